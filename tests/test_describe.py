"""Parameter, active-parameter, KV-cache and weight-byte arithmetic of rung.describe."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rung.config import ModelConfig, MoEConfig, preset_names
from rung.describe import describe, kv_cache_bytes, total_params, weight_bytes, weights

MiB = 2**20


# ---- gpt-oss: exact figures of docs/architectures-gpt-oss.md §9, §10 -----------------------------


def test_gpt_oss_20b_parameters_match_the_model_card():
    d = describe("gpt-oss-20b")
    assert d.total_params == 20_914_757_184
    assert d.active_params == 3_608_307_264


def test_gpt_oss_120b_parameters_match_the_model_card():
    d = describe("gpt-oss-120b")
    assert d.total_params == 116_829_156_672
    assert d.active_params == 5_132_849_472


def test_gpt_oss_mxfp4_checkpoint_bytes():
    assert describe("gpt-oss-20b").weight_bytes["mxfp4"] == 13_761_264_768
    assert describe("gpt-oss-120b").weight_bytes["mxfp4"] == 65_248_815_744


def test_gpt_oss_bf16_bytes_are_two_per_parameter():
    d = describe("gpt-oss-20b")
    assert d.weight_bytes["bf16"] == 2 * d.total_params == 41_829_514_368


def test_gpt_oss_20b_kv_cache_caps_sliding_layers_at_128():
    c = ModelConfig.from_preset("gpt-oss-20b")
    assert kv_cache_bytes(c, 4096) == 99 * MiB
    assert kv_cache_bytes(c, 32_768) == 771 * MiB
    assert kv_cache_bytes(c, 131_072) == 3075 * MiB
    d = describe(c, context=131_072)
    assert d.kv_bytes == 3075 * MiB and d.kv_bytes_per_token == 3075 * MiB / 131_072


def test_gpt_oss_120b_kv_cache():
    assert describe("gpt-oss-120b").kv_bytes == int(148.5 * MiB)


# ---- GPT-2 -------------------------------------------------------------------------------------


def test_gpt2_small_has_124_439_808_parameters():
    assert describe("gpt2").total_params == 124_439_808


def test_gpt2_active_leaves_out_the_position_table_but_counts_the_tied_head():
    d = describe("gpt2")
    assert d.active_params == 124_439_808 - 1024 * 768
    assert d.embedding_params == 50257 * 768 + 1024 * 768


def test_gpt2_kv_cache_is_full_multi_head():
    # 12 layers x K and V x 12 heads x 64 dims x 2 bytes
    assert describe("gpt2", context=1024).kv_bytes == 12 * 2 * 768 * 2 * 1024


# ---- published totals of every family ----------------------------------------------------------

PUBLISHED_TOTAL = {  # name -> (published parameters, relative tolerance)
    "gpt2-medium": (355e6, 0.01),
    "gpt2-large": (774e6, 0.01),
    "gpt2-xl": (1558e6, 0.01),  # OpenAI's release folder "1558M"
    "smollm2-135m": (135e6, 0.01),
    "smollm2-360m": (360e6, 0.01),
    "smollm2-1.7b": (1.7e9, 0.01),
    "qwen3-0.6b": (0.6e9, 0.01),  # Qwen model cards: total / non-embedding
    "qwen3-1.7b": (1.7e9, 0.02),
    "qwen3-4b": (4.0e9, 0.01),
    "qwen3-8b": (8.2e9, 0.01),
    "qwen3-14b": (14.8e9, 0.01),
    "qwen3-32b": (32.8e9, 0.01),
    "qwen3-30b-a3b": (30.5e9, 0.01),
    "qwen3-235b-a22b": (235e9, 0.01),
    "gemma3-270m": (270e6, 0.01),
    "gemma3-1b": (1.0e9, 0.01),
}

QWEN3_NON_EMBEDDING = {  # Qwen's "non-embedding": total minus input table and (untied) head
    "qwen3-0.6b": 0.44e9, "qwen3-1.7b": 1.4e9, "qwen3-4b": 3.6e9, "qwen3-8b": 6.95e9,
    "qwen3-14b": 13.2e9, "qwen3-32b": 31.2e9, "qwen3-30b-a3b": 29.9e9, "qwen3-235b-a22b": 234e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTAL))
def test_total_parameters_match_the_published_size(name):
    published, tol = PUBLISHED_TOTAL[name]
    assert describe(name).total_params == pytest.approx(published, rel=tol)


@pytest.mark.parametrize("name", sorted(QWEN3_NON_EMBEDDING))
def test_qwen3_non_embedding_parameters_match_the_model_card(name):
    d = describe(name)
    non_embedding = d.total_params - d.params_by_part["embeddings"] - d.params_by_part["head"]
    assert non_embedding == pytest.approx(QWEN3_NON_EMBEDDING[name], rel=0.01)


def test_qwen3_30b_a3b_activates_about_3b_per_token():
    d = describe("qwen3-30b-a3b")
    assert d.active_params == pytest.approx(3.0e9, rel=0.02)
    # Qwen's published 3.3B also counts the input embedding table
    assert d.active_params + d.embedding_params == pytest.approx(3.3e9, rel=0.02)


def test_qwen3_235b_a22b_activates_about_22b_per_token_with_the_table():
    d = describe("qwen3-235b-a22b")
    assert d.active_params + d.embedding_params == pytest.approx(22e9, rel=0.02)


def test_dense_untied_model_is_active_except_its_input_table():
    d = describe("qwen3-8b")
    assert d.active_params == d.total_params - 151_936 * 4096


@pytest.mark.parametrize("name", preset_names())
def test_total_matches_transformers_parameter_count(name):
    """transformers builds each preset on the meta device (no memory); its parameters agree exactly."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rung.config import preset_dict

    raw = {k: v for k, v in preset_dict(name).items() if k not in ("_source", "quantization_config")}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**raw))
    assert total_params(ModelConfig.from_hf(raw)) == sum(p.numel() for p in model.parameters())


# ---- formats and the arithmetic on a tiny config ------------------------------------------------


def tiny(**changes) -> ModelConfig:
    # Built afresh, not with .replace(): __post_init__ derives moe_layers from moe.
    fields = dict(model_type="llama", vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, intermediate_size=128)
    return ModelConfig(**{**fields, **changes})


def test_tiny_dense_model_counts_every_weight():
    c = tiny()
    attn = 64 * 64 + 2 * (64 * 32) + 64 * 64
    mlp = 3 * 64 * 128
    assert total_params(c) == 2 * (100 * 64) + 2 * (attn + mlp + 2 * 64) + 64


def test_tiny_moe_reads_top_k_experts_and_the_router():
    c = tiny(moe=MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=32, router_bias=True, expert_bias=True))
    expert = 2 * (64 * 32 + 32) + (32 * 64 + 64)
    per_layer_fixed = (64 * 64 + 2 * 64 * 32 + 64 * 64) + 2 * 64 + (8 * 64 + 8)
    d = describe(c)
    assert d.total_params == 2 * 100 * 64 + 2 * (per_layer_fixed + 8 * expert) + 64
    assert d.active_params == 100 * 64 + 2 * (per_layer_fixed + 2 * expert) + 64


def test_int8_stores_a_byte_per_linear_weight_and_a_scale_per_row():
    c = tiny()
    linear = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    per_layer = sum(o * i + 2 * o for o, i in linear)
    rest = (2 * 64 * 2 + 0) * 2 + 64 * 2 + 100 * 64 * 2  # norms, final norm, embedding table
    head = 100 * 64 + 2 * 100
    assert weight_bytes(c, "int8") == 2 * per_layer + rest + head


def test_int4_is_five_bits_per_linear_weight_and_keeps_the_tied_table_int8():
    # rung's q4: 4-bit values with an fp16 scale and offset per 32 inputs; the head (here the tied
    # table) in q8 with a scale per row, as pack_model stores it
    c = tiny(tie_word_embeddings=True)
    linear = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 2 + 64 * 128)
    table = 100 * 64
    other = total_params(c) - linear - table
    assert weight_bytes(c, "int4") == linear * 5 / 8 + (table + 100 * 2) + other * 2


def test_int8_and_int4_keep_moe_layers_as_they_are():
    moe = MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=32, router_bias=True, expert_bias=True)
    c = tiny(moe=moe)
    sparse = sum(w.size * w.count for w in weights(c) if w.name.startswith("sparse_layers.mlp"))
    assert sparse == 2 * (8 * 64 + 8 + 8 * (3 * 64 * 32 + 2 * 32 + 64))  # router and experts, biases
    dense = tiny()  # the same model with a dense MLP: attention, head and norms pack alike
    dense_mlp = 2 * (3 * 64 * 128 + (128 + 128 + 64) * 2)  # int8 values + an fp16 scale per row
    assert weight_bytes(c, "int8") - sparse * 2 == weight_bytes(dense, "int8") - dense_mlp


def test_mxfp4_packs_only_the_feed_forward_matrices():
    c = tiny(tie_word_embeddings=True)
    ffn = 2 * 3 * 64 * 128
    assert weight_bytes(c, "mxfp4") == ffn * 4.25 / 8 + (total_params(c) - ffn) * 2


def test_sliding_layers_hold_at_most_their_window():
    c = tiny(layer_types=("sliding", "full"), sliding_window=8)
    per_token_layer = 2 * 2 * 16 * 2
    assert kv_cache_bytes(c, 4) == 2 * 4 * per_token_layer
    assert kv_cache_bytes(c, 100) == (8 + 100) * per_token_layer


def test_describe_names_the_architecture():
    d = describe("gpt-oss-20b")
    assert d.attention == "GQA 64/8×64" and d.sinks and not d.qk_norm
    assert d.ffn == "clamped SwiGLU" and (d.num_experts, d.active_experts) == (32, 4)
    assert d.sliding_window.startswith("128 on 12/24 layers")
    assert "yarn" in d.positions and "150K" in d.positions
    g = describe("gemma3-270m")
    assert g.attention.startswith("MQA") and g.ffn == "GeGLU" and g.qk_norm and "pre+post" in g.norm
    assert describe("gpt2").positions == "learned" and describe("gpt2").ffn == "GELU MLP"
    assert describe("smollm2-1.7b").attention.startswith("MHA")


def test_description_states_the_active_convention():
    text = describe("gpt2").active_convention
    assert "input embedding table" in text and "tied" in text


def test_describe_and_cli_do_not_import_torch():
    code = "import sys, rung.describe, rung.cli; rung.describe.describe('gpt-oss-20b'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_rung_describe_answers_every_call_in_a_fresh_process():
    # importing the submodule rung/describe.py binds the package attribute rung.describe to the module:
    # the second call used to raise "'module' object is not callable"
    code = ("import rung\n"
            "a = rung.describe('gpt2'); b = rung.describe('gpt2', context=1024)\n"
            "import rung.describe\n"
            "from rung import describe\n"
            "c = rung.describe('smollm2-135m'); d = describe('gpt2')\n"
            "print(type(a).__name__, a.total_params, b.kv_bytes, c.total_params, d == a)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["Description", "124439808", str(12 * 2 * 768 * 2 * 1024), "134515008", "True"]


def test_description_is_an_object_and_a_mapping_with_the_decoder_issues_names():
    d = describe("gpt2", context=1024)
    assert d.kv_cache_bytes_per_token == d.kv_bytes_per_token == 12 * 2 * 768 * 2
    assert d["kv_cache_bytes_per_token"] == d["kv_bytes_per_token"] == d.kv_bytes_per_token
    assert d["total_params"] == d.total_params and d["weight_bytes"] == d.weight_bytes
    assert dict(d) == d.to_dict() and "config" not in d and set(d) >= {"active_params", "kv_bytes", "family"}
    with pytest.raises(KeyError):
        d["no_such_figure"]
