"""The verifier: built-in lexical overlap and python: callables score crafted answers, and through
the server a failing answer is refused (content_filter) or flagged, streamed or not, before any of it
reaches the client."""

from __future__ import annotations

import json

import pytest

from govern_fakes import Scripted, events, served, tiny_qwen3
from rung.govern.verify import CallableVerifier, LexicalVerifier, VerifierError, load_verifier
from rung.serve.governance import VERIFIER_REFUSAL, Verification, sources_of
from serve_helpers import metric

SOURCE = "The Eiffel Tower in Paris was completed in 1889 and is 330 metres tall."
QUESTION = "When was the Eiffel Tower completed?"
SUPPORTED = "The Eiffel Tower was completed in 1889."
UNSUPPORTED = "It was finished in 1925 by Gustave Flaubert in Lyon."
MESSAGES = [{"role": "system", "content": f"Answer from this text only: {SOURCE}"},
            {"role": "user", "content": QUESTION}]

CLASSIFIER = '''
def grounded(question, answer, sources):
    """A crafted classifier: every number in the answer must be in the sources."""
    import re
    numbers = re.findall(r"[0-9]+", answer)
    text = " ".join(sources)
    return 1.0 if all(n in text for n in numbers) else 0.0

def broken(question, answer, sources):
    return "very"
'''


@pytest.fixture
def classifier(tmp_path, monkeypatch):
    (tmp_path / "my_classifier.py").write_text(CLASSIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "python:my_classifier:grounded"


def test_lexical_overlap_flips_between_supported_and_unsupported_answers():
    v = LexicalVerifier()
    assert v.score(QUESTION, SUPPORTED, [SOURCE]) == 1.0
    assert v.score(QUESTION, UNSUPPORTED, [SOURCE]) < 0.3
    assert v.score(QUESTION, "It is 330 metres tall.", [SOURCE]) == 1.0
    assert v.score(QUESTION, "It is 320 metres tall.", [SOURCE]) < 1.0  # numbers are content words
    assert v.score(QUESTION, "Eiffel towers", [SOURCE]) == 1.0  # plurals
    assert v.score(QUESTION, SUPPORTED, []) == 0.0  # nothing to support it
    assert v.score(QUESTION, "Yes.", [SOURCE]) == 1.0  # nothing claimed


def test_python_callable_verifier(classifier):
    v = load_verifier(classifier)
    assert isinstance(v, CallableVerifier)
    assert v.score(QUESTION, SUPPORTED, [SOURCE]) == 1.0 and v.score(QUESTION, UNSUPPORTED, [SOURCE]) == 0.0
    assert v.fingerprint()["source_sha256"]  # a bench cache key changes with the code
    with pytest.raises(VerifierError, match=r"returned 'very', not a number in \[0, 1\]"):
        load_verifier("python:my_classifier:broken").score("q", "a", [])
    with pytest.raises(VerifierError, match="has no function 'nope'"):
        load_verifier("python:my_classifier:nope")
    with pytest.raises(VerifierError, match="cannot import no_such_module"):
        load_verifier("python:no_such_module:f")
    with pytest.raises(VerifierError, match="expected python:MODULE:FUNCTION"):
        load_verifier("python:only_module")


def test_sources_come_from_the_conversation():
    q, s = sources_of(MESSAGES)
    assert q == QUESTION and s == [MESSAGES[0]["content"]]
    q, s = sources_of(MESSAGES, passages=["retrieved passage"])
    assert s == ["retrieved passage"]
    tool_turn = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None},
                 {"role": "tool", "content": '{"temp": 21}'}, {"role": "user", "content": "And in F?"}]
    assert sources_of(tool_turn) == ("And in F?", ["Weather?", '{"temp": 21}'])
    single = [{"role": "user", "content": f"Context: {SOURCE}\nQuestion: {QUESTION}"}]
    assert sources_of(single)[1] == [single[0]["content"]]  # context and question in one message


# ---- through the server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    client, server = served(tiny_qwen3(tmp_path_factory.mktemp("qwen3")), verifier="lexical", verify_threshold=0.6)
    yield client, server
    server.shutdown()


def ask(client, **body):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 50,
                                                     "temperature": 0, **body})


def stream(client, **body) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": MESSAGES, "max_tokens": 50, "temperature": 0, "stream": True, **body}) as r:
        assert r.status_code == 200
        return events(r)


def answer_of(chunks) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_refuse_replaces_an_unsupported_answer_and_passes_a_supported_one(app):
    client, server = app
    server.verification.action = "refuse"
    Scripted(server, lambda prompt: SUPPORTED)
    r = ask(client)
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == SUPPORTED and choice["finish_reason"] == "stop"
    assert choice["rung"]["verifier"] == {"score": 1.0, "passed": True, "action": "passed"}
    assert r.headers["x-rung-verifier"] == "passed"

    Scripted(server, lambda prompt: UNSUPPORTED)
    r = ask(client)
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == VERIFIER_REFUSAL == choice["message"]["refusal"]
    assert choice["finish_reason"] == "content_filter"
    assert choice["rung"]["verifier"]["passed"] is False and choice["rung"]["verifier"]["score"] < 0.6
    assert r.headers["x-rung-verifier"] == "refused" and float(r.headers["x-rung-verifier-score"]) < 0.6
    text = client.get("/metrics").text
    assert metric(text, "rung:verifier_verdicts_total", verdict="refused") >= 1
    assert metric(text, "rung:verifier_verdicts_total", verdict="passed") >= 1
    assert metric(text, "rung:request_success_total", finished_reason="content_filter") >= 1


def test_flag_returns_the_answer_marked(app):
    client, server = app
    server.verification.action = "flag"
    try:
        Scripted(server, lambda prompt: UNSUPPORTED)
        r = ask(client)
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == UNSUPPORTED and choice["finish_reason"] == "stop"
        assert choice["rung"]["verifier"]["action"] == "flagged" and r.headers["x-rung-verifier"] == "flagged"
    finally:
        server.verification.action = "refuse"


def test_a_streamed_answer_is_verified_before_any_of_it_is_sent(app):
    client, server = app
    Scripted(server, lambda prompt: UNSUPPORTED)
    chunks = stream(client)
    assert "1925" not in json.dumps(chunks)
    assert answer_of(chunks) == VERIFIER_REFUSAL
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "content_filter" and last["rung"]["verifier"]["action"] == "refused"
    Scripted(server, lambda prompt: SUPPORTED)
    chunks = stream(client, logprobs=True)
    assert answer_of(chunks) == SUPPORTED
    assert chunks[-1]["choices"][0]["rung"]["verifier"]["passed"] is True
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks
               if c["choices"] and c["choices"][0].get("logprobs")) > 0  # logprobs survive the holding


def test_a_python_classifier_changes_the_outcome(app, classifier):
    client, server = app
    saved = server.verification
    server.verification = Verification(load_verifier(classifier), threshold=0.5, action="refuse")
    try:
        # lexically close, but a number the source does not have: the classifier refuses it
        Scripted(server, lambda prompt: "The Eiffel Tower was completed in 1887.")
        assert ask(client).json()["choices"][0]["finish_reason"] == "content_filter"
        Scripted(server, lambda prompt: "Completed: 1889.")
        assert ask(client).json()["choices"][0]["message"]["content"] == "Completed: 1889."
        server.verification = Verification(load_verifier("python:my_classifier:broken"), 0.5, "refuse")
        choice = ask(client).json()["choices"][0]  # a failing verifier fails closed
        assert choice["finish_reason"] == "content_filter" and "not a number" in choice["rung"]["verifier"]["error"]
    finally:
        server.verification = saved


def test_tool_calls_are_not_verified(app):
    client, server = app
    Scripted(server, lambda prompt: '<tool_call>\n{"name": "lookup", "arguments": {"q": "tower"}}\n</tool_call>')
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    choice = ask(client, tools=[tool]).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and "rung" not in choice
