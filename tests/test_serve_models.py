"""Several models behind one `rung serve`, and /tokenize and /detokenize: a real server process on
tiny random Qwen3 models (the serve tests' tiny folders), driven by the official openai client
(httpx for the two routes OpenAI does not have)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from hostile import run_cli_bounded
from serve_helpers import metric, rung_serve, wait_until

KEY = "key-models-1"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny Qwen3 models that differ in their context (2048 and 1024 tokens), so a reply tells
    which one ran it."""
    import transformers as tf

    from rung.text.templates import QWEN3_TEMPLATE
    from test_serve_families import tiny_folder

    a = tiny_folder(tmp_path_factory.mktemp("model-a"), tf.Qwen3Config, QWEN3_TEMPLATE)
    b = tiny_folder(tmp_path_factory.mktemp("model-b"), tf.Qwen3Config, QWEN3_TEMPLATE, max_position_embeddings=1024)
    return a, b


class Served:
    def __init__(self, port: int, log_path):
        self.base, self.log_path = f"http://127.0.0.1:{port}", log_path
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    def chat(self, model: str, content: str = "hi", **kw):
        return self.client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                   max_tokens=kw.pop("max_tokens", 4), temperature=0, **kw)

    def metrics(self) -> str:
        return self.http.get("/metrics").text

    def log(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def events(self, event: str) -> list[dict]:
        return [line for line in self.log() if line.get("event") == event]


def serve(folders, tmp_path, *extra):
    a, b = folders
    args = ["-m", str(a), "-m", str(b), "--served-model-name", "a", "--served-model-name", "b", "--api-key", KEY,
            "--threads", "1", "--kv-cache-mb", "1", *extra]
    log_path = tmp_path / "serve.log"
    return log_path, rung_serve(args, log_path, "rung serve with two models", timeout=180)


@pytest.fixture(scope="module")
def both(folders, tmp_path_factory):
    log_path, server = serve(folders, tmp_path_factory.mktemp("both"))
    with server as (port, _):
        yield Served(port, log_path)


# ---- two models, loaded at start ------------------------------------------------------------------


def test_models_lists_every_served_model_with_its_context(both):
    cards = {m.id: m for m in both.client.models.list().data}
    assert list(cards) == ["a", "b"]
    assert cards["a"].max_model_len == 2048 and cards["b"].max_model_len == 1024
    assert both.client.models.retrieve("b").id == "b"
    with pytest.raises(openai.NotFoundError):
        both.client.models.retrieve("c")


def test_each_request_runs_on_its_own_models_engine(both):
    long_prompt = "hi " * 450  # ~1350 tokens: within a's context of 2048 tokens, beyond b's 1024
    assert both.chat("a", long_prompt, max_tokens=1).usage.prompt_tokens > 1024
    with pytest.raises(openai.BadRequestError, match="1024"):
        both.chat("b", long_prompt, max_tokens=1)
    assert both.client.completions.create(model="b", prompt="hi", max_tokens=2).model == "b"
    with pytest.raises(openai.NotFoundError, match="'a', 'b'"):
        both.chat("c")


def test_metrics_and_log_lines_carry_the_model_name(both):
    before = both.metrics()
    ra = both.chat("a", max_tokens=3)
    rb = both.chat("b", max_tokens=2)
    text = both.metrics()
    for name, r in (("a", ra), ("b", rb)):
        grown = (metric(text, "rung:generation_tokens_total", model_name=name)
                 - metric(before, "rung:generation_tokens_total", model_name=name))
        assert grown == r.usage.completion_tokens
        assert metric(text, "rung:http_requests_total", model_name=name, handler="/v1/chat/completions",
                      status="200") >= 1
    lines = {line["id"]: line for line in both.log() if line.get("event") == "request"}
    assert lines[ra.id]["model"] == "a" and lines[rb.id]["model"] == "b"


def test_tokenize_detokenize_round_trip(both):
    text = "Hello, tiny world!"
    r = both.http.post("/tokenize", json={"model": "a", "prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] == 2048
    assert both.http.post("/tokenize", json={"model": "b", "prompt": text}).json()["max_model_len"] == 1024
    back = both.http.post("/detokenize", json={"model": "a", "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}


def test_tokenize_messages_renders_the_chat_template_as_chat_does(both):
    messages = [{"role": "user", "content": "Name one colour."}]
    r = both.http.post("/tokenize", json={"model": "a", "messages": messages}).json()
    reply = both.client.chat.completions.create(model="a", messages=messages, max_tokens=1, temperature=0)
    assert r["count"] == reply.usage.prompt_tokens  # the very prompt the chat route runs
    rendered = both.http.post("/detokenize", json={"model": "a", "tokens": r["tokens"]}).json()["prompt"]
    assert "<|im_start|>user\nName one colour.<|im_end|>" in rendered and rendered.endswith("<|im_start|>assistant\n")
    bare = both.http.post("/tokenize", json={"model": "a", "messages": messages,
                                              "add_generation_prompt": False}).json()
    assert bare["count"] < r["count"] and r["tokens"][:bare["count"]] == bare["tokens"]


def test_tokenize_errors_are_openai_shaped_and_need_the_key(both):
    def error(path, body, status, param=None):
        r = both.http.post(path, json=body)
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert param is None or e["param"] == param
        return e

    error("/tokenize", {"model": "a"}, 400)  # neither prompt nor messages
    error("/tokenize", {"model": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400)
    error("/tokenize", {"model": "a", "prompt": 5}, 400, "prompt")
    error("/tokenize", {"model": "zzz", "prompt": "x"}, 404, "model")
    assert "'a', 'b'" in error("/tokenize", {"prompt": "x"}, 400, "model")["message"]  # two models: name one
    error("/detokenize", {"tokens": [1]}, 400, "model")
    error("/detokenize", {"model": "a", "tokens": [1, 10**9]}, 400, "tokens.1")
    error("/detokenize", {"model": "a", "tokens": "12"}, 400, "tokens")
    error("/detokenize", {"model": "a", "tokens": [1], "extra": 1}, 400, "extra")
    error("/detokenize", {"model": "a", "tokens": [0] * 1_000_001}, 400, "tokens")  # bounded, not decoded
    assert httpx.post(both.base + "/tokenize", json={"model": "a", "prompt": "x"}).status_code == 401
    assert httpx.post(both.base + "/detokenize", json={"model": "a", "tokens": [1]}).status_code == 401


# ---- lazy loading and the memory budget ---------------------------------------------------------------


def test_lazy_models_load_on_first_request_and_the_budget_unloads_the_least_recently_used_idle_one(folders,
                                                                                                   tmp_path):
    # each model holds ~1.1 MB (1 MiB of KV cache and its weights): one fits in 1.6 MB, two do not
    log_path, server = serve(folders, tmp_path, "--lazy", "--memory-budget", "1.6MB")
    with server as (port, _):
        s = Served(port, log_path)
        cards = {m.id: m.model_dump() for m in s.client.models.list().data}
        assert list(cards) == ["a", "b"] and "max_model_len" not in cards["a"]  # listed, not loaded
        assert s.events("model_loaded") == []
        s.chat("a")
        assert [e["model"] for e in s.events("model_loaded")] == ["a"]
        assert metric(s.metrics(), "rung:generation_tokens_total", model_name="b") == 0
        s.chat("b")  # a is idle: unloaded to make room
        assert [(e["model"], e["to_load"]) for e in s.events("model_unloaded")] == [("a", "b")]
        s.chat("b")  # loaded: nothing moves
        s.chat("a")
        assert [e["model"] for e in s.events("model_unloaded")] == ["a", "b"]
        assert [e["model"] for e in s.events("model_loaded")] == ["a", "b", "a"]
        assert [m.id for m in s.client.models.list().data] == ["a", "b"]  # an unloaded model stays listed


def test_memory_budget_never_unloads_a_model_with_a_request_in_flight(folders, tmp_path):
    log_path, server = serve(folders, tmp_path, "--lazy", "--memory-budget", "1.6MB")
    with server as (port, _):
        s = Served(port, log_path)
        stream = s.client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2000, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # a is generating
        with pytest.raises(openai.InternalServerError) as refused:
            s.chat("b")
        assert refused.value.status_code == 503
        error = refused.value.body if isinstance(refused.value.body, dict) else {}
        assert error.get("code") == "model_memory_budget" and "'a'" in error.get("message", "")
        assert s.events("model_unloaded") == []
        stream.close()  # the client leaves: the request is cancelled, a goes idle
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                s.chat("b")
                break
            except openai.InternalServerError:  # the cancel has not reached the engine yet
                time.sleep(0.2)
        assert [e["model"] for e in s.events("model_unloaded")] == ["a"]


# ---- the command line -----------------------------------------------------------------------------


def test_memory_budget_sizes_and_their_units():
    from rung.serve.models import parse_size

    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MB") == 512 * 10**6
    assert parse_size("1GiB") == 2**30 and parse_size("1.5 mb") == 1_500_000 and parse_size("4096") == 4096
    for bad in ("", "lots", "2XB", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.parametrize("args, needle", [
    (["--memory-budget", "lots"], "--memory-budget"),
    (["--served-model-name", "x", "--served-model-name", "y"], "served-model-name"),
    (["-m", "smollm2-135m", "-m", "smollm2-135m"], "served as"),
])
def test_bad_multi_model_arguments_are_one_line_errors(args, needle):
    run_cli_bounded("serve", *args, "--port", "1", seconds=30).assert_refused(needle)


def test_a_q4_gguf_is_served_int4_on_the_cpu_unless_told_otherwise(tmp_path):
    from rung.commands.serve import _serving_spec

    spec, said = _serving_spec("smollm2-135m", "cpu", None)  # the built-in file holds Q4_1 blocks
    assert spec == "smollm2-135m@int4" and said.startswith("int4")
    assert _serving_spec("smollm2-135m@fp32", "cpu", None)[0] == "smollm2-135m@fp32"  # the spec wins
    assert _serving_spec("smollm2-135m", "cpu", "bfloat16") == ("smollm2-135m", "bfloat16")  # so does --dtype
    assert _serving_spec("smollm2-135m", "cuda", None) == ("smollm2-135m", "float32")


def test_a_float_gguf_stays_float32(tmp_path):
    import transformers as tf

    from oracle import hf_model
    from rung.commands.serve import _serving_spec
    from test_gguf_convert import write_gguf

    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, vocab_size=64)
    path = tmp_path / "float.gguf"
    write_gguf(path, hf_model(config))
    assert _serving_spec(str(path), "cpu", None) == (str(path), "float32")


def test_the_startup_line_names_each_model_and_its_format(both):
    ready = [line for line in both.log_path.read_text().splitlines() if "ready on" in line]
    assert ready and "a [float32]" in ready[0] and "b [float32]" in ready[0]


def test_an_evicted_models_weights_are_freed_under_a_frozen_start_up_heap(folders):
    """`rung serve` freezes the heap it started with out of the garbage collector (gc.freeze, as
    vLLM does); a model loaded then and evicted later under --memory-budget must still give its
    weights back (reference counting frees them; the collector could not look at frozen cycles)."""
    import asyncio
    import gc
    import weakref

    from rung.serve.models import Models, estimate_bytes, model_configs
    from rung.serve.server import ServeConfig

    configs = model_configs(ServeConfig(model="", engine=dict(kv_cache_bytes=2**20)), [str(f) for f in folders],
                            ["a", "b"])
    models = Models(configs, memory_budget=int(1.5 * max(estimate_bytes(c) for c in configs)))
    try:
        assert models.load_at_start() is None
        assert models.slots["a"].server is not None and models.slots["b"].server is None  # b waits for a request
        weights = weakref.ref(next(models.slots["a"].server.llm.model.parameters()))
        gc.collect()
        gc.freeze()
        try:
            async def use_b():
                async with models.get("b") as server:
                    return server.config.name

            assert asyncio.run(use_b()) == "b"
            assert models.slots["a"].server is None and weights() is None
        finally:
            gc.unfreeze()
    finally:
        models.shutdown()
