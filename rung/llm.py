"""The offline API, in the style of vLLM: ``LLM(model).generate(prompts, SamplingParams(...))``
and ``LLM.chat(messages)``, with streaming variants.

This is the plain implementation over the decoder's contiguous KV cache, one sequence at a time;
the engine (paged cache, continuous batching) replaces what runs underneath, not this surface.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from rung.engine.sampler import sample
from rung.engine.sampling_params import SamplingParams
from rung.engine.stops import StopStrings

Message = dict[str, Any]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) | "length"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: chosen (and top) token → logprob
    cumulative_logprob: float | None = None


@dataclass
class RequestMetrics:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds, prefill plus the first sampled token
    total_time: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decode_time = self.total_time - self.time_to_first_token
        steps = self.generated_tokens - 1
        return steps / decode_time if steps > 0 and decode_time > 0 else 0.0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: RequestMetrics = field(default_factory=RequestMetrics)


@dataclass
class StreamDelta:
    """One step of a streamed completion: new text (never a broken character, never part of a
    stop string), the tokens behind it, and the finish reason on the last delta of a sample."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None


class LLM:
    """A model and its tokenizer, ready to generate.

    ``model``: a built-in name (``smollm2-135m``, ``gemma3-270m``), a .gguf file or a Hugging Face
    folder. Nothing is downloaded.
    """

    def __init__(self, model: str | Path, dtype: str = "float32", device: str = "cpu", tokenizer: str | Path | None = None,
                 seed: int = 0, max_model_len: int | None = None):
        from rung.weights.loader import load_model
        from rung.weights.resolve import resolve_model

        self.path = resolve_model(model)
        self.model = load_model(self.path, dtype=dtype, device=device)
        self.device = torch.device(device)
        self.config = self.model.config
        self.tokenizer = _tokenizer_for(resolve_model(tokenizer) if tokenizer else self.path)
        self.max_model_len = max_model_len or self.config.max_position_embeddings or 2048
        self._rng = torch.Generator().manual_seed(seed)

    # ---- prompts ------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_kwargs) -> str:
        from rung.text.chat import chat_template_for

        # gpt-oss speaks harmony whatever template its folder ships; others use their own template
        template = chat_template_for("gpt_oss" if self.config.model_type == "gpt_oss" else self.tokenizer)
        return template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs)

    def encode_prompt(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            # a rendered chat template already holds its BOS text; plain prompts get what the model expects
            return self.tokenizer.encode(prompt, add_special_tokens=not chat)
        if not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {self.config.vocab_size})")
        return list(prompt)

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt (text or token ids). One SamplingParams for all, or one each."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        return [self._complete(p, sp) for p, sp in zip(prompts, params)]

    def chat(self, messages: list[Message] | list[list[Message]], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} messages) or several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        outputs = []
        for conversation in conversations:
            text = self.apply_chat_template(conversation, add_generation_prompt, tools, **(chat_template_kwargs or {}))
            outputs.append(self._complete(text, sampling_params or SamplingParams(), chat=True))
        return outputs

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        yield from self._stream(self.encode_prompt(prompt), sampling_params or SamplingParams())

    def chat_stream(self, messages: list[Message], sampling_params: SamplingParams | None = None,
                    tools: list[dict] | None = None, chat_template_kwargs: dict | None = None) -> Iterator[StreamDelta]:
        text = self.apply_chat_template(messages, True, tools, **(chat_template_kwargs or {}))
        yield from self._stream(self.encode_prompt(text, chat=True), sampling_params or SamplingParams())

    def _complete(self, prompt: str | list[int], params: SamplingParams, chat: bool = False) -> RequestOutput:
        ids = self.encode_prompt(prompt, chat=chat)
        metrics = RequestMetrics(prompt_tokens=len(ids))
        samples = [CompletionOutput(i, "", [], None, logprobs=[] if params.logprobs is not None else None)
                   for i in range(params.n)]
        start = time.perf_counter()
        for delta in self._stream(ids, params):
            out = samples[delta.index]
            if not metrics.time_to_first_token and delta.token_ids:
                metrics.time_to_first_token = time.perf_counter() - start
            out.text += delta.text
            out.token_ids += delta.token_ids
            if delta.logprobs is not None:
                out.logprobs += delta.logprobs
            if delta.finish_reason:
                out.finish_reason, out.stop_reason = delta.finish_reason, delta.stop_reason
        metrics.total_time = time.perf_counter() - start
        metrics.generated_tokens = sum(len(s.token_ids) for s in samples)
        for s in samples:
            if s.logprobs:
                s.cumulative_logprob = sum(lp[t] for lp, t in zip(s.logprobs, s.token_ids) if t in lp)
        return RequestOutput(uuid.uuid4().hex, prompt if isinstance(prompt, str) else None, ids, samples, metrics=metrics)

    @torch.inference_mode()
    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StreamDelta]:
        from rung.text.detok import IncrementalDetokenizer

        if not prompt_ids:
            raise ValueError("the prompt is empty")
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the model's context of "
                             f"{self.max_model_len} tokens")
        max_new = min(params.max_tokens or room, room)
        eos = set() if params.ignore_eos else set(self.tokenizer.eos_token_ids)
        stop_ids = eos | set(params.stop_token_ids)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else self._rng

        prompt = torch.tensor([prompt_ids], device=self.device)
        prefilled = self.model.new_cache()
        first_logits = self.model.logits(self.model.hidden_states(prompt, prefilled)[:, -1])[0]

        for index in range(params.n):
            cache = prefilled.fork()
            logits = first_logits
            detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            stops = StopStrings(params.stop, params.include_stop_str_in_output)
            output: list[int] = []
            while True:
                banned = list(eos) if len(output) < params.min_tokens else []
                s = sample(logits, params, generator, prompt_ids, output, banned)
                output.append(s.token)
                logprobs = None
                if params.logprobs is not None:
                    logprobs = [{s.token: s.logprob, **(s.top_logprobs or {})}]
                if s.token in stop_ids:
                    tail = stops.push(detok.flush()) + stops.flush()
                    yield StreamDelta(index, tail, [s.token], "stop", s.token, logprobs)
                    break
                text = stops.push(detok.push(s.token))
                if stops.stopped:
                    yield StreamDelta(index, text, [s.token], "stop", stops.hit, logprobs)
                    break
                if len(output) >= max_new:
                    text += stops.push(detok.flush()) + stops.flush()
                    yield StreamDelta(index, text, [s.token], "length", None, logprobs)
                    break
                yield StreamDelta(index, text, [s.token], None, None, logprobs)
                step = torch.tensor([[s.token]], device=self.device)
                logits = self.model(step, cache)[0, -1]



def _tokenizer_for(path: Path):
    """The tokenizer of a Hugging Face folder, or the one a GGUF file carries in its metadata."""
    from rung.text import load_tokenizer

    if path.suffix == ".gguf":
        from rung.weights.gguf import read_gguf

        with read_gguf(path) as gguf:
            return load_tokenizer(gguf.metadata)
    return load_tokenizer(path)
