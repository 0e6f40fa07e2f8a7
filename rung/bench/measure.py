"""The figures of one candidate's run: accuracy per check, schema fidelity, latency, throughput,
memory, prompt lengths and cost.

Latency is per request from its own submission, with ``concurrency`` requests in flight. Decode
tokens/s is the median over requests of (output tokens − 1) / (end − first token): what a user
watching a stream sees. Throughput is all output tokens over the run's wall time: what the hardware
delivers at that concurrency, and what cost per token follows from:

    cost per 1K output tokens = price per hour / 3600 / throughput × 1000        (local hardware)
    cost per 1K output tokens = price per 1M output tokens / 1000                (a priced endpoint)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rung.bench.records import CandidateRun


def wilson_interval(passed: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a pass rate: with a few dozen cases, a 10-point gap between
    two candidates is often noise, and the report says so."""
    if n == 0:
        return None
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Pricing:
    price_per_hour: float | None = None  # the hardware local candidates run on
    per_candidate: dict[str, dict[str, float]] = field(default_factory=dict)  # name → price_per_hour | price_per_1m_output_tokens

    def cost_per_1k(self, name: str, kind: str, throughput: float | None) -> tuple[float | None, str]:
        own = self.per_candidate.get(name, {})
        if "price_per_1m_output_tokens" in own:
            return own["price_per_1m_output_tokens"] / 1000, f"${own['price_per_1m_output_tokens']:g} per 1M output tokens"
        hourly = own.get("price_per_hour", self.price_per_hour if kind == "local" else None)
        if hourly is None:
            return None, "no price given"
        if not throughput:
            return None, "no throughput measured"
        return hourly / 3600 / throughput * 1000, f"${hourly:g}/hour at {throughput:.1f} output tokens/s"


@dataclass
class Metrics:
    name: str
    kind: str
    error: str | None
    cached: bool
    cases: int
    passed: int
    accuracy: float | None  # passed / scored cases (unsupported ones are left out)
    accuracy_ci: tuple[float, float] | None  # its 95% Wilson interval
    unsupported: int
    by_check: dict[str, float]  # check type → pass rate
    by_tag: dict[str, float]  # "language=en" → case pass rate
    schema_fidelity: float | None  # json checks whose answer validated against its schema
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    e2e_p50_ms: float | None
    e2e_p95_ms: float | None
    decode_tokens_per_s: float | None
    throughput_tokens_per_s: float | None
    output_tokens: int
    prompt_tokens_p50: float | None
    prompt_tokens_p95: float | None
    peak_memory_bytes: int | None  # while serving the suite
    model_memory_bytes: int | None
    load_peak_bytes: int | None
    total_params: int | None
    weight_bytes: int | None
    max_context: int | None
    cost_per_1k_output_tokens: float | None
    cost_basis: str
    concurrency: int | None
    perplexity: float | None  # mean over perplexity cases
    verifier: dict | None = None  # --verifier's effect on accuracy (rung/bench/verification.py)
    ttft_ms: list[float] = field(default_factory=list)  # every sample, for the distributions
    e2e_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(run: CandidateRun, pricing: Pricing | None = None) -> Metrics:
    pricing = pricing or Pricing()
    scored = [c for c in run.cases if not c.unsupported]
    by_check: dict[str, list[bool]] = {}
    schema: list[bool] = []
    perplexities = []
    for case in run.cases:
        for check in case.checks:
            if check.unsupported:
                continue
            by_check.setdefault(check.type, []).append(check.passed)
            if check.schema_valid is not None:
                schema.append(check.schema_valid)
            if check.type == "perplexity":
                perplexities.append(check.score)
    by_tag: dict[str, list[bool]] = {}
    for case in scored:
        for tag, value in case.tags.items():
            by_tag.setdefault(f"{tag}={value}", []).append(case.passed)

    samples = [s for c in run.cases for s in c.samples if not s.error]
    ttft = [s.ttft_s * 1000 for s in samples if s.ttft_s is not None]
    e2e = [s.latency_s * 1000 for s in samples]
    decode = [r for r in (s.decode_tokens_per_s for s in samples) if r]
    # one prompt per case (its samples share it)
    prompts = [c.samples[0].prompt_tokens for c in run.cases if c.samples and c.samples[0].prompt_tokens]
    output_tokens = sum(s.output_tokens for s in samples)
    throughput = output_tokens / run.wall_s if run.wall_s > 0 and output_tokens else None
    cost, basis = pricing.cost_per_1k(run.info.name, run.info.kind, throughput)
    passed = sum(c.passed for c in scored)

    def rate(xs: list[bool]) -> float:
        return sum(xs) / len(xs)

    return Metrics(
        name=run.info.name, kind=run.info.kind, error=run.error, cached=run.cached, cases=len(run.cases),
        passed=passed, accuracy=passed / len(scored) if scored else None, accuracy_ci=wilson_interval(passed, len(scored)),
        unsupported=len(run.cases) - len(scored),
        by_check={k: rate(v) for k, v in sorted(by_check.items())}, by_tag={k: rate(v) for k, v in sorted(by_tag.items())},
        schema_fidelity=rate(schema) if schema else None,
        ttft_p50_ms=percentile(ttft, 50), ttft_p95_ms=percentile(ttft, 95),
        e2e_p50_ms=percentile(e2e, 50), e2e_p95_ms=percentile(e2e, 95),
        decode_tokens_per_s=percentile(decode, 50), throughput_tokens_per_s=throughput, output_tokens=output_tokens,
        prompt_tokens_p50=percentile(prompts, 50), prompt_tokens_p95=percentile(prompts, 95),
        peak_memory_bytes=run.info.peak_memory_bytes, model_memory_bytes=run.info.model_memory_bytes,
        load_peak_bytes=run.info.load_peak_bytes,
        total_params=run.info.total_params, weight_bytes=run.info.weight_bytes, max_context=run.info.max_context,
        cost_per_1k_output_tokens=cost, cost_basis=basis, concurrency=run.settings.get("concurrency"),
        perplexity=sum(perplexities) / len(perplexities) if perplexities else None, ttft_ms=ttft, e2e_ms=e2e,
        verifier=_verifier_summary(run))


def _verifier_summary(run: CandidateRun) -> dict | None:
    from rung.bench.verification import summary

    v = run.settings.get("verifier") or {}
    return summary(run, v.get("spec"), v.get("threshold", 0.5))
