"""`rung bench --verifier`: the verifier's effect on accuracy per candidate (wrong answers caught,
right answers rejected), kept in the cache under a key that includes the verifier."""

from __future__ import annotations

import io

import pytest

from bench_fakes import Scripted
from rung.bench.cache import ResultCache
from rung.bench.run import BenchSettings, run_bench
from rung.bench.suite import suite_from_dict

TOWER = "The Eiffel Tower was completed in 1889."
SWISS = "Bern is the capital of Switzerland; Zurich is its largest city."
SUITE = suite_from_dict({"name": "grounded", "cases": [
    {"id": "right", "system": TOWER, "prompt": "When was it completed?", "expect": {"contains": "1889"}},
    {"id": "wrong", "system": TOWER, "prompt": "When was it completed, again?", "expect": {"contains": "1889"}},
    {"id": "right-unsupported", "system": "Oslo is the capital of Norway.", "prompt": "Capital of Norway?",
     "expect": {"contains": "Oslo"}},
    {"id": "wrong-supported", "system": SWISS, "prompt": "Capital of Switzerland?", "expect": {"contains": "Bern"}},
    {"id": "ppl", "text": "The cat sat on the mat.", "expect": {"perplexity": 50}},
]})
ANSWERS = {"right": "It was completed in 1889.", "wrong": "It was completed in 1925.",
           "right-unsupported": "Oslo, a lovely fjord town.", "wrong-supported": "Zurich is the capital city."}


def test_lexical_verifier_effect_on_accuracy():
    settings = BenchSettings(isolate=False, verifier="lexical", verify_threshold=0.6)
    [run] = run_bench([Scripted("cand", ANSWERS)], SUITE, settings)
    verdicts = {c.case_id: c.verifier and c.verifier["passed"] for c in run.cases}
    assert verdicts == {"right": True, "wrong": False, "right-unsupported": False, "wrong-supported": True,
                        "ppl": None}
    from rung.bench.measure import summarize

    v = summarize(run).verifier
    assert v["spec"] == "lexical" and v["verified"] == 4
    assert v["accuracy"] == 0.5 and v["accuracy_passed"] == 0.5 and v["refusal_rate"] == 0.5
    assert (v["caught"], v["wrong"], v["rejected_right"], v["right"]) == (1, 2, 1, 2)


def test_a_python_verifier_catches_what_lexical_overlap_cannot(tmp_path, monkeypatch):
    (tmp_path / "numbers_check.py").write_text(
        "import re\n"
        "def grounded(question, answer, sources):\n"
        "    return float(all(n in ' '.join(sources) for n in re.findall('[0-9]+', answer)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = BenchSettings(isolate=False, verifier="python:numbers_check:grounded")
    [run] = run_bench([Scripted("cand", ANSWERS)], SUITE, settings)
    from rung.bench.measure import summarize

    v = summarize(run).verifier
    assert (v["caught"], v["rejected_right"]) == (1, 0) and v["accuracy_passed"] == pytest.approx(2 / 3)


def test_cache_keys_include_the_verifier_and_cached_runs_keep_the_verdicts(tmp_path):
    cache = ResultCache(tmp_path)
    cand = Scripted("cand", ANSWERS)
    plain = BenchSettings(isolate=False)
    lexical = BenchSettings(isolate=False, verifier="lexical", verify_threshold=0.6)
    run_bench([cand], SUITE, plain, cache)
    [first] = run_bench([cand], SUITE, lexical, cache)
    assert cand.generated == 8  # another verifier, another key: generated again
    [hit] = run_bench([cand], SUITE, lexical, cache)
    assert hit.cached and cand.generated == 8
    assert [c.verifier for c in hit.cases] == [c.verifier for c in first.cases]
    run_bench([cand], SUITE, BenchSettings(isolate=False, verifier="lexical", verify_threshold=0.9), cache)
    assert cand.generated == 12  # the threshold changes verdicts: part of the key


def test_report_prints_the_verifier_table(tmp_path):
    from rich.console import Console

    import rung.bench as rb
    from rung.bench.report import print_report

    settings = BenchSettings(isolate=False, verifier="lexical", verify_threshold=0.6)
    runs = run_bench([Scripted("cand", ANSWERS)], SUITE, settings)
    result = rb.finish(SUITE, runs, rb.Requirements(), settings, tmp_path)
    out = io.StringIO()
    print_report(result.report, Console(file=out, width=200))
    text = out.getvalue()
    assert "verifier lexical (threshold 0.6)" in text and "1/2" in text
    assert result.report["candidates"][0]["metrics"]["verifier"]["caught"] == 1
    html = result.paths["html"].read_text()
    assert "Verifier lexical (threshold 0.6)" in html and "1 of 2" in html
