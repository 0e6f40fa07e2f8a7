"""DeepSeek-V2 / V3 (issue 21): Multi-head Latent Attention, shared experts, group-limited routing
(V3's sigmoid with the correction bias, V2's softmax), dense first layers. Logits equal
transformers' (float32, 1e-4); the cached, paged and absorbed paths equal the full pass; the
engine's pool holds the latent, not expanded keys and values."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import rung
from oracle import TOL, cached_decode_diff, check_family, hf_model, max_logit_diff, save

MLA_BASE = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
                n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, vocab_size=101,
                max_position_embeddings=64)


def v3_config(**extra):
    return tf.DeepseekV3Config(**{**MLA_BASE, "q_lora_rank": 24, "n_group": 4, "topk_group": 2, "n_shared_experts": 1,
                                  **extra})


def v2_config(**extra):
    return tf.DeepseekV2Config(**{**MLA_BASE, "q_lora_rank": None, "n_shared_experts": 2, **extra})


V3_CASES = {
    # sigmoid routing over 4 groups of 2, the best 2 groups kept, renormalised, scaled by 2.5
    "grouped_sigmoid_router": dict(),
    "not_renormalised_biases_no_interleave": dict(norm_topk_prob=False, attention_bias=True, rope_interleave=False,
                                                  routed_scaling_factor=1.0),
    # YaRN with mscale_all_dim: the softmax scale carries mscale(factor, mscale_all_dim)²
    "yarn_mscale": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8,
                                         "original_max_position_embeddings": 16}),
}


def with_correction_bias(model, seed: int = 0):
    """perturb() moves parameters only; V3's e_score_correction_bias is a buffer: move it too, by
    as much as the sigmoid scores differ, so a router that ignored it would choose other experts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.3)
    return model


def check_v3(config, tmp_path):
    reference = with_correction_bias(hf_model(config))
    model = rung.load_model(save(reference, tmp_path / "model"))
    diff = max_logit_diff(reference, model, ((1, 1), (2, 7), (3, 19)))
    assert diff < TOL, f"logits differ from transformers by {diff}"
    assert cached_decode_diff(model) < TOL
    return reference, model


@pytest.mark.parametrize("case", V3_CASES)
def test_deepseek_v3_matches_transformers(case, tmp_path):
    check_v3(v3_config(**V3_CASES[case]), tmp_path)


V2_CASES = {
    "greedy_softmax_no_q_lora": dict(),  # V2-Lite: one q_proj, greedy top-k of the softmax
    "group_limited_greedy_q_lora": dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                        routed_scaling_factor=1.5),
}


@pytest.mark.parametrize("case", V2_CASES)
def test_deepseek_v2_matches_transformers(case, tmp_path):
    check_family(v2_config(**V2_CASES[case]), tmp_path)
