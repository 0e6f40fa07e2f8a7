"""Tiny random GGUFs of every architecture and quant type, written as llama.cpp's converter would.

Each loads in rung with the logits of the model it was converted from (transformers, float32,
1e-4): that checks the metadata mapping and every undone converter change (the llama Q/K
permutation, Gemma's + 1 on norms, GPT-2's transposes, gpt-oss's gate/up split, llama3's
rope_freqs). Where transformers can load the architecture from GGUF, rung also matches transformers
loading the same file, including quantized files, whose weights both take from gguf's dequantizers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

import rung
from oracle import TOL, cached_decode_diff, hf_model, max_logit_diff
from rung.weights.gguf import read_gguf
from rung.weights.gguf_config import config_from_gguf
from rung.weights.keymaps import _unpermute
from test_gguf_convert import default_quant, hf_from_gguf, one_thread, write_gguf  # noqa: F401 (fixture)
from test_model_parity import GPT_OSS_BASE, LLAMA_BASE

SHAPES = ((1, 1), (2, 9), (1, 23))


def check(reference, path, shapes=SHAPES, decode=True):
    model = rung.load_model(path)
    diff = max_logit_diff(reference, model, shapes)
    assert diff < TOL, f"logits differ from the reference by {diff}"
    if decode:
        assert cached_decode_diff(model) < TOL
    return model


def convert_and_check(config, tmp_path, also_transformers_gguf: bool, **write):
    reference = hf_model(config)
    path = tmp_path / "model.gguf"
    write_gguf(path, reference, **write)
    model = check(reference, path)
    if also_transformers_gguf:
        assert max_logit_diff(hf_from_gguf(path), model, SHAPES) < TOL
    return model


# ---- llama (Q/K rows permuted by the converter) --------------------------------------------------


def test_llama_gguf_undoes_qk_permutation_and_matches_transformers(tmp_path):
    convert_and_check(tf.LlamaConfig(**LLAMA_BASE), tmp_path, also_transformers_gguf=True)


def test_llama_gguf_with_permuted_biases_and_tied_head(tmp_path):
    config = tf.LlamaConfig(**{**LLAMA_BASE, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True})
    # transformers' GGUF config has no bias flags: only the original model is the reference
    c = convert_and_check(config, tmp_path, also_transformers_gguf=False).config
    assert c.qkv_bias and c.o_bias and c.mlp_bias and c.tie_word_embeddings


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024, "rope_theta": 10000.0}
    config = tf.LlamaConfig(**{**LLAMA_BASE, "head_dim": 64, "rope_parameters": rope})
    model = convert_and_check(config, tmp_path, also_transformers_gguf=False)  # transformers ignores rope_freqs
    r = model.config.rope
    assert (r.type, r.factor, r.original_max_position, r.low_freq_factor, r.high_freq_factor) == \
        ("llama3", 8.0, 1024, 1.0, 4.0)


# ---- Qwen3, Qwen3-MoE (NeoX rotation: stored unpermuted) -----------------------------------------


def test_qwen3_gguf_matches_transformers(tmp_path):
    # transformers' GGUF config for qwen3 leaves head_dim at its default of 128
    config = tf.Qwen3Config(**{**LLAMA_BASE, "head_dim": 128, "tie_word_embeddings": True})
    convert_and_check(config, tmp_path, also_transformers_gguf=True)


def qwen3_moe_config(**extra):
    # GGUF implies norm_topk_prob (llama.cpp always renormalises Qwen3-MoE's top-k)
    return tf.Qwen3MoeConfig(**{**LLAMA_BASE, "moe_intermediate_size": 32, "num_experts": 6, "num_experts_per_tok": 2,
                                "head_dim": 20, "norm_topk_prob": True, **extra})


def test_qwen3_moe_gguf_stacked_experts_match_transformers(tmp_path):
    # transformers' GGUF config ignores expert_feed_forward_length (moe_intermediate_size stays 768)
    convert_and_check(qwen3_moe_config(moe_intermediate_size=768), tmp_path, also_transformers_gguf=True)


def test_qwen3_moe_gguf_fused_gate_up_experts_and_a_dense_layer(tmp_path):
    config = qwen3_moe_config(num_hidden_layers=3, mlp_only_layers=[1])
    model = convert_and_check(config, tmp_path, also_transformers_gguf=False, fuse_experts=True)
    assert model.config.moe_layers == (True, False, True)


# ---- gpt-oss (sinks, biases, split gate/up, MXFP4 experts) ---------------------------------------


def test_gpt_oss_gguf_matches_transformers(tmp_path):
    model = convert_and_check(tf.GptOssConfig(**GPT_OSS_BASE), tmp_path, also_transformers_gguf=False)
    assert model.config.rope.type == "yarn" and model.config.rope.truncate is False
    assert model.config.layer_types[:2] == ("sliding", "full")


def test_gpt_oss_gguf_mxfp4_experts_match_transformers_on_the_same_values(tmp_path):
    """Experts stored as GGML MXFP4; transformers runs on the values gguf decodes from the file."""
    reference = hf_model(tf.GptOssConfig(**{**GPT_OSS_BASE, "intermediate_size": 64}))
    path = tmp_path / "model.gguf"
    stored = write_gguf(path, reference, quant=lambda name, a: Q.MXFP4 if "_exps.weight" in name else Q.F32)
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            gate, up, down = (torch.from_numpy(dequantize(stored[f"blk.{i}.ffn_{p}_exps.weight"][0], Q.MXFP4))
                              for p in ("gate", "up", "down"))
            layer.mlp.experts.gate_up_proj[..., 0::2] = gate.transpose(1, 2)
            layer.mlp.experts.gate_up_proj[..., 1::2] = up.transpose(1, 2)
            layer.mlp.experts.down_proj.copy_(down.transpose(1, 2))
    assert read_gguf(path).tensors["blk.0.ffn_gate_exps.weight"] == ((8, 64, 64), Q.MXFP4)
    check(reference, path, shapes=((1, 3), (2, 17)))


# ---- GPT-2 (fused qkv, Conv1D transposed by the converter, learned positions) --------------------


def test_gpt2_gguf_matches_transformers(tmp_path):
    # transformers' GGUF config reads context_length into n_ctx, leaving n_positions at 1024
    config = tf.GPT2Config(n_embd=48, n_layer=3, n_head=4, vocab_size=97, n_positions=1024)
    convert_and_check(config, tmp_path, also_transformers_gguf=True)


def test_gpt2_gguf_untied_with_n_inner_takes_the_width_from_the_tensors(tmp_path):
    config = tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=40, n_inner=80,
                           tie_word_embeddings=False)
    model = convert_and_check(config, tmp_path, also_transformers_gguf=False)
    assert model.config.intermediate_size == 80 and not model.config.tie_word_embeddings


# ---- Gemma 3 (norms stored as 1 + w, sandwich norms, local/global layers) -------------------------


def gemma3_config(**extra):
    return tf.Gemma3TextConfig(**{
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 7, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 24, "vocab_size": 101, "sliding_window": 6,
        # llama.cpp scales queries by head_dim^-0.5 (query_pre_attn_scalar = head_dim below 27B)
        "query_pre_attn_scalar": 24, "max_position_embeddings": 128, **extra})


def test_gemma3_gguf_matches_transformers(tmp_path):
    # transformers' GGUF config leaves query_pre_attn_scalar at 256: a head of 256 makes both agree
    config = gemma3_config(head_dim=256, query_pre_attn_scalar=256)
    model = convert_and_check(config, tmp_path, also_transformers_gguf=True)
    assert model.config.layer_types.count("full") == 1 and model.config.sliding_window == 6


def test_gemma3_gguf_linear_rope_softcap_untied(tmp_path):
    config = gemma3_config(
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        final_logit_softcapping=5.0, tie_word_embeddings=False)
    model = convert_and_check(config, tmp_path, also_transformers_gguf=False)
    assert model.config.rope.type == "linear" and model.config.final_logit_softcap == 5.0


# ---- every quant type, through gguf's dequantizer, into the right parameter -----------------------

QUANT_TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.MXFP4]


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_llama_gguf_quant_type_dequantizes_into_the_right_parameters(qtype, tmp_path):
    # rows of 256 fit every block size (K-quants: 256); K-quant blocks are random, with small scales
    config = tf.LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    path = tmp_path / f"llama-{qtype.name}.gguf"
    stored = write_gguf(path, hf_model(config), quant=default_quant(qtype))
    assert sum(t == qtype for _, t in stored.values()) == 2 * 7 + 2  # every matrix, embedding and head

    model = rung.load_model(path)
    params = dict(model.named_parameters())

    def decoded(name):
        data, t = stored[name]
        return torch.from_numpy(np.ascontiguousarray(dequantize(data, t), dtype=np.float32))

    assert torch.equal(params["embed.weight"], decoded("token_embd.weight"))
    assert torch.equal(params["layers.0.mlp.down_proj.weight"], decoded("blk.0.ffn_down.weight"))
    k_rows = params["layers.1.attn.qkv_proj.weight"].split((256, 128, 128))[1]  # rows [q | k | v]
    assert torch.equal(k_rows, _unpermute(2)(decoded("blk.1.attn_k.weight")))
    assert torch.equal(params["lm_head.weight"], decoded("output.weight"))
    assert max_logit_diff(hf_from_gguf(path), model, ((2, 11),)) < TOL


def test_gguf_loads_in_bfloat16(tmp_path):
    reference = hf_model(tf.Qwen3Config(**{**LLAMA_BASE, "head_dim": 16}))
    path = tmp_path / "model.gguf"
    write_gguf(path, reference, quant=default_quant(Q.Q8_0))
    model = rung.load_model(path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    full = rung.load_model(path)
    ids = torch.arange(12)[None] % 101
    with torch.no_grad():
        assert (model(ids) - full(ids)).abs().max() < 0.1 * full(ids).abs().max()


def test_config_from_gguf_reads_the_metadata(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, hf_model(tf.Qwen3MoeConfig(**{**LLAMA_BASE, "moe_intermediate_size": 32, "num_experts": 6,
                                                    "num_experts_per_tok": 2, "head_dim": 20})))
    c = config_from_gguf(read_gguf(path))
    assert (c.model_type, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("qwen3_moe", 101, 64, 2, 4, 2, 20)
    assert (c.moe.num_experts, c.moe.top_k, c.moe.expert_intermediate_size, c.moe.norm_topk_prob) == (6, 2, 32, True)
    assert (c.max_position_embeddings, c.rope.theta, c.bos_token_id, c.eos_token_id) == (64, 10000.0, 1, 2)
    assert c.qk_norm and not c.tie_word_embeddings
