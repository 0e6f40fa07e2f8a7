"""Candidates: the models a suite runs against, local or behind an OpenAI-compatible endpoint.

  smollm2-135m, path/to/model.gguf, path/to/hf-folder, smollm2-135m@int4
      a rung model spec, loaded with ``rung.LLM`` and driven through its engine
  openai:http://localhost:8000/v1#MODEL
      any OpenAI-compatible server (vLLM, Ollama, llama.cpp, ``rung serve``, a hosted API) through the
      official ``openai`` client, streaming, so time to first token is measured the same way; the API
      key comes from $OPENAI_API_KEY (or "EMPTY" for local servers)

Both run a list of ``Request`` with up to ``concurrency`` in flight (a closed loop, like vLLM's
benchmark_serving --max-concurrency): each request's times run from its own submission.
"""

from __future__ import annotations

import json
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

from rung.bench.records import CandidateInfo, Sample
from rung.extras import require

ENDPOINT_PREFIX = "openai:"


@dataclass
class Request:
    case_id: str
    messages: list[dict]
    max_tokens: int
    temperature: float = 0.0
    n: int = 1
    seed: int = 0
    tools: list[dict] | None = None
    stop: list[str] | None = None


def case_seed(case_id: str, seed: int) -> int:
    """A per-case seed, stable across runs and machines (not Python's salted hash)."""
    return (zlib.crc32(case_id.encode()) + seed) % 2**31


OnDone = Callable[[int, list[Sample]], None]  # (request index, its samples)


def is_endpoint(spec: str) -> bool:
    return spec.startswith(ENDPOINT_PREFIX)


def parse_endpoint(spec: str) -> tuple[str, str]:
    """``openai:URL#model`` → (URL, model); a one-line ValueError if malformed."""
    rest = spec[len(ENDPOINT_PREFIX):]
    url, sep, model = rest.rpartition("#")
    if not sep or not url or not model:
        raise ValueError(f"{spec}: an endpoint candidate is openai:URL#MODEL, e.g. openai:http://localhost:8000/v1#qwen3-8b")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"{spec}: {url!r} is not an http(s) URL")
    return url, model


def open_candidate(spec: str, **options):
    return EndpointCandidate(spec, **options) if is_endpoint(spec) else LocalCandidate(spec, **options)


def strip_thinking(text: str) -> str:
    """The answer without Qwen3-style <think>…</think> reasoning (an unclosed one is all reasoning)."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    return re.sub(r"<think>.*", "", text, flags=re.DOTALL).strip() if "<think>" in text else text.strip()


# ---- local models --------------------------------------------------------------------------------


TOOL_SYSTEM = ("You can call these functions:\n<tools>\n{tools}\n</tools>\n"
               "To call one, reply with only <tool_call>{{\"name\": NAME, \"arguments\": {{...}}}}</tool_call>.")


class LocalCandidate:
    """A rung model spec in this process, run on its engine."""

    kind = "local"

    def __init__(self, spec: str, device: str = "cpu", dtype: str | None = None, kv_cache_bytes: int | None = None,
                 progress=None, tensor_parallel_size: int = 1):
        self.name, self.device, self.dtype = spec, device, dtype
        self.tensor_parallel_size = tensor_parallel_size
        self.kv_cache_bytes, self.progress = kv_cache_bytes, progress
        self.llm = None
        self.info: CandidateInfo | None = None

    def fingerprint(self) -> dict:
        """What identifies the weights: the resolved file or folder, its size and modification time."""
        from rung.weights.resolve import resolve_model

        base = self.name.split("@", 1)[0]
        try:
            path = resolve_model(base)
        except (OSError, ValueError):
            return {"spec": self.name}
        stat = path.stat()
        return {"spec": self.name, "path": str(path), "size": stat.st_size, "mtime": int(stat.st_mtime)}

    def open(self) -> CandidateInfo:
        import torch

        from rung.llm import LLM

        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = memory_now(cuda)
        start = time.perf_counter()
        options = {"dtype": self.dtype} if self.dtype else {}
        if self.kv_cache_bytes:
            options["kv_cache_bytes"] = self.kv_cache_bytes
        if self.tensor_parallel_size > 1:  # rank 0 here, the other ranks in their own processes
            options["tensor_parallel_size"] = self.tensor_parallel_size
        self.llm = LLM(self.name, device=self.device, progress=self.progress, **options)
        self._before = before
        self.info = describe_local(self.name, self.llm, time.perf_counter() - start, self.device)
        # loading can need more than serving (a checkpoint expanded, then packed): the load's peak is
        # kept apart, and the serving peak starts from here
        self.info.load_peak_bytes = peak_memory(cuda)
        reset_peak_memory(cuda)
        return self.info

    def generate(self, requests: list[Request], concurrency: int, on_done: OnDone | None = None) -> float:
        """Run every request, ``concurrency`` at a time; returns the wall time."""
        from rung.engine.engine import RequestError
        from rung.engine.sampling_params import SamplingParams

        llm = self.llm
        if llm._engine is None and not self.kv_cache_bytes:
            # LLM builds its engine on first use: size the KV pool to this workload, not the 512 MiB
            # default, or the engine would touch (and RSS count) blocks the suite never needed
            llm._engine_options["kv_cache_bytes"] = self._pool_bytes(requests, concurrency)
        engine = llm.engine
        harmony = llm.config.model_type == "gpt_oss"
        pending = list(enumerate(requests))[::-1]
        live: dict[str, dict] = {}
        start = time.perf_counter()

        def submit():
            while pending and len(live) < concurrency:
                index, req = pending.pop()
                try:
                    ids = encode_case(llm, req.messages, req.tools)
                    params = SamplingParams(n=req.n, temperature=req.temperature, max_tokens=req.max_tokens,
                                            seed=req.seed, stop=req.stop, skip_special_tokens=not harmony)
                    rid = engine.add_request(ids, params)
                except (RequestError, ValueError) as e:
                    if on_done:
                        on_done(index, [Sample(error=str(e)) for _ in range(req.n)])
                    continue
                now = time.perf_counter()
                live[rid] = {"index": index, "start": now, "prompt": len(ids), "req": req, "left": req.n,
                             "samples": [Sample(prompt_tokens=len(ids)) for _ in range(req.n)], "tokens": [[] for _ in range(req.n)]}

        submit()
        try:
            while live:
                for d in engine.step():
                    state = live.get(d.request_id)
                    if state is None:
                        continue
                    s = state["samples"][d.index]
                    now = time.perf_counter()
                    if d.token_ids and s.ttft_s is None:
                        s.ttft_s = now - state["start"]
                    s.text += d.text
                    state["tokens"][d.index] += d.token_ids
                    if d.finish_reason:
                        s.finish_reason, s.latency_s = d.finish_reason, now - state["start"]
                        s.output_tokens = len(state["tokens"][d.index])
                        state["left"] -= 1
                        if harmony:
                            _harmony_answer(s)
                        else:
                            s.text = strip_thinking(s.text)
                    if state["left"] == 0:
                        del live[d.request_id]
                        if on_done:
                            on_done(state["index"], state["samples"])
                submit()
        except BaseException:
            for rid in live:
                engine.abort(rid)
            raise
        return time.perf_counter() - start

    def _pool_bytes(self, requests: list[Request], concurrency: int) -> int:
        """KV for the ``concurrency`` longest requests (prompt + max_tokens, n samples), 1.5× headroom."""
        llm = self.llm
        tokens = sorted(((len(encode_case(llm, r.messages, r.tools)) + r.max_tokens + 16) * r.n
                         for r in requests), reverse=True)
        need = sum(tokens[:max(1, concurrency)]) * self.info.kv_bytes_per_token * 1.5
        return int(max(need, 8 * 2**20))

    def perplexity(self, text: str) -> tuple[float | None, str]:
        import math

        import torch

        llm = self.llm
        ids = llm.tokenizer.encode(text, add_special_tokens=True)
        if len(ids) < 2:
            return None, "text is under two tokens"
        window = min(llm.max_model_len, 2048)
        nll, count = 0.0, 0
        with torch.inference_mode():
            # windows that do not overlap: every token but the first of each window is scored once
            for begin in range(0, len(ids) - 1, window):
                chunk = torch.tensor([ids[begin:begin + window + 1]], device=llm.device)
                logits = llm.model(chunk[:, :-1]).float()  # [1, seq, vocab]
                loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
                nll, count = nll + loss.item(), count + chunk.shape[1] - 1
        return math.exp(nll / count), ""

    def measure_memory(self) -> None:
        """Peak memory while serving the suite, into ``info`` (call after generating)."""
        cuda = self.device.startswith("cuda")
        peak = peak_memory(cuda)
        self.info.peak_memory_bytes = peak
        self.info.model_memory_bytes = max(0, peak - self._before) if peak else None

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
        self.llm = None


def encode_case(llm, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """A case's prompt ids through the model's chat template, as `rung serve` encodes a chat: special
    tokens come from the template only (a case's `<|im_start|>` is text). Tools the template ignores
    are described in the system prompt instead."""
    if tools and llm.apply_chat_template(messages, tools=tools) == llm.apply_chat_template(messages):
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        note = TOOL_SYSTEM.format(tools=listing)
        messages = [dict(m) for m in messages]
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{note}"
        else:
            messages.insert(0, {"role": "system", "content": note})
        tools = None
    return llm.encode_chat(messages, tools=tools or None)[1]


def _harmony_answer(s: Sample) -> None:
    from rung.text.harmony import parse_harmony, to_chat_message

    message = to_chat_message(parse_harmony(s.text))
    s.text = message.get("content") or ""
    calls = []
    for call in message.get("tool_calls") or []:
        try:
            arguments = json.loads(call["function"]["arguments"] or "{}")
        except json.JSONDecodeError:
            arguments = {}
        calls.append({"name": call["function"]["name"], "arguments": arguments})
    s.tool_calls = calls or None


def describe_local(spec: str, llm, load_s: float, device: str) -> CandidateInfo:
    from rung.describe import describe, kv_cache_bytes

    config = llm.config
    seen, weight_bytes = set(), 0
    for t in list(llm.model.parameters()) + list(llm.model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())  # tied weights count once
        if key not in seen:
            seen.add(key)
            weight_bytes += t.numel() * t.element_size()
    d = describe(config)
    kv_width = model_dtype(llm.model).itemsize  # the engine keeps KV at the model's dtype
    return CandidateInfo(
        name=spec, kind="local", model_type=config.model_type, total_params=d.total_params,
        weight_bytes=weight_bytes, max_context=config.max_position_embeddings,
        kv_bytes_per_token=kv_cache_bytes(config, 1, bytes_per_value=kv_width), license=_license(llm.path),
        device=device, load_s=round(load_s, 3))


def model_dtype(model):
    """The dtype the engine keeps KV at: the model's first parameter's, as Engine reads it."""
    import torch

    first = next(iter(model.parameters()), None)
    return first.dtype if first is not None else torch.float32


def _license(path: Path) -> str | None:
    try:
        if path.is_file():
            from rung.weights.gguf import read_gguf

            with read_gguf(path) as gguf:
                value = gguf.metadata.get("general.license")
                return str(value) if value else None
        readme = path / "README.md"
        if readme.is_file():  # the Hugging Face model card's front matter
            m = re.search(r"^license:\s*(\S+)", readme.read_text(encoding="utf-8", errors="replace")[:4000], re.M)
            return m.group(1) if m else None
    except (OSError, ValueError):
        return None
    return None


def memory_now(cuda: bool = False) -> int:
    if cuda:
        import torch

        return torch.cuda.memory_allocated()
    return _proc_status("VmRSS") or 0


def peak_memory(cuda: bool = False) -> int | None:
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated()
    peak = _proc_status("VmHWM")
    if peak is None:  # not Linux: getrusage's peak (bytes on macOS)
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rss if sys.platform == "darwin" else rss * 1024
    return peak


def reset_peak_memory(cuda: bool = False) -> bool:
    """Start a new peak from the current usage; False where the OS cannot (then peaks include loading)."""
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux ≥ 4.0: resets VmHWM to VmRSS
        return True
    except OSError:
        return False


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


# ---- OpenAI-compatible endpoints -----------------------------------------------------------------


@dataclass
class EndpointCandidate:
    """A model behind an OpenAI-compatible server."""

    name: str
    api_key: str | None = None
    timeout_s: float = 120.0
    progress: object = None
    kind: str = field(default="endpoint", init=False)

    def __post_init__(self):
        self.url, self.model = parse_endpoint(self.name)
        self.client = None
        self.info: CandidateInfo | None = None
        self._stream_usage = True

    def fingerprint(self) -> dict:
        return {"spec": self.name}

    def open(self) -> CandidateInfo:
        require("bench", "openai", what="rung.bench")  # an endpoint candidate; local ones need no client
        import openai

        self.client = openai.OpenAI(base_url=self.url, api_key=self.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                                    timeout=self.timeout_s, max_retries=1)
        info = CandidateInfo(name=self.name, kind="endpoint", host=urlparse(self.url).hostname)
        known = _preset_for(self.model)
        if known is not None:  # the served model is a preset: its size is known without asking
            info.model_type, info.total_params, info.max_context = known
        self.info = info
        return info

    def generate(self, requests: list[Request], concurrency: int, on_done: OnDone | None = None) -> float:
        from concurrent.futures import ThreadPoolExecutor

        start = time.perf_counter()

        def one(index: int) -> tuple[int, list[Sample]]:
            req = requests[index]
            # n requests rather than the API's n: not every server implements it, and each sample
            # then has its own time to first token
            return index, [self._complete(req, req.seed + k) for k in range(req.n)]

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            for index, samples in pool.map(one, range(len(requests))):
                if on_done:
                    on_done(index, samples)
        return time.perf_counter() - start

    def _complete(self, req: Request, seed: int) -> Sample:
        import openai

        kwargs = dict(model=self.model, messages=req.messages, max_tokens=req.max_tokens, temperature=req.temperature,
                      seed=seed, stream=True)
        if req.tools:
            kwargs["tools"] = req.tools
        if req.stop:
            kwargs["stop"] = req.stop
        if self._stream_usage:
            kwargs["stream_options"] = {"include_usage": True}
        sample = Sample()
        start = time.perf_counter()
        text, calls, chunks = [], {}, 0
        try:
            try:
                stream = self.client.chat.completions.create(**kwargs)
            except openai.BadRequestError as e:
                if "stream_options" not in str(e):
                    raise
                self._stream_usage = False  # an older server: count chunks instead
                kwargs.pop("stream_options")
                stream = self.client.chat.completions.create(**kwargs)
            for chunk in stream:
                if chunk.usage:
                    sample.prompt_tokens = chunk.usage.prompt_tokens or 0
                    sample.output_tokens = chunk.usage.completion_tokens or 0
                for choice in chunk.choices or []:
                    delta = choice.delta
                    got = bool(delta and (delta.content or delta.tool_calls))
                    if got and sample.ttft_s is None:
                        sample.ttft_s = time.perf_counter() - start
                    if delta and delta.content:
                        text.append(delta.content)
                        chunks += 1
                    for tc in (delta.tool_calls or []) if delta else []:
                        slot = calls.setdefault(tc.index or 0, {"name": "", "arguments": ""})
                        if tc.function and tc.function.name:
                            slot["name"] += tc.function.name
                        if tc.function and tc.function.arguments:
                            slot["arguments"] += tc.function.arguments
                        chunks += 1
                    if choice.finish_reason:
                        sample.finish_reason = choice.finish_reason
        except openai.OpenAIError as e:
            sample.error = _one_line(e)
        sample.latency_s = time.perf_counter() - start
        sample.text = strip_thinking("".join(text))
        if not sample.output_tokens:
            sample.output_tokens = chunks  # servers stream about one token per chunk
        if calls:
            parsed = []
            for slot in calls.values():
                try:
                    arguments = json.loads(slot["arguments"] or "{}")
                except json.JSONDecodeError:
                    arguments = {"_unparsed": slot["arguments"]}
                parsed.append({"name": slot["name"], "arguments": arguments})
            sample.tool_calls = parsed
        return sample

    def perplexity(self, text: str) -> tuple[float | None, str]:
        """From /v1/completions with echo and logprobs (vLLM, llama.cpp); else unsupported."""
        import math

        import openai

        try:
            out = self.client.completions.create(model=self.model, prompt=text, max_tokens=1, echo=True, logprobs=0,
                                                 temperature=0)
            choice = out.choices[0]
            logprobs = list(choice.logprobs.token_logprobs) if choice.logprobs else []
            n_prompt = out.usage.prompt_tokens if out.usage else len(logprobs) - 1
            scored = [lp for lp in logprobs[1:n_prompt] if lp is not None]
        except (openai.OpenAIError, AttributeError, TypeError, IndexError) as e:
            return None, f"the endpoint returns no prompt logprobs (completions with echo): {_one_line(e)}"
        if not scored:
            return None, "the endpoint returned no prompt logprobs (completions with echo)"
        return math.exp(-sum(scored) / len(scored)), ""

    def measure_memory(self) -> None:
        pass  # not ours to measure

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _preset_for(model: str) -> tuple[str, int, int | None] | None:
    from rung.config import ModelConfig, preset_names
    from rung.describe import total_params

    base = model.split("@", 1)[0].lower()
    if base not in preset_names():
        return None
    config = ModelConfig.from_preset(base)
    return config.model_type, total_params(config), config.max_position_embeddings


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def requests_for(cases: Iterable, seed: int, repeat: int = 0) -> list[Request]:
    """One request per generating case; run ``repeat`` of a case (`repeats: k`) gets a seed of its own,
    so a repeat at the case's temperature is a new sample."""
    return [Request(case_id=c.id, messages=c.chat_messages(), max_tokens=c.max_tokens, temperature=c.temperature,
                    n=c.samples, seed=case_seed(c.id if repeat == 0 else f"{c.id}#repeat{repeat}", seed),
                    tools=[dict(t) for t in c.tools] if c.tools else None,
                    stop=list(c.stop) or None)
            for c in cases if c.generates]
