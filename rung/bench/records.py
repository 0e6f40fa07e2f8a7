"""What a bench run records: one generated sample, the outcome of each check, each case, each
candidate. Plain dataclasses with ``to_dict`` / ``from_dict``, so results are cached and reported as
JSON (never pickled)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Sample:
    """One answer of a candidate to one case, and how long it took."""

    text: str = ""
    tool_calls: list[dict] | None = None  # [{"name", "arguments": {...}}], as the API or parser gave them
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None  # time to first token, from the request's own start
    latency_s: float = 0.0  # end to end
    finish_reason: str | None = None
    error: str | None = None  # the request failed (endpoint error, context too long)

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2 or self.latency_s <= self.ttft_s:
            return None
        return (self.output_tokens - 1) / (self.latency_s - self.ttft_s)


@dataclass
class CheckOutcome:
    type: str
    passed: bool
    score: float  # in [0, 1] for most checks; perplexity carries the perplexity itself
    detail: str = ""
    answer: Any = None  # the normalised answer self-consistency votes on
    unsupported: bool = False  # the candidate cannot be scored this way (e.g. no logprobs)
    schema_valid: bool | None = None  # json checks: did the output validate against the schema


@dataclass
class CaseOutcome:
    case_id: str
    passed: bool
    checks: list[CheckOutcome]
    samples: list[Sample]
    chosen: int = 0  # the sample the outcome is from (self-consistency)
    tags: dict[str, str] = field(default_factory=dict)
    verifier: dict | None = None  # --verifier's verdict on the chosen answer: {score, passed} (rung/bench/verification.py)
    # `repeats: k`: the outcomes of runs 2..k of this case (distinct seeds); this one is run 1
    repeats: list["CaseOutcome"] = field(default_factory=list)

    @property
    def unsupported(self) -> bool:
        return any(c.unsupported for c in self.checks)

    @property
    def runs(self) -> list["CaseOutcome"]:
        """Every run of the case: this one and its repeats."""
        return [self, *self.repeats]

    @property
    def pass_rate(self) -> float:
        """Share of the case's runs that passed (0 or 1 without repeats)."""
        return sum(r.passed for r in self.runs) / len(self.runs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CaseOutcome":
        return cls(case_id=d["case_id"], passed=d["passed"], checks=[_make(CheckOutcome, c) for c in d["checks"]],
                   samples=[_make(Sample, s) for s in d["samples"]], chosen=d.get("chosen", 0),
                   tags=d.get("tags") or {}, verifier=d.get("verifier"),
                   repeats=[cls.from_dict(r) for r in d.get("repeats") or []])


@dataclass
class CandidateInfo:
    """What is known of a candidate's size and memory, measured or from rung.describe."""

    name: str
    kind: str  # "local" | "endpoint"
    model_type: str | None = None
    total_params: int | None = None
    weight_bytes: int | None = None  # as loaded in memory (local) or from describe for a known preset
    peak_memory_bytes: int | None = None  # peak RSS of the worker while serving (or CUDA peak allocated)
    model_memory_bytes: int | None = None  # that peak minus the process before the model was loaded
    load_peak_bytes: int | None = None  # peak RSS while loading (a loader may expand weights transiently)
    max_context: int | None = None
    kv_bytes_per_token: float | None = None  # at the loaded dtype, for memory at a required context
    license: str | None = None
    device: str | None = None
    load_s: float | None = None
    host: str | None = None  # endpoint host, for the governance check
    redaction: str | None = None  # the PII entity types its prompts were redacted of (rung/bench/redaction.py)
    weights: dict | None = None  # evidence: the weight files' sha256 (rung/bench/evidence.py)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CandidateInfo":
        return _make(cls, d)


@dataclass
class CandidateRun:
    """One candidate over one suite under one set of settings: what the cache stores."""

    info: CandidateInfo
    cases: list[CaseOutcome]
    wall_s: float  # generation wall time (for throughput), judge time excluded
    settings: dict[str, Any]
    suite_hash: str
    error: str | None = None  # the candidate could not run at all (failed to load, endpoint down)
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"info": asdict(self.info), "cases": [c.to_dict() for c in self.cases], "wall_s": self.wall_s,
                "settings": self.settings, "suite_hash": self.suite_hash, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CandidateRun":
        return cls(info=CandidateInfo.from_dict(d["info"]), cases=[CaseOutcome.from_dict(c) for c in d["cases"]],
                   wall_s=d["wall_s"], settings=d["settings"], suite_hash=d["suite_hash"], error=d.get("error"))


def _make(cls, d: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})
