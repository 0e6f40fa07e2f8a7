"""rung's logits equal transformers' (float32, 1e-4) for every family, and cached decoding equals
the full forward pass. Each config is tiny, random, perturbed, saved with save_pretrained."""

from __future__ import annotations

import pytest
import transformers as tf

from oracle import check_family

LLAMA_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)


# ---- GPT-2 ----------------------------------------------------------------------------------

GPT2_CASES = {
    "default": dict(),
    "untied_inner_exact_gelu": dict(n_inner=80, activation_function="gelu", tie_word_embeddings=False),
    "inverse_layer_scale_relu": dict(scale_attn_by_inverse_layer_idx=True, activation_function="relu"),
    "unscaled_attention": dict(scale_attn_weights=False, reorder_and_upcast_attn=True),
}


@pytest.mark.parametrize("case", GPT2_CASES)
def test_gpt2_matches_transformers(case, tmp_path):
    config = tf.GPT2Config(n_embd=48, n_layer=3, n_head=4, vocab_size=97, n_positions=40, **GPT2_CASES[case])
    check_family(config, tmp_path)


# ---- BLOOM (ALiBi) ---------------------------------------------------------------------------

@pytest.mark.parametrize("heads,post_ln", [(4, False), (6, False), (5, True)])
def test_bloom_alibi_matches_transformers(heads, post_ln, tmp_path):
    # 6 and 5 heads are not powers of two: the interleaved extra slopes
    config = tf.BloomConfig(hidden_size=heads * 8, n_layer=2, n_head=heads, vocab_size=89,
                            apply_residual_connection_post_layernorm=post_ln)
    check_family(config, tmp_path)


# ---- Llama and its RoPE scalings --------------------------------------------------------------

LLAMA_CASES = {
    "gqa": dict(),
    "mqa_biases": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "head_dim_not_hidden_over_heads": dict(head_dim=24),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 5000.0}),
    "rope_dynamic_ntk": dict(max_position_embeddings=12,
                             rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}),
    "rope_yarn_truncated": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                 "original_max_position_embeddings": 16}),
    "rope_yarn_untruncated": dict(rope_parameters={"rope_type": "yarn", "factor": 8.0, "rope_theta": 150000.0,
                                                   "original_max_position_embeddings": 16, "truncate": False,
                                                   "beta_fast": 16.0, "beta_slow": 2.0}),
    "rope_llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_matches_transformers(case, tmp_path):
    config = tf.LlamaConfig(**{**LLAMA_BASE, **LLAMA_CASES[case]})
    # dynamic NTK re-derives frequencies from the longest position of each call, so a token decoded
    # past the trained length sees keys rotated under another base: no cache equivalence to check
    check_family(config, tmp_path, decode=case != "rope_dynamic_ntk")


# ---- Qwen3 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["tied_qk_norm", "sliding_upper_layers"])
def test_qwen3_matches_transformers(case, tmp_path):
    extra = dict(head_dim=24, tie_word_embeddings=True)
    if case == "sliding_upper_layers":  # layers >= max_window_layers use a 6-token window
        extra = dict(use_sliding_window=True, sliding_window=6, max_window_layers=1, num_hidden_layers=3)
    config = tf.Qwen3Config(**{**LLAMA_BASE, **extra})
    check_family(config, tmp_path)


# ---- Qwen3-MoE ------------------------------------------------------------------------------

QWEN3_MOE_CASES = {
    "top2_renormalised": dict(norm_topk_prob=True),
    "top3_not_renormalised": dict(num_experts_per_tok=3, norm_topk_prob=False),
    "dense_layers_mixed_in": dict(num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=2, norm_topk_prob=True),
    "sliding_window": dict(use_sliding_window=True, sliding_window=5),
}


@pytest.mark.parametrize("case", QWEN3_MOE_CASES)
def test_qwen3_moe_matches_transformers(case, tmp_path):
    config = tf.Qwen3MoeConfig(**{**LLAMA_BASE, "moe_intermediate_size": 40, "num_experts": 6,
                                  "num_experts_per_tok": 2, "head_dim": 20, **QWEN3_MOE_CASES[case]})
    check_family(config, tmp_path)


# ---- gpt-oss --------------------------------------------------------------------------------

GPT_OSS_BASE = dict(hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=3,
                    vocab_size=103, sliding_window=5)


def gpt_oss_config(**extra):
    return tf.GptOssConfig(**{**GPT_OSS_BASE, **extra})


@pytest.mark.parametrize("case", ["real_yarn_constants", "mqa_top1"])
def test_gpt_oss_sliding_window_and_sinks_match_transformers(case, tmp_path):
    extra = {} if case == "real_yarn_constants" else dict(num_key_value_heads=1, num_experts_per_tok=1)
    # prompts of 19 and 30 tokens run well past the 5-token window of the even layers
    check_family(gpt_oss_config(**extra), tmp_path, shapes=((1, 1), (2, 19), (1, 30)))


# ---- Gemma 3 (text) ---------------------------------------------------------------------------

GEMMA3_CASES = {
    # 5 local : 1 global, local layers at base 10,000 and a 6-token window, globals at 1e6
    "local_and_global": dict(),
    "linear_scaled_global_rope_softcap": dict(
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        final_logit_softcapping=5.0, tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", GEMMA3_CASES)
def test_gemma3_matches_transformers(case, tmp_path):
    config = tf.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                                 num_key_value_heads=1, head_dim=24, vocab_size=101, sliding_window=6,
                                 query_pre_attn_scalar=20, max_position_embeddings=128, **GEMMA3_CASES[case])
    check_family(config, tmp_path)
