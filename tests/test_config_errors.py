"""Malformed and absurd config.json values: `rung arch` (and every loader, through ModelConfig)
refuses in one line naming the field, or answers with arithmetic at once; never a raw
ZeroDivisionError / TypeError / KeyError traceback, never an allocation the config sizes."""

from __future__ import annotations

import json

import pytest
import torch
from hostile import run_cli_bounded

from rung.cli import main
from rung.config import ConfigError, ModelConfig, MoEConfig, RopeConfig

LLAMA = dict(model_type="llama", vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128)
QWEN3_MOE = dict(LLAMA, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
GPT2 = dict(model_type="gpt2", vocab_size=100, n_embd=64, n_layer=2, n_head=4)

# case: (config.json, what the one-line error must name)
REFUSED = {
    "zero_heads": (dict(LLAMA, num_attention_heads=0), ["num_attention_heads"]),
    "zero_kv_heads": (dict(LLAMA, num_key_value_heads=0), ["num_key_value_heads"]),
    "kv_heads_not_dividing_heads": (dict(LLAMA, num_key_value_heads=3), ["num_key_value_heads", "num_attention_heads"]),
    "heads_not_dividing_hidden": (dict(LLAMA, hidden_size=66), ["hidden_size", "num_attention_heads"]),
    "gpt2_zero_heads": (dict(GPT2, n_head=0), ["n_head"]),
    "gpt2_heads_not_dividing_hidden": (dict(GPT2, n_head=5), ["n_embd", "n_head"]),
    "zero_hidden": (dict(LLAMA, hidden_size=0), ["hidden_size"]),
    "negative_hidden": (dict(LLAMA, hidden_size=-64), ["hidden_size"]),
    "zero_layers": (dict(LLAMA, num_hidden_layers=0), ["num_hidden_layers"]),
    "too_many_layers": (dict(LLAMA, num_hidden_layers=10**9), ["num_hidden_layers"]),
    "int_past_any_model": (dict(LLAMA, hidden_size=10**40), ["hidden_size"]),
    "zero_vocab": (dict(LLAMA, vocab_size=0), ["vocab_size"]),
    "string_for_int": (dict(LLAMA, hidden_size="64"), ["hidden_size"]),
    "float_for_int": (dict(LLAMA, num_hidden_layers=2.5), ["num_hidden_layers"]),
    "list_for_float": (dict(LLAMA, rms_norm_eps=[1e-6]), ["rms_norm_eps"]),
    "string_for_float": (dict(LLAMA, rope_theta="x"), ["rope_theta"]),
    "string_for_bool": (dict(LLAMA, tie_word_embeddings="false"), ["tie_word_embeddings"]),
    "list_for_rope_scaling": (dict(LLAMA, rope_scaling=[1]), ["rope_scaling"]),
    "zero_rope_factor": (dict(LLAMA, rope_scaling={"rope_type": "linear", "factor": 0}), ["factor"]),
    "zero_rope_theta": (dict(LLAMA, rope_theta=0), ["rope_theta"]),
    "odd_head_dim_with_rope": (dict(LLAMA, head_dim=15), ["head_dim"]),
    "list_for_activation": (dict(LLAMA, hidden_act=["silu"]), ["hidden_act"]),
    "string_for_eos": (dict(LLAMA, eos_token_id="</s>"), ["eos_token_id"]),
    "zero_sparse_step": (dict(QWEN3_MOE, decoder_sparse_step=0), ["decoder_sparse_step"]),
    "top_k_above_experts": (dict(QWEN3_MOE, num_experts_per_tok=8), ["num_experts_per_tok"]),
    "int_for_mlp_only_layers": (dict(QWEN3_MOE, mlp_only_layers=3), ["mlp_only_layers"]),
    "gpt_oss_zero_experts": (dict(LLAMA, model_type="gpt_oss", num_local_experts=0, num_experts_per_tok=2),
                             ["num_local_experts"]),
    "gemma_zero_query_scalar": (dict(LLAMA, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=0),
                                ["query_pre_attn_scalar"]),
    "gemma_string_layer_types": (dict(LLAMA, model_type="gemma3_text", head_dim=16, layer_types="full"),
                                 ["layer_types"]),
    "list_for_model_type": (dict(LLAMA, model_type=["llama"]), ["model_type"]),
}


def _folder(tmp_path, config) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_rung_arch_refuses_a_malformed_config_in_one_line_naming_the_field(case, tmp_path, capsys):
    config, needles = REFUSED[case]
    folder = _folder(tmp_path, config)
    assert main(["arch", folder]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rung: error: ") and "config.json" in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("case", ["zero_heads", "string_for_int", "kv_heads_not_dividing_heads"])
def test_rung_arch_refusal_is_bounded_in_a_child(case, tmp_path):
    config, needles = REFUSED[case]
    run_cli_bounded("arch", _folder(tmp_path, config), seconds=30).assert_refused(*needles)


def test_rung_generate_refuses_zero_heads_before_reading_any_tensor(tmp_path):
    # a weights file is there (the loader reads headers before the config), but only its header is read
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(100, 64)}, str(tmp_path / "model.safetensors"))
    run_cli_bounded("generate", "-m", _folder(tmp_path, REFUSED["zero_heads"][0]), "hi",
                    seconds=30).assert_refused("num_attention_heads")


@pytest.mark.parametrize("change", [dict(hidden_size=10**9), dict(num_hidden_layers=10**6)])
def test_rung_arch_answers_an_absurd_config_at_once_with_arithmetic(change, tmp_path):
    # a terabyte of weights, or a million layers: figures in seconds, nothing allocated (1 GB limit past torch)
    res = run_cli_bounded("arch", _folder(tmp_path, dict(LLAMA, **change)), "--json", seconds=30)
    [d] = json.loads(res.assert_ok())
    assert d["total_params"] > 10**12 if "hidden_size" in change else d["total_params"] > 10**6 * 64 * 64


def test_a_million_sliding_layers_are_summarised_at_once(tmp_path):
    config = dict(LLAMA, model_type="qwen3", head_dim=16, num_hidden_layers=10**6, use_sliding_window=True,
                  sliding_window=64, max_window_layers=500_000)
    res = run_cli_bounded("arch", _folder(tmp_path, config), "--json", seconds=30)
    [d] = json.loads(res.assert_ok())
    assert d["sliding_window"] == "64 on 500000/1000000 layers (layers 500000-999999)"


def test_model_config_checks_every_construction_not_only_config_json():
    # a GGUF's metadata and a packed checkpoint's rung_config build the dataclass directly
    base = dict(model_type="llama", vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, intermediate_size=128)
    ModelConfig(**base)
    for change, needle in ((dict(num_kv_heads=0), "num_kv_heads"), (dict(num_heads=5), "num_heads"),
                           (dict(hidden_size="64"), "hidden_size"), (dict(num_layers=-1), "num_layers"),
                           (dict(norm_eps=float("nan")), "norm_eps"), (dict(activation="swish2"), "activation"),
                           (dict(layer_types=("full", "local")), "layer_types"),
                           (dict(moe_layers=(True, True)), "moe"), (dict(eos_token_id=("x",)), "eos_token_id")):
        with pytest.raises(ConfigError, match=needle):
            ModelConfig(**{**base, **change})
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3, expert_intermediate_size=8)
    with pytest.raises(ConfigError, match="factor"):
        RopeConfig(type="linear", factor=float("inf"))


def test_config_json_that_is_not_json_is_one_line(tmp_path, capsys):
    for text in ("{", "[1, 2]", '{"hidden_size": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000):
        (tmp_path / "config.json").write_text(text)
        assert main(["arch", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "config.json" in err, err
