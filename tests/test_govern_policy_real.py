"""`rung serve --policy FILE --verifier lexical` end to end: a real server process with SmolLM2,
driven by the openai client. A forced tool call whose arguments the policy denies never reaches the
client: it is logged on stderr (one line per denied call, the rule named, no argument values),
counted in /metrics, fed back to the model, and the reply ends in a refusal."""

from __future__ import annotations

import http.client
import json

import openai
import pytest

from rung.govern.policy import hash_key
from serve_helpers import metric, rung_serve

KEY = "tester-key-7"
MODEL = "smollm2-135m"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
POLICY = f"""
max_rounds: 1
default:
  tools: {{allow: [get_weather]}}
  arguments:
    get_weather:
      city: {{enum: [Atlantis]}}   # whatever city the model names is denied
keys:
  tester: {{sha256: {hash_key(KEY)}}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy-serve")
    (folder / "policy.yaml").write_text(POLICY)
    log_path = folder / "serve.log"
    args = ["-m", MODEL, "--threads", "1", "--kv-cache-mb", "64", "--max-model-len", "2048",
            "--policy", str(folder / "policy.yaml"), "--verifier", "lexical", "--verify-action", "flag"]
    with rung_serve(args, log_path, "rung serve --policy to load the model") as (port, _):
        yield port, log_path


def lines(log_path, event: str) -> list[dict]:
    return [x for x in (json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{"))
            if x["event"] == event]


def test_denied_call_is_refused_logged_and_counted(server):
    port, log_path = server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
        tool_choice="required", max_tokens=40, temperature=0)
    choice = r.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "content_filter"
    assert "denied by policy" in choice.message.refusal
    denied = lines(log_path, "policy_denied")
    assert [x["round"] for x in denied] == [1, 2]  # the call, then the call after the model saw the error
    assert {x["rule"] for x in denied} == {"default.arguments.get_weather.city.enum"}
    assert all(x["key"] == "tester" and "arguments" not in x for x in denied)
    [request] = [x for x in lines(log_path, "request") if x["id"] == r.id]
    assert request["policy_denied"] == 2 and request["policy_refused"] == 1 and request["tool_calls"] == 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert metric(text, "rung:policy_denied_calls_total", key="tester", kind="arguments") == 2
    assert metric(text, "rung:policy_refusals_total", key="tester") == 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="other", max_retries=0).models.list()


def test_answers_carry_the_verifiers_verdict(server):
    port, _ = server
    body = json.dumps({"model": MODEL, "max_tokens": 24, "temperature": 0, "messages": [
        {"role": "system", "content": "The library opens at 9 am and closes at 5 pm."},
        {"role": "user", "content": "When does the library open?"}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    reply = json.loads(response.read())
    verdict = reply["choices"][0]["rung"]["verifier"]
    assert 0 <= verdict["score"] <= 1 and verdict["action"] in ("passed", "flagged")
    assert response.getheader("X-Rung-Verifier") == verdict["action"]
    assert reply["choices"][0]["message"]["content"]  # flag never replaces the answer
