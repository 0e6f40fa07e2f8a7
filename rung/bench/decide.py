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
    chosen: smollm2-135m@int8     # the model you ship: what `rung bench --check` guards
    candidates:                   # optional: what to try (or -m on the command line)
      - smollm2-135m@int4
      - {spec: "openai:https://api.example.com/v1#big", price_per_1m_output_tokens: 0.6, params: 8e9}

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
from rung.bench.suite import SuiteError

SUCCESS_KEYS = {"accuracy", "slice_accuracy", "checks", "schema_fidelity", "ttft_p95_ms", "e2e_p95_ms",
                "decode_tokens_per_s", "cost_per_1k_output_tokens"}
TOP_KEYS = {"success", "context_p95", "languages", "domains", "runs_on", "governance", "chosen", "candidates"}
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
        redaction=bool(governance.get("redaction", False)), chosen=data.get("chosen"), source=where)
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


@dataclass
class Verdict:
    name: str
    passed: bool  # every requirement met
    reasons: list[str]  # why it failed (empty when it passed)
    notes: list[str]  # what could not be checked, and other caveats
    memory_needed_bytes: int | None = None


@dataclass
class Decision:
    chosen: str | None
    verdicts: list[Verdict]  # smallest first
    summary: str  # one line: the recommendation and why
    notes: list[str] = field(default_factory=list)

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
    ordered = sorted(metrics, key=lambda m: size_key(m, req))
    notes = []
    verdicts = [_verdict(m, info.get(m.name), req, suite_tags) for m in ordered]
    chosen = next((v for v in verdicts if v.passed), None)
    for v in verdicts:
        if v.passed and chosen is not None and v is not chosen:
            v.notes.insert(0, f"passes, but {chosen.name} is smaller")
    if chosen is None:
        summary = "no candidate passes every requirement"
    else:
        m = next(x for x in metrics if x.name == chosen.name)
        summary = f"{chosen.name}: the smallest candidate that passes every requirement ({_size(m)})"
    return Decision(chosen.name if chosen else None, verdicts, summary, notes)


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
    if m.error:
        return Verdict(m.name, False, [f"did not run: {m.error}"], [])
    s = req.success

    def at_least(label: str, value: float | None, threshold: float, fmt: str) -> None:
        if value is None:
            reasons.append(f"{label} not measured (needs ≥ {fmt.format(threshold)})")
        elif value < threshold - 1e-12:
            reasons.append(f"{label} {fmt.format(value)} < {fmt.format(threshold)}")

    def at_most(label: str, value: float | None, threshold: float, fmt: str) -> None:
        if value is None:
            reasons.append(f"{label} not measured (needs ≤ {fmt.format(threshold)})")
        elif value > threshold + 1e-12:
            reasons.append(f"{label} {fmt.format(value)} > {fmt.format(threshold)}")

    if "accuracy" in s:
        at_least("accuracy", m.accuracy, s["accuracy"], "{:.0%}")
        ci = m.accuracy_ci
        if ci and ci[0] <= s["accuracy"] <= ci[1]:
            notes.append(f"accuracy {m.accuracy:.0%} is within noise of the {s['accuracy']:.0%} threshold (95% interval "
                         f"{ci[0]:.0%}–{ci[1]:.0%} over {m.cases - m.unsupported} cases): more cases would tell")
    for check, threshold in (s.get("checks") or {}).items():
        at_least(f"{check} pass rate", m.by_check.get(check), threshold, "{:.0%}")
    if "schema_fidelity" in s:
        at_least("schema fidelity", m.schema_fidelity, s["schema_fidelity"], "{:.0%}")
    if "ttft_p95_ms" in s:
        at_most("TTFT p95", m.ttft_p95_ms, s["ttft_p95_ms"], "{:,.0f} ms")
    if "e2e_p95_ms" in s:
        at_most("end-to-end p95", m.e2e_p95_ms, s["e2e_p95_ms"], "{:,.0f} ms")
    if "decode_tokens_per_s" in s:
        at_least("decode", m.decode_tokens_per_s, s["decode_tokens_per_s"], "{:,.1f} tokens/s")
    if "cost_per_1k_output_tokens" in s:
        at_most("cost per 1K output tokens", m.cost_per_1k_output_tokens, s["cost_per_1k_output_tokens"], "${:.4f}")
    if m.unsupported:
        notes.append(f"{m.unsupported} case(s) unsupported by this candidate, left out of accuracy")

    # 3. languages and domains: each slice the team needs must be in the suite and pass
    threshold = s.get("slice_accuracy", s.get("accuracy"))
    for tag, wanted in (("language", req.languages), ("domain", req.domains)):
        for value in wanted:
            if value not in suite_tags.get(tag, set()):
                reasons.append(f"{tag} {value}: no cases tagged {tag}={value} in the suite")
            elif threshold is not None:
                at_least(f"{tag} {value} accuracy", m.by_tag.get(f"{tag}={value}"), threshold, "{:.0%}")

    # 2 and 4. context and memory
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
    return Verdict(m.name, not reasons, reasons, notes, needed)


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
