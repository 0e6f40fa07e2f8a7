"""rung bench: run your own eval suite against candidate models and pick the smallest that passes.

    from rung.bench import bench, load_suite, load_requirements
    result = bench(load_suite("suite.yaml"), ["smollm2-135m@int4", "openai:http://localhost:8000/v1#m"],
                   load_requirements("requirements.yaml"), out_dir="rung-bench")
    print(result.decision.summary, result.paths["html"])

Modules: suite (files, hashing), scorers (checks), candidates (local / endpoint), worker (a local
model in its own process), run (generate, score, cache), measure (figures), stats (intervals, paired
tests, power), decide (requirements → choice), cache, report and plots (terminal, HTML, JSON).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rung.bench.cache import ResultCache
from rung.bench.decide import Decision, Requirements, decide, deploy, load_requirements, requirements_from_dict
from rung.bench.measure import Metrics, summarize
from rung.bench.records import CandidateRun
from rung.bench.run import BenchSettings, run_bench
from rung.bench.suite import Suite, SuiteError, load_suite, suite_from_dict

STARTER = Path(__file__).parent / "starter"


def starter_suite() -> Suite:
    return load_suite(STARTER / "suite.yaml")


def starter_requirements() -> Requirements:
    return load_requirements(STARTER / "requirements.yaml")


@dataclass
class BenchResult:
    runs: list[CandidateRun]
    metrics: list[Metrics]
    decision: Decision
    report: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def bench(suite: Suite, candidates: list, requirements: Requirements | None = None,
          settings: BenchSettings | None = None, cache: ResultCache | None = None, out_dir: str | Path | None = None,
          progress=None) -> BenchResult:
    """Run, measure, decide, and (with ``out_dir``) write ``<suite>.html`` and ``<suite>.json``."""
    requirements = requirements or Requirements()
    settings = settings or BenchSettings()
    start = time.perf_counter()
    runs = run_bench(candidates, suite, settings, cache, progress)
    return finish(suite, runs, requirements, settings, out_dir, time.perf_counter() - start)


def finish(suite: Suite, runs: list[CandidateRun], requirements: Requirements, settings: BenchSettings,
           out_dir: str | Path | None = None, wall_s: float | None = None) -> BenchResult:
    """Figures, decision and reports from finished runs."""
    from rung.bench.report import build_report, write_html, write_json

    pricing = requirements.pricing()
    metrics = [summarize(r, pricing, requirements.confidence) for r in runs]
    tags = {tag: suite.tag_values(tag) for tag in ("language", "domain")}
    decision = decide(metrics, runs, requirements, tags)
    key = settings.key(suite)
    report = build_report(suite, runs, metrics, decision, requirements, key, wall_s,
                          deploy(decision, runs, requirements, key))
    paths: dict[str, Path] = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in suite.name) or "bench"
        paths = {"html": out / f"{stem}.html", "json": out / f"{stem}.json"}
        write_html(report, paths["html"])
        write_json(report, paths["json"])
    return BenchResult(runs, metrics, decision, report, paths)


__all__ = ["BenchResult", "BenchSettings", "Decision", "Requirements", "ResultCache", "Suite", "SuiteError", "bench",
           "decide", "finish", "load_requirements", "load_suite", "requirements_from_dict", "run_bench",
           "starter_requirements", "starter_suite", "suite_from_dict", "summarize"]
