"""The decision rule on crafted results whose answer is known: the smallest candidate that passes
every requirement, with the reason each other one failed."""

from __future__ import annotations

import pytest

from bench_fakes import Scripted
from rung.bench import finish
from rung.bench.decide import RequirementsError, load_requirements, parse_bytes, requirements_from_dict
from rung.bench.run import BenchSettings, run_bench
from rung.bench.suite import suite_from_dict

SETTINGS = BenchSettings(concurrency=1, isolate=False)
SUITE = suite_from_dict({"cases": [
    {"id": f"en-{i}", "prompt": f"{i}+1?", "expect": {"numeric": i + 1}, "tags": {"language": "en", "domain": "math"}}
    for i in range(8)] + [
    {"id": f"de-{i}", "prompt": f"{i}+2?", "expect": {"numeric": i + 2}, "tags": {"language": "de", "domain": "math"}}
    for i in range(2)] + [
    {"id": "json", "prompt": "JSON", "expect": {"type": "json", "schema": {"type": "object", "required": ["a"]}}}]})


def answers(en_right: int, de_right: int = 2, json_ok: bool = True) -> dict:
    out = {f"en-{i}": str(i + 1 if i < en_right else 0) for i in range(8)}
    out.update({f"de-{i}": str(i + 2 if i < de_right else 0) for i in range(2)})
    out["json"] = '{"a": 1}' if json_ok else "{oops"
    return out


def decide_for(candidates, requirements: dict):
    runs = run_bench(candidates, SUITE, SETTINGS)
    return finish(SUITE, runs, requirements_from_dict(requirements), SETTINGS).decision


def test_smallest_passing_candidate_wins_and_the_others_say_why():
    d = decide_for([Scripted("big", answers(8), params=7_000_000_000), Scripted("tiny", answers(3), params=135_000_000),
                    Scripted("small", answers(7), params=360_000_000)], {"success": {"accuracy": 0.8}})
    assert d.chosen == "small" and [v.name for v in d.verdicts] == ["tiny", "small", "big"]
    assert d.verdict("tiny").reasons == ["accuracy 55% < 80%"]  # 3 English + 2 German + the JSON case of 11
    # 11 cases: 10/11 and 11/11 pass on the point estimate, neither reliably (lower bounds 62% and 74%)
    assert d.status == "provisional" and d.verdict("big").passed and not d.verdict("big").reliable
    assert d.verdict("big").notes[0] == "passes on the point estimate, but small is smaller"
    d = decide_for([Scripted("big", answers(8), params=7_000_000_000), Scripted("tiny", answers(3), params=135_000_000),
                    Scripted("small", answers(7), params=360_000_000)], {"success": {"accuracy": 0.6}})
    assert d.chosen == "small" and d.status == "reliable" and d.verdict("big").notes[0] == "passes, but small is smaller"
    assert "small: the smallest candidate that passes every requirement reliably" in d.summary and "360M params" in d.summary


def test_no_candidate_passes():
    d = decide_for([Scripted("a", answers(0)), Scripted("b", answers(1))], {"success": {"accuracy": 0.9}})
    assert d.chosen is None and d.status == "none" and d.summary.startswith("no candidate passes reliably")
    assert all(not v.passed and v.reasons for v in d.verdicts)


def test_equal_parameters_go_to_fewer_weight_bytes():
    same = 135_000_000
    d = decide_for([Scripted("fp32", answers(8), params=same, weight_bytes=540_000_000),
                    Scripted("int4", answers(8), params=same, weight_bytes=90_000_000),
                    Scripted("int8", answers(8), params=same, weight_bytes=160_000_000)], {"success": {"accuracy": 0.9}})
    assert d.chosen == "int4" and [v.name for v in d.verdicts] == ["int4", "int8", "fp32"]


def test_per_check_schema_fidelity_and_latency_thresholds():
    d = decide_for([Scripted("broken-json", answers(8, json_ok=False), params=1),
                    Scripted("slow", answers(8), params=2, ttft_s=2.0, latency_s=3.0),
                    Scripted("ok", answers(8), params=3)],
                   {"success": {"checks": {"json": 1.0}, "schema_fidelity": 1.0, "ttft_p95_ms": 1000, "e2e_p95_ms": 2500}})
    assert d.chosen == "ok"
    assert d.verdict("broken-json").reasons == ["json pass rate 0% < 100%", "schema fidelity 0% < 100%"]
    assert d.verdict("slow").reasons == ["TTFT p95 2,000 ms > 1,000 ms", "end-to-end p95 3,000 ms > 2,500 ms"]


def test_languages_must_be_covered_and_pass():
    # "weak-de" passes overall (9/11) but gets the German slice wrong; French is not in the suite at all
    d = decide_for([Scripted("weak-de", answers(8, de_right=0), params=1), Scripted("ok", answers(8), params=2)],
                   {"success": {"accuracy": 0.8}, "languages": ["en", "de"], "domains": ["math"]})
    assert d.chosen == "ok" and d.verdict("weak-de").reasons == ["language de accuracy 0% < 80%"]
    # a slice threshold of its own: German at 50% is enough
    d = decide_for([Scripted("half-de", answers(8, de_right=1), params=1)],
                   {"success": {"accuracy": 0.8, "slice_accuracy": 0.5}, "languages": ["en", "de"]})
    assert d.chosen == "half-de"
    d = decide_for([Scripted("ok", answers(8))], {"success": {"accuracy": 0.8}, "languages": ["fr"]})
    assert d.chosen is None and d.verdict("ok").reasons == ["language fr: no cases tagged language=fr in the suite"]


def test_memory_budget_counts_kv_at_the_required_context():
    # peak 1.0 GB measured; at 8,192 tokens × 2 requests a 40 kB/token KV cache adds 0.66 GB
    cands = [Scripted("lean", answers(8), params=1, peak=1_000_000_000, kv_per_token=40_000),
             Scripted("fat", answers(8), params=2, peak=1_000_000_000, kv_per_token=4_000)]
    d = decide_for(cands, {"context_p95": 8192, "runs_on": {"memory": "1.5GB", "concurrency": 2}})
    assert d.chosen == "fat"
    assert d.verdict("lean").reasons == ["memory 1.66 GB (peak 1.00 GB + KV 0.66 GB at context p95) > budget 1.50 GB"]
    assert d.verdict("fat").memory_needed_bytes == 1_000_000_000 + 4_000 * 8192 * 2


def test_a_load_that_peaks_above_the_budget_fails():
    cands = [Scripted("expands-on-load", answers(8), params=1, peak=500_000_000, load_peak=2_000_000_000),
             Scripted("steady", answers(8), params=2, peak=500_000_000, load_peak=600_000_000)]
    d = decide_for(cands, {"runs_on": {"memory": "1.5GB"}})
    assert d.chosen == "steady" and d.verdict("expands-on-load").reasons == ["loading peaks at 2.00 GB > budget 1.50 GB"]


def test_context_longer_than_the_model_fails():
    d = decide_for([Scripted("short", answers(8), params=1, max_context=2048), Scripted("long", answers(8), params=2)],
                   {"context_p95": 4096})
    assert d.chosen == "long" and d.verdict("short").reasons == ["max context 2,048 < required p95 4,096 tokens"]


def test_governance_external_endpoints_and_licenses():
    cands = [Scripted("hosted", answers(8), params=1, kind="endpoint", host="api.example.com"),
             Scripted("gemma", answers(8), params=2, license="gemma"),
             Scripted("unknown", answers(8), params=3, license=""),
             Scripted("lan", answers(8), params=4, kind="endpoint", host="10.0.0.7"),
             Scripted("ok", answers(8), params=5)]
    d = decide_for(cands, {"governance": {"external_endpoints": False, "licenses": ["apache-2.0", "MIT"]}})
    assert d.chosen == "lan"  # a private address is your network
    assert d.verdict("hosted").reasons == ["external endpoint api.example.com: governance forbids sending data outside"]
    assert d.verdict("gemma").reasons == ["license gemma not allowed (apache-2.0, mit)"]
    assert d.verdict("unknown").reasons == ["license unknown (allowed: apache-2.0, mit)"]


def test_redaction_requirement_fails_a_candidate_run_unredacted():
    d = decide_for([Scripted("ok", answers(8))], {"governance": {"redaction": True}})
    assert d.chosen is None  # the redacted run passes: tests/test_govern_redact_bench.py
    assert d.verdict("ok").reasons == ["not run redacted: governance asks for PII redaction "
                                       "(bench ok+redact, or --redact)"]


def test_endpoint_cost_from_its_price_and_size_hint_orders_it():
    cands = [Scripted("openai:http://x/v1#big", answers(8), params=None, kind="endpoint", host="x"),
             Scripted("local", answers(8), params=7_000_000_000)]
    req = {"success": {"cost_per_1k_output_tokens": 0.001},
           "runs_on": {"price_per_hour": 36.0},  # $0.01/s at 16 tokens/s: $0.000625/token: too dear
           "candidates": [{"spec": "openai:http://x/v1#big", "price_per_1m_output_tokens": 0.5, "params": 1e9}]}
    d = decide_for(cands, req)
    assert [v.name for v in d.verdicts] == ["openai:http://x/v1#big", "local"]  # the 1e9 hint sorts it first
    assert d.chosen == "openai:http://x/v1#big"
    assert d.verdict("local").reasons[0].startswith("cost per 1K output tokens $0.6250 > $0.0010")


def test_a_candidate_that_did_not_run_fails_with_its_error():
    d = decide_for([Scripted("gone", answers(8), fail_open="connection refused"), Scripted("ok", answers(8), params=10**10)],
                   {})
    assert d.chosen == "ok" and d.verdict("gone").reasons == ["did not run: connection refused"]


def test_requirements_file_and_sizes(tmp_path):
    path = tmp_path / "req.yaml"
    path.write_text("success: {accuracy: 0.9}\nruns_on: {memory: 24GiB, price_per_hour: 1.5}\nchosen: m@int4\n"
                    "candidates: [m@int4, {spec: 'openai:http://h/v1#x', price_per_hour: 2}]\n")
    req = load_requirements(path)
    assert req.memory_bytes == 24 * 2**30 and req.chosen == "m@int4" and req.candidates == ["m@int4", "openai:http://h/v1#x"]
    assert req.prices == {"openai:http://h/v1#x": {"price_per_hour": 2.0}}
    assert parse_bytes("24GB") == 24 * 10**9 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes(1000) == 1000
    assert parse_bytes("1.5gb") == 1_500_000_000
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes("lots")
    for bad, message in [({"succes": {}}, "unknown key"), ({"success": {"accuracy": "high"}}, "success.accuracy"),
                         ({"runs_on": {"memory": "big"}}, "runs_on.memory"), ({"context_p95": -1}, "context_p95"),
                         ({"governance": {"vpn": True}}, "governance: takes")]:
        with pytest.raises(RequirementsError, match=message):
            requirements_from_dict(bad)


# ---- the statistical rule, on crafted outcome tables (rung/bench/decide.py's docstring) ----------

from rung.bench.candidates import case_seed  # noqa: E402
from rung.bench.decide import compare, decide  # noqa: E402
from rung.bench.measure import summarize  # noqa: E402
from rung.bench.records import CandidateInfo, CandidateRun, CaseOutcome, CheckOutcome, Sample  # noqa: E402


def crafted(name: str, outcomes: list, params: int) -> CandidateRun:
    """A run whose case i passed outcomes[i] (a bool, or a list of bools: its repeats)."""
    cases = []
    for i, o in enumerate(outcomes):
        runs = [CaseOutcome(f"c{i}", p, [CheckOutcome("contains", p, float(p))],
                            [Sample(text="x", output_tokens=8, ttft_s=0.05, latency_s=0.5)])
                for p in (o if isinstance(o, list) else [o])]
        runs[0].repeats = runs[1:]
        cases.append(runs[0])
    return CandidateRun(CandidateInfo(name, "local", total_params=params, weight_bytes=params, kv_bytes_per_token=1000,
                                      license="mit"), cases, 1.0, {"concurrency": 1}, "sha256:test")


def paired(both: int, smaller_only: int, larger_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Two outcome columns over the same cases, from the four cells of the paired table."""
    small = [True] * both + [True] * smaller_only + [False] * larger_only + [False] * neither
    large = [True] * both + [False] * smaller_only + [True] * larger_only + [False] * neither
    return small, large


def decide_runs(runs: list[CandidateRun], requirements: dict):
    req = requirements_from_dict(requirements)
    return decide([summarize(r, req.pricing(), req.confidence) for r in runs], runs, req, {})


def test_indistinguishable_candidates_the_smaller_is_chosen_provisionally_never_the_larger():
    """The starter run of issue 17: int8 10/18 against int4's and fp32's 9/18 at 55%, one case apart."""
    int4, int8 = paired(9, 0, 1, 8)
    runs = [crafted("int8", int8, 135_000_001), crafted("fp32", int4, 135_000_002), crafted("int4", int4, 135_000_000)]
    d = decide_runs(runs, {"success": {"accuracy": 0.55}})
    assert d.chosen == "int4" and d.status == "provisional"
    assert d.summary.startswith("no candidate passes reliably") and "provisional answer: int4" in d.summary
    assert [v.verdict for v in d.verdicts] == ["fails", "provisional", "fails"]  # int4, int8, fp32 by size
    a = d.against_best
    assert (a["smaller"], a["larger"], a["differ"], a["smaller_only"], a["larger_only"]) == ("int4", "int8", 1, 0, 1)
    assert a["p_value"] == 1.0 and not a["significant"] and a["difference_ci"][0] < 0 < a["difference_ci"][1]
    # what would decide it: Connor's McNemar sample size for 1 discordant case in 18 at 80% power; at
    # int8's 55.6% its lower bound clears 55% only after tens of thousands of cases; int4's 50% never
    assert d.cases_to_decide["paired"] == 139
    assert d.cases_to_decide["best"]["lower_bound"]["accuracy"] > 10_000
    assert d.cases_to_decide["answer"]["lower_bound"]["accuracy"] is None
    # with enough cases the same rule picks the smaller reliable one
    small, large = paired(180, 2, 3, 15)
    d = decide_runs([crafted("large", large, 2), crafted("small", small, 1)], {"success": {"accuracy": 0.8}})
    assert d.chosen == "small" and d.status == "reliable" and all(v.reliable for v in d.verdicts)
    assert not d.comparisons[0]["significant"] and d.comparisons[0]["differ"] == 5


def test_a_significantly_better_larger_candidate_beats_a_smaller_one_failing_the_threshold():
    # within noise of 70% both, but the larger wins 7 cases and loses none: McNemar p = 2/2^7
    small, large = paired(40, 0, 7, 13)
    d = decide_runs([crafted("small", small, 1), crafted("large", large, 2)], {"success": {"accuracy": 0.7}})
    assert d.verdict("small").verdict == "fails" and d.verdict("small").eligible  # 67%, its interval holds 70%
    assert d.chosen == "large" and d.status == "provisional"
    [c] = d.comparisons
    assert c["p_value"] == pytest.approx(2 / 2**7) and c["significant"] and c["difference"] == pytest.approx(7 / 60)
    assert c["difference_ci"][0] > 0
    # and when the larger clears the threshold's interval it is the reliable answer
    small, large = paired(30, 0, 28, 2)
    d = decide_runs([crafted("small", small, 1), crafted("large", large, 2)], {"success": {"accuracy": 0.8}})
    assert d.chosen == "large" and d.status == "reliable" and d.comparisons[0]["significant"]
    assert d.summary.startswith("large: the smallest candidate that passes every requirement reliably")


def test_nobody_reliably_passes():
    small, large = paired(16, 0, 1, 3)  # 80% and 85% of 20 against 75%: both within noise
    d = decide_runs([crafted("small", small, 1), crafted("large", large, 2)], {"success": {"accuracy": 0.75}})
    assert d.status == "provisional" and d.chosen == "small" and not any(v.reliable for v in d.verdicts)
    assert d.summary.startswith("no candidate passes reliably")
    assert "accuracy 80% is within noise of 75%" in d.verdict("small").within_noise[0]
    d = decide_runs([crafted("small", small, 1), crafted("large", large, 2)], {"success": {"accuracy": 0.95}})
    assert d.status == "none" and d.chosen is None and d.summary.startswith("no candidate passes reliably")


def test_a_smaller_candidate_that_fails_a_hard_requirement_is_never_the_provisional_answer():
    small, large = paired(9, 0, 1, 8)
    runs = [crafted("small", small, 1), crafted("large", large, 2)]
    runs[0].info.license = "gemma"
    d = decide_runs(runs, {"success": {"accuracy": 0.55}, "governance": {"licenses": ["mit"]}})
    assert d.chosen == "large" and d.status == "provisional" and not d.verdict("small").eligible


def test_repeats_turn_a_flaky_pass_into_a_fail():
    """18 of 30 cases pass only on their first seed: one run passes them all; four show them flaky."""
    suite = suite_from_dict({"defaults": {"temperature": 0.7}, "cases": [
        {"id": f"q{i}", "prompt": f"{i}+1?", "expect": {"numeric": i + 1}} for i in range(30)]})

    def answer(i: int):
        return lambda req: str(i + 1) if i < 12 or req.seed == case_seed(f"q{i}", 0) else "0"

    answers_ = {f"q{i}": answer(i) for i in range(30)}
    req = requirements_from_dict({"success": {"accuracy": 0.6}})
    once = finish(suite, run_bench([Scripted("m", answers_)], suite, SETTINGS), req, SETTINGS)
    assert once.decision.chosen == "m" and once.decision.status == "reliable" and once.metrics[0].accuracy == 1.0
    four = BenchSettings(concurrency=1, isolate=False, repeats=4)
    result = finish(suite, run_bench([Scripted("m", answers_)], suite, four), req, four)
    m = result.metrics[0]
    assert m.accuracy == pytest.approx((12 + 18 / 4) / 30) and m.repeats == 4
    assert m.pass_at_k == 1.0 and m.pass_hat_k == pytest.approx(12 / 30)
    assert len(m.flaky_cases) == 18 and m.flake_rate == pytest.approx(18 / 30)
    assert result.decision.chosen is None and result.decision.verdict("m").reasons == ["accuracy 55% < 60%"]
    # the suite's `repeats:` does the same as --repeats
    suite4 = suite_from_dict({"defaults": {"temperature": 0.7, "repeats": 4}, "cases": [
        {"id": f"q{i}", "prompt": f"{i}+1?", "expect": {"numeric": i + 1}} for i in range(30)]})
    assert suite4.hash == suite.hash  # how often a case is measured, not what
    [run] = run_bench([Scripted("m", answers_)], suite4, SETTINGS)
    assert summarize(run).accuracy == pytest.approx(m.accuracy)
    report = finish(suite4, [run], req, SETTINGS).report
    assert report["cases"][12]["repeats"]["m"] == {"runs": 4, "passed": 1, "pass_at_k": 1.0, "pass_hat_k": 0.0,
                                                   "flaky": True}


def test_every_repeat_is_a_new_sample_cached_under_its_own_key(tmp_path):
    from rung.bench.cache import ResultCache

    suite = suite_from_dict({"cases": [{"id": f"q{i}", "prompt": "?", "expect": {"contains": "a"}, "temperature": 1.0,
                                        "repeats": 3 if i < 2 else 1} for i in range(4)]})
    cache = ResultCache(tmp_path)
    first = Scripted("m", {})
    [run] = run_bench([first], suite, SETTINGS, cache)
    assert first.generated == 4 + 2 + 2  # repeats 2 and 3 of q0 and q1
    seeds = {(r.case_id, r.seed) for r in first.requests}
    assert len(seeds) == 8  # every run its own seed
    assert [len(c.runs) for c in run.cases] == [3, 3, 1, 1] and len(list(tmp_path.glob("*.json"))) == 3
    again = Scripted("m", {})
    [cached] = run_bench([again], suite, SETTINGS, cache)
    assert again.generated == 0 and cached.cached and [len(c.runs) for c in cached.cases] == [3, 3, 1, 1]
    # --repeats: runs 1-3 of every case, then a fourth: only the fourth is new work, with new seeds
    three = Scripted("m", {})
    run_bench([three], suite, BenchSettings(concurrency=1, isolate=False, repeats=3), cache)
    assert three.generated == 4 + 4  # run 1 of every case is cached; runs 2-3 now cover q2 and q3 too
    four = Scripted("m", {})
    [run4] = run_bench([four], suite, BenchSettings(concurrency=1, isolate=False, repeats=4), cache)
    assert four.generated == 4 and [len(c.runs) for c in run4.cases] == [4, 4, 4, 4]
    assert not {(r.case_id, r.seed) for r in four.requests} & {(r.case_id, r.seed) for r in first.requests + three.requests}


def test_confidence_is_a_requirements_setting_between_0_and_1():
    assert requirements_from_dict({}).confidence == 0.95
    assert requirements_from_dict({"confidence": 0.8}).confidence == 0.8
    for bad in (0, 1, 1.5, "high", True):
        with pytest.raises(RequirementsError, match="confidence must be a number between 0 and 1"):
            requirements_from_dict({"confidence": bad})
    # a lower confidence narrows the interval: 16/20 against 65% is reliable at 80% (66%–88%), not at 95% (58%–92%)
    small, _ = paired(16, 0, 1, 3)
    assert decide_runs([crafted("m", small, 1)], {"success": {"accuracy": 0.65}}).status == "provisional"
    assert decide_runs([crafted("m", small, 1)], {"success": {"accuracy": 0.65}, "confidence": 0.8}).status == "reliable"


def test_latency_percentiles_reliably_under_the_limit_use_the_bootstrap_upper_bound():
    runs = [crafted("m", [True] * 40, 1)]
    for i, case in enumerate(runs[0].cases):  # 38 fast requests and two slow ones
        case.samples[0].latency_s = 2.0 if i in (3, 17) else 0.5
    m = summarize(runs[0])
    assert m.latency_label == "p95" and m.e2e_p95_ms == pytest.approx(575.0)  # 0.05 of the way from 0.5 s to 2 s
    assert m.e2e_p95_ci[1] == pytest.approx(2000.0)  # a resample with three slow ones puts p95 at 2 s
    d = decide_runs(runs, {"success": {"e2e_p95_ms": 1000}})
    assert d.status == "provisional" and "end-to-end p95 575 ms is within noise" in d.verdicts[0].within_noise[0]
    short = crafted("m", [True] * 18, 1)
    m = summarize(short)
    assert m.latency_label == "max (n=18)" and m.e2e_p95_ms == 500.0


def test_compare_with_repeats_uses_per_case_rates():
    small = crafted("s", [[True, False]] * 10 + [[True, True]] * 10, 1)
    large = crafted("l", [[True, True]] * 20, 2)
    c = compare(small, large)
    assert (c["smaller_only"], c["larger_only"], c["cases"]) == (0, 10, 20) and c["p_value"] == pytest.approx(2 / 2**10)
    assert c["difference"] == pytest.approx(0.25) and c["difference_ci"][0] > 0 and "bootstrap" in c["method"]


def test_repeats_are_bounded_whole_numbers_and_leave_the_hash_alone():
    from rung.bench.suite import SuiteError

    case = {"id": "a", "prompt": "hi", "expect": {"contains": "x"}}
    assert suite_from_dict({"cases": [case]}).cases[0].repeats == 1
    assert suite_from_dict({"defaults": {"repeats": 5}, "cases": [case]}).cases[0].repeats == 5
    assert suite_from_dict({"defaults": {"repeats": 5}, "cases": [{**case, "repeats": 2}]}).cases[0].repeats == 2
    assert (suite_from_dict({"defaults": {"repeats": 5}, "cases": [case]}).hash
            == suite_from_dict({"cases": [case]}).hash)
    for bad, message in [(0, "at least 1"), (101, "at most 100"), (2.5, "whole number"), ("3", "whole number")]:
        with pytest.raises(SuiteError, match=f"case 'a': 'repeats' must be.*{message}"):
            suite_from_dict({"cases": [{**case, "repeats": bad}]})
