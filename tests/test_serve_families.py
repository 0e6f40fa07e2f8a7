"""The server in process on tiny random Qwen3 and gpt-oss models whose tokenizers carry each
family's tokens: Qwen3's template and <tool_call> grammar end to end, harmony rendering, the
503 while loading, request timeouts, and the engine idle after each."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from rung.serve.app import create_app
from rung.serve.server import ServeConfig, Server

from test_serve_structured import make_chat_vocab

CITY_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 4}}, "required": ["city"],
    "additionalProperties": False}}}


def tiny_folder(folder, config_class, template: str | None, **config):
    from oracle import hf_model

    # a vocabulary with harmony's tokens is served as harmony, whatever its template
    tokenizer, _ = make_chat_vocab(harmony=template is None)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    tokenizer_config = {"eos_token": "<|im_end|>", "bos_token": None}
    if template:
        tokenizer_config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, vocab_size=tokenizer.vocab_size, max_position_embeddings=2048)
    hf_model(config_class(**{**base, **config})).save_pretrained(folder)
    return folder


def client_for(folder, **config) -> tuple[TestClient, Server]:
    server = Server(ServeConfig(model=str(folder), served_model_name="tiny", engine=dict(num_blocks=256), **config))
    server.load()
    assert server.load_error is None, server.load_error
    return TestClient(create_app(server)), server


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    import transformers as tf

    from rung.text.templates import QWEN3_TEMPLATE

    folder = tiny_folder(tmp_path_factory.mktemp("qwen3"), tf.Qwen3Config, QWEN3_TEMPLATE)
    client, server = client_for(folder)
    yield client, server
    server.shutdown()


def engine_idle(server: Server) -> bool:
    stats = server.engine_stats()
    pool = server.llm.engine.pool
    return stats["running"] == stats["waiting"] == 0 and stats["free_blocks"] == pool.num_blocks * len(pool.groups)


def test_qwen3_is_served_as_the_hermes_family(qwen3):
    client, server = qwen3
    assert (server.family.name, server.family.thinks) == ("hermes", True)
    assert client.get("/health").json() == {"status": "ok"}


def test_qwen3_forced_tool_call_through_its_template_and_grammar(qwen3):
    client, server = qwen3
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [CITY_TOOL],
            "tool_choice": "required", "max_tokens": 60, "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False}}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    assert set(args) == {"city"} and len(args["city"]) <= 4
    # the call and its result go back through the Qwen3 template
    history = body["messages"] + [choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    r = client.post("/v1/chat/completions", json={**body, "messages": history, "tool_choice": "auto",
                                                  "max_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 30
    assert engine_idle(server)


def test_qwen3_streamed_forced_call_arguments_arrive_in_pieces(qwen3):
    client, _ = qwen3
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Weather?"}], "tools": [CITY_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 60,
            "temperature": 0, "stream": True, "reasoning_effort": "none"}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    calls = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls", []) if e["choices"]]
    assert calls[0]["index"] == 0 and calls[0]["id"] and calls[0]["function"]["name"] == "get_weather"
    assert len(calls) > 2 and all(set(tc) == {"index", "function"} and tc["index"] == 0 for tc in calls[1:])
    json.loads("".join(tc["function"]["arguments"] for tc in calls))
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_qwen3_json_schema_answer_with_thinking_off(qwen3):
    client, _ = qwen3
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "ok?"}], "max_tokens": 30, "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": False},
        "response_format": {"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}})
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"])["ok"], bool)


def test_request_timeout_is_a_408_and_frees_the_engine(tmp_path):
    import transformers as tf

    from rung.text.templates import QWEN3_TEMPLATE

    folder = tiny_folder(tmp_path, tf.Qwen3Config, QWEN3_TEMPLATE)
    client, server = client_for(folder, request_timeout=0.2)
    try:
        long = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 2000,
                "ignore_eos": True, "temperature": 0}
        r = client.post("/v1/chat/completions", json=long)
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        with client.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert json.loads(lines[-2][6:])["error"]["code"] == "timeout" and lines[-1] == "data: [DONE]"
        assert engine_idle(server) and server.in_flight == 0
    finally:
        server.shutdown()


def test_gpt_oss_chat_renders_harmony_and_parses_the_reply(tmp_path):
    import transformers as tf

    folder = tiny_folder(tmp_path, tf.GptOssConfig, None, num_local_experts=4, num_experts_per_tok=2,
                         sliding_window=8)
    client, server = client_for(folder)
    try:
        assert server.family.name == "harmony" and not server.family.skip_special_tokens
        for effort in ("low", "high"):
            r = client.post("/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "hi"}],
                "tools": [CITY_TOOL], "max_tokens": 12, "temperature": 0, "reasoning_effort": effort})
            assert r.status_code == 200, r.text
            message = r.json()["choices"][0]["message"]
            assert message["role"] == "assistant"
            assert all(isinstance(message.get(k), (str, list, type(None)))
                       for k in ("content", "reasoning_content", "tool_calls"))
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                      "reasoning_effort": "extreme"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"
        assert engine_idle(server)
    finally:
        server.shutdown()


def test_503_while_loading_and_after_a_failed_load(tmp_path):
    loading = Server(ServeConfig(model="smollm2-135m"))
    client = TestClient(create_app(loading))
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}
    assert client.get("/health").status_code == 503
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
    assert client.post("/v1/chat/completions", json={**body, "model": "other"}).status_code == 404
    assert "rung:model_loading" in client.get("/metrics").text

    (tmp_path / "config.json").write_text("{not json")
    broken = Server(ServeConfig(model=str(tmp_path)))
    broken.load()
    client = TestClient(create_app(broken))
    r = client.post("/v1/chat/completions", json={**body, "model": str(tmp_path)})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
    assert client.get("/health").json()["status"] == "failed"


def test_stream_interval_sends_the_first_token_alone_then_chunks_of_n(tmp_path):
    """--stream-interval 3: the first content chunk holds one token, later ones up to 3; the text,
    the finish and the usage are the unstreamed reply's; a Responses stream is merged the same way."""
    import transformers as tf

    from rung.text.templates import QWEN3_TEMPLATE

    folder = tiny_folder(tmp_path, tf.Qwen3Config, QWEN3_TEMPLATE)
    client, server = client_for(folder, stream_interval=3)
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 14, "ignore_eos": True,
                "temperature": 0, "chat_template_kwargs": {"enable_thinking": False}}
        whole = client.post("/v1/chat/completions", json=body).json()
        with client.stream("POST", "/v1/chat/completions",
                           json={**body, "stream": True, "stream_options": {"include_usage": True},
                                 "logprobs": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        pieces = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
        sizes = [len(p["logprobs"]["content"]) for p in pieces]  # tokens a chunk carries
        assert sizes[0] == 1 and all(1 <= n <= 3 for n in sizes) and sum(sizes) == 14 and len(sizes) <= 1 + 13 // 3 + 1
        assert "".join(p["delta"].get("content") or "" for p in pieces) == whole["choices"][0]["message"]["content"]
        used = chunks[-1]["usage"]  # (the second request's prompt is a prefix-cache hit: cached_tokens differ)
        assert (used["prompt_tokens"], used["completion_tokens"]) == (whole["usage"]["prompt_tokens"], 14)
        with client.stream("POST", "/v1/responses", json={"model": "tiny", "input": "go", "max_output_tokens": 14,
                                                          "temperature": 0, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
        assert 1 < len(deltas) <= 1 + 13 // 3 + 1
        assert "".join(deltas) == events[-1]["response"]["output"][-1]["content"][0]["text"]
        assert engine_idle(server)
    finally:
        server.shutdown()


def test_coalesced_merges_each_samples_deltas_and_closes_its_source():
    import asyncio

    from rung.engine.engine import Delta
    from rung.serve.run import coalesced

    closed = []

    async def source():
        try:
            for i in range(5):
                for index in (0, 1):
                    yield Delta("r", index, str(i), [i], logprobs=[{i: -0.5}])
            yield Delta("r", 0, "", [], "stop")
            yield Delta("r", 1, "x", [9], "length")
        finally:
            closed.append(True)

    async def run():
        return [d async for d in coalesced(source(), 2)]

    out = asyncio.run(run())
    zero = [d for d in out if d.index == 0]
    assert [d.token_ids for d in zero] == [[0], [1, 2], [3, 4], []] and zero[-1].finish_reason == "stop"
    assert [d.text for d in zero] == ["0", "12", "34", ""] and zero[1].logprobs == [{1: -0.5}, {2: -0.5}]
    one = [d for d in out if d.index == 1]
    assert [d.token_ids for d in one] == [[0], [1, 2], [3, 4], [9]] and one[-1].finish_reason == "length"
    assert closed == [True]

    async def abandon():
        gen = coalesced(source(), 2)
        await gen.__anext__()
        await gen.aclose()  # a client gone: the engine's deltas are closed too

    closed.clear()
    asyncio.run(abandon())
    assert closed == [True]
