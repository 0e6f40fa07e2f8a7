"""parallel_tool_calls: false (OpenAI's "at most one call"): a reply with two calls keeps the first
only, whole and streamed, in chat and in Responses, for every format's parallel-call row; with the
default (true) both calls stay."""

from __future__ import annotations

import pytest

from cases import CASES
from runners import chat_body, responses_body, scripted_server, stream_events

PARALLEL = [(fmt, c) for fmt, rows in CASES.items() for c in rows if c.id.startswith("parallel_calls")]


@pytest.mark.parametrize("fmt,case", PARALLEL, ids=[f"{f}-{c.id}" for f, c in PARALLEL])
def test_parallel_tool_calls_false_keeps_the_first_call_only(fmt, case):
    assert len(case.calls) >= 2
    client, engine = scripted_server(fmt)
    engine.script = case.output
    first = list(case.calls[0])
    with client:
        both = client.post("/v1/chat/completions", json=chat_body(case, False)).json()["choices"][0]
        assert len(both["message"]["tool_calls"]) == len(case.calls)

        body = {**chat_body(case, False), "parallel_tool_calls": False}
        choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        calls = choice["message"]["tool_calls"]
        assert [[c["function"]["name"], c["function"]["arguments"]] for c in calls] == [first]
        assert choice["finish_reason"] == "tool_calls"

        chunks = stream_events(client, {**chat_body(case, True), "parallel_tool_calls": False})
        streamed = [tc for ch in chunks if ch["choices"] for tc in ch["choices"][0]["delta"].get("tool_calls") or []]
        assert {tc["index"] for tc in streamed} == {0}
        assert "".join(tc["function"]["arguments"] for tc in streamed) == first[1]

        r = client.post("/v1/responses", json={**responses_body(case, False), "parallel_tool_calls": False}).json()
        items = [o for o in r["output"] if o["type"] == "function_call"]
        assert [[o["name"], o["arguments"]] for o in items] == [first] and r["parallel_tool_calls"] is False
