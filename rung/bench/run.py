"""Running a suite against candidates: generate, score, vote, cache.

For each candidate: a cached result for (candidate, suite hash, settings) is used as is; otherwise
the candidate is opened (a local model in its own worker process, so its peak memory is its own),
every generating case is submitted with ``concurrency`` in flight, perplexity cases are scored, and
the answers are scored by their checks. Judge checks go to the judge model once the candidate is
closed; a judge is opened once per bench (in its own worker too) and reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import rung
from rung.bench.cache import ResultCache
from rung.bench.candidates import EndpointCandidate, LocalCandidate, Request, case_seed, is_endpoint, requests_for
from rung.bench.records import CandidateInfo, CandidateRun, CaseOutcome, CheckOutcome, Sample
from rung.bench.scorers import judge_messages, score_check, score_judge, score_perplexity, vote
from rung.bench.suite import Case, Suite, canonical_json


@dataclass
class BenchSettings:
    concurrency: int = 4
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None
    isolate: bool = True  # local candidates in a worker process (their own peak memory)
    # retrieval: every generating case grounded in an index (a rung.rag.Index or its path; default: the suite's rag:)
    rag: Any = None
    rag_k: int | None = None
    rag_max_chars: int | None = None
    _indexes: dict = field(default_factory=dict, repr=False, compare=False)
    # --verifier: each answer scored as `rung serve --verifier` would (rung/bench/verification.py)
    verifier: str | None = None
    verify_threshold: float = 0.5
    _verifier: Any = field(default=None, repr=False, compare=False)
    # --repeats: runs of every case (overrides the suite's `repeats:`); not in the key, each repeat has its own
    repeats: int | None = None
    # --tensor-parallel-size: local candidates split over that many processes (rung/distributed/)
    tensor_parallel_size: int = 1

    def repeats_of(self, case: Case) -> int:
        return self.repeats or case.repeats

    def key(self, suite: Suite) -> dict[str, Any]:
        """The settings that change results: part of every cache key."""
        judges = sorted({c.options.get("judge") or suite.judge for case in suite.cases for c in case.checks
                         if c.type == "judge"})
        key = {"concurrency": self.concurrency, "seed": self.seed, "device": self.device, "dtype": self.dtype,
               "judges": judges, "rung": rung.__version__}
        if self.tensor_parallel_size > 1:  # the same tokens, other timings and memory: its own results
            key["tensor_parallel_size"] = self.tensor_parallel_size
        retrieval = self.retrieval(suite)
        if retrieval is not None:  # grounded and ungrounded runs are different results
            index, k, max_chars = retrieval
            key["rag"] = {"index": index.hash, "k": k, "max_chars": max_chars}
        if self.verifier:
            from rung.govern.verify import fingerprint

            key["verifier"] = {"spec": self.verifier, "threshold": self.verify_threshold, **fingerprint(self.verifier)}
        return key

    def loaded_verifier(self):
        if self._verifier is None:
            from rung.govern.verify import load_verifier

            self._verifier = load_verifier(self.verifier, device=self.device)
        return self._verifier

    def retrieval(self, suite: Suite):
        """(index, k, max_chars) the cases are grounded with, or None: --rag, else the suite's `rag:`."""
        from rung.rag import DEFAULT_K, DEFAULT_MAX_CHARS, load_index

        spec = suite.rag or {}
        index = self.rag if self.rag is not None else spec.get("index")
        if index is None:
            return None
        if not hasattr(index, "search"):
            if str(index) not in self._indexes:
                self._indexes[str(index)] = load_index(index)
            index = self._indexes[str(index)]
        return (index, self.rag_k or spec.get("k") or DEFAULT_K,
                self.rag_max_chars or spec.get("max_chars") or DEFAULT_MAX_CHARS)


class Progress(Protocol):
    def start(self, name: str, total: int) -> None: ...
    def loading(self, done: int, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def finish(self, run: CandidateRun) -> None: ...


class _Quiet:
    def start(self, name, total): pass
    def loading(self, done, total): pass
    def advance(self, n=1): pass
    def finish(self, run): pass


def make_candidate(spec: str, settings: BenchSettings, progress: Progress | None = None):
    from rung.bench.redaction import RedactedCandidate, base_spec, is_redacted

    if is_redacted(spec):  # NAME+redact: the same candidate behind rung's PII redaction
        return RedactedCandidate(make_candidate(base_spec(spec), settings, progress))
    if is_endpoint(spec):
        return EndpointCandidate(spec)
    options: dict[str, Any] = {"device": settings.device}
    if settings.dtype:
        options["dtype"] = settings.dtype
    if settings.tensor_parallel_size > 1:
        options["tensor_parallel_size"] = settings.tensor_parallel_size
    loading = progress.loading if progress else None
    if settings.isolate:
        from rung.bench.worker import WorkerCandidate

        return WorkerCandidate(spec, progress=loading, **options)
    return LocalCandidate(spec, progress=loading, **options)


def run_bench(candidates: list, suite: Suite, settings: BenchSettings | None = None, cache: ResultCache | None = None,
              progress: Progress | None = None) -> list[CandidateRun]:
    """Every candidate (a spec string or an object with LocalCandidate's interface) over ``suite``."""
    settings = settings or BenchSettings()
    progress = progress or _Quiet()
    judges: dict[str, Any] = {}
    runs = []
    try:
        for candidate in candidates:
            if isinstance(candidate, str):
                candidate = make_candidate(candidate, settings, progress)
            runs.append(run_candidate(candidate, suite, settings, cache, progress, judges))
    finally:
        for judge in judges.values():
            judge.close()
    return runs


def run_candidate(candidate, suite: Suite, settings: BenchSettings, cache: ResultCache | None, progress: Progress,
                  judges: dict) -> CandidateRun:
    """Every run of every case (`repeats:`), each repeat cached under its own key: a cached repeat is
    reused, a missing one is generated with the candidate opened once."""
    key_settings = settings.key(suite)
    fingerprint = candidate.fingerprint() if cache else None
    plan = [_repeat_cases(suite, settings, r) for r in range(max(settings.repeats_of(c) for c in suite.cases))]
    plan = [cases for cases in plan if cases]
    keys = [_repeat_key(fingerprint, suite, key_settings, r, cases) for r, cases in enumerate(plan)] if cache else None
    progress.start(candidate.name, sum(_work(cases) for cases in plan))
    runs: list[CandidateRun | None] = [cache.get(key) for key in keys] if cache else [None] * len(plan)
    for hit, cases in zip(runs, plan):
        if hit is not None:
            progress.advance(_work(cases))
    if all(runs):
        merged = _merge(runs, key_settings, suite.hash, cached=True)
        _keep_evidence(merged, candidate, cache)
        progress.finish(merged)
        return merged

    info = CandidateInfo(name=candidate.name, kind=getattr(candidate, "kind", "local"))
    fresh: dict[int, tuple[dict, dict, list, float]] = {}
    try:
        info = candidate.open()
        for r, cases in enumerate(plan):
            if runs[r] is None:
                fresh[r] = _generate(candidate, suite, cases, settings, progress, r)
        candidate.measure_memory()
        info = candidate.info
    except Exception as e:  # a candidate that cannot run is reported, and the others still run
        run = CandidateRun(info=info, cases=[], wall_s=0.0, settings=key_settings, suite_hash=suite.hash,
                           error=" ".join(str(e).split()) or type(e).__name__)
        progress.finish(run)
        return run
    finally:
        candidate.close()

    for r, (samples, perplexities, requests, wall) in fresh.items():
        outcomes = score_cases(suite, samples, perplexities, judges, settings, plan[r])
        if settings.verifier:
            from rung.bench.verification import verify_outcomes

            verify_outcomes(settings.loaded_verifier(), settings.verify_threshold, outcomes,
                            {q.case_id: q.messages for q in requests})
        runs[r] = CandidateRun(info=info, cases=outcomes, wall_s=wall, settings=key_settings, suite_hash=suite.hash)
        # a failed request may be transient (a server restarting, a timeout): such runs are measured again
        if cache and not any(s.error for case in outcomes for s in case.samples):
            cache.put(keys[r], runs[r])
    merged = _merge(runs, key_settings, suite.hash, cached=False, info=info)
    _keep_evidence(merged, candidate, cache)
    progress.finish(merged)
    return merged


def _keep_evidence(run: CandidateRun, candidate, cache: ResultCache | None) -> None:
    """The candidate's weight files by sha256, into its info (the report's evidence)."""
    from rung.bench.evidence import weights_evidence

    try:
        run.info.weights = weights_evidence(candidate.fingerprint(),
                                            cache.directory / "sha256.json" if cache is not None and cache.enabled else None)
    except (OSError, ValueError) as e:
        run.info.weights = {"sha256": None, "note": f"not hashed: {' '.join(str(e).split())}"}


def _repeat_cases(suite: Suite, settings: BenchSettings, repeat: int) -> list[Case]:
    """The cases run ``repeat`` covers: run 0 all of them, a later run those with more repeats that
    generate (a perplexity is the same every time)."""
    return [c for c in suite.cases if repeat == 0 or (c.generates and settings.repeats_of(c) > repeat)]


def _repeat_key(fingerprint: dict, suite: Suite, key_settings: dict, repeat: int, cases: list[Case]) -> str:
    """Run 0 has the key a run without repeats always had; run r adds its index and the cases it covers."""
    if repeat == 0:
        return ResultCache.key(fingerprint, suite.hash, key_settings)
    ids = canonical_json(sorted(c.id for c in cases))
    return ResultCache.key(fingerprint, suite.hash, {**key_settings, "repeat": repeat, "cases": ids})


def _work(cases: list[Case]) -> int:
    return sum(c.samples if c.generates else 1 for c in cases)


def _generate(candidate, suite: Suite, cases: list[Case], settings: BenchSettings, progress: Progress, repeat: int):
    """Run ``repeat`` of ``cases``: (samples per case, perplexities, requests, generation wall time)."""
    samples: dict[str, list[Sample]] = {}
    perplexities: dict[str, tuple[float | None, str]] = {}
    requests = requests_for(cases, settings.seed, repeat)
    retrieval = settings.retrieval(suite)
    if retrieval is not None:  # --rag: the passages each case's question retrieves, in its system message
        from rung.rag import ground

        index, k, max_chars = retrieval
        requests = [replace(q, messages=ground(index, q.messages, k, max_chars)[0]) for q in requests]

    def done(index: int, got: list[Sample]) -> None:
        samples[requests[index].case_id] = got
        progress.advance(len(got))

    wall = candidate.generate(requests, settings.concurrency, done)
    for case in cases:
        if not case.generates:
            perplexities[case.id] = candidate.perplexity(case.text)
            progress.advance()
    return samples, perplexities, requests, wall


def _merge(runs: list[CandidateRun], key_settings: dict, suite_hash: str, cached: bool,
           info: CandidateInfo | None = None) -> CandidateRun:
    """One run whose case outcomes carry their repeats (run 0's outcome first)."""
    first = runs[0]
    later: dict[str, list[CaseOutcome]] = {}
    for run in runs[1:]:
        for outcome in run.cases:
            later.setdefault(outcome.case_id, []).append(outcome)
    cases = [replace(o, repeats=later.get(o.case_id, [])) for o in first.cases]
    merged = CandidateRun(info=info or first.info, cases=cases, wall_s=sum(r.wall_s for r in runs),
                          settings=key_settings, suite_hash=suite_hash)
    merged.cached = cached
    return merged


def score_cases(suite: Suite, samples: dict[str, list[Sample]], perplexities: dict, judges: dict,
                settings: BenchSettings, cases: list[Case] | None = None) -> list[CaseOutcome]:
    """The outcome of each of ``cases`` (default: the suite's) from its samples."""
    cases = list(suite.cases) if cases is None else cases
    per_case: dict[str, list[list[CheckOutcome]]] = {}
    judged: list[tuple[Case, int, int, Any]] = []  # (case, sample, check index, check)
    for case in cases:
        if not case.generates:
            value, why = perplexities.get(case.id, (None, "not run"))
            per_case[case.id] = [[score_perplexity(check, value, why) for check in case.checks]]
            continue
        got = samples.get(case.id) or [Sample(error="no answer")]
        tool_names = [t["function"]["name"] for t in case.tools] if case.tools else None
        rows = []
        for s_index, sample in enumerate(got):
            row = []
            for c_index, check in enumerate(case.checks):
                if check.type == "judge":
                    row.append(None)
                    judged.append((case, s_index, c_index, check))
                else:
                    row.append(score_check(check, sample, list(case.choices or []), tool_names))
            rows.append(row)
        per_case[case.id] = rows
    if judged:
        _judge(suite, judged, samples, per_case, judges, settings)

    out = []
    for case in cases:
        rows = per_case[case.id]
        chosen = vote(rows, case.vote) if len(rows) > 1 else 0
        checks = rows[chosen]
        out.append(CaseOutcome(case_id=case.id, passed=all(c.passed for c in checks), checks=checks,
                               samples=samples.get(case.id, []), chosen=chosen, tags=dict(case.tags)))
    return out


def _judge(suite: Suite, judged: list, samples: dict, per_case: dict, judges: dict, settings: BenchSettings) -> None:
    """Grade the judge checks: each judge model is opened once per bench and reused."""
    by_judge: dict[str, list] = {}
    for item in judged:
        spec = item[3].options.get("judge") or suite.judge
        by_judge.setdefault(spec, []).append(item)
    for spec, items in by_judge.items():
        requests, targets = [], []
        for case, s_index, c_index, check in items:
            sample = samples[case.id][s_index]
            if sample.error:
                per_case[case.id][s_index][c_index] = CheckOutcome("judge", False, 0.0, f"request failed: {sample.error}")
                continue
            question = "\n".join(f"{m['role']}: {m['content']}" for m in case.chat_messages())
            requests.append(Request(case_id=case.id, messages=judge_messages(check, question, sample.text), max_tokens=48,
                                    seed=case_seed(case.id, settings.seed)))
            targets.append((case, s_index, c_index, check))
        if not requests:
            continue
        verdicts: dict[int, str] = {}
        try:
            judge = judges.get(spec)
            if judge is None:
                judge = spec if not isinstance(spec, str) else make_candidate(spec, settings)
                judge.open()
                judges[spec] = judge

            def done(i: int, got: list[Sample]) -> None:
                verdicts[i] = got[0].text if not got[0].error else f"(judge error: {got[0].error})"

            judge.generate(requests, settings.concurrency, done)
        except Exception as e:
            for i in range(len(requests)):
                verdicts.setdefault(i, f"(judge {spec} failed: {' '.join(str(e).split())})")
        for i, (case, s_index, c_index, check) in enumerate(targets):
            per_case[case.id][s_index][c_index] = score_judge(check, verdicts.get(i, ""), str(spec))

