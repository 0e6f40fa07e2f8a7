"""Load test of `rung serve`: many concurrent streaming clients on localhost for a bounded time.

    python benchmarks/serve_load.py                      # 64 clients, 60 s, starts its own server
    python benchmarks/serve_load.py --clients 8 --seconds 5
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY   # an existing server
    python benchmarks/serve_load.py --redact             # server with --redact --log-prompts, PII in the mix

Every client loops over a mix of requests (short chats, a long prompt, n=2, a JSON schema answer, a
forced tool call, a text completion), each streamed through the openai client with usage in the
last chunk. A request must either complete whole (every chunk well formed, one finish per choice,
usage that adds up, JSON that validates, a tool call that parses) or be refused with 429 (then the
client waits the Retry-After and goes on); anything else counts as lost or garbled, and the exit
status is 1. With --redact the mix also sends messages full of PII (``PII_MESSAGES``) to a server
started with --redact --log-prompts, and none of their values may appear in the server's log. Afterwards the server must return to idle: no running or waiting sequences, every KV
block free, resident memory back near its level after warm-up.

Only 127.0.0.1 is ever contacted; every loop is bounded in time. Reports requests/s, tokens/s and
p50/p95 of time to first token and of latency.

    python benchmarks/serve_load.py --compare            # rung serve beside the engine alone
    python benchmarks/serve_load.py --peer               # ... and beside llama.cpp's server, in one run
    python benchmarks/serve_load.py --compare --levels 1,4 --requests 2 --max-tokens 8   # a quick smoke

--compare (and --peer, which implies it) measures serving overhead instead: at each level of
clients (1, 4, 16, 64) every client sends --requests greedy streamed chats in turn (the same prompts,
all of at most 256 tokens), to rung serve and, with --peer, to llama-cpp-python's OpenAI server
(``pip install 'llama-cpp-python[server]'``, part of the ``bench`` extra) started on the same GGUF
file; the engine alone (``LLM.generate``, rung's own batching, no HTTP) runs the same prompts in
rounds of as many prompts as there are clients. It prints tokens/s and TTFT p50/p95 of each, and
the ratios rung serve / engine and rung serve / llama.cpp. The engine alone runs with the OpenMP
spin count rung serve sets for itself (rung/serve/threads.py); llama.cpp's server with the
environment as given (it uses libgomp too, with its default spin). Each of the three first runs one round
at the largest level with a few tokens, unmeasured: the first touch of the KV cache and the
prefill buffers costs seconds on a VM, which would otherwise land in the first level measured.
llama-cpp-python's server runs with --interrupt_requests False: by default a new request cuts the
stream being generated short (it ends with [DONE] and no finish reason), so under concurrent
clients it would report the tokens of cut streams; a stream without a finish reason is an error.

The --compare clients are raw by default: HTTP/1.1 keep-alive on asyncio streams and one
json.loads per SSE line, ~0.06 ms of CPU a streamed chunk. The load generator shares the machine's
cores with the server under test, and the official openai client (--client openai) spends ~0.25 ms
a chunk building pydantic objects: at 16 clients on 2 cores that alone took ~10% from the server.

The engine alone and rung serve stay up for the whole run and take turns at each level (which one
goes first alternates by round): on a shared machine whose speed swings over minutes, a ratio is
only sound between runs close in time. --rounds N repeats that N times, with llama.cpp's server
after each round, and prints each figure's median with its range; serve / engine is the median of
the ratios of each level's pair.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LONG = ("The history of computing is a story of abstraction layered on abstraction. " * 24).strip()
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
    "additionalProperties": False}}}
# planted PII (valid card, IBAN, SSN) and the values that must never reach a log line under --redact
PII_VALUES = ["Maria Garcia", "maria.garcia@example.com", "+1 415-555-2671", "4111 1111 1111 1111",
              "DE89 3704 0044 0532 0130 00", "123-45-6789", "203.0.113.42", "James Wilson", "Berlin"]
PII_MESSAGES = [
    "Hi, I am Maria Garcia (maria.garcia@example.com, +1 415-555-2671). Repeat my e-mail address.",
    "Charge card 4111 1111 1111 1111 and refund to DE89 3704 0044 0532 0130 00. What did I ask?",
    "My SSN is 123-45-6789 and my server is 203.0.113.42. Summarise in one line.",
    "James Wilson from Berlin wants a reply to maria.garcia@example.com. Write it.",
]
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?", "Say hello in Spanish.",
             "Give me a tip for writing tests.", "What is 12 times 7?"]


@dataclass
class Report:
    completed: int = 0
    refused: int = 0
    lost: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _request(kind: str, model: str, rng: random.Random) -> tuple[str, dict]:
    """(endpoint, keyword arguments) of one request of the mix."""
    max_tokens = rng.randint(8, 40)
    chat = {"model": model, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    if kind == "short":
        return "chat", {**chat, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
                        "temperature": rng.choice([0.0, 0.8])}
    if kind == "long":
        return "chat", {**chat, "messages": [{"role": "user", "content": LONG + "\nSummarise this."}]}
    if kind == "n2":
        return "chat", {**chat, "n": 2, "temperature": 1.0, "seed": rng.randint(0, 1000),
                        "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}
    if kind == "json":
        return "chat", {**chat, "max_tokens": 60, "temperature": 0.7,
                        "messages": [{"role": "user", "content": "Describe a person as JSON."}],
                        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}
    if kind == "pii":
        return "chat", {**chat, "messages": [{"role": "user", "content": rng.choice(PII_MESSAGES)}], "temperature": 0,
                        "user": "maria.garcia@example.com"}
    if kind == "tool":
        return "chat", {**chat, "max_tokens": 60, "tools": [TOOL], "tool_choice": "required", "temperature": 0,
                        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}]}
    return "completion", {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True,
                          "stream_options": {"include_usage": True}, "temperature": 0.5}


KINDS = ["short", "short", "short", "long", "n2", "json", "tool", "completion"]


def _check(kind: str, endpoint: str, args: dict, chunks: list) -> int:
    """Raise AssertionError if the streamed reply is not whole and well formed; return its tokens."""
    import jsonschema

    assert chunks, "no chunk"
    assert len({c.id for c in chunks}) == 1, "chunk ids differ"
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == [], "no usage in the last chunk"
    n = args.get("n", 1)
    finishes: dict[int, str] = {}
    texts: dict[int, str] = {}
    calls: dict[int, list] = {}
    for c in chunks[:-1]:
        assert c.usage is None, "usage before the last chunk"
        for choice in c.choices:
            if endpoint == "chat":
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
                calls.setdefault(choice.index, []).extend(choice.delta.tool_calls or [])
            else:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                assert choice.index not in finishes, "two finish reasons for one choice"
                finishes[choice.index] = choice.finish_reason
    assert sorted(finishes) == list(range(n)), f"finish reasons for {sorted(finishes)}, expected {n} choices"
    assert 1 <= usage.completion_tokens <= n * args["max_tokens"], f"usage {usage}"
    for i, t in texts.items():  # U+FFFD only where max_tokens cut a character in two
        assert "\ufffd" not in (t[:-1] if finishes[i] == "length" else t), "broken characters"
    if kind == "json" and finishes[0] == "stop":
        jsonschema.validate(json.loads(texts[0]), SCHEMA)
    if kind == "tool":
        assert finishes[0] == "tool_calls" and calls[0], f"no tool call ({finishes[0]})"
        assert calls[0][0].function.name == "get_weather"
        json.loads("".join(d.function.arguments or "" for d in calls[0]))
    return usage.completion_tokens


async def run_load(base_url: str, api_key: str, model: str, clients: int, seconds: float, seed: int = 0,
                   pii: bool = False) -> Report:
    """``pii``: every client's first request and about a quarter of the rest carry PII_MESSAGES (for a
    server run with --redact)."""
    import openai

    kinds = KINDS + ["pii"] * (len(KINDS) // 3) if pii else KINDS

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=seconds + 120)
    report = Report()
    start = time.perf_counter()
    deadline = start + seconds

    async def one_client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        sent_any = False
        while time.perf_counter() < deadline:
            kind = rng.choice(kinds) if sent_any or not pii else "pii"
            sent_any = True
            endpoint, args = _request(kind, model, rng)
            sent = time.perf_counter()
            first = None
            try:
                create = client.chat.completions.create if endpoint == "chat" else client.completions.create
                stream = await create(**args)
                chunks = []
                async for chunk in stream:
                    if first is None and chunk.choices:
                        c = chunk.choices[0]
                        text = (c.delta.content or c.delta.tool_calls) if endpoint == "chat" else c.text
                        if text:
                            first = time.perf_counter()
                    chunks.append(chunk)
                report.tokens += _check(kind, endpoint, args, chunks)
                report.completed += 1
                report.kinds[kind] = report.kinds.get(kind, 0) + 1
                report.latency.append(time.perf_counter() - sent)
                if first is not None:
                    report.ttft.append(first - sent)
            except openai.RateLimitError as e:
                report.refused += 1
                wait = float(e.response.headers.get("retry-after", "1")) * rng.uniform(1.0, 2.0)  # with jitter
                await asyncio.sleep(min(wait, max(0.0, deadline - time.perf_counter())))
            except Exception as e:  # lost or garbled: recorded, never hidden
                report.lost.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    report.seconds = time.perf_counter() - start
    await client.close()
    return report


# ---- the server side ------------------------------------------------------------------------------------


def http_get(url: str, api_key: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def gauge(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})?\s+(\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")


def idle_state(base_url: str) -> dict:
    text = http_get(base_url + "/metrics")[1]
    return {k: gauge(text, f"rung:{k}") for k in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                                                  "num_requests_in_flight")}


def wait_idle(base_url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    state = idle_state(base_url)
    while time.monotonic() < deadline and any(v != 0 for v in state.values()):
        time.sleep(0.2)
        state = idle_state(base_url)
    return state


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str, command: list[str], port: int, ready_path: str, log_path: Path, env: dict | None = None):
    """Start ``command`` (a server on ``port``) with its output in ``log_path``; (process, base URL)
    once GET ``ready_path`` answers 200, within 300 s."""
    log = open(log_path, "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if http_get(base + ready_path)[0] == 200:
                return proc, base
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{name} did not answer {ready_path} in 300 s")


def died(proc: subprocess.Popen) -> str:
    """Why a server process is gone ("" while it runs), with the one cause seen here spelled out."""
    try:
        code = proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return ""
    if code == -signal.SIGILL:  # llama.cpp built with -march=native on a VM that lists AMX but traps it
        return ("it died of SIGILL (an instruction this CPU refuses: for llama-cpp-python on a VM that lists "
                "AMX, rebuild it with -DGGML_NATIVE=OFF and the instruction sets named: docs/install.md); ")
    return f"it exited {code}; "


def start_server(model: str, api_key: str, max_concurrent: int, threads: int | None, log_path: Path,
                 extra: list[str] = ()):
    port = free_port()
    command = [sys.executable, "-m", "rung", "serve", "-m", model, "--port", str(port), "--api-key", api_key,
               "--max-concurrent", str(max_concurrent)]
    if threads:
        command += ["--threads", str(threads)]
    return launch("rung serve", command + list(extra), port, "/health", log_path)


def leaked_pii(log_text: str) -> list[str]:
    """The PII_VALUES that appear in a server log (with --redact: none may)."""
    return [v for v in PII_VALUES if v in log_text]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summary(report: Report) -> str:
    rows = [
        ("requests completed", f"{report.completed}"),
        ("refused with 429", f"{report.refused}"),
        ("lost or garbled", f"{len(report.lost)}"),
        ("requests/s", f"{report.completed / report.seconds:.2f}"),
        ("generated tokens/s", f"{report.tokens / report.seconds:.1f}"),
        ("TTFT p50 / p95 (s)", f"{pct(report.ttft, 50):.3f} / {pct(report.ttft, 95):.3f}"),
        ("latency p50 / p95 (s)", f"{pct(report.latency, 50):.3f} / {pct(report.latency, 95):.3f}"),
        ("mix", ", ".join(f"{k} {v}" for k, v in sorted(report.kinds.items()))),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---- serving overhead: rung serve beside the engine alone and llama.cpp's server (--compare, --peer) -----

PEER_MISSING = ("serve_load: --peer needs llama-cpp-python's OpenAI server, which is not installed: "
                "pip install 'llama-cpp-python[server]' (or 'rung[bench]'; it compiles llama.cpp, minutes)")


@dataclass
class Level:
    """One server (or the engine) at one number of clients."""

    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


# the long prompt of --compare: 244 tokens with SmolLM2's template (the issue's TTFT target is for ≤ 256)
LONG_COMPARE = ("The history of computing is a story of abstraction layered on abstraction. " * 16).strip()


def compare_messages(count: int) -> list[list[dict]]:
    """``count`` chats cycling over the questions and the long passage (each prompt ≤ 256 tokens)."""
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts.append([{"role": "user", "content": LONG_COMPARE + "\nSummarise this."}])
    return [prompts[i % len(prompts)] for i in range(count)]


async def run_clients(base_url: str, api_key: str, model: str, clients: int, requests: int, max_tokens: int,
                      client: str = "openai") -> Level:
    """``clients`` clients, each sending ``requests`` greedy streamed chats in turn; tokens from the
    usage chunk where the server sends one, else one per streamed piece of content. ``client``:
    "openai" (the official client, which builds a pydantic object per chunk: ~0.3 ms of this
    machine's CPU a token) or "raw" (httpx and json.loads on each SSE line: the server's cost with
    less of the load generator's beside it on a 2-core machine)."""
    level = Level()
    prompts = compare_messages(clients * requests)
    stream_one = _openai_stream if client == "openai" else _raw_stream
    session = _session(client, base_url, api_key)

    async def one_client(i: int) -> None:
        for messages in prompts[i::clients]:  # round r: prompt r·clients + i, as run_engine's rounds
            sent = time.perf_counter()
            first, pieces, completion, finish = await stream_one(session, model, messages, max_tokens)
            if finish is None:  # cut short (llama-cpp-python interrupts a stream when another request comes)
                raise RuntimeError(f"{base_url}: a stream ended without a finish reason after {pieces} pieces")
            level.tokens += completion if completion is not None else pieces
            if first is not None:
                level.ttft.append(first - sent)

    start = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    level.seconds = time.perf_counter() - start
    await (session.close() if client == "openai" else session.aclose())
    return level


def _session(client: str, base_url: str, api_key: str):
    if client == "openai":
        import openai

        return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    return RawSession(base_url, api_key)


class RawSession:
    """HTTP/1.1 keep-alive connections on asyncio streams, one per client at a time: the least a
    load generator can spend on each streamed chunk (a chunk-size line, a JSON line), so that on a
    2-core machine what is measured is the server, not its client (httpx costs ~0.15 ms of CPU a
    chunk here, the openai client ~0.25)."""

    def __init__(self, base_url: str, api_key: str):
        host, _, port = base_url.removeprefix("http://").partition(":")
        self.host, self.port, self.api_key = host, int(port or 80), api_key
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post_lines(self, path: str, body: dict):
        """POST ``body``; yields the response's SSE ``data:`` payloads (bytes) as they arrive."""
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        try:
            payload = json.dumps(body).encode()
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {self.api_key}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                         + payload)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split()[1])
            headers = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
            if status != 200 or headers.get("transfer-encoding") != "chunked":
                raw = await reader.readexactly(int(headers.get("content-length", 0)))
                raise RuntimeError(f"HTTP {status}: {raw[:300]!r}")
            pending = b""
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                pending += data[:-2].replace(b"\r\n", b"\n")  # sse-starlette (llama.cpp's server) ends lines in CRLF
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: "):
                        yield event[6:]
        except BaseException:  # an error, or the caller stopped reading: this connection is not reusable
            writer.close()
            raise
        self.idle.append((reader, writer))

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def _openai_stream(session, model: str, messages: list, max_tokens: int):
    """(time of the first content piece, pieces, usage.completion_tokens or None, finish reason)."""
    first, pieces, usage, finish = None, 0, None, None
    stream = await session.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                   temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            first = first or time.perf_counter()
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        usage = chunk.usage or usage
    return first, pieces, usage.completion_tokens if usage else None, finish


async def _raw_stream(session: RawSession, model: str, messages: list, max_tokens: int):
    """``_openai_stream``'s result from the SSE lines themselves."""
    first, pieces, completion, finish = None, 0, None, None
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async for line in session.post_lines("/v1/chat/completions", body):
        if line == b"[DONE]":
            continue
        chunk = json.loads(line)
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            pieces += 1
            first = first or time.perf_counter()
        if choices and choices[0].get("finish_reason"):
            finish = choices[0]["finish_reason"]
        if chunk.get("usage"):
            completion = chunk["usage"]["completion_tokens"]
    return first, pieces, completion, finish


def run_engine(llm, clients: int, requests: int, max_tokens: int) -> Level:
    """The same prompts through ``LLM.generate``, ``clients`` at a time, ``requests`` rounds."""
    from rung.engine.sampling_params import SamplingParams

    level = Level()
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    start = time.perf_counter()
    messages = compare_messages(clients * requests)
    for r in range(requests):
        prompts = [llm.encode_chat(m)[1] for m in messages[r * clients:(r + 1) * clients]]
        for out in llm.generate(prompts, params):
            level.tokens += len(out.outputs[0].token_ids)
            level.ttft.append(out.metrics.time_to_first_token)
    level.seconds = time.perf_counter() - start
    return level


def peer_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        import llama_cpp.server.app  # noqa: F401  (the server extra: fastapi, sse-starlette, pydantic-settings)
    except ImportError:
        return False
    return True


def start_peer(gguf: Path, threads: int | None, context: int, log_path: Path, env: dict | None = None):
    """llama-cpp-python's OpenAI server on ``gguf``, on a free loopback port: (process, base URL)."""
    port = free_port()
    # --interrupt_requests False: by default a new request cuts the stream being generated short
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "peer",
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context),
               "--interrupt_requests", "False"]
    if threads:
        command += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    return launch("llama.cpp's server", command, port, "/v1/models", log_path, env)


def compare(args) -> int:
    """rung serve and the engine alone in turns at each level of clients, then (--peer) llama.cpp's
    server; --rounds times."""
    from rung.commands.serve import _serving_spec
    from rung.weights.resolve import resolve_model

    levels = [int(n) for n in args.levels.split(",")]
    gguf = resolve_model(args.model.rpartition("@")[0] if "@int" in args.model else args.model)
    if args.peer and gguf.suffix != ".gguf":
        raise SystemExit(f"serve_load: --peer needs a GGUF file; {args.model} is {gguf}")
    spec, fmt = _serving_spec(args.model, "cpu", None)  # what rung serve will run: the engine alone runs it too
    print(f"serving overhead: {args.model} as {spec} ({fmt}), {args.requests} greedy chats per client, "
          f"max_tokens {args.max_tokens}, levels {levels}, {args.rounds} round(s), {args.client} client, "
          f"rung serve --stream-interval {args.stream_interval}", flush=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    names = ["engine", "rung serve"] + (["llama.cpp server"] if args.peer else [])
    results: dict[str, dict[int, list[Level]]] = {name: {n: [] for n in levels} for name in names}
    # the engine alone and rung serve stay up for the whole run and take turns at each level (the
    # first of the pair alternating by round): this VM's speed swings over minutes, and a ratio is
    # only sound between two runs close in time. llama.cpp's server (minutes a level) comes after.
    with engine_alone(spec, levels, args) as engine, serving("rung serve", gguf, levels, args) as serve:
        pair = [("engine", engine), ("rung serve", serve)]
        for r in range(args.rounds):
            for n in levels:
                for name, run in pair if r % 2 == 0 else pair[::-1]:
                    results[name][n].append(progress(name, n, run(n)))
            if args.peer:
                with serving("llama.cpp server", gguf, levels, args) as peer:
                    for n in levels:
                        results["llama.cpp server"][n].append(progress("llama.cpp server", n, peer(n)))
    print(compare_table(results, levels))
    return 0


def progress(name: str, clients: int, level: Level) -> Level:
    print(f"{time.strftime('%H:%M:%S')} {name:<16} {clients:>3} clients  {level.tokens_per_s:7.1f} tok/s  TTFT p50 "
          f"{pct(level.ttft, 50):.3f} p95 {pct(level.ttft, 95):.3f} s", flush=True)
    return level


@contextlib.contextmanager
def engine_alone(spec: str, levels: list[int], args):
    """``run(clients) -> Level``: the prompts through ``LLM.generate`` in this process."""
    from rung.llm import LLM

    llm = LLM(spec, max_seqs=max(levels), max_batch_tokens=max(512, 256 * max(levels)))
    try:
        run_engine(llm, max(levels), 1, 4)  # warm-up: the largest batch touches the cache and buffers once
        yield lambda n: run_engine(llm, n, args.requests, args.max_tokens)
    finally:
        llm.shutdown()


@contextlib.contextmanager
def serving(name: str, gguf: Path, levels: list[int], args):
    """``run(clients) -> Level`` against rung serve or llama.cpp's server, started for the block."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    if name == "rung serve":
        log_path = tmp / f"rung-serve-compare-{os.getpid()}.log"
        proc, base = start_server(args.model, args.api_key, max(levels), args.threads, log_path,
                                  ["--max-num-seqs", str(max(levels)), "--stream-interval", str(args.stream_interval)])
        model = args.model
    else:
        log_path = tmp / f"llama-cpp-server-{os.getpid()}.log"
        proc, base = start_peer(gguf, args.threads, 4096, log_path, getattr(args, "peer_env", None))
        model = "peer"
    def run(clients: int, requests: int, max_tokens: int) -> Level:
        try:
            return asyncio.run(run_clients(base, args.api_key, model, clients, requests, max_tokens, args.client))
        except (OSError, asyncio.IncompleteReadError) as e:  # this server went away mid-response
            raise SystemExit(f"serve_load: {name} broke off a response ({type(e).__name__}); "
                             f"{died(proc)}its log: {log_path}") from None

    try:
        run(max(levels), 1, 4)  # warm-up
        yield lambda n: run(n, args.requests, args.max_tokens)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def spread(values: list[float], digits: int = 1) -> str:
    """The median of ``values``, and their range when there are several: "229.4 (201.3–240.0)"."""
    values = [v for v in values if v == v]  # NaN (no TTFT) left out
    if not values:
        return "nan"
    mid = f"{statistics.median(values):.{digits}f}"
    return mid if len(values) == 1 else f"{mid} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def compare_table(results: dict[str, dict[int, list[Level]]], levels: list[int]) -> str:
    """One row per level and measured party: tokens/s, TTFT p50 / p95, and for rung serve the
    ratios to the engine alone and to llama.cpp's server, each taken within a round (median, range)."""
    rows = [("clients", "", "tokens/s", "TTFT p50 (s)", "TTFT p95 (s)", "serve / engine", "serve / llama.cpp")]
    for n in levels:
        serve = [r.tokens_per_s for r in results["rung serve"][n]]
        for name, by_level in results.items():
            runs = by_level.get(n)
            if not runs:
                continue
            ratios = ("", "")
            if name == "rung serve":
                peer = results.get("llama.cpp server", {}).get(n)
                ratios = (spread([s / e.tokens_per_s for s, e in zip(serve, results["engine"][n])], 2),
                          spread([s / p.tokens_per_s for s, p in zip(serve, peer)], 2) if peer else "")
            rows.append((str(n), name, spread([r.tokens_per_s for r in runs]),
                         spread([pct(r.ttft, 50) for r in runs], 3), spread([pct(r.ttft, 95) for r in runs], 3),
                         *ratios))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="an already running server (default: start one)")
    p.add_argument("--api-key", default="load-test-key")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-concurrent", type=int, default=32, help="the started server's limit (clients above it see 429)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redact", action="store_true",
                   help="start the server with --redact --log-prompts, add PII messages to the mix, and fail if any "
                        "of their values reaches the server's log")
    p.add_argument("--compare", action="store_true",
                   help="serving overhead: rung serve beside the engine alone (LLM.generate) at each of --levels")
    p.add_argument("--peer", action="store_true",
                   help="--compare, and llama.cpp's OpenAI server (llama-cpp-python[server]) on the same GGUF too")
    p.add_argument("--levels", default="1,4,16,64", help="numbers of clients for --compare (default 1,4,16,64)")
    p.add_argument("--requests", type=int, default=4, help="chats per client per level in --compare (default 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each chat in --compare (default 64)")
    p.add_argument("--client", choices=("openai", "raw"), default="raw",
                   help="--compare: the load generator's client: raw HTTP/1.1 on asyncio streams + json.loads per "
                        "SSE line (default: ~0.06 ms of CPU a chunk, on the cores the server under test also uses) "
                        "or the official openai client (~0.25 ms a chunk: pydantic objects)")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="--compare: rung serve's --stream-interval (tokens a streamed chunk carries; default 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="--compare: this many rounds of the engine and rung serve in turns at each level "
                        "(then llama.cpp's server), printing medians and ranges (default 1)")
    args = p.parse_args(argv)
    if args.peer or args.compare:
        from rung.serve import threads

        # the engine alone runs with the OpenMP spin count rung serve sets for itself (rung/serve/threads.py),
        # set before anything loads libgomp (llama_cpp, imported by peer_available, does: one runtime per
        # process); llama.cpp's server, as it ships, gets the environment as given
        args.peer_env = dict(os.environ)
        threads.apply()
    if args.peer and not peer_available():
        raise SystemExit(PEER_MISSING)
    if args.peer or args.compare:
        return compare(args)
    if args.url and not re.match(r"^https?://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?$", args.url):
        raise SystemExit("serve_load: --url must be a loopback address (127.0.0.1, localhost, [::1])")

    proc, log_path = None, Path(os.environ.get("TMPDIR", "/tmp")) / f"rung-serve-load-{os.getpid()}.log"
    if args.url:
        base = args.url.rstrip("/")
    else:
        extra = ["--redact", "--log-prompts"] if args.redact else []
        proc, base = start_server(args.model, args.api_key, args.max_concurrent, args.threads, log_path, extra)
    try:
        # warm-up: a few requests of each kind, so memory is measured after the first allocations
        asyncio.run(run_load(base, args.api_key, args.model, clients=4, seconds=3, seed=args.seed + 99,
                             pii=args.redact))
        wait_idle(base)
        rss_idle = rss_mb(proc.pid) if proc else float("nan")
        print(f"load: {args.clients} streaming clients for {args.seconds:g} s against {base} "
              f"(server --max-concurrent {args.max_concurrent if proc else '?'})", flush=True)
        report = asyncio.run(run_load(base, args.api_key, args.model, args.clients, args.seconds, args.seed,
                                      pii=args.redact))
        rss_peak = rss_mb(proc.pid) if proc else float("nan")
        state = wait_idle(base)
        rss_after = rss_mb(proc.pid) if proc else float("nan")
        print(summary(report))
        print(f"{'after the run':<21}  " + ", ".join(f"{k} {v:g}" for k, v in state.items()))
        print(f"{'server RSS (MiB)':<21}  idle {rss_idle:.0f}, under load {rss_peak:.0f}, after {rss_after:.0f}")
        for line in report.lost[:10]:
            print("  lost:", line)
        ok = not report.lost and all(v == 0 for v in state.values()) and report.completed > 0
        if args.redact and proc:
            leaked = leaked_pii(log_path.read_text())
            print(f"{'PII in the server log':<21}  {', '.join(leaked) or 'none'} ({report.kinds.get('pii', 0)} PII requests)")
            ok = ok and not leaked
        if proc and rss_after > rss_idle * 1.25 + 64:
            print("server memory did not return near its idle level")
            ok = False
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        if proc:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
