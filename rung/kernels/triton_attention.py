"""Triton kernel of kernels/paged_attention.py (imported only where Triton is)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rung.kernels.paged_attention import tile_rows


@triton.jit
def paged_attention_kernel(
    Q, K, V, O, Tables, Pos, TileFirst, TileCount, TileRow, Sinks,
    scale, window,
    sq_t, sq_h, sk_s, sk_h, sv_s, sv_h, so_t, so_h, st_r,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)  # kv head
    first = tl.load(TileFirst + tile)
    count = tl.load(TileCount + tile)
    row = tl.load(TileRow + tile).to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    t = r // GROUP  # token of the tile
    live = t < count
    tok = (first + t).to(tl.int64)
    head = h * GROUP + r % GROUP
    dd = tl.arange(0, D_P)
    dmask = dd < D
    q_pos = tl.load(Pos + tok, mask=live, other=0)
    q = tl.load(Q + tok[:, None] * sq_t + head[:, None] * sq_h + dd[None, :],
                mask=live[:, None] & dmask[None, :], other=0.0)
    lo_pos = tl.load(Pos + first)
    hi = tl.load(Pos + first + count - 1) + 1  # keys [lo, hi) cover every query of the tile
    if HAS_WINDOW:
        lo = tl.maximum(lo_pos - window + 1, 0)
    else:
        lo = lo_pos * 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    for k0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        k_pos = k0 + tl.arange(0, BLOCK_N)
        k_in = (k_pos >= lo) & (k_pos < hi)
        block = tl.load(Tables + row * st_r + k_pos // PAGE, mask=k_in, other=0).to(tl.int64)
        slot = block * PAGE + k_pos % PAGE
        k = tl.load(K + slot[:, None] * sk_s + h * sk_h + dd[None, :], mask=k_in[:, None] & dmask[None, :],
                    other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        seen = k_in[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            seen = seen & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        p = tl.exp(s - m_ref[:, None])
        alpha = tl.exp(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * sv_s + h * sv_h + dd[None, :], mask=k_in[:, None] & dmask[None, :],
                    other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if HAS_SINKS:  # the sink joins the denominator: rescale to the larger max, add exp(sink)
        sink = tl.load(Sinks + head, mask=live, other=0.0).to(tl.float32)
        m_f = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_f)
        l_i = l_i * alpha + tl.exp(sink - m_f)
        acc = acc * alpha[:, None]
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + tok[:, None] * so_t + head[:, None] * so_h + dd[None, :], out.to(O.dtype.element_ty),
             mask=live[:, None] & dmask[None, :])


def triton_paged_attention(q, k_pool, v_pool, tables, positions, tiles, block_size, window, sinks, scale, decode):
    n, hq, d = q.shape
    hkv = k_pool.shape[1]
    group = hq // hkv
    block_m = tile_rows(group, decode, d)
    first, count, row = tiles
    out = torch.empty_like(q)
    k_pool = k_pool if k_pool.stride(-1) == 1 else k_pool.contiguous()
    v_pool = v_pool if v_pool.stride(-1) == 1 else v_pool.contiguous()
    grid = (first.shape[0], hkv)
    paged_attention_kernel[grid](
        q, k_pool, v_pool, out, tables, positions, first, count, row, sinks if sinks is not None else q,
        float(scale), int(window or 0),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        out.stride(0), out.stride(1), tables.stride(0),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=64 if d <= 128 else 32, D=d, D_P=1 << (d - 1).bit_length(),
        PAGE=block_size, HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None,
        IEEE=q.dtype == torch.float32, num_warps=4 if block_m <= 64 else 8,
    )
    return out


@triton.jit
def write_kv_kernel(KP, VP, Slots, K, V, skp_s, skp_h, svp_s, svp_h, sk_n, sk_h, sv_n, sv_h,
                    D: tl.constexpr, D_P: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, D_P)
    m = d < D
    slot = tl.load(Slots + i).to(tl.int64)
    tl.store(KP + slot * skp_s + h * skp_h + d, tl.load(K + i * sk_n + h * sk_h + d, mask=m), mask=m)
    tl.store(VP + slot * svp_s + h * svp_h + d, tl.load(V + i * sv_n + h * sv_h + d, mask=m), mask=m)


def triton_write_kv(k_pool, v_pool, slots, k, v) -> None:
    n, hkv, d = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    write_kv_kernel[(n, hkv)](k_pool, v_pool, slots, k, v, k_pool.stride(0), k_pool.stride(1), v_pool.stride(0),
                              v_pool.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                              D=d, D_P=1 << (d - 1).bit_length(), num_warps=1)
