"""Issue 21's config fields refuse bad values in one line naming the field: LongRoPE factors,
SmolLM3's no_rope_layers, OLMo 2's norm placement; and a config.json with a vast factor list is
refused within a time and memory bound."""

from __future__ import annotations

import json

import pytest
from hostile import run_cli_bounded

from rung.config import ConfigError, ModelConfig, RopeConfig

BASE = dict(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128)
PHI3 = dict(BASE, model_type="phi3", max_position_embeddings=128, original_max_position_embeddings=32)


def longrope(short, long, **extra):
    return dict(PHI3, rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long, **extra})


REFUSED = {
    "longrope_without_factors": (dict(PHI3, rope_scaling={"type": "longrope"}), "short_factor"),
    "longrope_factors_of_the_wrong_length": (longrope([1.0] * 3, [1.0] * 8), "8 entries each"),
    "longrope_zero_factor": (longrope([1.0] * 8, [0.0] * 8), "positive"),
    "longrope_string_factor": (longrope([1.0] * 8, ["x"] * 8), "long_factor"),
    "longrope_factors_not_a_list": (longrope(2.0, [1.0] * 8), "short_factor"),
    "no_rope_layers_too_short": (dict(BASE, model_type="smollm3", no_rope_layers=[1, 0]), "no_rope_layers"),
    "no_rope_layers_not_flags": (dict(BASE, model_type="smollm3", no_rope_layers=[1, 2, 1, 0]), "no_rope_layers"),
    "gemma2_negative_softcap": (dict(BASE, model_type="gemma2", attn_logit_softcapping=-1.0, head_dim=16),
                                "attn_logit_softcap"),
    "mixtral_top_k_past_experts": (dict(BASE, model_type="mixtral", num_local_experts=2, num_experts_per_tok=3),
                                   "num_experts_per_tok"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_bad_family_fields_are_refused_naming_the_field(case):
    raw, needle = REFUSED[case]
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as e:
        ModelConfig.from_hf(raw)
    assert "\n" not in str(e.value)


def test_post_only_norms_need_the_norms_after_each_sublayer():
    c = ModelConfig.from_hf(dict(BASE, model_type="olmo2"))
    assert not c.pre_norms and c.sandwich_norms and c.qk_norm_whole
    with pytest.raises(ConfigError, match="pre_norms=False needs sandwich_norms"):
        c.replace(sandwich_norms=False)


def test_su_is_read_as_longrope_with_the_factor_from_the_context_ratio():
    c = ModelConfig.from_hf(dict(PHI3, rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}))
    assert c.rope == RopeConfig(type="longrope", factor=4.0, original_max_position=32, short_factor=(1.0,) * 8,
                                long_factor=(2.0,) * 8)


def test_a_vast_longrope_factor_list_is_refused_within_bounds(tmp_path):
    # 4 million factors (~20 MB of JSON, under the 64 MB config cap): refused by count, not sized into tensors
    raw = longrope([1.0] * 8, [1.5] * 4_000_000)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    run_cli_bounded("arch", str(tmp_path), seconds=30).assert_refused("long_factor", "at most")


def test_family_configs_survive_the_packed_checkpoints_json_round_trip():
    """rung quantize writes the ModelConfig as JSON (lists for tuples); it must read back equal."""
    from rung.quant.checkpoint import config_from_dict, config_to_dict

    for name in ("phi-3.5-mini", "smollm3-3b", "olmo2-7b", "gemma2-2b", "mixtral-8x7b"):
        c = ModelConfig.from_preset(name)
        assert config_from_dict(json.loads(json.dumps(config_to_dict(c)))) == c, name
