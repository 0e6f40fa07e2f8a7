"""PII redaction in `rung serve`: the model only ever sees placeholders, the client gets the values back
(whole and streamed replies, content and tool-call arguments), per server and per request; nothing a
user typed reaches a log line, also under load with --log-prompts (the last test runs benchmarks/
serve_load.py against `rung serve --redact` with SmolLM2).

The engine's replies are scripted (govern_fakes): the model "answers" with the placeholders it was
given, streamed a few characters per delta so placeholders are cut between chunks."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest

from govern_fakes import call, events, served, tiny_qwen3, tool
from rung.engine.engine import Delta
from serve_helpers import metric, rung_serve

MARIA = "Maria Garcia"
EMAIL = "maria.garcia@example.com"
CARD = "4111 1111 1111 1111"
MESSAGE = f"I am {MARIA}, mail me at {EMAIL} and charge card {CARD}."
VALUES = [MARIA, EMAIL, CARD]


class Echo:
    """Answers with every placeholder of its prompt (or ``reply(placeholders)``), ``step`` characters
    per delta; records the prompts."""

    def __init__(self, server, reply=None, step: int = 3):
        self.server, self.prompts, self.step = server, [], step
        self.reply = reply or (lambda ps: "Noted: " + ", ".join(ps) + ".")
        server.generate = self.generate

    async def generate(self, prepared, request_id):
        self.prompts.append(prepared.prompt_text)
        placeholders = list(dict.fromkeys(re.findall(r"<[A-Z_]+_\d+>", prepared.prompt_text or "")))
        text = self.reply(placeholders)
        pieces = [text[i:i + self.step] for i in range(0, len(text), self.step)]
        for j in range(prepared.params.n):
            for k, piece in enumerate(pieces):
                yield Delta(request_id, j, piece, [1], finish_reason="stop" if k == len(pieces) - 1 else None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_qwen3(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def redacting(folder):
    client, server = served(folder, redact=True, log_prompts=True)
    yield client, server
    server.shutdown()


@pytest.fixture(scope="module")
def plain(folder):
    client, server = served(folder)
    yield client, server
    server.shutdown()


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger="rung.serve.requests")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "rung.serve.requests"]


def ask(client, content=MESSAGE, **body):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 200, **body}
    return client.post("/v1/chat/completions", json=body)


def test_the_model_sees_placeholders_and_the_client_gets_the_values(redacting, log):
    client, server = redacting
    model = Echo(server)
    r = ask(client, user=EMAIL)
    assert r.status_code == 200, r.text
    [prompt] = model.prompts
    assert not any(v in prompt for v in VALUES)
    assert "<PERSON_1>" in prompt and "<EMAIL_ADDRESS_1>" in prompt and "<CREDIT_CARD_1>" in prompt
    assert r.json()["choices"][0]["message"]["content"] == f"Noted: {MARIA}, {EMAIL}, {CARD}."
    lines = log()
    assert lines and not any(v in line for line in lines for v in VALUES)  # --log-prompts and `user` included
    [line] = [json.loads(x) for x in lines if r.json()["id"] in x]
    assert "<EMAIL_ADDRESS_1>" in line["prompt"] and line["user"] == "<EMAIL_ADDRESS_1>"
    assert line["redacted"] == {"PERSON": 1, "EMAIL_ADDRESS": 2, "CREDIT_CARD": 1}
    text = client.get("/metrics").text
    assert metric(text, "rung:redacted_entities_total", entity_type="CREDIT_CARD") >= 1
    assert metric(text, "rung:redacted_entities_total", entity_type="EMAIL_ADDRESS") >= 2


def test_a_stream_restores_placeholders_cut_between_chunks(redacting):
    client, server = redacting
    for step in (1, 2, 5):
        Echo(server, step=step)
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 200,
                "stream": True, "n": 2}) as r:
            chunks = events(r)
        for index in (0, 1):
            pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks
                      if c["choices"] and c["choices"][0]["index"] == index]
            assert "".join(pieces) == f"Noted: {MARIA}, {EMAIL}, {CARD}."
            assert not any("<" in p for p in pieces)  # never a placeholder, whole or in part
            finishes = [c for c in chunks if c["choices"] and c["choices"][0]["index"] == index
                        and c["choices"][0]["finish_reason"]]
            assert len(finishes) == 1


def test_tool_call_arguments_are_restored_whole_and_streamed(redacting):
    client, server = redacting
    Echo(server, reply=lambda ps: call("send_mail", to=ps[1], person=ps[0]))
    body = {"tools": [tool("send_mail", to="string", person="string")]}
    r = ask(client, **body)
    [c] = r.json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(c["function"]["arguments"]) == {"to": EMAIL, "person": MARIA}
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 200, "stream": True,
            **body}) as s:
        chunks = events(s)
    calls = [tc for ch in chunks if ch["choices"] for tc in ch["choices"][0]["delta"].get("tool_calls") or []]
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"to": EMAIL, "person": MARIA}


def test_history_and_tool_results_are_redacted_consistently(redacting):
    client, server = redacting
    model = Echo(server)
    r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 50, "messages": [
        {"role": "user", "content": f"Find {EMAIL}."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "lookup", "arguments": json.dumps({"email": EMAIL})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": f"{EMAIL} belongs to {MARIA}"},
        {"role": "user", "content": f"Write to {MARIA}."}]})
    assert r.status_code == 200, r.text
    [prompt] = model.prompts
    assert not any(v in prompt for v in VALUES)
    assert prompt.count("<EMAIL_ADDRESS_1>") == 3 and prompt.count("<PERSON_1>") == 2  # one value, one placeholder
    assert r.json()["choices"][0]["message"]["content"] == f"Noted: {EMAIL}, {MARIA}."


def test_text_completions_are_redacted_and_echo_is_restored(redacting):
    client, server = redacting
    model = Echo(server, reply=lambda ps: " and " + ps[0])
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": f"Mail {EMAIL}", "max_tokens": 20,
                                             "echo": True})
    assert r.status_code == 200, r.text
    assert model.prompts == ["Mail <EMAIL_ADDRESS_1>"]
    assert r.json()["choices"][0]["text"] == f"Mail {EMAIL} and {EMAIL}"
    refused = client.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2})
    assert refused.status_code == 400 and "token ids cannot be redacted" in refused.json()["error"]["message"]


def test_a_redacting_server_refuses_requests_that_turn_it_off(redacting):
    client, _ = redacting
    for value in (False, ["EMAIL_ADDRESS"]):
        r = ask(client, redact=value)
        assert r.status_code == 400 and r.json()["error"]["param"] == "redact", r.text


def test_per_request_redaction_on_a_server_without_redact(plain, log):
    client, server = plain
    model = Echo(server)
    assert ask(client).status_code == 200  # off by default: the model sees the message as sent
    assert MARIA in model.prompts[-1]
    r = ask(client, redact=True)
    assert r.status_code == 200 and not any(v in model.prompts[-1] for v in VALUES)
    assert r.json()["choices"][0]["message"]["content"] == f"Noted: {MARIA}, {EMAIL}, {CARD}."
    r = ask(client, redact=["EMAIL_ADDRESS"])  # only those types
    assert EMAIL not in model.prompts[-1] and MARIA in model.prompts[-1] and CARD in model.prompts[-1]
    bad = ask(client, redact=["NOT_A_TYPE"])
    assert bad.status_code == 400 and "NOT_A_TYPE" in bad.json()["error"]["message"]
    assert ask(client, redact="yes").status_code == 400


def test_without_the_extra_the_server_answers_one_clear_400(plain, monkeypatch):
    client, server = plain
    Echo(server)
    monkeypatch.setattr(server, "_redactors", {})
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)
    r = ask(client, redact=True)
    assert r.status_code == 400 and "pip install 'rung[pii]'" in r.json()["error"]["message"]


@pytest.mark.xdist_group("serve-smollm2")
def test_no_pii_reaches_the_logs_of_rung_serve_redact_under_load(tmp_path):
    """benchmarks/serve_load.py with its PII messages against `rung serve --redact --log-prompts`."""
    import asyncio
    import importlib.util
    from pathlib import Path

    import rung

    path = Path(__file__).parent.parent / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    load = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("serve_load", load)
    spec.loader.exec_module(load)
    found = {e.value for m in load.PII_MESSAGES for e in rung.redact(m).entities}
    assert set(load.PII_VALUES) <= found  # every planted value is one the redactor finds

    log_path = tmp_path / "serve.log"
    args = ["-m", "smollm2-135m", "--api-key", "k", "--threads", "1", "--kv-cache-mb", "64", "--redact", "--log-prompts"]
    with rung_serve(args, log_path, "rung serve --redact to load") as (port, _):
        report = asyncio.run(load.run_load(f"http://127.0.0.1:{port}", "k", "smollm2-135m", clients=4, seconds=6,
                                           pii=True))
    text = log_path.read_text()
    lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    assert report.lost == [] and report.kinds.get("pii", 0) >= 1, (report.lost, report.kinds)
    assert sum(1 for x in lines if x.get("redacted")) >= report.kinds["pii"]
    assert all("prompt" in x for x in lines if x.get("event") == "request")  # --log-prompts was on
    assert load.leaked_pii(text) == []
