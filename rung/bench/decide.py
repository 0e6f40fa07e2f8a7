"""The decision: the smallest candidate that passes every requirement, and why each other did not.

A requirements file answers five questions (YAML)::

    success:                      # 1. what success means, as thresholds on the measured figures
      accuracy: 0.8               #    cases passed / cases scored
      slice_accuracy: 0.7         #    the same within each language and domain below (default: accuracy)
      checks: {json: 0.9, tool_call: 1.0}    # pass rate per check type
      schema_fidelity: 1.0
      ttft_p95_ms: 800
      e2e_p95_ms: 4000
      decode_tokens_per_s: 15
      cost_per_1k_output_tokens: 0.02
    context_p95: 4096             # 2. tokens (prompt + answer) of the 95th-percentile request
    languages: [en]               # 3. languages and domains: cases tagged language=/domain= in the
    domains: [support]            #    suite; each slice must reach slice_accuracy
    runs_on:                      # 4. where it runs: a memory budget, the hardware's price, the
      memory: 8GB                 #    requests in flight at context_p95
      price_per_hour: 0.20
      concurrency: 1
    governance:                   # 5. governance
      external_endpoints: false   #    hosted endpoints outside your network fail
      licenses: [apache-2.0, mit] #    a model whose license is not listed (or unknown) fails
      redaction: true             #    the suite must run redacted (NAME+redact, rung/bench/redaction.py)
    confidence: 0.95              # the level of every interval and test (default 0.95)
    chosen: smollm2-135m@int8     # the model you ship: what `rung bench --check` guards
    candidates:                   # optional: what to try (or -m on the command line)
      - smollm2-135m@int4
      - {spec: "openai:https://api.example.com/v1#big", price_per_1m_output_tokens: 0.6, params: 8e9}

Each candidate gets one of three verdicts (``Verdict.verdict``):

- ``reliable``: every requirement holds on its confidence interval, not only on the point estimate
  (a rate's Wilson lower bound is at or above its threshold, a latency percentile's bootstrap upper
  bound at or below its limit; memory, context, licenses and cost are read as measured);
- ``provisional``: every requirement holds on the point estimate, but some only within noise;
- ``fails``: some requirement is not met.

The rule: the answer is the smallest candidate that passes reliably. If none does, the decision
says so first, then gives a provisional answer: the smallest candidate that is not significantly
worse (exact McNemar at 1 − confidence) than the best one (highest accuracy) that passes on the
point estimate, among those whose every miss is within noise. It states how many cases would decide
it: for the rates in question, the cases at which the lower bound would clear the threshold at the
observed rate; for the pair, the cases McNemar needs to detect the observed difference at 80% power.
So a smaller candidate never loses to a larger one by noise.

"Smallest" orders by parameters, then weight bytes, then peak memory (unknown sizes last). Memory
needed is the peak measured while serving the suite plus the KV cache of ``concurrency`` requests
at ``context_p95`` (from the model's bytes per token), or the peak while loading if that is higher,
against the budget.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rung.bench.measure import Metrics, Pricing
from rung.bench.records import CandidateRun
from rung.bench.stats import (cases_for_lower_bound, cases_for_paired_difference, paired_bootstrap,
                              paired_difference_ci, sign_test)
from rung.bench.suite import SuiteError
from rung.extras import require

POWER = 0.8  # of the paired-difference sample size the provisional answer states

SUCCESS_KEYS = {"accuracy", "slice_accuracy", "checks", "schema_fidelity", "ttft_p95_ms", "e2e_p95_ms",
                "decode_tokens_per_s", "cost_per_1k_output_tokens"}
TOP_KEYS = {"success", "context_p95", "languages", "domains", "runs_on", "governance", "chosen", "candidates",
            "confidence"}
RUNS_ON_KEYS = {"memory", "price_per_hour", "concurrency", "hardware"}
GOVERNANCE_KEYS = {"external_endpoints", "licenses", "redaction"}


class RequirementsError(SuiteError):
    """A requirements file rung cannot read; the message names the file and the field."""


@dataclass
class Requirements:
    success: dict[str, Any] = field(default_factory=dict)
    context_p95: int | None = None
    languages: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    memory_bytes: int | None = None
    price_per_hour: float | None = None
    concurrency: int = 1
    hardware: str | None = None
    external_endpoints: bool = True
    licenses: list[str] | None = None
    redaction: bool = False
    chosen: str | None = None
    candidates: list[str] = field(default_factory=list)
    prices: dict[str, dict[str, float]] = field(default_factory=dict)  # per candidate
    params: dict[str, float] = field(default_factory=dict)  # size hints for endpoints
    source: str | None = None
    confidence: float = 0.95  # of every interval and test

    def pricing(self) -> Pricing:
        return Pricing(self.price_per_hour, self.prices)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text: str | int | float) -> int:
    """ "24GB" → 24·10⁹, "24GiB" → 24·2³⁰, "512 MiB", or a plain number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"{text!r} is not a memory size (e.g. 24GB, 16GiB, 512MiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def load_requirements(path: str | Path) -> Requirements:
    require("bench", "yaml", what="rung.bench")
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RequirementsError(f"{path}: no such requirements file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RequirementsError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    return requirements_from_dict(data, str(path))


def requirements_from_dict(data: dict[str, Any], where: str = "requirements") -> Requirements:
    if not isinstance(data, dict):
        raise RequirementsError(f"{where}: expected a mapping")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise RequirementsError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (expected {', '.join(sorted(TOP_KEYS))})")
    success = data.get("success") or {}
    if not isinstance(success, dict) or set(success) - SUCCESS_KEYS:
        raise RequirementsError(f"{where}: success: takes {', '.join(sorted(SUCCESS_KEYS))}")
    for key, value in success.items():
        values = value.values() if key == "checks" and isinstance(value, dict) else [value]
        if key == "checks" and not isinstance(value, dict):
            raise RequirementsError(f"{where}: success.checks maps check types to pass rates")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values):
            raise RequirementsError(f"{where}: success.{key} must be a non-negative number")
    runs_on = data.get("runs_on") or {}
    governance = data.get("governance") or {}
    if not isinstance(runs_on, dict) or set(runs_on) - RUNS_ON_KEYS:
        raise RequirementsError(f"{where}: runs_on: takes {', '.join(sorted(RUNS_ON_KEYS))}")
    if not isinstance(governance, dict) or set(governance) - GOVERNANCE_KEYS:
        raise RequirementsError(f"{where}: governance: takes {', '.join(sorted(GOVERNANCE_KEYS))}")
    try:
        memory = parse_bytes(runs_on["memory"]) if "memory" in runs_on else None
    except ValueError as e:
        raise RequirementsError(f"{where}: runs_on.memory: {e}") from None
    req = Requirements(
        success=success, context_p95=_int(data, "context_p95", where), languages=_strings(data, "languages", where),
        domains=_strings(data, "domains", where), memory_bytes=memory, price_per_hour=runs_on.get("price_per_hour"),
        concurrency=int(runs_on.get("concurrency", 1)), hardware=runs_on.get("hardware"),
        external_endpoints=bool(governance.get("external_endpoints", True)),
        licenses=[s.lower() for s in governance["licenses"]] if governance.get("licenses") else None,
        redaction=bool(governance.get("redaction", False)), chosen=data.get("chosen"), source=where,
        confidence=_confidence(data, where))
    for item in data.get("candidates") or []:
        if isinstance(item, str):
            req.candidates.append(item)
        elif isinstance(item, dict) and isinstance(item.get("spec"), str):
            req.candidates.append(item["spec"])
            prices = {k: float(item[k]) for k in ("price_per_hour", "price_per_1m_output_tokens") if k in item}
            if prices:
                req.prices[item["spec"]] = prices
            if "params" in item:
                req.params[item["spec"]] = float(item["params"])
        else:
            raise RequirementsError(f"{where}: candidates: each is a model spec or {{spec: ..., price_per_hour: ...}}")
    return req


def _confidence(data: dict, where: str) -> float:
    value = data.get("confidence", 0.95)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise RequirementsError(f"{where}: confidence must be a number between 0 and 1 (e.g. 0.95), got {value!r}")
    return float(value)


def _int(data: dict, key: str, where: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequirementsError(f"{where}: {key} must be a positive whole number of tokens")
    return value


def _strings(data: dict, key: str, where: str) -> list[str]:
    value = data.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequirementsError(f"{where}: {key} must be a list of names")
    return value


# ---- the rule ----------------------------------------------------------------------------------


RELIABLE, PROVISIONAL, FAILS = "reliable", "provisional", "fails"


@dataclass
class Verdict:
    name: str
    passed: bool  # every requirement met on the point estimate
    reasons: list[str]  # why it failed (empty when it passed)
    notes: list[str]  # what could not be checked, and other caveats
    memory_needed_bytes: int | None = None
    verdict: str = FAILS  # "reliable" | "provisional" | "fails" (module docstring)
    within_noise: list[str] = field(default_factory=list)  # requirements whose interval straddles the threshold
    # every miss is within noise: the candidate may still be the provisional answer
    eligible: bool = False
    # rate requirements within noise: [{requirement, rate, threshold}], for the cases that would decide them
    noisy_rates: list[dict] = field(default_factory=list)

    @property
    def reliable(self) -> bool:
        return self.verdict == RELIABLE


@dataclass
class Decision:
    chosen: str | None  # the answer: reliable, else provisional (``status``), else None
    verdicts: list[Verdict]  # smallest first
    summary: str  # one line: the recommendation and why
    notes: list[str] = field(default_factory=list)
    status: str = "none"  # "reliable" | "provisional" | "none"
    confidence: float = 0.95
    comparisons: list[dict] = field(default_factory=list)  # each candidate against the next smaller one
    against_best: dict | None = None  # provisional: the answer against the best on the point estimate
    cases_to_decide: dict | None = None  # provisional: the power calculation

    @property
    def provisional(self) -> bool:
        return self.status == PROVISIONAL

    def verdict(self, name: str) -> Verdict:
        return next(v for v in self.verdicts if v.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_key(m: Metrics, req: Requirements) -> tuple:
    params = m.total_params if m.total_params is not None else req.params.get(m.name)
    inf = math.inf
    return (params if params is not None else inf, m.weight_bytes if m.weight_bytes is not None else inf,
            m.peak_memory_bytes if m.peak_memory_bytes is not None else inf, m.name)


def decide(metrics: list[Metrics], runs: list[CandidateRun], req: Requirements,
           suite_tags: dict[str, set[str]]) -> Decision:
    """``suite_tags``: tag name → the values the suite's cases carry (e.g. {"language": {"en"}})."""
    info = {r.info.name: r.info for r in runs}
    by_run = {r.info.name: r for r in runs}
    ordered = sorted(metrics, key=lambda m: size_key(m, req))
    by_name = {m.name: m for m in ordered}
    verdicts = [_verdict(m, info.get(m.name), req, suite_tags) for m in ordered]
    confidence = req.confidence
    ran = [m for m in ordered if not m.error]
    comparisons = [compare(by_run[a.name], by_run[b.name], confidence) for a, b in zip(ran, ran[1:])]
    decision = Decision(None, verdicts, "", [], "none", confidence, comparisons)

    def against(v: Verdict, than: Verdict) -> dict:
        return compare(by_run[v.name], by_run[than.name], confidence)

    chosen = next((v for v in verdicts if v.reliable), None)
    if chosen is not None:
        decision.chosen, decision.status = chosen.name, RELIABLE
        decision.summary = (f"{chosen.name}: the smallest candidate that passes every requirement reliably "
                            f"({_size(by_name[chosen.name])})")
        for v in verdicts[:verdicts.index(chosen)]:
            if v.eligible and not by_name[v.name].error:
                c = against(v, chosen)
                if not c["significant"]:
                    decision.notes.append(
                        f"{v.name} is smaller and not significantly worse than {chosen.name} ({_pair(c)}), but does "
                        f"not pass reliably: {'; '.join(v.reasons + v.within_noise)}; more cases would tell")
    else:
        point = [v for v in verdicts if v.passed]
        if not point:
            decision.summary = "no candidate passes reliably: none passes every requirement, even on the point estimate"
        else:
            best = max(point, key=lambda v: (_accuracy(by_name[v.name]), -verdicts.index(v)))
            answer = best
            for v in verdicts[:verdicts.index(best)]:
                if v.eligible and not by_name[v.name].error and not _significantly_worse(against(v, best)):
                    answer = v
                    break
            decision.chosen, decision.status = answer.name, PROVISIONAL
            decision.against_best = against(answer, best) if answer is not best else None
            decision.cases_to_decide = _cases_to_decide(answer, best, decision.against_best, confidence)
            decision.summary = _provisional_summary(answer, best, decision, by_name)
    names = [v.name for v in verdicts]
    for v in verdicts:
        if not v.passed or decision.chosen is None or v.name == decision.chosen:
            continue
        if names.index(v.name) > names.index(decision.chosen):
            how = "passes" if v.reliable else "passes on the point estimate"
            v.notes.insert(0, f"{how}, but {decision.chosen} is smaller")
        else:
            v.notes.insert(0, "passes on the point estimate only")
    return decision


def deploy(decision: Decision, runs: list[CandidateRun], req: Requirements, settings: dict[str, Any]) -> dict | None:
    """The command that serves the answer the way it was measured, and the `chosen:` line for the
    requirements file. ``settings``: the bench's settings key (BenchSettings.key).

    --max-concurrent is the concurrency the latency was measured at; --kv-cache-mb the KV cache the
    memory verdict counted (``runs_on.concurrency`` requests at ``context_p95``), when both are known;
    the dtype, device, verifier and redaction as benched. An endpoint is already served: only the
    `chosen:` line."""
    if decision.chosen is None:
        return None
    from rung.bench.redaction import base_spec, is_redacted

    run = next(r for r in runs if r.info.name == decision.chosen)
    out = {"chosen_line": f"chosen: {decision.chosen}", "command": None}
    if run.info.kind != "local":
        return out
    spec = base_spec(decision.chosen) if is_redacted(decision.chosen) else decision.chosen
    parts = ["rung", "serve", "-m", _quote(spec), "--max-concurrent", str(settings.get("concurrency") or 1)]
    kv = run.info.kv_bytes_per_token
    if kv and req.context_p95:
        parts += ["--kv-cache-mb", str(max(1, math.ceil(kv * req.context_p95 * req.concurrency / 2**20)))]
    if settings.get("dtype"):
        parts += ["--dtype", str(settings["dtype"])]
    if settings.get("device") and settings["device"] != "cpu":
        parts += ["--device", str(settings["device"])]
    if (settings.get("tensor_parallel_size") or 1) > 1:
        parts += ["--tensor-parallel-size", str(settings["tensor_parallel_size"])]
    verifier = settings.get("verifier")
    if verifier:
        parts += ["--verifier", _quote(verifier["spec"]), "--verify-threshold", f"{verifier['threshold']:g}"]
    if is_redacted(decision.chosen):
        parts.append("--redact")
    out["command"] = " ".join(parts)
    return out


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _accuracy(m: Metrics) -> float:
    return m.accuracy if m.accuracy is not None else -1.0


def _significantly_worse(c: dict) -> bool:
    """The smaller (first) candidate of comparison ``c`` is significantly worse than the larger."""
    return c["significant"] and c["difference"] > 0


def _pair(c: dict) -> str:
    return (f"{c['differ']} of {c['cases']} cases differ, {c['larger_only']} in favour of {c['larger']}; "
            f"McNemar p={c['p_value']:.2g}")


def _cases_to_decide(answer: Verdict, best: Verdict, against: dict | None, confidence: float) -> dict:
    """How many cases would decide the provisional answer (the docstring of this module says which)."""
    def lower_bounds(v: Verdict) -> dict:
        return {r["requirement"]: cases_for_lower_bound(r["rate"], r["threshold"], confidence) for r in v.noisy_rates}

    out = {"answer": {"name": answer.name, "lower_bound": lower_bounds(answer)},
           "best": {"name": best.name, "lower_bound": lower_bounds(best)}, "paired": None, "power": POWER}
    if against is not None:
        out["paired"] = cases_for_paired_difference(against["smaller_only"], against["larger_only"], against["cases"],
                                                    confidence, POWER)
    return out


def _provisional_summary(answer: Verdict, best: Verdict, decision: Decision, by_name: dict) -> str:
    pct = f"{decision.confidence:.0%}"
    head = f"no candidate passes reliably (at {pct} confidence); provisional answer: {answer.name}"
    if answer is best:
        why = "the smallest that passes on the point estimate"
    else:
        why = f"the smallest not significantly worse than {best.name}, the best on the point estimate ({_pair(decision.against_best)})"
    need = []
    cases = decision.cases_to_decide
    if decision.against_best is not None:
        n = cases["paired"]
        need.append(f"~{n:,} cases to tell {answer.name} from {best.name} at {POWER:.0%} power" if n else
                    f"no difference between {answer.name} and {best.name} to detect")
    for who, v in (("answer", answer), ("best", best))[:1 if answer is best else 2]:
        bounds = cases[who]["lower_bound"]
        never = [r for r in v.noisy_rates if bounds[r["requirement"]] is None]
        if never:
            shown = ", ".join(f"{r['requirement']} {r['rate']:.0%} against {r['threshold']:.0%}" for r in never[:2])
            need.append(f"{v.name}'s {shown}{' …' if len(never) > 2 else ''}: no number of cases clears that at the "
                        "observed rate")
        elif bounds:
            need.append(f"{v.name} would pass reliably at ~{max(bounds.values()):,} cases if its rates held")
    return f"{head}, {why}. What would decide it: {'; '.join(need) or 'more cases'}"


def compare(smaller: CandidateRun, larger: CandidateRun, confidence: float = 0.95) -> dict:
    """Two candidates on the cases both were scored on (paired): how many differ, the difference in
    pass rate (larger − smaller) with its interval, the exact McNemar p-value; the paired bootstrap of
    per-case latency (end to end, ms) and of perplexity.

    One run per case: McNemar on the discordant cases, Newcombe's interval (rung/bench/stats.py).
    With repeats a case's outcome is its pass rate: the sign test on the cases whose rates differ
    (McNemar's test when the rates are 0 or 1) and a case-level paired bootstrap interval."""
    a = {o.case_id: o for o in smaller.cases if not o.unsupported}
    b = {o.case_id: o for o in larger.cases if not o.unsupported}
    both = [cid for cid in a if cid in b]
    rates = [(a[c].pass_rate, b[c].pass_rate) for c in both]
    repeated = any(len(a[c].runs) > 1 or len(b[c].runs) > 1 for c in both)
    smaller_only, larger_only, p = sign_test([x - y for x, y in rates])
    n = len(both)
    difference = sum(y - x for x, y in rates) / n if n else 0.0
    if repeated:
        boot = paired_bootstrap([x for x, _ in rates], [y for _, y in rates], confidence)
        ci, method = (boot["ci"] if boot else None), "sign test on per-case pass rates, case bootstrap interval"
    else:
        both_pass = sum(1 for x, y in rates if x and y)
        ci = paired_difference_ci(both_pass, larger_only, smaller_only, n - both_pass - larger_only - smaller_only,
                                  confidence)
        method = "exact McNemar, Newcombe interval"
    return {"smaller": smaller.info.name, "larger": larger.info.name, "cases": n, "differ": smaller_only + larger_only,
            "smaller_only": smaller_only, "larger_only": larger_only, "difference": difference,
            "difference_ci": ci, "p_value": p, "significant": p < 1 - confidence, "method": method,
            "e2e_ms": paired_bootstrap([_latency_ms(a[c]) for c in both], [_latency_ms(b[c]) for c in both], confidence),
            "perplexity": paired_bootstrap([_perplexity(a[c]) for c in both], [_perplexity(b[c]) for c in both],
                                           confidence)}


def _latency_ms(outcome) -> float | None:
    """A case's mean end-to-end latency over its runs' requests."""
    xs = [s.latency_s * 1000 for r in outcome.runs for s in r.samples if not s.error and s.latency_s]
    return sum(xs) / len(xs) if xs else None


def _perplexity(outcome) -> float | None:
    xs = [c.score for c in outcome.checks if c.type == "perplexity" and not c.unsupported]
    return xs[0] if xs else None


def _size(m: Metrics) -> str:
    parts = []
    if m.total_params:
        parts.append(f"{m.total_params / 1e6:,.0f}M params" if m.total_params < 1e9 else f"{m.total_params / 1e9:.1f}B params")
    if m.weight_bytes:
        parts.append(f"{m.weight_bytes / 1e6:,.0f} MB of weights")
    if m.accuracy is not None:
        parts.append(f"accuracy {m.accuracy:.0%}")
    return ", ".join(parts)


def _verdict(m: Metrics, info, req: Requirements, suite_tags: dict[str, set[str]]) -> Verdict:
    reasons, notes = [], []
    noise: list[str] = []  # requirements whose interval holds the threshold
    clear: list[str] = []  # misses no number of cases would turn (outside noise, or not a sampled figure)
    noisy_rates: list[dict] = []
    if m.error:
        return Verdict(m.name, False, [f"did not run: {m.error}"], [])
    s = req.success
    level = f"{req.confidence:.0%}"

    def judge(label: str, value, threshold: float, fmt: str, ci, higher_is_better: bool, rate: bool = False) -> None:
        """Point estimate against the threshold; then the interval (None: a figure read as measured)."""
        sign = "≥" if higher_is_better else "≤"
        if value is None:
            reasons.append(f"{label} not measured (needs {sign} {fmt.format(threshold)})")
            clear.append(label)
            return
        ok = value >= threshold - 1e-12 if higher_is_better else value <= threshold + 1e-12
        if not ok:
            reasons.append(f"{label} {fmt.format(value)} {'<' if higher_is_better else '>'} {fmt.format(threshold)}")
        if ci is None:
            if not ok:
                clear.append(label)
            return
        # the far bound decides reliability; the near bound whether a miss is within noise
        far, near = (ci[0], ci[1]) if higher_is_better else (ci[1], ci[0])
        holds = far >= threshold - 1e-12 if higher_is_better else far <= threshold + 1e-12
        reachable = near >= threshold - 1e-12 if higher_is_better else near <= threshold + 1e-12
        if ok and holds:
            return
        interval = f"{level} interval {fmt.format(ci[0])}–{fmt.format(ci[1])}"
        if ok or reachable:
            noise.append(f"{label} {fmt.format(value)} is within noise of {fmt.format(threshold)} ({interval})")
            if rate:
                noisy_rates.append({"requirement": label, "rate": value, "threshold": threshold})
        if not ok and not reachable:
            clear.append(label)

    if "accuracy" in s:
        judge("accuracy", m.accuracy, s["accuracy"], "{:.0%}", m.accuracy_ci, True, rate=True)
    for check, threshold in (s.get("checks") or {}).items():
        judge(f"{check} pass rate", m.by_check.get(check), threshold, "{:.0%}", m.by_check_ci.get(check), True, rate=True)
    if "schema_fidelity" in s:
        judge("schema fidelity", m.schema_fidelity, s["schema_fidelity"], "{:.0%}", m.schema_fidelity_ci, True, rate=True)
    if "ttft_p95_ms" in s:
        judge("TTFT p95", m.ttft_p95_ms, s["ttft_p95_ms"], "{:,.0f} ms", m.ttft_p95_ci, False)
    if "e2e_p95_ms" in s:
        judge("end-to-end p95", m.e2e_p95_ms, s["e2e_p95_ms"], "{:,.0f} ms", m.e2e_p95_ci, False)
    if "decode_tokens_per_s" in s:
        judge("decode", m.decode_tokens_per_s, s["decode_tokens_per_s"], "{:,.1f} tokens/s", m.decode_tokens_per_s_ci, True)
    if "cost_per_1k_output_tokens" in s:  # from the run's measured throughput: read as measured
        judge("cost per 1K output tokens", m.cost_per_1k_output_tokens, s["cost_per_1k_output_tokens"], "${:.4f}",
              None, False)
    if m.unsupported:
        notes.append(f"{m.unsupported} case(s) unsupported by this candidate, left out of accuracy")
    if m.flaky_cases:
        notes.append(f"{len(m.flaky_cases)} flaky case(s) (passed some of their {m.repeats} runs, failed others): "
                     + ", ".join(m.flaky_cases[:5]) + (" …" if len(m.flaky_cases) > 5 else ""))

    # 3. languages and domains: each slice the team needs must be in the suite and pass
    threshold = s.get("slice_accuracy", s.get("accuracy"))
    for tag, wanted in (("language", req.languages), ("domain", req.domains)):
        for value in wanted:
            if value not in suite_tags.get(tag, set()):
                reasons.append(f"{tag} {value}: no cases tagged {tag}={value} in the suite")
                clear.append(tag)
            elif threshold is not None:
                key = f"{tag}={value}"
                judge(f"{tag} {value} accuracy", m.by_tag.get(key), threshold, "{:.0%}", m.by_tag_ci.get(key), True,
                      rate=True)

    # 2 and 4. context and memory
    before = len(reasons)
    needed = None
    if req.context_p95:
        if m.max_context is None:
            notes.append("max context unknown")
        elif m.max_context < req.context_p95:
            reasons.append(f"max context {m.max_context:,} < required p95 {req.context_p95:,} tokens")
    if m.kind == "local":
        kv = info.kv_bytes_per_token if info else None
        if m.peak_memory_bytes is not None:
            extra = kv * req.context_p95 * req.concurrency if (kv and req.context_p95) else 0
            serving = int(m.peak_memory_bytes + extra)
            needed = max(serving, m.load_peak_bytes or 0)  # the process must also survive its own loading
        if req.memory_bytes is not None:
            if needed is None:
                reasons.append("peak memory not measured")
            elif needed > req.memory_bytes:
                if needed != serving:
                    why = f"loading peaks at {_gb(needed)}"
                elif needed != m.peak_memory_bytes:
                    why = f"memory {_gb(needed)} (peak {_gb(m.peak_memory_bytes)} + KV {_gb(needed - m.peak_memory_bytes)} at context p95)"
                else:
                    why = f"memory {_gb(needed)}"
                reasons.append(f"{why} > budget {_gb(req.memory_bytes)}")
    elif req.memory_bytes is not None:
        notes.append("memory not measured (an endpoint's memory is its host's)")

    # 5. governance
    if req.redaction and not (info and info.redaction):
        reasons.append(f"not run redacted: governance asks for PII redaction (bench {m.name}+redact, or --redact)")
    if not req.external_endpoints and m.kind == "endpoint" and info and not _private(info.host):
        reasons.append(f"external endpoint {info.host}: governance forbids sending data outside")
    if req.licenses is not None and m.kind == "local":
        lic = (info.license or "").lower() if info else ""
        if not lic:
            reasons.append(f"license unknown (allowed: {', '.join(req.licenses)})")
        elif lic not in req.licenses:
            reasons.append(f"license {lic} not allowed ({', '.join(req.licenses)})")
    clear += reasons[before:]  # memory, context, governance: no number of cases changes them
    passed = not reasons
    verdict = FAILS if not passed else PROVISIONAL if noise else RELIABLE
    return Verdict(m.name, passed, reasons, notes, needed, verdict, noise, eligible=not clear, noisy_rates=noisy_rates)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _private(host: str | None) -> bool:
    if not host:
        return False
    if host in ("localhost",) or host.endswith(".local") or host.endswith(".internal"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a public name
    return ip.is_private or ip.is_loopback
