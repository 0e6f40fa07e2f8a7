"""`POST /v1/responses` on crafted model output: reasoning items for Qwen3 `<think>` and gpt-oss
analysis, calls after reasoning, the event order around them, the input items → chat messages
mapping, and the response store's bounds (entries, bytes, TTL). The server tests run in process
on a tiny Qwen3 whose engine is replaced by one that writes a scripted reply."""

from __future__ import annotations

import json
import openai
import pytest

from rung.engine.engine import Delta
from rung.serve.family import Family
from rung.serve.reasoning import Event, ToolCallOut
from rung.serve.responses_api import input_messages
from rung.serve.responses_run import OutputItems
from rung.serve.responses_store import ResponseStore

WEATHER = {"type": "function", "name": "get_weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def items_of(events):
    out = OutputItems()
    for e in events:
        out.add(e)
    out.finish()
    return out.items, out.take()


def parsed(family: Family, text: str, tools=None, size: int = 3) -> list[Event]:
    parser = family.parser(tools)
    events = []
    for i in range(0, len(text), size):
        events += parser.push(text[i:i + size])
    return events + parser.finish()


# ---- output items from parsed replies --------------------------------------------------------------


def test_qwen3_think_block_becomes_a_reasoning_item_before_the_message():
    events = parsed(Family("hermes", thinks=True), "<think>\nThe user greets me.\n</think>\n\nHello!")
    items, stream = items_of(events)
    assert [i["type"] for i in items] == ["reasoning", "message"]
    assert items[0]["content"] == [{"type": "reasoning_text", "text": "\nThe user greets me.\n"}]
    assert items[1]["content"][0]["text"] == "Hello!" and items[1]["status"] == "completed"
    kinds = [e["type"] for e in stream]
    first_message = kinds.index("response.output_item.added", 1)
    assert kinds[:2] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[first_message - 3:first_message] == ["response.reasoning_text.done", "response.content_part.done",
                                                      "response.output_item.done"]
    reasoning = "".join(e["delta"] for e in stream if e["type"] == "response.reasoning_text.delta")
    assert reasoning == items[0]["content"][0]["text"]
    assert {e["output_index"] for e in stream if e["type"] == "response.output_text.delta"} == {1}


def test_gpt_oss_analysis_becomes_a_reasoning_item_and_a_call_a_function_call_item():
    text = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
            "to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>")
    items, stream = items_of(parsed(Family("harmony", thinks=False), text, [WEATHER]))
    assert [i["type"] for i in items] == ["reasoning", "function_call"]
    assert items[0]["content"][0]["text"] == "Need the weather."
    assert items[1]["name"] == "get_weather" and json.loads(items[1]["arguments"]) == {"city": "Paris"}
    kinds = [e["type"] for e in stream]
    # the arguments stream in pieces as they are written (issue 20), then .done and the item's end
    call = kinds[kinds.index("response.output_item.added", kinds.index("response.output_item.done")):]
    assert call[0] == "response.output_item.added" and call[-2:] == ["response.function_call_arguments.done",
                                                                      "response.output_item.done"]
    assert set(call[1:-2]) == {"response.function_call_arguments.delta"} and len(call[1:-2]) > 1
    assert "".join(e["delta"] for e in stream if e["type"].endswith("arguments.delta")) == items[1]["arguments"]


def test_gpt_oss_final_channel_is_the_message_and_analysis_never_leaks_into_it():
    text = "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>Hi there.<|return|>"
    items, _ = items_of(parsed(Family("harmony", thinks=False), text))
    assert [i["type"] for i in items] == ["reasoning", "message"]
    assert items[1]["content"][0]["text"] == "Hi there."


def test_parallel_calls_are_one_item_each_and_prose_after_a_call_opens_a_new_message():
    a, b = ToolCallOut("f", '{"x": 1}', "call_a"), ToolCallOut("g", "{}", "call_b")
    items, _ = items_of([Event("content", "Let me check."), Event("tool_call", call=a), Event("tool_call", call=b),
                         Event("content", "Done.")])
    assert [(i["type"], i.get("call_id")) for i in items] == [("message", None), ("function_call", "call_a"),
                                                               ("function_call", "call_b"), ("message", None)]
    assert len({i["id"] for i in items}) == 4


def test_argument_pieces_of_a_streaming_parser_add_up_to_the_whole_call():
    """A parser that streams a call's arguments (pieces, then the whole call) gives one item whose
    deltas concatenate to the arguments, and no piece is sent twice."""
    call = ToolCallOut("f", '{"city": "Paris"}', "call_1")
    pieces = [Event("tool_call_delta", text='{"city"', call=call), Event("tool_call_delta", text=': "Par', call=call)]
    items, stream = items_of(pieces + [Event("tool_call", call=call)])
    assert len(items) == 1 and items[0]["arguments"] == call.arguments
    deltas = [e["delta"] for e in stream if e["type"] == "response.function_call_arguments.delta"]
    assert len(deltas) == 3 and "".join(deltas) == call.arguments


def test_a_cut_off_reply_leaves_its_last_item_incomplete():
    out = OutputItems()
    out.add(Event("content", "Once upon"))
    out.finish(incomplete=True)
    assert out.items[0]["status"] == "incomplete"


# ---- input items → chat messages ----------------------------------------------------------------------


def test_input_items_become_the_chat_conversation():
    items = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "?"}]},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "call it"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
             {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]}]
    assert input_messages(items) == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather ?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "call it", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"}]
    assert input_messages("hi") == [{"role": "user", "content": "hi"}]


# ---- the store ------------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_store_entries_expire_after_the_ttl():
    clock = Clock()
    store = ResponseStore(max_entries=10, ttl=60, clock=clock)
    store.put("a", [{"role": "user", "content": "x"}], {"id": "a"})
    clock.now = 30
    store.put("b", [], {"id": "b"})
    assert store.get("a") is not None
    clock.now = 60
    assert store.get("a") is None and store.get("b") is not None
    clock.now = 91
    assert store.get("b") is None and len(store) == 0


def test_store_keeps_the_newest_within_its_entry_and_byte_bounds():
    store = ResponseStore(max_entries=2, ttl=60)
    for name in "abc":
        store.put(name, [], {"id": name})
    assert [store.get(n) is not None for n in "abc"] == [False, True, True]
    small = ResponseStore(max_entries=100, ttl=60, max_bytes=300)
    text = [{"role": "user", "content": "x" * 100}]
    assert small.put("a", text, {}) and small.put("b", text, {})
    assert small.put("c", text, {}) and small.get("a") is None and small.get("c") is not None
    assert not small.put("huge", [{"role": "user", "content": "x" * 1000}], {}) and small.get("huge") is None


# ---- through the server, on a scripted reply ------------------------------------------------------------


class ScriptedEngine:
    """The AsyncEngine's generate(), writing ``pieces`` one token each, then stopping."""

    error = None

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def generate(self, prompt_ids, params, request_id):
        async def deltas():
            for i, piece in enumerate(self.pieces):
                last = i == len(self.pieces) - 1
                yield Delta(request_id, 0, piece, [1], finish_reason="stop" if last else None)

        return deltas()

    def stats(self):
        return {}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    import transformers as tf

    from rung.text.templates import QWEN3_TEMPLATE
    from test_serve_families import client_for, tiny_folder

    folder = tiny_folder(tmp_path_factory.mktemp("qwen3"), tf.Qwen3Config, QWEN3_TEMPLATE)
    client, server = client_for(folder)
    real = server.engine
    yield client, server
    server.engine = real
    server.shutdown()


def scripted(qwen3, text: str, size: int = 4):
    client, server = qwen3
    server.engine = ScriptedEngine([text[i:i + size] for i in range(0, len(text), size)])
    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=0)


def test_qwen3_reasoning_item_through_the_client_whole_and_streamed(qwen3):
    text = "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?"
    client = scripted(qwen3, text)
    r = client.responses.create(model="tiny", input="Hi", reasoning={"effort": "high"})
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "\nThe user greets me.\n" and r.output_text == "Hello! How can I help?"
    # the tokens up to the end of </think> wrote the reasoning: each scripted piece is one token
    assert r.usage.output_tokens == len(range(0, len(text), 4))
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    with client.responses.stream(model="tiny", input="Hi") as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "\nThe user greets me.\n"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds.index("response.output_text.delta") > kinds.index("response.reasoning_text.done")


def test_qwen3_call_after_thinking_is_a_function_call_item_and_the_history_carries_the_reasoning(qwen3):
    text = '<think>I need the tool.</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    client = scripted(qwen3, text)
    r = client.responses.create(model="tiny", input="Weather in Oslo?", tools=[WEATHER], store=True)
    assert [o.type for o in r.output] == ["reasoning", "function_call"]
    call = r.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    scripted(qwen3, "It is sunny.")
    follow = client.responses.create(model="tiny", previous_response_id=r.id, tools=[WEATHER],
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert follow.output_text == "It is sunny."
    # stateless: the reply's own output items sent back as input give the same conversation
    scripted(qwen3, "It is sunny.")
    again = client.responses.create(model="tiny", tools=[WEATHER], input=[{"role": "user", "content": "Weather in Oslo?"},
                                    *r.output, {"type": "function_call_output", "call_id": call.call_id,
                                                "output": "sunny"}])
    assert again.usage.input_tokens == follow.usage.input_tokens
    _, server = qwen3
    stored = server.responses.get(r.id).messages
    assert stored[-1]["tool_calls"][0]["id"] == call.call_id and stored[-1]["reasoning_content"] == "I need the tool."


def test_a_failure_mid_stream_ends_with_an_error_event_and_response_failed(qwen3):
    client, server = qwen3

    class Broken(ScriptedEngine):
        def generate(self, prompt_ids, params, request_id):
            async def deltas():
                yield Delta(request_id, 0, "Hel", [1])
                raise RuntimeError("engine fell over")

            return deltas()

    server.engine = Broken([])
    with client.stream("POST", "/v1/responses", json={"model": "tiny", "input": "Hi", "stream": True}) as r:
        lines = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in lines]
    assert kinds[-2:] == ["error", "response.failed"] and "engine fell over" in lines[-2]["message"]
    assert lines[-1]["response"]["status"] == "failed" and server.in_flight == 0


# ---- governance: the --policy tool gate, as for chat ---------------------------------------------------


@pytest.fixture(scope="module")
def governed(tmp_path_factory):
    from govern_fakes import served, tiny_qwen3
    from rung.govern.policy import hash_key, parse_policy

    policy = {"max_rounds": 1, "default": {"tools": {"allow": ["get_*"], "deny": ["delete*"]}},
              "keys": {"alice": {"sha256": hash_key("alice-key")}}}
    client, server = served(tiny_qwen3(tmp_path_factory.mktemp("qwen3")), policy=parse_policy(policy, "policy.yaml"))
    yield client, server
    server.shutdown()


DELETE = {"type": "function", "name": "delete_all", "parameters": {"type": "object", "properties": {}}}
GET = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}


def test_a_denied_call_never_leaves_and_the_model_answers_again(governed):
    from govern_fakes import Scripted, call

    client, server = governed
    model = Scripted(server, lambda p: "I may not do that." if "denied by policy" in p else call("delete_all"))
    body = {"model": "tiny", "input": "Delete everything.", "tools": [DELETE, GET], "tool_choice": "auto",
            "max_output_tokens": 100}
    r = client.post("/v1/responses", json=body, headers={"Authorization": "Bearer alice-key"})
    assert r.status_code == 200, r.text
    assert [o["type"] for o in r.json()["output"]] == ["message"]
    assert r.json()["output"][0]["content"][0]["text"] == "I may not do that." and len(model.prompts) == 2
    with client.stream("POST", "/v1/responses", json={**body, "stream": True},
                       headers={"Authorization": "Bearer alice-key"}) as s:
        kinds = [json.loads(line[6:])["type"] for line in s.iter_lines() if line.startswith("data: ")]
    assert not any("function_call" in k for k in kinds) and kinds[-1] == "response.completed"


def test_a_request_that_cannot_fit_names_max_output_tokens(governed):
    client, _ = governed
    r = client.post("/v1/responses", json={"model": "tiny", "input": "Hi."}, headers={"Authorization": "Bearer alice-key"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "max_output_tokens" and "max_output_tokens" in error["message"]


def test_a_model_that_keeps_violating_ends_with_a_refusal_part(governed):
    from govern_fakes import Scripted, call

    client, server = governed
    Scripted(server, lambda p: call("delete_all"))
    r = client.post("/v1/responses", json={"model": "tiny", "input": "Delete.", "tools": [DELETE, GET],
                                                "max_output_tokens": 100},
                    headers={"Authorization": "Bearer alice-key"})
    body = r.json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "content_filter"}
    part = body["output"][-1]["content"][-1]
    assert part["type"] == "refusal" and "denied by policy" in part["refusal"]


# ---- governance: PII redaction, as for chat ----------------------------------------------------------


def test_redacted_request_the_model_sees_placeholders_and_the_output_has_the_values(qwen3):
    from test_govern_redact_serve import EMAIL, MARIA, MESSAGE, VALUES, Echo

    client, server = qwen3
    model = Echo(server, step=3)  # placeholders cut between deltas
    body = {"model": "tiny", "input": MESSAGE, "redact": True, "max_output_tokens": 100}
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    assert not any(v in model.prompts[0] for v in VALUES) and "<EMAIL_ADDRESS_1>" in model.prompts[0]
    text = r.json()["output"][0]["content"][0]["text"]
    assert MARIA in text and EMAIL in text
    with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert streamed == text == events[-1]["response"]["output"][0]["content"][0]["text"]
    del server.generate  # back to the engine


@pytest.mark.parametrize("flag, value, needle", [("--responses-store-ttl", "0", "--responses-store-ttl above 0"),
                                                 ("--responses-store-size", "-1", "--responses-store-size must be"),
                                                 ("--responses-store-mb", "0", "--responses-store-mb must be at least 1"),
                                                 ("--request-timeout", "nan", "positive number of seconds, not nan"),
                                                 ("--request-timeout", "0", "positive number of seconds, not 0"),
                                                 ("--request-timeout", "inf", "positive number of seconds, not inf")])
def test_bad_store_and_timeout_flags_are_refused_before_the_port_opens(capsys, flag, value, needle):
    from rung.cli import main

    try:
        status = main(["serve", "-m", "smollm2-135m", flag, value])
    except SystemExit as e:  # refused by the argument's own type (argparse's usage error)
        status = e.code
    assert status == 2
    assert needle in capsys.readouterr().err
