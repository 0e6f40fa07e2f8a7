"""`POST /v1/responses` end to end: a real `rung serve` process with the SmolLM2 weights, driven by
the official openai client's `responses.create` and `responses.stream`. A Responses request runs
the chat path, so at temperature 0 its text and token counts equal the chat completion of the same
conversation: that is what most tests check."""

from __future__ import annotations

import http.client
import json

import jsonschema
import openai
import pytest

from serve_helpers import rung_serve

KEY = "test-key-resp"
MODEL = "smollm2-135m"
STORE_SIZE = 3
GREEDY = dict(temperature=0)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False}}


class Served:
    def __init__(self, port: int):
        self.port = port
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)

    def raw(self, body: dict | bytes, key: str | None = KEY, method: str = "POST", path: str = "/v1/responses"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        status, payload = response.status, json.loads(response.read() or b"null")
        conn.close()
        return status, payload


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    # float32 as test_serve_api: the claims below are bit-exact, and int4 replies (the default for a
    # Q4 GGUF) vary with how much of a prompt a prefix-cache hit skipped
    args = ["-m", MODEL, "--api-key", KEY, "--threads", "1", "--max-model-len", "2048",
            "--responses-store-size", str(STORE_SIZE), "--dtype", "float32"]
    with rung_serve(args, log_path, "rung serve to load the model", timeout=240) as (port, _):
        yield Served(port)


def respond(served, input="Name one colour.", **kw):
    kw.setdefault("max_output_tokens", 8)
    return served.client.responses.create(model=MODEL, input=input, **{**GREEDY, **kw})


def chat(served, messages, **kw):
    kw.setdefault("max_tokens", 8)
    return served.client.chat.completions.create(model=MODEL, messages=messages, **{**GREEDY, **kw})


# ---- plain and message-list input ----------------------------------------------------------------


def test_string_input_answers_as_chat_does_with_usage(served):
    r = respond(served, "Say hello.")
    c = chat(served, [{"role": "user", "content": "Say hello."}])
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.output_text == c.choices[0].message.content and r.output_text
    assert r.usage.input_tokens == c.usage.prompt_tokens
    assert r.usage.output_tokens == c.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    # cut by max_output_tokens: incomplete, and why
    assert (r.status, r.incomplete_details.reason) == ("incomplete", "max_output_tokens")


def test_message_list_with_instructions_is_the_chat_conversation(served):
    items = [{"role": "user", "content": "Hi."},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Name a fruit."}]}]
    r = respond(served, items, instructions="Answer in one word.")
    c = chat(served, [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi."},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a fruit."}])
    assert r.output_text == c.choices[0].message.content
    assert r.usage.input_tokens == c.usage.prompt_tokens
    assert r.instructions == "Answer in one word."


# ---- streaming -------------------------------------------------------------------------------------


def test_stream_events_arrive_in_order_and_add_up_to_the_reply(served):
    whole = respond(served, "Count to five.", max_output_tokens=12)
    with served.client.responses.stream(model=MODEL, input="Count to five.", max_output_tokens=12, **GREEDY) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1
    assert kinds == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * len(deltas)
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.completed"])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in deltas)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert text == done.text == final.output_text == whole.output_text
    item_id = events[2].item.id
    assert all(e.item_id == item_id and e.output_index == 0 and e.content_index == 0 for e in deltas)
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_output_text_logprobs_match_the_chat_completions(served):
    """include message.output_text.logprobs with top_logprobs: each token of the output text with its
    logprob and alternatives, the same numbers chat completions gives for the same conversation."""
    r = respond(served, "Say yes.", max_output_tokens=6, include=["message.output_text.logprobs"], top_logprobs=2)
    part = r.output[0].content[0]
    c = chat(served, [{"role": "user", "content": "Say yes."}], max_tokens=6, logprobs=True, top_logprobs=2)
    expected = c.choices[0].logprobs.content
    assert part.text == c.choices[0].message.content
    assert [t.token for t in part.logprobs] == [t.token for t in expected] and len(expected) > 1
    assert "".join(t.token for t in part.logprobs) == part.text
    for got, want in zip(part.logprobs, expected):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5) and got.logprob <= 0
        assert [a.token for a in got.top_logprobs] == [a.token for a in want.top_logprobs]
        assert len(got.top_logprobs) == 2 and got.top_logprobs[0].logprob == pytest.approx(got.logprob, abs=1e-5)
    plain = respond(served, "Say yes.", max_output_tokens=6)
    assert plain.output[0].content[0].logprobs == []  # not asked: none


def test_streamed_logprobs_arrive_with_their_deltas_and_add_up(served):
    with served.client.responses.stream(model=MODEL, input="Count to five.", max_output_tokens=10, top_logprobs=1,
                                        include=["message.output_text.logprobs"], **GREEDY) as s:
        events = list(s)
        final = s.get_final_response()
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    streamed = [t for e in deltas for t in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    whole = final.output[0].content[0].logprobs
    assert len(streamed) == len(whole) == len(done.logprobs) == final.usage.output_tokens
    assert [t.token for t in streamed] == [t.token for t in whole] == [t.token for t in done.logprobs]
    assert all(e.logprobs for e in deltas)  # each delta's tokens with it
    assert "".join(t.token for t in streamed) == final.output_text


# ---- tools -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_function_call_is_a_function_call_item(served, choice):
    r = respond(served, "What is the weather in Paris?", tools=[WEATHER], tool_choice=choice, max_output_tokens=40)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id and calls[0].status == "completed"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    assert r.status == "completed"


def test_streamed_function_call_arguments_add_up_to_the_call(served):
    with served.client.responses.stream(model=MODEL, input="Weather in Rome?", tools=[WEATHER], max_output_tokens=40,
                                        tool_choice={"type": "function", "name": "get_weather"}, **GREEDY) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    start, end = kinds.index("response.output_item.added"), kinds.index("response.output_item.done")
    assert events[start].item.type == "function_call" and events[start].item.name == "get_weather"
    pieces = [e.delta for e in events[start:end] if e.type == "response.function_call_arguments.delta"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert pieces and "".join(pieces) == done.arguments == final.output[0].arguments == events[end].item.arguments
    assert kinds[end - 1] == "response.function_call_arguments.done" and kinds[-1] == "response.completed"
    json.loads(done.arguments)


def test_function_call_output_items_continue_the_conversation_as_chat_tool_messages(served):
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    result = {"type": "function_call_output", "call_id": "call_1", "output": '{"sky": "clear"}'}
    r = respond(served, [{"role": "user", "content": "Weather in Paris?"}, call, result], tools=[WEATHER])
    c = chat(served, [{"role": "user", "content": "Weather in Paris?"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "call_1", "type": "function",
                           "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'}],
             tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}])
    assert r.usage.input_tokens == c.usage.prompt_tokens
    assert r.output_text == (c.choices[0].message.content or "")


def test_tool_choice_none_hides_the_tools(served):
    r = respond(served, "Weather in Paris?", tools=[WEATHER], tool_choice="none")
    plain = respond(served, "Weather in Paris?")
    assert r.usage.input_tokens == plain.usage.input_tokens and r.output_text == plain.output_text


# ---- structured output ----------------------------------------------------------------------------


def test_json_schema_text_format_parses_and_validates(served):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 10},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["colour", "count"], "additionalProperties": False}
    r = respond(served, "Give a colour and a count as JSON.", max_output_tokens=40,
                text={"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.status == "completed" and r.text.format.type == "json_schema"


def test_parse_with_a_pydantic_text_format(served):
    from typing import Literal

    from pydantic import BaseModel

    class Pick(BaseModel):
        colour: Literal["red", "green", "blue"]
        count: Literal[1, 2, 3]

    r = served.client.responses.parse(model=MODEL, input="Pick a colour and a count.", text_format=Pick,
                                      max_output_tokens=40, **GREEDY)
    assert isinstance(r.output_parsed, Pick) and r.output_parsed.colour in ("red", "green", "blue")


# ---- stored responses --------------------------------------------------------------------------------


def test_previous_response_id_continues_the_stored_conversation(served):
    first = respond(served, "My name is Ada.", store=True)
    second = respond(served, "What is my name?", previous_response_id=first.id, store=True)
    c = chat(served, [{"role": "user", "content": "My name is Ada."},
                      {"role": "assistant", "content": first.output_text},
                      {"role": "user", "content": "What is my name?"}])
    assert second.usage.input_tokens == c.usage.prompt_tokens
    assert second.output_text == c.choices[0].message.content
    assert second.previous_response_id == first.id
    # a third turn carries both before it
    third = respond(served, "Thanks.", previous_response_id=second.id)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    assert served.client.responses.retrieve(first.id).output_text == first.output_text


def test_unknown_or_unstored_previous_response_id_is_a_404(served):
    unstored = respond(served, "Hi.")  # stateless by default
    for rid in (unstored.id, "resp_does_not_exist"):
        with pytest.raises(openai.NotFoundError) as e:
            respond(served, "And?", previous_response_id=rid)
        error = e.value.body
        assert error["code"] == "previous_response_not_found" and error["param"] == "previous_response_id"
        assert e.value.status_code == 404 and rid in error["message"]


def test_the_store_keeps_only_the_newest_responses(served):
    ids = [respond(served, f"Say {i}.", store=True, max_output_tokens=2).id for i in range(STORE_SIZE + 1)]
    with pytest.raises(openai.NotFoundError):
        served.client.responses.retrieve(ids[0])
    for rid in ids[1:]:
        assert served.client.responses.retrieve(rid).id == rid
    assert respond(served, "Go on.", previous_response_id=ids[-1], max_output_tokens=2).status
    served.client.responses.delete(ids[-1])
    with pytest.raises(openai.NotFoundError):
        respond(served, "Go on.", previous_response_id=ids[-1])


# ---- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name!"}]}, "tools.0.name"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input.0.content.0.type"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input.0.type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
    ({"input": "x", "max_output_tokens": 100000}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "nonsense"}}}},
     "text.format.schema"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "max_token": 5}, "max_token"),
    ({"input": "x", "stream": "yes"}, "stream"),
    ({}, "input"),
    ({"input": [1]}, "input.0"),
    ({"input": [{"role": "user", "content": [7]}]}, "input.0.content.0.type"),
    ({"input": [{"type": "reasoning", "content": {"a": 1}}]}, "input.0.content"),
    ({"input": [{"content": "no role"}]}, "input.0"),
    ({"input": "x", "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice.type"),
    ({"input": "x", "include": ["file_search_call.results"]}, "include.0"),
    ({"input": "x", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "x", "stream_options": {"include_obfuscation": False}}, "stream_options"),
])
def test_malformed_requests_are_openai_shaped_400s(served, body, param):
    status, payload = served.raw({"model": MODEL, **body})
    assert status == 400, payload
    error = payload["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert "\n" not in error["message"] and error["message"]


def test_too_long_input_is_context_length_exceeded(served):
    status, payload = served.raw({"model": MODEL, "input": "word " * 3000})
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"
    assert payload["error"]["param"] == "input"


def test_auth_and_unknown_model_as_for_chat(served):
    assert served.raw({"model": MODEL, "input": "x"}, key=None)[0] == 401
    assert served.raw({"model": MODEL, "input": "x"}, key="wrong")[1]["error"]["code"] == "invalid_api_key"
    status, payload = served.raw({"model": "other", "input": "x"})
    assert status == 404 and payload["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        served.client.responses.create(model=MODEL, input="x", tools=[{"type": "file_search", "vector_store_ids": []}])


def test_stored_response_reads_are_counted_by_route_not_by_id(served):
    rid = respond(served, "Hi.", store=True, max_output_tokens=2).id
    served.client.responses.retrieve(rid)
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert 'rung:http_requests_total{handler="/v1/responses/{response_id}",method="GET"' in text
    assert rid not in text
