"""`rung serve`: an OpenAI-compatible server (rung/serve) for one model or several.

The port opens at once and the models load behind it: /health and the API answer 503 until they
are ready, as vLLM's do, so an orchestrator can tell "starting" from "down". A model that fails to
load stops the server with a one-line error. ``-m A -m B`` serves both, routed by the request's
``model``; with --lazy a model loads on its first request, and with --memory-budget the least
recently used idle model is unloaded to make room (rung/serve/models.py).

On the CPU a GGUF file with Q4 blocks is served ``@int4`` (its blocks kept packed) unless its spec
or --dtype says otherwise; the startup line says which format each model runs in.
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading

from rung.commands.base import Command, CommandError
from rung.commands.index import open_rag, rag_arguments
from rung.extras import require

DEFAULT_MODEL = "smollm2-135m"


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _seconds(text: str) -> float:
    seconds = float(text)
    if not 0 < seconds < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return seconds


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", action="append", default=None,
                   help=f"built-in name, .gguf file or Hugging Face folder, optionally NAME@FORMAT (default "
                        f"{DEFAULT_MODEL}); repeat it to serve several models, routed by the request's `model`")
    p.add_argument("--served-model-name", action="append", default=None,
                   help="the name clients send as `model` (default: --model); repeat it, one per --model in order")
    p.add_argument("--lazy", action="store_true", help="load each model on its first request, not at start")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="bytes the loaded models may hold (weights and KV cache), e.g. 2GB, 512MB, 1GiB (KB/MB/GB "
                        "are powers of 10, KiB/MiB/GiB of 2): the least recently used idle model is unloaded "
                        "to make room for another")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or set RUNG_API_KEY)")
    p.add_argument("--dtype", default=None,
                   help="float32 (default; a Q4 GGUF on the CPU is served @int4 unless --dtype is given) or bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N processes on this host: N GPUs (NCCL), or CPU processes (gloo)")
    p.add_argument("--seed", type=int, default=0, help="seed of requests that give none")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=None, help="the most tokens a request may ask for")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests in flight; more get 429 (default 64)")
    p.add_argument("--request-timeout", type=_seconds, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--stream-interval", type=_positive, default=1, metavar="N",
                   help="stream N tokens a chunk (the first token alone): fewer chunks for the server and its "
                        "clients to handle under load, steps of N tokens for a reader (default 1)")
    p.add_argument("--max-request-bytes", type=int, default=8 * 2**20, help="bigger bodies get 413 (default 8 MiB)")
    p.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache size in MiB (default 512)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step (default 64)")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per engine step (default 512)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--speculative", choices=["ngram"], default=None, help="prompt-lookup speculative decoding")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-prompts", action="store_true",
                   help="put prompt text in the request log lines (and in traces, as gen_ai.prompt)")
    p.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                   help="export one OpenTelemetry trace per request over OTLP/HTTP (e.g. http://localhost:4318; "
                        "needs the otel extra)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (request lines are always logged)")
    rag_arguments(p)  # chat completions grounded in an index; replies carry rung.rag sources and citations
    r = p.add_argument_group("responses (POST /v1/responses with store: true, for previous_response_id)")
    r.add_argument("--responses-store-size", type=int, default=1000,
                   help="stored responses kept in memory at most; the oldest go first (default 1000)")
    r.add_argument("--responses-store-ttl", type=float, default=3600.0,
                   help="seconds a stored response is kept (default 3600)")
    r.add_argument("--responses-store-mb", type=int, default=256,
                   help="MiB of stored conversations at most (default 256)")
    g = p.add_argument_group("governance")
    g.add_argument("--policy", default=None, metavar="FILE",
                   help="tool-use policy (YAML/JSON): API keys by SHA-256, allowed/denied tools and arguments per key")
    g.add_argument("--verifier", default=None, metavar="SPEC",
                   help="score each answer before it is returned: lexical, python:MODULE:FUNCTION or a model spec")
    g.add_argument("--verify-threshold", type=float, default=0.5, help="answers scoring below it fail (default 0.5)")
    g.add_argument("--verify-action", choices=["refuse", "flag"], default="refuse",
                   help="refuse: replace a failed answer with a refusal (finish_reason content_filter); "
                        "flag: return it, marked (default refuse)")
    g.add_argument("--redact", action="store_true",
                   help="redact PII (names, places, e-mail, phone, cards, IBANs, IPs, SSNs) from every request "
                        "before the model sees it; replies are restored (needs pip install 'rung[pii]')")
    g.add_argument("--redact-entities", default=None, metavar="TYPES",
                   help="comma-separated Presidio entity types for --redact (default: the eight above)")


def _run(args: argparse.Namespace) -> int:
    import os

    require("serve", what="rung serve")
    from rung.serve import threads

    threads.apply()  # first: libgomp reads its spin count when torch loads (rung/serve/threads.py)
    if args.redact:
        require("pii", what="rung serve --redact")
    if args.otlp_traces_endpoint:
        require("otel", what="rung serve --otlp-traces-endpoint")
    import uvicorn

    from rung.serve import logs
    from rung.serve.app import create_app
    from rung.serve.models import Models, model_configs, parse_size
    from rung.serve.server import ServeConfig
    from rung.weights.resolve import resolve_model

    specs, formats = [], []
    for model in args.model or [DEFAULT_MODEL]:
        spec, fmt = _serving_spec(model, args.device, args.dtype)
        specs.append(spec)
        formats.append(fmt)
    try:
        budget = parse_size(args.memory_budget) if args.memory_budget is not None else None
    except ValueError as e:
        raise CommandError(f"--memory-budget: {e}") from None
    rag = open_rag(args)  # so does a missing, damaged or hostile --rag index
    for name in ("tensor_parallel_size", "max_concurrent", "max_num_seqs", "max_batch_tokens", "kv_cache_mb", "block_size",
                 "max_request_bytes", "responses_store_mb"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
    if args.responses_store_size < 0 or not args.responses_store_ttl > 0:
        raise CommandError("--responses-store-size must be at least 0 and --responses-store-ttl above 0")
    policy = None
    if args.policy:
        from rung.govern.policy import load_policy

        policy = load_policy(args.policy)  # a PolicyError (ValueError) is one line, before the port opens
    if not 0.0 <= args.verify_threshold <= 1.0:
        raise CommandError(f"--verify-threshold must be in [0, 1], got {args.verify_threshold}")
    if args.verifier and args.verifier != "lexical" and not args.verifier.startswith("python:"):
        resolve_model(args.verifier)
    elif args.verifier:
        from rung.govern.verify import load_verifier

        load_verifier(args.verifier)  # an import error is one line now, not a failed load later
    redact_entities = None
    if args.redact_entities is not None:
        if not args.redact:
            raise CommandError("--redact-entities goes with --redact")
        redact_entities = tuple(e.strip().upper() for e in args.redact_entities.split(",") if e.strip())
    if args.redact:
        from rung.govern.redact import PIIUnavailable, RedactionError, Redactor

        try:  # the analyzer is built now (cached for the server): a missing extra is one line, before the port opens
            Redactor(entities=redact_entities or Redactor.entities).load()
        except (PIIUnavailable, RedactionError) as e:
            raise CommandError(f"--redact: {e}") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    engine = dict(kv_cache_bytes=args.kv_cache_mb * 2**20, block_size=args.block_size, max_seqs=args.max_num_seqs,
                  max_batch_tokens=args.max_batch_tokens, prefix_caching=not args.no_prefix_caching)
    if args.speculative:
        engine["speculative"] = args.speculative
    config = ServeConfig(model=specs[0],
                         api_key=args.api_key or os.environ.get("RUNG_API_KEY") or None,
                         max_concurrent=args.max_concurrent, request_timeout=args.request_timeout,
                         stream_interval=args.stream_interval,
                         max_model_len=args.max_model_len, max_tokens=args.max_tokens,
                         max_request_bytes=args.max_request_bytes, log_prompts=args.log_prompts, dtype=args.dtype or "float32",
                         device=args.device, seed=args.seed, engine=engine, rag=rag,
                         tensor_parallel_size=args.tensor_parallel_size,
                         rag_k=args.rag_k or 4, rag_max_chars=args.rag_max_chars or 3000, policy=policy,
                         verifier=args.verifier, verify_threshold=args.verify_threshold,
                         verify_action=args.verify_action, redact=args.redact, redact_entities=redact_entities,
                         otlp_traces_endpoint=args.otlp_traces_endpoint,
                         responses_store_size=args.responses_store_size, responses_store_ttl=args.responses_store_ttl,
                         responses_store_bytes=args.responses_store_mb * 2**20)
    try:
        given = args.served_model_name or []
        if len(given) > len(specs):
            raise ValueError(f"{len(given)} --served-model-name for {len(specs)} --model")
        names = [given[i] if i < len(given) else m for i, m in enumerate(args.model or [DEFAULT_MODEL])]  # as written
        models = Models(model_configs(config, specs, names), lazy=args.lazy, memory_budget=budget)
    except ValueError as e:  # two models under one name, more names than models
        raise CommandError(str(e)) from None
    logs.setup()
    web = uvicorn.Server(uvicorn.Config(create_app(models, shutdown_with_app=True), host=args.host, port=args.port,
                                        log_level=args.log_level, access_log=False, timeout_graceful_shutdown=5))
    failed: list[tuple[str, BaseException]] = []
    described = ", ".join(f"{name} [{fmt}]" for name, fmt in zip(models.slots, formats))

    def load() -> None:
        failure = models.load_at_start()
        if failure is not None:
            failed.append(failure)
            web.should_exit = True
        else:
            # as vLLM does: what start-up built (modules, weights' wrappers, tokenizers) lives as long
            # as the server, so it leaves the collector's generations; the oldest generation's
            # collections then walk only what serving allocates, and pause the event loop less
            gc.collect()
            gc.freeze()
            lazy = " (loaded on first request)" if args.lazy else ""
            print(f"rung serve: {described}{lazy} ready on http://{args.host}:{args.port}/v1", file=sys.stderr,
                  flush=True)

    threading.Thread(target=load, name="rung-load", daemon=True).start()
    try:
        web.run()
    finally:
        models.shutdown()
    if failed:
        name, error = failed[0]
        raise CommandError(f"loading {models.slots[name].config.model} failed: {error}")
    return 0


def _serving_spec(model: str, device: str, dtype: str | None) -> tuple[str, str]:
    """(the spec to load, its format in words for the startup line). NAME@int4 serves NAME quantized,
    as `rung bench` measured it; a GGUF file with Q4 blocks is served @int4 on the CPU by default
    (float32 would unpack every block to four bytes a weight), unless the spec or --dtype names a format."""
    from rung.quant.spec import parse_spec
    from rung.weights.resolve import resolve_model

    try:
        spec = parse_spec(model)
    except ValueError as e:
        raise CommandError(str(e)) from None
    path = resolve_model(spec.model)  # an unknown name or path fails here, in one line, before the port opens
    if spec.dtype is not None or spec.weights is not None:
        return model, spec.format_name
    if dtype is None and device == "cpu" and _has_q4_blocks(path):
        return f"{model}@int4", "int4: the GGUF's Q4 blocks, default on the CPU"
    return model, dtype or "float32"


def _has_q4_blocks(path) -> bool:
    """Whether ``path`` is a GGUF file holding Q4 blocks (Q4_0, Q4_1, Q4_K)."""
    if not str(path).endswith(".gguf") or not path.is_file():
        return False
    from rung.weights.gguf import read_gguf

    with read_gguf(path) as f:
        return any(kind.name.startswith("Q4") for _, kind in f.tensors.values())


SERVE = Command("serve", "serve a model over an OpenAI-compatible HTTP API", _arguments, _run)
