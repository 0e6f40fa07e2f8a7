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

from rung.bench.records import CandidateRun, CaseOutcome
from rung.bench.stats import case_rate, pass_at_k, percentile_ci, percentile_label, wilson_interval  # noqa: F401


def tail_percentile(values: list[float], q: float) -> float | None:
    """A latency percentile as the report prints it: with fewer than 100 / (100 − q) values (20 for a
    p95) the maximum, which is all such a sample can say (``percentile_label`` names it so)."""
    xs = [v for v in values if v is not None]
    if xs and percentile_label(q, len(xs)) != f"p{q:g}":
        return max(xs)
    return percentile(xs, q)


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
    accuracy: float | None  # passed / scored cases (unsupported ones left out); with repeats, the mean per-case rate
    accuracy_ci: tuple[float, float] | None  # its Wilson interval at the requirements' confidence (on n_eff)
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
    # how much the figures know (rung/bench/stats.py): intervals at `confidence`, repeats and flakiness
    confidence: float = 0.95
    accuracy_n_eff: float | None = None  # effective number of cases behind accuracy_ci (n without repeats)
    by_check_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    by_tag_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    schema_fidelity_ci: tuple[float, float] | None = None
    requests: int = 0  # timed requests behind the latency figures
    latency_label: str = "p95"  # "max (n=18)" when too few requests make a p95 their maximum
    ttft_p95_ci: tuple[float, float] | None = None  # bootstrap intervals
    e2e_p95_ci: tuple[float, float] | None = None
    decode_tokens_per_s_ci: tuple[float, float] | None = None
    repeats: int = 1  # the most runs of any case
    pass_at_k: float | None = None  # share of cases passed in at least one of their runs (pass@k, k = runs)
    pass_hat_k: float | None = None  # share passed in all of their runs (pass^k)
    flaky_cases: list[str] = field(default_factory=list)  # cases that both passed and failed across runs
    flake_rate: float | None = None  # flaky cases / scored cases with more than one run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(run: CandidateRun, pricing: Pricing | None = None, confidence: float = 0.95) -> Metrics:
    pricing = pricing or Pricing()
    scored = [c for c in run.cases if not c.unsupported]
    by_check: dict[str, list[tuple[float, int]]] = {}  # (per-case rate over runs, runs) per check
    schema: list[tuple[float, int]] = []
    perplexities = []
    for case in run.cases:
        for i, check in enumerate(case.checks):
            if check.unsupported:
                continue
            runs = [r.checks[i] for r in case.runs if i < len(r.checks)]
            by_check.setdefault(check.type, []).append(_rate(c.passed for c in runs))
            if check.schema_valid is not None:
                schema.append(_rate(bool(c.schema_valid) for c in runs))
            if check.type == "perplexity":
                perplexities.append(check.score)
    by_tag: dict[str, list[tuple[float, int]]] = {}
    for case in scored:
        for tag, value in case.tags.items():
            by_tag.setdefault(f"{tag}={value}", []).append(_rate(r.passed for r in case.runs))

    samples = [s for c in run.cases for r in c.runs for s in r.samples if not s.error]
    ttft = [s.ttft_s * 1000 for s in samples if s.ttft_s is not None]
    e2e = [s.latency_s * 1000 for s in samples]
    decode = [r for r in (s.decode_tokens_per_s for s in samples) if r]
    # one prompt per case (its samples share it)
    prompts = [c.samples[0].prompt_tokens for c in run.cases if c.samples and c.samples[0].prompt_tokens]
    output_tokens = sum(s.output_tokens for s in samples)
    throughput = output_tokens / run.wall_s if run.wall_s > 0 and output_tokens else None
    cost, basis = pricing.cost_per_1k(run.info.name, run.info.kind, throughput)
    accuracy = _interval([_rate(r.passed for r in c.runs) for c in scored], confidence)
    checks = {k: _interval(v, confidence) for k, v in sorted(by_check.items())}
    tags = {k: _interval(v, confidence) for k, v in sorted(by_tag.items())}
    fidelity = _interval(schema, confidence)
    repeated = [c for c in scored if len(c.runs) > 1]
    flaky = [c.case_id for c in repeated if 0 < sum(r.passed for r in c.runs) < len(c.runs)]
    passed = sum(c.pass_rate for c in scored)

    return Metrics(
        name=run.info.name, kind=run.info.kind, error=run.error, cached=run.cached, cases=len(run.cases),
        passed=int(passed) if float(passed).is_integer() else passed, accuracy=accuracy["rate"],
        accuracy_ci=accuracy["ci"], unsupported=len(run.cases) - len(scored),
        by_check={k: v["rate"] for k, v in checks.items()}, by_tag={k: v["rate"] for k, v in tags.items()},
        schema_fidelity=fidelity["rate"],
        ttft_p50_ms=percentile(ttft, 50), ttft_p95_ms=tail_percentile(ttft, 95),
        e2e_p50_ms=percentile(e2e, 50), e2e_p95_ms=tail_percentile(e2e, 95),
        decode_tokens_per_s=percentile(decode, 50), throughput_tokens_per_s=throughput, output_tokens=output_tokens,
        prompt_tokens_p50=percentile(prompts, 50), prompt_tokens_p95=percentile(prompts, 95),
        peak_memory_bytes=run.info.peak_memory_bytes, model_memory_bytes=run.info.model_memory_bytes,
        load_peak_bytes=run.info.load_peak_bytes,
        total_params=run.info.total_params, weight_bytes=run.info.weight_bytes, max_context=run.info.max_context,
        cost_per_1k_output_tokens=cost, cost_basis=basis, concurrency=run.settings.get("concurrency"),
        perplexity=sum(perplexities) / len(perplexities) if perplexities else None, ttft_ms=ttft, e2e_ms=e2e,
        verifier=_verifier_summary(run), confidence=confidence, accuracy_n_eff=accuracy["n_eff"] or None,
        by_check_ci={k: v["ci"] for k, v in checks.items()}, by_tag_ci={k: v["ci"] for k, v in tags.items()},
        schema_fidelity_ci=fidelity["ci"], requests=len(e2e), latency_label=percentile_label(95, len(e2e)),
        ttft_p95_ci=percentile_ci(ttft, 95, confidence), e2e_p95_ci=percentile_ci(e2e, 95, confidence),
        decode_tokens_per_s_ci=percentile_ci(decode, 50, confidence),
        repeats=max((len(c.runs) for c in run.cases), default=1),
        pass_at_k=_mean([case_pass_at_k(c) for c in scored]), pass_hat_k=_mean([case_pass_hat_k(c) for c in scored]),
        flaky_cases=flaky, flake_rate=len(flaky) / len(repeated) if repeated else None)


def case_pass_at_k(case: CaseOutcome) -> float:
    """pass@k of one case with k = its runs: Chen et al.'s estimator with n = k, i.e. 1 if any run passed."""
    n = len(case.runs)
    return pass_at_k(n, sum(r.passed for r in case.runs), n)


def case_pass_hat_k(case: CaseOutcome) -> float:
    """pass^k: 1 if every one of the case's runs passed."""
    return float(all(r.passed for r in case.runs))


def _rate(outcomes) -> tuple[float, int]:
    xs = [bool(x) for x in outcomes]
    return sum(xs) / len(xs), len(xs)


def _interval(units: list[tuple[float, int]], confidence: float) -> dict:
    return case_rate([u[0] for u in units], [u[1] for u in units], confidence)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _verifier_summary(run: CandidateRun) -> dict | None:
    from rung.bench.verification import summary

    v = run.settings.get("verifier") or {}
    return summary(run, v.get("spec"), v.get("threshold", 0.5))
