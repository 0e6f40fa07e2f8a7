"""The shipped presets are the public config.json files of real models, and rung parses them."""

from __future__ import annotations

import json

import pytest

from rung.config import PRESET_DIR, ModelConfig, preset_dict, preset_names

EXPECTED = {
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
    "smollm2-135m", "smollm2-360m", "smollm2-1.7b",
    "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b",
    "qwen3-30b-a3b", "qwen3-235b-a22b",
    "gpt-oss-20b", "gpt-oss-120b",
    "gemma3-270m", "gemma3-1b",
    "deepseek-v3", "deepseek-v2-lite",
    # issue 21 (families)
    "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b", "mistral-7b-v0.1", "mixtral-8x7b", "phi-3.5-mini",
    "gemma2-2b", "gemma2-9b", "olmo2-7b", "smollm3-3b",
}


def test_every_expected_preset_ships():
    assert set(preset_names()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_is_a_json_config_with_a_source(name):
    raw = json.loads((PRESET_DIR / f"{name}.json").read_text())
    assert raw["_source"].endswith("config.json") and "/" in raw["_source"]
    assert raw["model_type"] in ("gpt2", "llama", "qwen3", "qwen3_moe", "gpt_oss", "gemma3_text", "deepseek_v2",
                                 "deepseek_v3", "qwen2", "mistral", "mixtral", "phi3", "gemma2", "olmo2", "smollm3")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parses_from_dict_and_by_name(name):
    assert ModelConfig.from_hf(preset_dict(name)) == ModelConfig.from_preset(name)


def test_preset_names_are_case_insensitive():
    assert ModelConfig.from_preset("GPT-OSS-20B") == ModelConfig.from_preset("gpt-oss-20b")


def test_gemma_presets_are_text_only_configs():
    for name in ("gemma3-270m", "gemma3-1b"):
        assert preset_dict(name)["model_type"] == "gemma3_text"


def test_gpt_oss_slides_on_even_layers_with_a_128_window():
    for name, layers, experts in (("gpt-oss-20b", 24, 32), ("gpt-oss-120b", 36, 128)):
        c = ModelConfig.from_preset(name)
        assert c.num_layers == layers and c.moe.num_experts == experts and c.moe.top_k == 4
        assert c.layer_types == ("sliding", "full") * (layers // 2)
        assert c.sliding_window == 128 and c.attn_sinks and c.qkv_bias
        assert c.rope.type == "yarn" and c.rope.factor == 32 and c.rope.theta == 150_000 and not c.rope.truncate


def test_gemma3_1b_is_full_attention_every_sixth_layer():
    c = ModelConfig.from_preset("gemma3-1b")
    assert [i for i, t in enumerate(c.layer_types) if t == "full"] == [5, 11, 17, 23]
    assert c.sliding_window == 512 and c.rope.theta == 1e6 and c.local_rope.theta == 1e4


def test_qwen3_presets_attend_fully_and_norm_q_and_k():
    for name in (n for n in EXPECTED if n.startswith("qwen3")):
        c = ModelConfig.from_preset(name)
        assert set(c.layer_types) == {"full"} and c.sliding_window is None and c.qk_norm


def test_qwen3_moe_presets_are_sparse_in_every_layer():
    for name, experts, k in (("qwen3-30b-a3b", 128, 8), ("qwen3-235b-a22b", 128, 8)):
        c = ModelConfig.from_preset(name)
        assert all(c.moe_layers) and (c.moe.num_experts, c.moe.top_k) == (experts, k) and c.moe.norm_topk_prob


def test_tied_embeddings_match_the_released_models():
    tied = {n for n in EXPECTED if ModelConfig.from_preset(n).tie_word_embeddings}
    assert tied == {
        "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "smollm2-135m", "smollm2-360m", "smollm2-1.7b",
        "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "gemma3-270m", "gemma3-1b",
        "qwen2.5-0.5b", "gemma2-2b", "gemma2-9b", "smollm3-3b",  # issue 21
    }


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_matches_transformers_reading_of_it(name):
    """transformers accepts each preset, and its layer_types agree with rung's parse."""
    transformers = pytest.importorskip("transformers")
    raw = {k: v for k, v in preset_dict(name).items() if k not in ("_source", "quantization_config")}
    hf = transformers.AutoConfig.for_model(**raw)
    c = ModelConfig.from_hf(raw)
    assert c == ModelConfig.from_hf(hf.to_dict())  # the v5 dialect (rope_parameters) parses the same
    hf_types = getattr(hf, "layer_types", None)
    if hf_types is not None:
        assert c.layer_types == tuple("sliding" if t == "sliding_attention" else "full" for t in hf_types)
