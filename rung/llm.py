"""The offline API, in the style of vLLM: ``LLM(model).generate(prompts, SamplingParams(...))``
and ``LLM.chat(messages)``, with streaming variants.

Every call runs on the engine (rung/engine): prompts given together are batched, n > 1 samples
share the prompt's blocks, and a stream that is dropped cancels its request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from rung.engine.engine import Delta
from rung.engine.sampling_params import SamplingParams

Message = dict[str, Any]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) | "length" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: chosen (and top) token → logprob
    cumulative_logprob: float | None = None
    error: str | None = None  # finish_reason "error": why this sample failed (the other prompts' went on)


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
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served (vLLM's name)


# one step of a streamed completion: new text (never a broken character, never part of a stop
# string), its tokens, and the finish reason on a sample's last delta; the engine's own type
StreamDelta = Delta


class LLM:
    """A model and its tokenizer, ready to generate.

    ``model``: a built-in name (``smollm2-135m``, ``gemma3-270m``), a .gguf file or a Hugging Face
    folder, optionally with a format: ``smollm2-135m@int4`` (rung/quant/spec.py). Nothing is downloaded. ``engine_options`` go to EngineConfig (kv_cache_bytes,
    block_size, max_batch_tokens, max_seqs, preempt, prefix_caching).

    ``tensor_parallel_size``: split the model over that many processes on this host (vLLM's name;
    rung/distributed/): this process is rank 0 and schedules and samples, ranks 1..N-1 are worker
    processes, NCCL between GPUs (one per rank) and gloo on the CPU. ``shutdown()`` stops them.
    """

    def __init__(self, model: str | Path, dtype: str = "float32", device: str = "cpu", tokenizer: str | Path | None = None,
                 seed: int = 0, max_model_len: int | None = None, progress=None, tensor_parallel_size: int = 1,
                 **engine_options):
        from rung.quant.spec import parse_spec
        from rung.weights.loader import load_model
        from rung.weights.resolve import resolve_model

        self.spec = parse_spec(str(model))
        self.path = resolve_model(self.spec.model)
        if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
        self.tensor_parallel_size, self.tp_group = tensor_parallel_size, None
        if tensor_parallel_size > 1:
            from rung.distributed.workers import TensorParallelGroup

            # the workers follow rank 0 step by step: no native whole-step decode, no graphs, no swap
            engine_options = {**engine_options, "cpu_decode": False, "cuda_graphs": False, "overlap": False,
                              "preempt": "recompute"}
            self.tp_group, self.model = TensorParallelGroup.start(str(model), tensor_parallel_size, dtype, device)
        else:
            self.model = load_model(str(model), dtype=dtype, device=device, progress=progress, fast=True)
        self.device = torch.device(device)
        self.config = self.model.config
        self.tokenizer = _tokenizer_for(resolve_model(tokenizer) if tokenizer else self.path)
        self.max_model_len = max_model_len or self.config.max_position_embeddings or 2048
        self._seed, self._engine_options, self._engine = seed, engine_options, None

    # ---- prompts ------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_kwargs) -> str:
        return self._chat_template().render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                            **template_kwargs)

    def _chat_template(self):
        from rung.text.chat import chat_template_for

        # gpt-oss speaks harmony whatever template its folder ships; others use their own template
        return chat_template_for("gpt_oss" if self.config.model_type == "gpt_oss" else self.tokenizer)

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **template_kwargs) -> tuple[str, list[int]]:
        """The rendered chat and its token ids; special tokens come from the template only, a user's
        `<|im_start|>` is text (rung.text.chat.encode_chat)."""
        from rung.text.chat import encode_chat

        return encode_chat(self.tokenizer, self._chat_template(), messages, add_generation_prompt, tools,
                           **template_kwargs)

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
        return self._run_all([(self.encode_prompt(p), sp, p) for p, sp in zip(prompts, params)])

    def chat(self, messages: list[Message] | list[list[Message]], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} messages) or several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        requests = []
        for conversation in conversations:
            text, ids = self.encode_chat(conversation, add_generation_prompt, tools, **(chat_template_kwargs or {}))
            requests.append((ids, sampling_params or SamplingParams(), text))
        return self._run_all(requests)

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        yield from self._stream(self.encode_prompt(prompt), sampling_params or SamplingParams())

    def chat_stream(self, messages: list[Message], sampling_params: SamplingParams | None = None,
                    tools: list[dict] | None = None, chat_template_kwargs: dict | None = None) -> Iterator[StreamDelta]:
        _, ids = self.encode_chat(messages, True, tools, **(chat_template_kwargs or {}))
        yield from self._stream(ids, sampling_params or SamplingParams())

    def _complete(self, prompt: str | list[int], params: SamplingParams, chat: bool = False) -> RequestOutput:
        return self._run_all([(self.encode_prompt(prompt, chat=chat), params, prompt)])[0]

    def _run_all(self, requests: list[tuple[list[int], SamplingParams, str | list[int]]]) -> list[RequestOutput]:
        """Submit every request to the engine at once (they are batched), step until all finish."""
        engine = self.engine
        outputs: dict[str, RequestOutput] = {}
        start = time.perf_counter()
        order = []
        try:
            for ids, params, prompt in requests:
                rid = engine.add_request(ids, params)
                order.append(rid)
                samples = [CompletionOutput(i, "", [], None, logprobs=[] if params.logprobs is not None else None)
                           for i in range(params.n)]
                outputs[rid] = RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids, samples,
                                             metrics=RequestMetrics(prompt_tokens=len(ids)))
            while engine.has_unfinished():
                for d in engine.step():
                    out = outputs.get(d.request_id)
                    if out is not None:
                        _apply(out, d, start)
        except BaseException:
            for rid in order:
                engine.abort(rid)
            raise
        now = time.perf_counter()
        for out in outputs.values():
            out.metrics.total_time = now - start
            out.metrics.generated_tokens = sum(len(s.token_ids) for s in out.outputs)
            for s in out.outputs:
                if s.logprobs:
                    s.cumulative_logprob = sum(lp[t] for lp, t in zip(s.logprobs, s.token_ids) if t in lp)
        return [outputs[rid] for rid in order]

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StreamDelta]:
        engine = self.engine
        rid = engine.add_request(prompt_ids, params)
        pending = params.n
        try:
            while pending:
                for d in engine.step():
                    if d.request_id != rid:
                        continue
                    pending -= d.finish_reason is not None
                    yield d
        finally:
            if pending:  # the caller stopped reading: cancel, free the blocks
                engine.abort(rid)

    @property
    def engine(self):
        if self._engine is None:
            from rung.engine.engine import Engine, EngineConfig

            engine = Engine(self.model, self.tokenizer, EngineConfig(**self._engine_options),
                            seed=self._seed, max_model_len=self.max_model_len)
            if self.tp_group is not None:
                engine.runner = self.tp_group.driver(engine.runner, engine.pool)
            self._engine = engine
        return self._engine

    def reset_prefix_cache(self) -> None:
        """Forget the cached prompt blocks (vLLM's ``LLM.reset_prefix_cache``): timing a prompt
        twice, the second run computes it whole again."""
        self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (a one-process LLM has nothing to stop)."""
        if self.tp_group is not None:
            self.tp_group.shutdown()
            self.tp_group = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _apply(out: RequestOutput, d, start: float) -> None:
    s = out.outputs[d.index]
    if not out.metrics.time_to_first_token and d.token_ids:
        out.metrics.time_to_first_token = time.perf_counter() - start
    s.text += d.text
    s.token_ids += d.token_ids
    if d.logprobs is not None:
        s.logprobs += d.logprobs
    if d.finish_reason:
        s.finish_reason, s.stop_reason, s.error = d.finish_reason, d.stop_reason, d.error
    if d.num_cached_tokens is not None:  # one prompt, whatever its samples
        out.num_cached_tokens = max(out.num_cached_tokens, d.num_cached_tokens)

def _tokenizer_for(path: Path):
    """The tokenizer of a Hugging Face folder, or the one a GGUF file carries in its metadata."""
    from rung.text import load_tokenizer

    if path.is_file():  # resolve_model only lets GGUF files through
        from rung.weights.gguf import read_gguf

        with read_gguf(path) as gguf:
            return load_tokenizer(gguf.metadata)
    return load_tokenizer(path)
