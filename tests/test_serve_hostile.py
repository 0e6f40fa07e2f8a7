"""Hostile and malformed requests against the server, in process on a tiny Qwen3 model: every one is
a 4xx in OpenAI's error shape naming its field (never a 500), the server stays healthy and serves
the next request; and the CPU work of a big request runs off the event loop, so /health answers
while it is prepared."""

from __future__ import annotations

import json
import threading
import time

import pytest
from starlette.testclient import TestClient

from rung.serve.app import create_app
from rung.serve.server import ServeConfig, Server

MODEL = "tiny"
HI = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL, "messages": HI, "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def start(folder, **config) -> tuple[TestClient, Server]:
    """The app on one event loop (the TestClient's portal, entered), as uvicorn runs it: requests
    from several threads share that loop, so a handler that blocks it delays every other."""
    server = Server(ServeConfig(model=str(folder), served_model_name=MODEL, engine=dict(num_blocks=256), **config))
    server.load()
    assert server.load_error is None, server.load_error
    client = TestClient(create_app(server), raise_server_exceptions=False)
    client.__enter__()
    return client, server


def stop(client: TestClient, server: Server) -> None:
    client.__exit__(None, None, None)
    server.shutdown()


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    import transformers as tf

    from rung.text.templates import QWEN3_TEMPLATE
    from test_serve_families import tiny_folder

    return tiny_folder(tmp_path_factory.mktemp("qwen3"), tf.Qwen3Config, QWEN3_TEMPLATE)


@pytest.fixture(scope="module")
def served(qwen3_folder):
    client, server = start(qwen3_folder)
    yield client, server
    stop(client, server)


def post(client, path: str, body) -> tuple[int, dict]:
    """POST a body (a dict as JSON, or raw bytes) and return (status, the JSON reply)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        return r.status_code, {"stream": r.text}
    return r.status_code, r.json()


def refused(client, path: str, body, status: int = 400) -> dict:
    """The error of a refused request, checked for OpenAI's shape and one line."""
    got, reply = post(client, path, body)
    assert got == status, (got, reply)
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}, reply
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error" if status in (400, 413) else error["type"]
    return error


def still_serving(client) -> None:
    assert client.get("/health").status_code == 200
    status, reply = post(client, "/v1/chat/completions", {**CHAT, "temperature": 0})
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("length", "stop"), reply
    status, reply = post(client, "/v1/completions", {**COMPLETION, "temperature": 0})
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("length", "stop"), reply


# ---- the README's 400s: reserved template variables, surrogates, deep JSON, deep schemas --------------


@pytest.mark.parametrize("key", ["messages", "tools", "add_generation_prompt", "documents"])
def test_chat_template_kwargs_may_not_set_the_templates_own_arguments(served, key):
    client, _ = served
    kwargs = {key: [], "enable_thinking": False}
    error = refused(client, "/v1/chat/completions", {**CHAT, "chat_template_kwargs": kwargs})
    assert error["param"] == "chat_template_kwargs" and key in error["message"]
    still_serving(client)


LONE = "\\ud800"  # as JSON writes it: json.loads gives a str with a lone surrogate
CHAT_HI = '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]'  # a body, open for one more field


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "a%sb"}]}',
     "messages.0.content"),
    ("/v1/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "%s"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/chat/completions", CHAT_HI + ', "stop": ["%s"]}', "stop.0"),
    ("/v1/chat/completions", CHAT_HI + ', "user": "\\udfff%s"}', "user"),
    ("/v1/chat/completions", CHAT_HI + ', "chat_template_kwargs": {"x%s": 1}}', None),
    ("/v1/completions", '{"model": "tiny", "prompt": "%s"}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "%s"]}', "prompt.1"),
])
def test_a_lone_utf16_surrogate_is_a_400_naming_the_field(served, path, body, param):
    client, _ = served
    error = refused(client, path, (body % LONE).encode())
    assert "surrogate" in error["message"]
    if param is not None:
        assert error["param"] == param
    else:
        assert error["param"].startswith("chat_template_kwargs.")
    still_serving(client)


def test_a_lone_surrogate_sent_as_raw_utf8_bytes_is_a_400(served):
    client, _ = served
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'  # U+D800 in UTF-8 form
    status, reply = post(client, "/v1/chat/completions", body)
    assert status == 400, reply
    still_serving(client)


@pytest.mark.parametrize("depth", [200, 5_000, 100_000])
@pytest.mark.parametrize("bracket", ["[]", "{}"])
def test_json_nested_thousands_deep_is_a_400(served, depth, bracket):
    client, _ = served
    nest = (bracket[0] if bracket == "[]" else '{"a":') * depth + "1" + bracket[1] * depth
    body = f'{{"model": "tiny", "messages": [{{"role": "user", "content": "hi"}}], "metadata": {nest}}}'.encode()
    start = time.perf_counter()
    error = refused(client, "/v1/chat/completions", body)
    assert time.perf_counter() - start < 5
    assert "levels" in error["message"] and error["param"] == "metadata"
    still_serving(client)


def nested_schema(levels: int) -> dict:
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def nested_schema_text(levels: int) -> str:
    """The JSON of ``nested_schema(levels)``, written out (json.dumps itself recurses)."""
    return '{"type": "object", "properties": {"a": ' * levels + '{"type": "string"}' + "}}" * levels


@pytest.mark.parametrize("levels", [40, 100, 1000])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_response_schema_nested_deep_is_a_400_naming_response_format(served, levels, path):
    client, _ = served
    base = json.dumps(CHAT if "chat" in path else COMPLETION)[:-1]
    body = (base + ', "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
            + nested_schema_text(levels) + "}}}")
    error = refused(client, path, body.encode())
    assert error["param"].startswith("response_format") and "levels" in error["message"]
    still_serving(client)


def test_a_tool_schema_nested_deep_or_invalid_is_a_400_naming_the_tool(served):
    client, _ = served
    deep = {"type": "function", "function": {"name": "deep", "parameters": nested_schema(40)}}
    error = refused(client, "/v1/chat/completions", {**CHAT, "tools": [TOOL, deep]})
    assert error["param"] == "tools.1.function.parameters" and "levels" in error["message"]
    invalid = {"type": "function", "function": {"name": "bad", "parameters": {"type": "objekt"}}}
    error = refused(client, "/v1/chat/completions", {**CHAT, "tools": [invalid], "tool_choice": "auto"})
    assert error["param"] == "tools.0.function.parameters" and "not a valid JSON Schema" in error["message"]
    a_schema_that_is_fine = nested_schema(20)
    status, reply = post(client, "/v1/chat/completions", {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": a_schema_that_is_fine}}})
    assert status == 200, reply


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_number_that_is_not_finite_is_a_400_naming_the_field(served, value):
    client, _ = served
    body = '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": %s}' % value
    error = refused(client, "/v1/chat/completions", body.encode())
    assert error["param"] == "repetition_penalty" and "repetition_penalty" in error["message"]
    error = refused(client, "/v1/completions", ('{"model": "tiny", "prompt": "hi", "stop_token_ids": [1], '
                                                '"logit_bias": {"7": %s}}' % value).encode())
    assert error["param"] == "logit_bias.7"
    still_serving(client)


def test_a_sampling_params_error_is_a_400_naming_its_field(served, monkeypatch):
    """SamplingParams' own bounds (the engine's, which may be tighter than the schema's) reach the
    client as a 400 whose param is the field the error names (its ``param``)."""
    from rung.engine.sampling_params import SamplingParams

    class Refused(ValueError):
        param = "repetition_penalty"

    def refuse(self):
        raise Refused("SamplingParams: repetition_penalty must be in [0.01, 10]")

    client, _ = served
    monkeypatch.setattr(SamplingParams, "__post_init__", refuse)
    error = refused(client, "/v1/chat/completions", {**CHAT, "repetition_penalty": 1e-38})
    assert error["param"] == "repetition_penalty" and error["message"].startswith("repetition_penalty must be")
    monkeypatch.undo()
    still_serving(client)


# ---- stream and stream_options are named -----------------------------------------------------------


@pytest.mark.parametrize("extra, param", [
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream": None}, "stream"),
    ({"stream": True, "stream_options": {"include_usage": "x"}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": 2}}, "stream_options.continuous_usage_stats"),
    ({"stream": True, "stream_options": "usage"}, "stream_options"),
    ({"stream": True, "stream_options": [True]}, "stream_options"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_errors_of_stream_and_stream_options_name_the_field(served, extra, param, path):
    client, _ = served
    base = CHAT if "chat" in path else COMPLETION
    error = refused(client, path, {**base, **extra})
    assert error["param"] == param and param in error["message"]


# ---- a battery of malformed requests: never a 500 ---------------------------------------------------------

BAD_CHAT = {
    "no model": {"messages": HI},
    "no messages": {"model": MODEL},
    "empty messages": {**CHAT, "messages": []},
    "messages not a list": {**CHAT, "messages": {"role": "user", "content": "hi"}},
    "message not an object": {**CHAT, "messages": ["hi"]},
    "message without role": {**CHAT, "messages": [{"content": "hi"}]},
    "unknown role": {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]},
    "role not a string": {**CHAT, "messages": [{"role": 1, "content": "hi"}]},
    "content a number": {**CHAT, "messages": [{"role": "user", "content": 5}]},
    "content an object": {**CHAT, "messages": [{"role": "user", "content": {"text": "hi"}}]},
    "content part of unknown type": {**CHAT, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]},
    "image content part": {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]},
    "content part without type": {**CHAT, "messages": [{"role": "user", "content": [{"text": "hi"}]}]},
    "content part text a number": {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
    "unknown message field": {**CHAT, "messages": [{"role": "user", "content": "hi", "mood": "happy"}]},
    "tool message without content": {**CHAT, "messages": HI + [{"role": "tool", "tool_call_id": "x"}]},
    "tool_calls not a list": {**CHAT, "messages": [{"role": "assistant", "tool_calls": {"id": "x"}}]},
    "tool call without function": {**CHAT, "messages": [{"role": "assistant", "tool_calls": [{"id": "x"}]}]},
    "model a number": {**CHAT, "model": 7},
    "unknown model": {**CHAT, "model": "gpt-5"},
    "huge model name": {**CHAT, "model": "m" * 100_000},
    "unknown field": {**CHAT, "max_token": 5},
    "n zero": {**CHAT, "n": 0},
    "n huge": {**CHAT, "n": 10**9},
    "n negative": {**CHAT, "n": -3},
    "n a float": {**CHAT, "n": 2.5},
    "n a string": {**CHAT, "n": "2"},
    "n a bool": {**CHAT, "n": True},
    "n with thousands of digits": {**CHAT, "n": 10**3000},
    "max_tokens zero": {**CHAT, "max_tokens": 0},
    "max_tokens negative": {**CHAT, "max_tokens": -1},
    "max_tokens huge": {**CHAT, "max_tokens": 10**30},
    "max_tokens a string": {**CHAT, "max_tokens": "8"},
    "max_completion_tokens negative": {**CHAT, "max_completion_tokens": -5},
    "temperature negative": {**CHAT, "temperature": -1},
    "temperature huge": {**CHAT, "temperature": 1e300},
    "temperature a string": {**CHAT, "temperature": "hot"},
    "top_p zero": {**CHAT, "top_p": 0},
    "top_p over one": {**CHAT, "top_p": 1.5},
    "top_k under -1": {**CHAT, "top_k": -2},
    "min_p negative": {**CHAT, "min_p": -0.5},
    "repetition_penalty zero": {**CHAT, "repetition_penalty": 0},
    "repetition_penalty negative": {**CHAT, "repetition_penalty": -1},
    "presence_penalty huge": {**CHAT, "presence_penalty": 1e9},
    "frequency_penalty a list": {**CHAT, "frequency_penalty": [1]},
    "min_tokens negative": {**CHAT, "min_tokens": -1},
    "seed too big": {**CHAT, "seed": 2**70},
    "seed a float": {**CHAT, "seed": 1.5},
    "stop a number": {**CHAT, "stop": 5},
    "stop too long a list": {**CHAT, "stop": ["x"] * 17},
    "stop empty string": {**CHAT, "stop": [""]},
    "stop with a number": {**CHAT, "stop": ["a", 3]},
    "stop_token_ids out of vocab": {**CHAT, "stop_token_ids": [10**9]},
    "stop_token_ids negative": {**CHAT, "stop_token_ids": [-1]},
    "stop_token_ids strings": {**CHAT, "stop_token_ids": ["a"]},
    "logit_bias": {**CHAT, "logit_bias": {"50256": -100}},
    "logit_bias bad key": {**CHAT, "logit_bias": {"not-a-token": 5}},
    "logit_bias bad value": {**CHAT, "logit_bias": {"1": "x"}},
    "logit_bias a list": {**CHAT, "logit_bias": [1, 2]},
    "logprobs a string": {**CHAT, "logprobs": "yes"},
    "top_logprobs without logprobs": {**CHAT, "top_logprobs": 3},
    "top_logprobs huge": {**CHAT, "logprobs": True, "top_logprobs": 10**6},
    "tools not a list": {**CHAT, "tools": TOOL},
    "tool without function": {**CHAT, "tools": [{"type": "function"}]},
    "tool of unknown type": {**CHAT, "tools": [{"type": "retrieval", "function": TOOL["function"]}]},
    "tool name with spaces": {**CHAT, "tools": [{"type": "function", "function": {"name": "get weather"}}]},
    "tool name too long": {**CHAT, "tools": [{"type": "function", "function": {"name": "f" * 65}}]},
    "tool parameters not an object": {**CHAT, "tools": [{"type": "function", "function": {"name": "f",
                                                                                          "parameters": "x"}}]},
    "tool parameters an invalid schema": {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": 3}}}]},
    "tool parameters a list": {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
    "tool_choice naming an unknown tool": {**CHAT, "tools": [TOOL], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}},
    "tool_choice naming a tool without tools": {**CHAT, "tool_choice": {"type": "function", "function": {"name": "x"}}},
    "tool_choice required without tools": {**CHAT, "tool_choice": "required"},
    "tool_choice unknown string": {**CHAT, "tools": [TOOL], "tool_choice": "sometimes"},
    "tool_choice without function": {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function"}},
    "response_format unknown type": {**CHAT, "response_format": {"type": "yaml"}},
    "response_format a string": {**CHAT, "response_format": "json"},
    "json_schema without schema": {**CHAT, "response_format": {"type": "json_schema"}},
    "json_schema schema not an object": {**CHAT, "response_format": {"type": "json_schema",
                                                                      "json_schema": {"schema": [1]}}},
    "json_schema an invalid schema": {**CHAT, "response_format": {"type": "json_schema",
                                                                  "json_schema": {"schema": {"type": "objekt"}}}},
    "json_schema unenforceable": {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "array", "uniqueItems": True}}}},
    "reasoning_effort unknown": {**CHAT, "reasoning_effort": "extreme"},
    "chat_template_kwargs a list": {**CHAT, "chat_template_kwargs": ["enable_thinking"]},
    "chat_template_kwargs messages": {**CHAT, "chat_template_kwargs": {"messages": []}},
    "add_generation_prompt a string": {**CHAT, "add_generation_prompt": "yes"},
    "metadata values not strings": {**CHAT, "metadata": {"a": 1}},
    "user a number": {**CHAT, "user": 5},
    "rag without an index": {**CHAT, "rag": True},
    "rag k out of range": {**CHAT, "rag": {"k": 0}},
    "redact a string": {**CHAT, "redact": "yes"},
    "context exceeded": {**CHAT, "messages": [{"role": "user", "content": "word " * 5000}]},
}

BAD_COMPLETION = {
    "no prompt": {"model": MODEL},
    "prompt a number": {**COMPLETION, "prompt": 5},
    "prompt an object": {**COMPLETION, "prompt": {"text": "hi"}},
    "empty prompt list": {**COMPLETION, "prompt": []},
    "empty token list": {**COMPLETION, "prompt": [[]]},
    "empty string": {**COMPLETION, "prompt": ""},
    "token ids out of vocab": {**COMPLETION, "prompt": [10**9]},
    "token ids negative": {**COMPLETION, "prompt": [-1, 2]},
    "token ids as bools": {**COMPLETION, "prompt": [True, False]},
    "token ids mixed": {**COMPLETION, "prompt": [1, "a"]},
    "too many prompts": {**COMPLETION, "prompt": ["a"] * 65},
    "n huge": {**COMPLETION, "n": 10**6},
    "max_tokens huge": {**COMPLETION, "max_tokens": 10**12},
    "max_tokens a float": {**COMPLETION, "max_tokens": 2.0},
    "logprobs over 20": {**COMPLETION, "logprobs": 21},
    "logprobs a bool": {**COMPLETION, "logprobs": True},
    "echo with logprobs": {**COMPLETION, "echo": True, "logprobs": 1},
    "best_of other than n": {**COMPLETION, "best_of": 3},
    "suffix": {**COMPLETION, "suffix": "end"},
    "stream a string": {**COMPLETION, "stream": "true"},
    "messages on completions": {**COMPLETION, "messages": HI},
    "stop too long a list": {**COMPLETION, "stop": ["x"] * 100},
    "response_format unknown type": {**COMPLETION, "response_format": {"type": "xml"}},
    "unknown model": {**COMPLETION, "model": "davinci"},
}

BAD_BODIES = {
    "invalid JSON": b'{"model": "tiny", "messages": [',
    "empty body": b"",
    "a JSON array": b"[1, 2]",
    "a JSON string": b'"hello"',
    "a JSON number": b"42",
    "JSON null": b"null",
    "not UTF-8": b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "NaN": b'{"model": "tiny", "prompt": "hi", "messages": [], "temperature": NaN}',
    "Infinity": CHAT_HI.encode() + b', "repetition_penalty": Infinity}',
    "a number out of range": CHAT_HI.encode() + b', "temperature": 1e999}',
    "-Infinity in a list": b'{"model": "tiny", "prompt": "hi", "logit_bias": {"5": -Infinity}}',
    "an integer of 5000 digits": b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": '
                                 + b"9" * 5000 + b"}",
    "trailing garbage": b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]} {}',
    "duplicate keys of the wrong type": b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                                        b'"n": 1, "n": "x"}',
}


@pytest.mark.parametrize("name", list(BAD_CHAT))
def test_malformed_chat_request_is_a_4xx_in_openai_shape(served, name):
    client, _ = served
    status, reply = post(client, "/v1/chat/completions", BAD_CHAT[name])
    assert 400 <= status < 500, (status, reply)
    refused(client, "/v1/chat/completions", BAD_CHAT[name], status)


@pytest.mark.parametrize("name", list(BAD_COMPLETION))
def test_malformed_completion_request_is_a_4xx_in_openai_shape(served, name):
    client, _ = served
    status, reply = post(client, "/v1/completions", BAD_COMPLETION[name])
    assert 400 <= status < 500, (status, reply)
    refused(client, "/v1/completions", BAD_COMPLETION[name], status)


@pytest.mark.parametrize("name", list(BAD_BODIES))
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_body_that_is_no_request_is_a_400(served, name, path):
    client, _ = served
    error = refused(client, path, BAD_BODIES[name])
    assert error["type"] == "invalid_request_error"


WRONG_VALUES = [{"an": ["object"]}, [{"a": "list"}], "a string", 12345.5, True, None, 10**40]


@pytest.mark.parametrize("path, base", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_every_field_with_a_value_of_every_type_is_answered_and_never_a_500(served, path, base):
    """Each field of the request in turn holds each of WRONG_VALUES: the answer is a success or a
    4xx naming that field (a wrong type is never silently coerced into a 500)."""
    from rung.serve.schemas import ChatCompletionRequest, CompletionRequest

    client, _ = served
    schema = ChatCompletionRequest if "chat" in path else CompletionRequest
    failures = []
    for field in schema.model_fields:
        for value in WRONG_VALUES:
            body = {**base, field: value, "max_tokens": 2}
            if field == "max_tokens":
                body[field] = value
            status, reply = post(client, path, body)
            if status == 200:
                continue
            error = reply.get("error", {})
            if not 400 <= status < 500:
                failures.append((field, value, status, error.get("message")))
            elif field != "model" and not (error.get("param") or "").startswith(field) and status == 400:
                failures.append((field, value, status, f"param {error.get('param')!r}: {error.get('message')}"))
    assert failures == []
    still_serving(client)


def test_unknown_routes_and_methods_answer_in_openai_shape(served):
    client, _ = served
    for path in ("/v1/embeddings", "/v1/audio/speech"):  # /v1/responses exists now (issue 20)
        r = client.post(path, json={"model": MODEL, "input": "hi"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_after_the_whole_battery_the_server_is_healthy_and_idle(served):
    client, server = served
    for body in BAD_CHAT.values():
        post(client, "/v1/chat/completions", body)
    for body in BAD_BODIES.values():
        post(client, "/v1/chat/completions", body)
    still_serving(client)
    assert server.in_flight == 0
    stats = server.engine_stats()
    assert stats["running"] == stats["waiting"] == 0


# ---- CPU work off the event loop ---------------------------------------------------------------------


def health_latencies(client, busy: threading.Event, done: threading.Event) -> list[float]:
    """How long each /health took to answer while ``busy`` is set and ``done`` is not, counted from
    the end of the previous poll (less the pause between polls): this process is also the client,
    so a server thread holding the GIL would stall the poller anywhere, not only inside get()."""
    assert busy.wait(30), "the request never started its work"
    times, last, pause = [], time.perf_counter(), 0.0
    while True:
        finished = done.is_set()  # one poll more after the end: a stall just before it counts too
        assert client.get("/health").status_code == 200
        now = time.perf_counter()
        times.append(now - last - pause)
        if finished:
            return times
        last, pause = now, 0.02
        time.sleep(pause)


def in_background(work) -> tuple[threading.Thread, threading.Event, list]:
    done, out = threading.Event(), []

    def run():
        try:
            out.append(work())
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done, out


def slow_template(server, seconds: float) -> threading.Event:
    """The server's template renders ``seconds`` slower (a stand-in for a huge prompt's CPU work);
    the event is set once a render has begun."""
    render, busy = server.template.render, threading.Event()

    def slow_render(*args, **kwargs):
        busy.set()
        time.sleep(seconds)
        return render(*args, **kwargs)

    server.template.render = slow_render
    return busy


def at_most_one_hiccup(measure) -> None:
    """Run ``measure`` (which asserts a latency bound) and, if it fails, once more: a loop blocked by
    the work fails every time, while one stall of the whole test process (a collection of the
    oldest generation, a busy neighbour on CI's two cores) does not come back on the second run."""
    try:
        measure()
    except AssertionError as first:
        try:
            measure()
        except AssertionError as second:
            raise AssertionError(f"twice: {first} / then {second}") from None


def test_health_answers_while_a_slow_template_render_runs(qwen3_folder):
    """A render that takes 2 s (standing in for a 7 MB prompt) no longer stops the event loop: /health
    answers within 0.5 s all the while; before, it waited for the render."""
    def measure():
        client, server = start(qwen3_folder)
        try:
            busy = slow_template(server, 2.0)
            thread, done, out = in_background(lambda: post(client, "/v1/chat/completions", CHAT))
            times = health_latencies(client, busy, done)
            thread.join(30)
            assert out and out[0][0] == 200, out
            assert len(times) >= 10 and max(times) < 0.5, times  # 2 s of render, polled every 20 ms
        finally:
            stop(client, server)

    at_most_one_hiccup(measure)


def test_the_slot_is_held_while_a_request_is_prepared(qwen3_folder):
    """--max-concurrent 1: while one request's template renders, the next is a 429 at once."""
    client, server = start(qwen3_folder, max_concurrent=1)
    try:
        busy = slow_template(server, 1.0)
        thread, done, out = in_background(lambda: post(client, "/v1/chat/completions", CHAT))
        assert busy.wait(30)
        start_ = time.perf_counter()
        status, reply = post(client, "/v1/completions", COMPLETION)
        assert status == 429 and time.perf_counter() - start_ < 0.5, reply
        thread.join(30)
        assert out[0][0] == 200 and server.in_flight == 0
    finally:
        stop(client, server)


def watch_prepare(server: Server) -> threading.Event:
    """An event set when the server starts preparing a chat request (on its prepare thread)."""
    busy, prepare = threading.Event(), server.prepare_chat

    def watched(*args):
        busy.set()
        return prepare(*args)

    server.prepare_chat = watched
    return busy


@pytest.mark.parametrize("what", ["a 2000-property response schema", "a 1 MB prompt"])
def test_health_answers_while_real_cpu_work_of_a_big_request_runs(qwen3_folder, what):
    """Real work, not a stand-in: a schema checked by jsonschema and compiled by llguidance, or a
    prompt rendered and tokenized (then refused as longer than the context). Both take seconds of
    CPU; /health answers within 0.5 s all the while."""
    if "schema" in what:
        schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)}}
        body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    else:
        body = {**CHAT, "messages": [{"role": "user", "content": "zebra quantum " * 75_000}]}

    def measure():
        client, server = start(qwen3_folder)
        try:
            busy = watch_prepare(server)
            start_ = time.perf_counter()
            thread, done, out = in_background(lambda: post(client, "/v1/chat/completions", body))
            times = health_latencies(client, busy, done)
            thread.join(60)
            took = time.perf_counter() - start_
            assert out and out[0][0] in (200, 400), out
            assert len(times) >= 4, (took, times)  # the work was long enough to be measured
            assert max(times) < 0.5, (took, max(times))
        finally:
            stop(client, server)

    at_most_one_hiccup(measure)


def test_a_20000_property_schema_is_refused_at_once(served):
    """Checking and compiling grow faster than the schema (llguidance: ~10 s at 5000 optional
    properties, a panic at 12000): past MAX_SCHEMA_NODES a schema is refused before either."""
    client, _ = served
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(20_000)}}
    start_ = time.perf_counter()
    error = refused(client, "/v1/chat/completions", {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert time.perf_counter() - start_ < 2
    assert error["param"] == "response_format.json_schema.schema" and "too large" in error["message"]
    tools = [{"type": "function", "function": {"name": "big", "parameters": schema}}]
    error = refused(client, "/v1/chat/completions", {**CHAT, "tools": tools})
    assert error["param"] == "tools" and "in all" in error["message"]
    small = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(100)}}
    many = [{"type": "function", "function": {"name": f"f{i}", "parameters": small}} for i in range(200)]
    start_ = time.perf_counter()
    error = refused(client, "/v1/chat/completions", {**CHAT, "tools": many})  # each small, 20,000 properties in all
    assert time.perf_counter() - start_ < 2
    assert error["param"] == "tools" and "in all" in error["message"]


def test_tokenize_and_detokenize_take_the_one_served_model_when_none_is_named(served):
    """As vLLM's: ``model`` is optional on /tokenize and /detokenize where one model is served."""
    client, _ = served
    status, named = post(client, "/tokenize", {"model": MODEL, "prompt": "hello there"})
    assert status == 200
    status, unnamed = post(client, "/tokenize", {"prompt": "hello there"})
    assert status == 200 and unnamed == named
    status, chat = post(client, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and chat["count"] > 2
    status, text = post(client, "/detokenize", {"tokens": named["tokens"]})
    assert status == 200 and text["prompt"].endswith("hello there")

