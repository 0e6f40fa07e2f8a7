"""The GPU kernels' reference paths (kernels/) against the model's plain PyTorch paths, on the CPU.

The Triton kernels compute the functions these references define; benchmarks/gpu.py checks the
kernels against them on the GPU before timing.
"""

from __future__ import annotations

import pytest
import torch

from rung.config import MoEConfig, ModelConfig
from rung.kernels.fused_moe import Activation, ExpertWeights, fused_moe_ref, moe_align, moe_slot_layout
from rung.kernels.paged_attention import chunk_tiles, paged_attention, paged_attention_ref, tokens_per_tile
from rung.model.attention import attend, attention_bias
from rung.model.moe import MoE
from rung.weights.mxfp4 import dequantize_mxfp4, quantize_mxfp4


def plain_attention(q, k_pool, v_pool, tables, rows, positions, block_size, window, sinks, scale):
    """Token by token through the model's attend(): gather the visible keys, exact mask, sinks."""
    outs = []
    for i in range(q.shape[0]):
        p = int(positions[i])
        lo = 0 if window is None else max(0, p - window + 1)
        k_pos = torch.arange(lo, p + 1)
        slots = tables[rows[i]].long()[k_pos // block_size] * block_size + k_pos % block_size
        k, v = (pool[slots].transpose(0, 1)[None] for pool in (k_pool, v_pool))
        bias = attention_bias(torch.tensor([p]), k_pos, window, None, q.dtype, exact=True)
        outs.append(attend(q[i][None, :, None], k, v, bias, scale, sinks)[0, :, 0])
    return torch.stack(outs)


def paged_batch(hq, hkv, d, block_size, seed=0):
    """A pool with shuffled blocks, three sequences' tables, and a flat batch of one decode token,
    a 40-token prefill chunk starting mid-sequence and a 7-token chunk."""
    g = torch.Generator().manual_seed(seed)
    blocks = 64
    k_pool = torch.randn(blocks * block_size + 1, hkv, d, generator=g)
    v_pool = torch.randn(blocks * block_size + 1, hkv, d, generator=g)
    tables = torch.stack([torch.randperm(blocks, generator=g)[:100 // block_size + 1] for _ in range(3)]).to(torch.int32)
    layout = [(0, 1, 0), (1, 40, 1), (41, 7, 2)]  # first flat token, tokens, table row
    starts = [60, 3, 90]
    positions = torch.cat([torch.arange(s, s + n) for (_, n, _), s in zip(layout, starts)])
    rows = torch.cat([torch.full((n,), r) for _, n, r in layout])
    q = torch.randn(positions.numel(), hq, d, generator=g)
    sinks = torch.randn(hq, generator=g)
    return q, k_pool, v_pool, tables, rows, positions, layout, sinks


@pytest.mark.parametrize("hq,hkv,d,block_size,window,with_sinks", [
    (8, 2, 16, 4, None, False),  # GQA, full attention
    (8, 2, 16, 4, 17, True),  # gpt-oss: window and sinks
    (6, 6, 8, 8, 5, True),  # MHA, window shorter than a block
    (9, 3, 16, 16, None, True),  # a group of 3 (SmolLM2's 9/3)
])
def test_paged_attention_reference_matches_the_models_attention(hq, hkv, d, block_size, window, with_sinks):
    q, k_pool, v_pool, tables, rows, positions, layout, sinks = paged_batch(hq, hkv, d, block_size)
    sinks = sinks if with_sinks else None
    ref = paged_attention_ref(q, k_pool, v_pool, tables, rows, positions, block_size, window, sinks, 0.3)
    plain = plain_attention(q, k_pool, v_pool, tables, rows, positions, block_size, window, sinks, 0.3)
    torch.testing.assert_close(ref, plain, atol=2e-5, rtol=1e-5)
    # the dispatcher takes the reference off CUDA, with the chunk tiles the kernel would get
    tiles = chunk_tiles(layout, tokens_per_tile(hq, hkv, d, decode=False), "cpu")
    fast = paged_attention(q, k_pool, v_pool, tables, positions, tiles, block_size, window, sinks, 0.3,
                           decode=False, rows=rows)
    torch.testing.assert_close(fast, plain, atol=2e-5, rtol=1e-5)


def test_paged_attention_never_reads_blocks_outside_the_window():
    """A sliding group frees the blocks behind its window (tables hold 0 there): poisoning every
    slot a query cannot see must not change its output."""
    q, k_pool, v_pool, tables, rows, positions, _, sinks = paged_batch(4, 2, 16, 4)
    window = 6
    ref = paged_attention_ref(q, k_pool, v_pool, tables, rows, positions, 4, window, sinks, 0.3)
    poisoned_k, poisoned_v = k_pool.clone(), v_pool.clone()
    seen = set()
    for i in range(q.shape[0]):
        p = int(positions[i])
        for kp in range(max(0, p - window + 1), p + 1):
            seen.add(int(tables[rows[i], kp // 4]) * 4 + kp % 4)
    unseen = torch.tensor(sorted(set(range(k_pool.shape[0])) - seen))
    poisoned_k[unseen], poisoned_v[unseen] = float("nan"), float("nan")
    out = paged_attention_ref(q, poisoned_k, poisoned_v, tables, rows, positions, 4, window, sinks, 0.3)
    torch.testing.assert_close(out, ref)


def test_moe_align_groups_every_slot_once_by_expert_in_padded_blocks():
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(11)])  # [11 tokens, top 3]
    sorted_ids, block_expert, total = moe_align(experts, 8, 4)
    s = experts.numel()
    used = sorted_ids[: int(total)]
    assert sorted(used[used < s].tolist()) == list(range(s))  # every slot exactly once
    assert (sorted_ids[int(total):] == s).all()  # past the end: padding only
    flat = experts.reshape(-1)
    for b in range(int(total) // 4):
        block = sorted_ids[b * 4:(b + 1) * 4]
        real = block[block < s].long()
        assert real.numel() > 0 and (flat[real] == block_expert[b]).all()
    assert sorted_ids.numel() == -(-(s + 8 * 3) // 4) * 4  # the static bound: shapes alone decide it


def moe_module(kind: str, bias: bool, experts=6, hidden=64, inter=32, top_k=2, seed=0) -> MoE:
    config = ModelConfig(model_type="test", vocab_size=10, hidden_size=hidden, num_layers=1, num_heads=2,
                         num_kv_heads=2, head_dim=8, intermediate_size=inter, activation=kind,
                         moe=MoEConfig(experts, top_k, inter, router="topk_softmax" if bias else "softmax_topk",
                                       norm_topk_prob=True, router_bias=bias, expert_bias=bias))
    moe = MoE(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return moe.eval()


@pytest.mark.parametrize("kind,bias", [("silu", False), ("swiglu_clamped", True)])
def test_fused_moe_reference_matches_the_expert_loop(kind, bias):
    moe = moe_module(kind, bias)
    x = torch.randn(13, 64, generator=torch.Generator().manual_seed(1))
    from rung.model.moe import route

    weights, experts = route(moe.router(x), moe.top_k, moe.router_kind, moe.norm_topk_prob)
    act = Activation(kind, moe.limit, moe.alpha)
    with torch.no_grad():
        plain = moe(x)
        for block_m in (1, 4, 16):  # one slot per block (decode) up to several experts' padding
            torch.testing.assert_close(fused_moe_ref(x, weights, experts, moe.expert_weights(), act, block_m),
                                       plain, atol=1e-5, rtol=1e-5)
        # the decode layout: no sort, one slot per block
        torch.testing.assert_close(fused_moe_ref(x, weights, experts, moe.expert_weights(), act, 16, moe_slot_layout),
                                   plain, atol=1e-5, rtol=1e-5)


def test_packed_mxfp4_experts_compute_what_their_dequantized_weights_do():
    moe = moe_module("swiglu_clamped", True, hidden=64, inter=64)
    packed = [quantize_mxfp4(getattr(moe, n).detach()) for n in ("gate_proj", "up_proj", "down_proj")]
    dense = moe_module("swiglu_clamped", True, hidden=64, inter=64)
    with torch.no_grad():
        for name, (blocks, scales) in zip(("gate_proj", "up_proj", "down_proj"), packed):
            getattr(dense, name).copy_(dequantize_mxfp4(blocks, scales))
    moe.keep_packed(*packed)
    assert moe.gate_proj.dtype == torch.uint8 and moe.gate_proj.shape == (6, 64, 32)  # 4 bits a weight
    assert "gate_proj" not in dict(moe.named_parameters())
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = dense(x)
        torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)
        from rung.model.moe import route

        weights, experts = route(moe.router(x), moe.top_k, moe.router_kind, moe.norm_topk_prob)
        act = Activation("swiglu_clamped", moe.limit, moe.alpha)
        torch.testing.assert_close(fused_moe_ref(x, weights, experts, moe.expert_weights(), act), want,
                                   atol=1e-5, rtol=1e-5)


def test_keep_packed_refuses_blocks_of_the_wrong_shape():
    moe = moe_module("swiglu_clamped", True, hidden=64, inter=64)
    blocks, scales = quantize_mxfp4(torch.randn(6, 64, 32))  # the input axis is 32, not 64
    with pytest.raises(ValueError, match="gate_proj: MXFP4 blocks"):
        moe.keep_packed((blocks, scales), (blocks, scales), (blocks, scales))


def test_expert_weights_dequantize_one_expert_at_a_time():
    w = torch.randn(3, 8, 64)
    blocks, scales = quantize_mxfp4(w)
    ew = ExpertWeights(blocks.reshape(3, 8, -1), blocks.reshape(3, 8, -1), blocks.reshape(3, 8, -1),
                       scales, scales, scales)
    assert ew.packed
    torch.testing.assert_close(ew.expert("up", 1, torch.float32), dequantize_mxfp4(blocks, scales)[1])


def test_elementwise_references_are_the_models_bf16_chains():
    """kernels/elementwise.py's references (what the RMSNorm and RoPE kernels compute on CUDA)
    are the model's own op chains, bit for bit, on the CPU."""
    from rung.kernels.elementwise import rms_norm_ref, rotary_ref
    from rung.model.norm import RMSNorm
    from rung.model.rope import apply_rotary

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 64, generator=g).to(torch.bfloat16)
    for offset, in_f32 in ((0.0, False), (1.0, False), (0.0, True)):
        norm = RMSNorm(64, 1e-6, offset, in_f32).to(torch.bfloat16)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(64, generator=g))
            assert torch.equal(rms_norm_ref(x, norm.weight, 1e-6, offset, in_f32), norm(x))
    for rot in (64, 32):  # full and partial rotary
        cos = torch.randn(2, 1, 5, rot, generator=g).to(torch.bfloat16)
        sin = torch.randn(2, 1, 5, rot, generator=g).to(torch.bfloat16)
        assert torch.equal(rotary_ref(x, cos, sin), apply_rotary(x, cos, sin))
