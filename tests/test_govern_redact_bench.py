"""`rung bench` redacted vs not: NAME+redact sends the suite's prompts through PII redaction, restores
the answers before scoring, is cached apart, and is what a `governance: {redaction: true}` requires."""

from __future__ import annotations

import json
import re

from bench_fakes import Scripted
from rung.bench import finish
from rung.bench.cache import ResultCache
from rung.bench.decide import requirements_from_dict
from rung.bench.redaction import RedactedCandidate
from rung.bench.run import BenchSettings, make_candidate, run_bench
from rung.bench.suite import suite_from_dict
from rung.cli import main

EMAIL = "maria.garcia@example.com"
SUITE = suite_from_dict({"name": "pii", "cases": [
    {"id": "echo", "prompt": f"Repeat the address {EMAIL}.", "expect": {"contains": EMAIL}},
    {"id": "name", "system": "You are Maria Garcia's assistant.", "prompt": "Whose assistant are you?",
     "expect": {"contains": "Maria Garcia"}},
    {"id": "call", "prompt": f"E-mail {EMAIL} the invoice.", "expect": {"type": "tool_call", "name": "send"},
     "tools": [{"type": "function", "function": {"name": "send", "parameters": {"type": "object"}}}]},
]})
SETTINGS = BenchSettings(concurrency=1, isolate=False)


def placeholders(req) -> list[str]:
    return re.findall(r"<[A-Z_]+_\d+>", json.dumps(req.messages))


def echo(req):
    """The model repeats the placeholders it was given (or the raw text, unredacted)."""
    found = list(dict.fromkeys(placeholders(req)))
    return " ".join(found) if found else req.messages[-1]["content"]


def scripted(name="m"):
    return Scripted(name, {"echo": echo, "name": echo,
                           "call": lambda req: {"name": "send", "arguments": {"to": (placeholders(req) or [""])[0]}}})


def test_a_redacted_run_sees_placeholders_and_is_scored_on_restored_answers(tmp_path):
    inner = scripted()
    [run] = run_bench([RedactedCandidate(inner)], SUITE, SETTINGS)
    assert run.info.name == "m+redact" and "EMAIL_ADDRESS" in run.info.redaction
    seen = json.dumps([r.messages for r in inner.requests])
    assert EMAIL not in seen and "Maria Garcia" not in seen and "<EMAIL_ADDRESS_1>" in seen and "<PERSON_1>" in seen
    outcome = {c.case_id: c for c in run.cases}
    assert all(c.passed for c in run.cases), [(c.case_id, c.checks) for c in run.cases]
    assert outcome["echo"].samples[0].text == EMAIL
    assert outcome["call"].samples[0].tool_calls == [{"name": "send", "arguments": {"to": EMAIL}}]


def test_redacted_and_plain_runs_are_cached_apart(tmp_path):
    cache = ResultCache(tmp_path)
    plain, redacted = scripted(), RedactedCandidate(scripted())
    assert plain.fingerprint() != redacted.fingerprint()
    run_bench([plain, redacted], SUITE, SETTINGS, cache)
    again_plain, again_redacted = scripted(), RedactedCandidate(scripted())
    runs = run_bench([again_plain, again_redacted], SUITE, SETTINGS, cache)
    assert all(r.cached for r in runs) and again_plain.generated == again_redacted.inner.generated == 0
    assert [r.info.name for r in runs] == ["m", "m+redact"]


def test_the_plus_redact_spec_wraps_any_candidate():
    candidate = make_candidate("openai:http://127.0.0.1:1/v1#m+redact", SETTINGS)
    assert isinstance(candidate, RedactedCandidate) and candidate.name == "openai:http://127.0.0.1:1/v1#m+redact"
    assert candidate.inner.model == "m" and candidate.fingerprint()["redact"]["entities"]


def test_governance_redaction_passes_only_the_redacted_run():
    runs = run_bench([scripted(), RedactedCandidate(scripted())], SUITE, SETTINGS)
    decision = finish(SUITE, runs, requirements_from_dict({"governance": {"redaction": True}}), SETTINGS).decision
    assert decision.chosen == "m+redact"
    assert decision.verdict("m").reasons[0].startswith("not run redacted")


def test_rung_bench_redact_reports_both_side_by_side(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f'cases:\n  - {{id: e, prompt: "Write to {EMAIL}", expect: {{contains: "@"}}}}\n')
    args = [str(suite), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"),
            "-m", "openai:http://127.0.0.1:9/v1#m", "--redact"]
    assert main(["bench", *args]) == 0  # nothing listens on port 9: both runs fail, and say so
    report = json.loads((tmp_path / "out" / "suite.json").read_text())
    infos = {c["info"]["name"]: c["info"] for c in report["candidates"]}
    assert set(infos) == {"openai:http://127.0.0.1:9/v1#m", "openai:http://127.0.0.1:9/v1#m+redact"}, infos
    assert infos["openai:http://127.0.0.1:9/v1#m+redact"]["redaction"] and not infos["openai:http://127.0.0.1:9/v1#m"]["redaction"]
