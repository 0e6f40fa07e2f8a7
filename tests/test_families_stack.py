"""Issue 21's families through every layer of rung: the engine (through ``LLM``, a batch of mixed
lengths equal to greedy full forward passes), the CPU native decode step where it applies (and the
reason where it does not), ``rung serve`` and ``rung bench``. Tiny random models with a real
tokenizer, one parametrised test per layer."""

from __future__ import annotations

import json

import pytest
import torch

FAMILIES = {
    # name: (transformers config class, its tiny config); widths of 64 suit the native kernels, the
    # windows of 6 are shorter than the prompts below
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", dict(sliding_window=6)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6)),
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.5, 2.0, 2.5],
        "long_factor": [2.0, 3.0, 4.0, 6.0], "partial_rotary_factor": 0.5, "original_max_position_embeddings": 256})),
    "gemma2": ("Gemma2Config", dict(sliding_window=6, query_pre_attn_scalar=16, attn_logit_softcapping=3.0,
                                    final_logit_softcapping=10.0, num_hidden_layers=3)),
    "olmo2": ("Olmo2Config", {}),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4)),
}
# the plain pre-norm families the CPU native decode step covers; the others name their reason
NATIVE = {"qwen2": None, "mistral": None, "mixtral": "mixture-of-experts", "phi3": "positions",
          "gemma2": "soft-capped", "olmo2": "norms after the sublayers", "smollm3": "NoPE"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import transformers as tf

    from oracle import tiny_chat_model

    return {name: str(tiny_chat_model(tmp_path_factory.mktemp(name), getattr(tf, cls), hidden_size=64,
                                      intermediate_size=64, head_dim=16, max_position_embeddings=256,
                                      pad_token_id=0, bos_token_id=0, **extra))
            for name, (cls, extra) in FAMILIES.items()}


def greedy_reference(model, ids, steps):
    ids = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -steps:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_batch_equals_greedy_full_forward_passes(family, folders):
    from rung.engine.sampling_params import SamplingParams
    from rung.llm import LLM

    llm = LLM(folders[family], num_blocks=64, block_size=4)
    prompts = ["Hello world, the quick brown fox jumps over the lazy dog.", "def f(x):", "Bonjour à tous — 你好"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = llm.generate(prompts, params)  # one batch: chunked prefills beside decodes, past every window
    for out in outs:
        assert out.outputs[0].token_ids == greedy_reference(llm.model, out.prompt_token_ids, 10)


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_native_decode_step_covers_the_plain_pre_norm_families(family, folders):
    from rung.engine.cpu_decode import unsupported
    from rung.engine.engine import Engine, EngineConfig
    from rung.quant.rewrite import pack_model
    from rung.text import load_tokenizer
    from rung.weights.loader import load_model

    model = pack_model(load_model(folders[family]), "f32")
    why = unsupported(model)
    if NATIVE[family] is not None:
        assert why is not None and NATIVE[family] in why
        return
    assert why is None
    from test_engine import prompts  # noqa: PLC0415 (a test helper)
    from rung.engine.sampling_params import SamplingParams

    tokenizer = load_tokenizer(folders[family])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ps = prompts(4, model.config.vocab_size, hi=30)  # past the window of 6

    def tokens(native: bool):
        engine = Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=96, max_seqs=4, cpu_decode=native))
        out = engine.run([(p, params) for p in ps])
        return engine, [seqs[0].output_ids for seqs in out.values()]

    _, want = tokens(False)
    engine, got = tokens(True)
    assert got == want and engine.cpu_decode is not None and engine.cpu_decode.steps >= 10


@pytest.mark.parametrize("family", FAMILIES)
def test_rung_serve_answers_a_chat_for_every_family(family, folders):
    from fastapi.testclient import TestClient

    from rung.serve.app import create_app
    from rung.serve.server import ServeConfig, Server

    server = Server(ServeConfig(model=folders[family], served_model_name="tiny", engine=dict(num_blocks=64)))
    server.load()
    try:
        assert server.load_error is None, server.load_error
        client = TestClient(create_app(server))
        r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 5, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "Hello world"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] >= 1 and isinstance(body["choices"][0]["message"]["content"], str)
    finally:
        server.shutdown()


@pytest.mark.parametrize("family", FAMILIES)
def test_rung_bench_runs_every_family(family, folders, tmp_path, capsys):
    from rung.cli import main

    (tmp_path / "suite.yaml").write_text(
        "name: tiny\ncases:\n  - {id: hello, prompt: Hello world, expect: {contains: the}, max_tokens: 4}\n"
        "  - {id: ppl, text: 'Hello world, the quick brown fox.', expect: {perplexity: 1000000}}\n")
    argv = ["bench", str(tmp_path / "suite.yaml"), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"),
            "-m", folders[family], "--in-process"]
    assert main(argv) == 0
    [c] = json.loads((tmp_path / "out" / "tiny.json").read_text())["candidates"]
    assert c["metrics"]["error"] is None and c["metrics"]["output_tokens"] > 0 and c["metrics"]["perplexity"] > 1
