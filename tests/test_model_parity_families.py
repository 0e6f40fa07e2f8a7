"""Issue 21's families against transformers (float32, 1e-4): Qwen2.5, Mistral, Mixtral, Phi-3
(LongRoPE), Gemma 2, OLMo 2 and SmolLM3. Each: tiny, random, perturbed, saved with save_pretrained
and loaded by rung from the folder; logits equal, the contiguous cache equal to the full pass, and
the engine's paged path (a prefill split over non-contiguous blocks, then a decode step) equal too."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from oracle import TOL, check_family, ids_for
from rung.engine.paged import Chunk, KVPool, PagedStep

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
LONG = ((1, 1), (2, 7), (3, 19))  # the 19-token prompts run past every window below


@torch.no_grad()
def paged_diff(model) -> float:
    """Two prompts prefilled together into scattered blocks, then one decode step each, against
    the full forward pass of each sequence alone."""
    pool = KVPool(model.config, num_blocks=32, block_size=4, dtype=torch.float32)
    a, b = ids_for(model.config.vocab_size, 1, 15, seed=3)[0], ids_for(model.config.vocab_size, 1, 9, seed=4)[0]
    tables_a = [[0, 5, 2, 7] for _ in pool.groups]
    tables_b = [[10, 12, 11] for _ in pool.groups]
    step = PagedStep(pool, [Chunk(tables_a, 0, 14), Chunk(tables_b, 0, 8)], torch.device("cpu"))
    model.hidden_states(torch.cat([a[:14], b[:8]])[None], step)
    decode = PagedStep(pool, [Chunk(tables_a, 14, 1), Chunk(tables_b, 8, 1)], torch.device("cpu"))
    got = model.logits(model.hidden_states(torch.stack([a[14], b[8]])[None], decode))[0]
    want = torch.stack([model(a[None])[0, -1], model(b[None])[0, -1]])
    return (got - want).abs().max().item()


def check(config, tmp_path, shapes=LONG, decode=True):
    _, model = check_family(config, tmp_path, shapes=shapes, decode=decode)
    d = paged_diff(model)
    assert d < TOL, f"the engine's paged path differs from the full forward pass by {d}"
    return model


# ---- Qwen2.5: biased q, k, v ------------------------------------------------------------------

@pytest.mark.parametrize("case", ["qkv_bias", "sliding_upper_layers_tied"])
def test_qwen2_biased_qkv_matches_transformers(case, tmp_path):
    extra = {} if case == "qkv_bias" else dict(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                                num_hidden_layers=3, tie_word_embeddings=True)
    model = check(tf.Qwen2Config(**{**BASE, **extra}), tmp_path)
    c = model.config
    assert c.qkv_bias and not c.o_bias
    assert (c.layer_window(0), c.layer_window(c.num_layers - 1)) == ((None, None) if case == "qkv_bias" else (None, 5))


# ---- Mistral: a sliding window on every layer -------------------------------------------------

def test_mistral_sliding_window_on_every_layer_matches_transformers(tmp_path):
    model = check(tf.MistralConfig(**{**BASE, "sliding_window": 5, "head_dim": 24}), tmp_path)
    assert [model.config.layer_window(i) for i in range(2)] == [5, 5]


# ---- Mixtral: softmax top-k MoE -----------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 6])
def test_mixtral_softmax_topk_moe_matches_transformers(window, tmp_path):
    config = tf.MixtralConfig(**{**BASE, "num_local_experts": 5, "num_experts_per_tok": 2, "intermediate_size": 40,
                                 "sliding_window": window})
    model = check(config, tmp_path)
    moe = model.config.moe
    assert (moe.num_experts, moe.top_k, moe.router, moe.norm_topk_prob) == (5, 2, "softmax_topk", True)


# ---- Phi-3: fused checkpoint projections, partial rotary, LongRoPE ----------------------------

def phi3_config(**extra):
    g = torch.Generator().manual_seed(5)
    rotary_half = int(16 * 0.75) // 2  # head_dim 16 x partial_rotary_factor 0.75 → 12 dims, 6 frequencies
    short = (1 + torch.rand(rotary_half, generator=g)).tolist()
    long = (1 + 8 * torch.rand(rotary_half, generator=g)).tolist()
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
            "partial_rotary_factor": 0.75, "original_max_position_embeddings": 16}
    return tf.Phi3Config(**{**BASE, "rope_parameters": rope, "original_max_position_embeddings": 16, **extra})


@pytest.mark.parametrize("case", ["longrope", "longrope_window"])
def test_phi3_longrope_matches_transformers(case, tmp_path):
    # 7 tokens stay inside the 16-token original context (short factors), 19 go past it (long ones,
    # for the whole call); the cached decode (12 tokens) stays inside, where the cache is exact
    config = phi3_config(**({} if case == "longrope" else {"sliding_window": 6}))
    model = check(config, tmp_path)
    rope = model.config.rope
    assert rope.type == "longrope" and rope.factor == 64 / 16 and len(rope.long_factor) == 6


def test_longrope_switches_to_the_long_factors_past_the_original_context():
    from rung.config import RopeConfig
    from rung.model.rope import Rotary

    rope = RopeConfig(type="longrope", factor=4.0, original_max_position=16, short_factor=(1.0, 2.0),
                      long_factor=(3.0, 5.0))
    rot = Rotary(rope, head_dim=4, max_position=64)
    inside = rot(torch.arange(16), torch.float32)[0][-1]  # position 15: the short set
    past = rot(torch.arange(17), torch.float32)[0][15]  # the same position in a call reaching 16
    scale = (1 + torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(16.0))).sqrt()
    base = torch.tensor([1.0, 100.0])  # 10000 ** (0 / 4), 10000 ** (2 / 4)

    def cos(factors):
        return scale * torch.cos(15 / (torch.tensor(factors) * base))
    assert torch.allclose(inside[:2], cos([1.0, 2.0])) and torch.allclose(past[:2], cos([3.0, 5.0]))


# ---- Gemma 2: soft-capped attention and logits, alternating windows, sandwich norms -------------

def test_gemma2_softcapping_and_alternating_windows_match_transformers(tmp_path):
    # a cap of 2 bends nearly every score of these perturbed weights: without it the logits differ
    config = tf.Gemma2Config(**{**BASE, "num_hidden_layers": 4, "head_dim": 16, "sliding_window": 5,
                                "query_pre_attn_scalar": 20, "attn_logit_softcapping": 2.0,
                                "final_logit_softcapping": 5.0})
    model = check(config, tmp_path)
    c = model.config
    assert (c.attn_logit_softcap, c.final_logit_softcap, c.layer_types) == (2.0, 5.0, ("sliding", "full") * 2)


# ---- OLMo 2: norms after each sublayer, QK-norm over the whole projection ----------------------

def test_olmo2_post_norms_and_whole_projection_qk_norm_match_transformers(tmp_path):
    model = check(tf.Olmo2Config(**BASE), tmp_path)
    attn = model.layers[0].attn
    assert attn.q_norm.weight.shape == (64,) and attn.k_norm.weight.shape == (32,)  # hq·d and hkv·d
    assert not any(n.startswith(("attn_norm", "mlp_norm")) for n, _ in model.layers[0].named_parameters())


# ---- SmolLM3: NoPE layers ---------------------------------------------------------------------

@pytest.mark.parametrize("case", ["every_fourth_layer", "explicit_no_rope_layers"])
def test_smollm3_nope_layers_match_transformers(case, tmp_path):
    extra = {} if case == "every_fourth_layer" else {"no_rope_layers": [0, 1, 0, 1]}
    model = check(tf.SmolLM3Config(**{**BASE, "num_hidden_layers": 4, **extra}), tmp_path)
    want = (True, True, True, False) if case == "every_fourth_layer" else (False, True, False, True)
    assert model.config.rope_layers == want
