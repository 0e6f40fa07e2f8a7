"""rung.describe's int8 / int4 weight bytes are what loading MODEL@int8 / MODEL@int4 holds, measured
on tiny models saved by transformers: MoE experts and routers kept as they are, the LM head (or the
tied table) int8 under int4, matrices whose input width is not a multiple of 32 left unpacked."""

from __future__ import annotations

import pytest
import transformers as tf
from oracle import hf_model, save

import rung
from rung.bench.fit import plan
from rung.describe import describe
from rung.quant.rewrite import packed_bytes

MODELS = {
    # a dense layer among sparse ones, untied head
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=3,
        num_hidden_layers=3, mlp_only_layers=[0], num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False),
    # the GPU issue's shape: widths 48 and 20 are not multiples of 32, so q/k/v, gate/up and the tied head stay bf16
    "qwen3_moe_small_tied": lambda: tf.Qwen3MoeConfig(
        hidden_size=48, intermediate_size=64, moe_intermediate_size=20, num_experts=6, num_experts_per_tok=3,
        num_hidden_layers=2, mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True),
    # biases on attention, router and experts; sinks
    "gpt_oss": lambda: tf.GptOssConfig(
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=96, sliding_window=8,
        max_position_embeddings=64),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def folder(request, tmp_path_factory):
    return save(hf_model(MODELS[request.param]()), tmp_path_factory.mktemp(request.param) / "model")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_describe_weight_bytes_are_what_loading_the_spec_holds(folder, fmt):
    model = rung.load_model(f"{folder}@{fmt}", dtype="bfloat16")
    held = packed_bytes(model)
    assert describe(folder).weight_bytes[fmt] == held
    # rung fit takes its weights from the same figure
    [fit] = plan(4096, 1, [folder], [fmt])
    assert fit.weight_bytes == held


def test_int8_and_int4_keep_gpt_oss_experts_in_bf16():
    # its experts have biases and the clamped SwiGLU: rung/quant/experts.py leaves them as they are
    # gpt-oss-20b: 24 layers × 32 experts × 3 matrices of 2880 × 2880 stay bf16 under @int4 (~38 GB),
    # not the 12.6 GB that quantizing them would give
    d = describe("gpt-oss-20b")
    experts = 24 * 32 * (3 * 2880 * 2880 + 2 * 2880 + 2880)
    assert d.weight_bytes["int4"] > experts * 2 > 38e9
    assert d.weight_bytes["int8"] - d.weight_bytes["int4"] < 0.02 * d.weight_bytes["int4"]
