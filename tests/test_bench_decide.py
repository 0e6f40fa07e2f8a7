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
    assert d.verdict("big").passed and d.verdict("big").notes[0] == "passes, but small is smaller"
    assert "small: the smallest candidate that passes" in d.summary and "360M params" in d.summary


def test_no_candidate_passes():
    d = decide_for([Scripted("a", answers(0)), Scripted("b", answers(1))], {"success": {"accuracy": 0.9}})
    assert d.chosen is None and d.summary == "no candidate passes every requirement"
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
