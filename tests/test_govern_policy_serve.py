"""The tool-use policy end to end through the server: declared tools a key may not use are taken
out, a denied call never reaches the client (it is logged, counted and fed back to the model as a
tool error), a model that keeps violating ends with a refusal; streaming and whole replies alike.

The engine's replies are scripted (govern_fakes): the model "calls" exactly what a test needs, and
the tests read the prompts it was given. The last test runs `rung serve --policy` with SmolLM2."""

from __future__ import annotations

import json
import logging

import pytest

from govern_fakes import Scripted, call, events, served, tiny_qwen3, tool
from rung.govern.policy import hash_key, parse_policy
from serve_helpers import metric

READ = tool("read_file", path="string")
DELETE = tool("delete_all")
WEATHER = tool("get_weather", city="string")
POLICY = {
    "max_rounds": 1,
    "default": {"tools": {"allow": ["read_file", "get_*"], "deny": ["delete*"]},
                "arguments": {"read_file": {"path": {"deny": ["@path_traversal"], "max_length": 64}}}},
    "keys": {"alice": {"sha256": hash_key("alice-key")},
             "ops": {"sha256": hash_key("ops-key"), "tools": {"allow": ["*"]}}},
}
ALICE = {"Authorization": "Bearer alice-key"}
SECRET = "../../etc/passwd"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    client, server = served(tiny_qwen3(tmp_path_factory.mktemp("qwen3")), policy=parse_policy(POLICY, "policy.yaml"))
    yield client, server
    server.shutdown()


def ask(client, *tools, headers=ALICE, **body):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Read the passwords."}], "tools": list(tools),
            "max_tokens": 200, "temperature": 0, **body}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def denied_once(prompt: str) -> str:
    """The model calls a file outside its folder, then, shown the error, answers in words."""
    return "I may not read that file." if "denied by policy" in prompt else call("read_file", path=SECRET)


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger="rung.serve.requests")
    return lambda event: [json.loads(r.getMessage()) for r in caplog.records
                          if r.name == "rung.serve.requests" and json.loads(r.getMessage())["event"] == event]


def test_denied_call_is_logged_counted_and_returned_to_the_model_as_a_tool_error(app, log):
    client, server = app
    model = Scripted(server, denied_once)
    r = ask(client, READ)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["tool_calls"] is None and choice["message"]["content"] == "I may not read that file."
    assert choice["finish_reason"] == "stop"
    # the model was asked twice; the second prompt holds its call and the policy's error as the tool result
    assert len(model.prompts) == 2
    assert "read_file" in model.prompts[1] and "denied by policy" in model.prompts[1]
    assert "deny pattern '@path_traversal'" in model.prompts[1]
    usage = r.json()["usage"]
    first = len(server.llm.tokenizer.encode(model.prompts[0], add_special_tokens=False))
    assert usage["prompt_tokens"] > 2 * first  # both rounds' prompts were processed
    [line] = log("policy_denied")
    assert line["key"] == "alice" and line["tool"] == "read_file" and line["round"] == 1
    assert line["rule"] == "default.arguments.read_file.path.deny[0]"
    assert "arguments" not in line and SECRET not in json.dumps(line)  # no argument values without --log-prompts
    [request] = [x for x in log("request") if x["id"] == r.json()["id"]]
    assert request["policy_denied"] == 1 and request["key"] == "alice" and request["tool_calls"] == 0
    text = client.get("/metrics").text
    assert metric(text, "rung:policy_denied_calls_total", key="alice", kind="arguments") == 1


def test_a_model_that_keeps_violating_ends_with_a_refusal(app):
    client, server = app
    model = Scripted(server, lambda prompt: "Let me look. " + call("read_file", path=SECRET))
    r = ask(client, READ)
    choice = r.json()["choices"][0]
    assert len(model.prompts) == 1 + POLICY["max_rounds"]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["tool_calls"] is None
    refusal = choice["message"]["refusal"]
    assert "denied by policy" in refusal and SECRET not in refusal
    assert choice["message"]["content"].endswith(refusal)
    assert metric(client.get("/metrics").text, "rung:policy_refusals_total", key="alice") >= 1


def test_allowed_calls_pass_unchanged_and_keys_have_their_own_rules(app):
    client, server = app
    Scripted(server, lambda prompt: call("read_file", path="docs/a.md"))
    choice = ask(client, READ).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"path": "docs/a.md"}
    # ops may call anything; alice may not call a tool outside her allow list, even one the model invents
    Scripted(server, lambda prompt: call("shell", command="ls"))
    assert ask(client, tool("shell"), headers={"Authorization": "Bearer ops-key"}).json()["choices"][0][
        "finish_reason"] == "tool_calls"
    # a call to a tool the request did not declare is no call at all (issue 20): it stays content
    r = ask(client, READ, messages=[{"role": "user", "content": "list"}])
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["tool_calls"] is None
    assert '"shell"' in choice["message"]["content"]
    assert ask(client, READ, headers={"Authorization": "Bearer nobody"}).status_code == 401
    assert ask(client, READ, headers={}).status_code == 401


def test_declared_tools_the_key_may_not_use_are_removed_or_refused(app):
    client, server = app
    model = Scripted(server, lambda prompt: "Nothing to do.")
    r = ask(client, READ, DELETE)
    assert r.status_code == 200 and r.headers["x-rung-policy-removed-tools"] == "delete_all"
    assert "read_file" in model.prompts[0] and "delete_all" not in model.prompts[0]
    r = ask(client, READ, DELETE, tool_choice={"type": "function", "function": {"name": "delete_all"}})
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert "delete_all" in r.json()["error"]["message"] and "default.tools.deny[0]" in r.json()["error"]["message"]
    r = ask(client, DELETE, tool_choice="required")
    assert r.status_code == 403
    assert metric(client.get("/metrics").text, "rung:policy_removed_tools_total", key="alice") >= 1


def test_streamed_calls_are_sent_only_after_the_policy_passed_them(app):
    client, server = app
    Scripted(server, denied_once)
    with client.stream("POST", "/v1/chat/completions", headers=ALICE, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Read it."}], "tools": [READ],
            "max_tokens": 200, "temperature": 0, "stream": True}) as r:
        chunks = events(r)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not any(d.get("tool_calls") for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == "I may not read that file."
    assert SECRET not in json.dumps(chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop"]

    Scripted(server, lambda prompt: "Checking. " + call("get_weather", city="Oslo"))
    with client.stream("POST", "/v1/chat/completions", headers=ALICE, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER],
            "max_tokens": 200, "temperature": 0, "stream": True}) as r:
        chunks = events(r)
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert len(calls) == 1 and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_every_sample_of_n_gets_its_own_rounds(app):
    client, server = app
    Scripted(server, denied_once)
    r = ask(client, READ, n=2, temperature=1.0, seed=1)
    choices = r.json()["choices"]
    assert [c["message"]["content"] for c in choices] == ["I may not read that file."] * 2
    assert [c["index"] for c in choices] == [0, 1]
