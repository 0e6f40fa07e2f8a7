"""`rung bench`: run an eval suite against candidate models, pick the smallest that passes.

With no arguments it runs the starter suite against SmolLM2-135M in fp32, int8 and int4 and Gemma 3
270M, and ends with the recommendation and the report's path.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rung.commands.base import Command, CommandError
from rung.commands.index import open_rag, rag_arguments
from rung.extras import require

EXIT_FAILED_CHECK = 1  # --check: the guarded model fails a requirement (even on the point estimate)
EXIT_PROVISIONAL = 2  # --check: it passes only on the point estimate (within noise), not reliably


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", nargs="?", default=None,
                   help="a .yaml or .jsonl eval suite (default: the built-in starter suite)")
    p.add_argument("-m", "--model", action="append", dest="models", metavar="SPEC", default=None,
                   help="candidate (repeatable): a model name, .gguf, HF folder, NAME@int4|int8|bf16|fp32, or "
                        "openai:URL#MODEL (default: the requirements file's candidates)")
    p.add_argument("-r", "--requirements", metavar="FILE", default=None,
                   help="the five questions as YAML: thresholds, context p95, languages/domains, where it runs, "
                        "governance (default with the starter suite: its example requirements)")
    p.add_argument("--check", nargs="?", const=True, default=None, metavar="MODEL",
                   help="CI guard on MODEL (default: the requirements' `chosen`, else the decision): exit 0 when it "
                        "passes reliably, 1 when it fails, 2 when it passes only on the point estimate (provisional); "
                        "with `chosen` and no -m, only that model runs")
    p.add_argument("--repeats", type=int, default=None, metavar="K",
                   help="run every case K times with distinct seeds at its temperature (overrides the suite's "
                        "`repeats:`): pass@k, pass^k and flaky cases, intervals over cases")
    p.add_argument("--out", default="rung-bench", metavar="DIR", help="where the HTML and JSON reports go (default rung-bench/)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="result cache (default ~/.cache/rung/bench)")
    p.add_argument("--no-cache", action="store_true", help="measure everything again (and cache nothing)")
    p.add_argument("--concurrency", type=int, default=4, metavar="N", help="requests in flight per candidate (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 for local candidates (default: the spec's)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split each local candidate over N processes: N GPUs (NCCL) or CPU processes (gloo)")
    p.add_argument("--price-per-hour", type=float, default=None, metavar="USD",
                   help="the price of the hardware local candidates run on (overrides the requirements)")
    p.add_argument("--in-process", action="store_true",
                   help="load local candidates in this process (faster start; peak memory is then process-wide)")
    rag_arguments(p)  # every case grounded in the index (default: the suite's `rag:`), cached apart from ungrounded runs
    p.add_argument("--redact", action="store_true",
                   help="run every candidate also as NAME+redact: prompts PII-redacted, answers restored before "
                        "scoring, side by side with the unredacted run (needs pip install 'rung[pii]')")
    p.add_argument("--verifier", default=None, metavar="SPEC",
                   help="score every answer as `rung serve --verifier` would (lexical, python:MODULE:FUNCTION or a "
                        "model) and report its effect on accuracy: caught wrong answers, rejected right ones")
    p.add_argument("--verify-threshold", type=float, default=0.5, help="answers scoring below it fail (default 0.5)")


def _bench(args: argparse.Namespace) -> int:
    require("bench", what="rung bench")
    from rich.console import Console

    import rung.bench as rb
    from rung.bench.cache import ResultCache
    from rung.bench.decide import RequirementsError
    from rung.bench.redaction import is_redacted
    from rung.bench.suite import SuiteError

    if args.concurrency < 1:
        raise CommandError("--concurrency must be at least 1")
    if args.tensor_parallel_size < 1:
        raise CommandError("--tensor-parallel-size must be at least 1")
    from rung.bench.suite import MAX_REPEATS

    if args.repeats is not None and not 1 <= args.repeats <= MAX_REPEATS:
        raise CommandError(f"--repeats must be between 1 and {MAX_REPEATS}, got {args.repeats}")
    if not 0.0 <= args.verify_threshold <= 1.0:
        raise CommandError(f"--verify-threshold must be in [0, 1], got {args.verify_threshold}")
    if args.verifier:
        from rung.govern.verify import fingerprint

        fingerprint(args.verifier)  # a python: verifier that cannot be imported is a usage error now
    try:
        suite = rb.load_suite(args.suite) if args.suite else rb.starter_suite()
        if args.requirements:
            requirements = rb.load_requirements(args.requirements)
        elif args.suite is None:
            requirements = rb.starter_requirements()
        else:
            requirements = rb.Requirements()
    except (SuiteError, RequirementsError) as e:
        raise CommandError(str(e)) from None
    if args.price_per_hour is not None:
        requirements.price_per_hour = args.price_per_hour

    guarded = args.check if isinstance(args.check, str) else requirements.chosen if args.check else None
    candidates = list(args.models or [])
    if not candidates:
        candidates = [guarded] if guarded else list(requirements.candidates)
    if guarded and guarded not in candidates:
        candidates.append(guarded)
    if not candidates:
        raise CommandError("no candidates: pass -m MODEL (repeatable) or list `candidates:` in the requirements file")
    candidates = _redacted_twins(candidates, requirements, args.redact)
    if any(is_redacted(spec) for spec in candidates):  # --redact, NAME+redact, or requirements that demand it
        require("pii", what="rung bench --redact")
    if guarded and guarded not in candidates:
        guarded += "+redact"  # the requirements demand redaction: --check guards the redacted run
    for spec in candidates:
        if spec.startswith("openai:"):
            from rung.bench.candidates import parse_endpoint
            from rung.bench.redaction import base_spec

            parse_endpoint(base_spec(spec))  # a malformed endpoint is a usage error before anything runs

    settings = rb.BenchSettings(concurrency=args.concurrency, seed=args.seed, device=args.device, dtype=args.dtype,
                                isolate=not args.in_process, rag=open_rag(args), rag_k=args.rag_k,
                                rag_max_chars=args.rag_max_chars, verifier=args.verifier,
                                verify_threshold=args.verify_threshold, repeats=args.repeats,
                                tensor_parallel_size=args.tensor_parallel_size)
    retrieval = settings.retrieval(suite)  # a suite's `rag:` index is opened (and checked) here
    cache = ResultCache(args.cache_dir, enabled=not args.no_cache)
    console = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(f"suite {suite.name} ({len(suite.cases)} cases, {suite.hash}) · {len(candidates)} candidate(s) · "
                  f"{settings.concurrency} in flight · cache {cache.directory if cache.enabled else 'off'}"
                  + (f" · grounded in {retrieval[0].path} ({retrieval[0].hash}, k={retrieval[1]})" if retrieval else ""))
    start = time.perf_counter()
    with _Progress(console) as progress:
        runs = rb.run_bench(candidates, suite, settings, cache, progress)
    if args.suite is None and not args.models:
        # the starter's quantized variants need rung's quantization: skip, with a note, any that cannot load
        for run in [r for r in runs if r.error and "@" in r.info.name]:
            console.print(f"[yellow]skipped {run.info.name}[/yellow]: {run.error}")
            runs.remove(run)
    result = rb.finish(suite, runs, requirements, settings, args.out, time.perf_counter() - start)

    from rung.bench.report import print_report

    print_report(result.report, console, {"report": result.paths["html"], "figures": result.paths["json"]})
    console.print(f"[dim]{time.perf_counter() - start:.0f} s[/dim]")
    if args.check:
        return _check(result, guarded, console)
    return 0


def _redacted_twins(candidates: list[str], requirements, redact: bool) -> list[str]:
    """With --redact, each candidate and its NAME+redact twin; when the requirements demand redaction,
    only the twins (an unredacted run could not pass). Prices and sizes given by name carry over."""
    from rung.bench.redaction import SUFFIX, is_redacted

    if not (redact or requirements.redaction):
        return candidates
    out = []
    for spec in candidates:
        if is_redacted(spec):
            out.append(spec)
            continue
        for table in (requirements.prices, requirements.params):
            if spec in table:
                table.setdefault(spec + SUFFIX, table[spec])
        if not requirements.redaction:
            out.append(spec)
        out.append(spec + SUFFIX)
    return list(dict.fromkeys(out))


def _check(result, guarded: str | None, console) -> int:
    """0: the guarded model (or, with no `chosen`, the decision) passes reliably; 1: it fails (or no
    candidate passes even on the point estimate); 2: it passes only on the point estimate."""
    decision = result.decision
    if guarded is None:
        if decision.chosen is None:
            console.print("[bold red]check failed[/bold red]: no candidate passes")
            return EXIT_FAILED_CHECK
        if decision.provisional:
            console.print(f"[bold yellow]check provisional[/bold yellow]: no candidate passes reliably; "
                          f"{decision.chosen} is only a provisional answer")
            return EXIT_PROVISIONAL
        console.print(f"[green]check passed[/green]: {decision.chosen} passes reliably")
        return 0
    verdict = decision.verdict(guarded)
    if verdict.reliable:
        console.print(f"[green]check passed[/green]: {guarded} still passes reliably")
        return 0
    if verdict.passed:
        console.print(f"[bold yellow]check provisional[/bold yellow]: {guarded} passes only on the point estimate: "
                      f"{'; '.join(verdict.within_noise)}")
        return EXIT_PROVISIONAL
    console.print(f"[bold red]check failed[/bold red]: {guarded} no longer passes: {'; '.join(verdict.reasons)}")
    return EXIT_FAILED_CHECK


class _Progress:
    """One rich progress bar per candidate while it runs (on a terminal); a line per candidate otherwise."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.live = console.is_terminal
        self.bar = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stage]}"), TimeElapsedColumn(), console=console,
                            disable=not self.live)
        self.task = None
        self.started = 0.0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def start(self, name: str, total: int) -> None:
        self.started = time.perf_counter()
        self.task = self.bar.add_task(name, total=total, stage="loading")

    def loading(self, done: int, total: int) -> None:
        pass  # the weights load in a moment for small models; the bar says "loading" meanwhile

    def advance(self, n: int = 1) -> None:
        self.bar.update(self.task, advance=n, stage="cases")

    def finish(self, run) -> None:
        passed = sum(c.passed for c in run.cases)  # first runs (with repeats, the report has the rest)
        if run.error:
            stage = "failed"
        elif run.cached:
            stage = f"{passed}/{len(run.cases)} passed (cached)"
        else:
            stage = f"{passed}/{len(run.cases)} passed"
        self.bar.update(self.task, stage=stage)
        if not self.live:
            took = time.perf_counter() - self.started
            error = f": {run.error}" if run.error else ""
            print(f"  {run.info.name}: {stage} in {took:.1f} s{error}", file=self.console.file, flush=True)


BENCH = Command("bench", "run an eval suite against candidate models and pick the smallest that passes", _arguments, _bench)
