"""Triton kernel of kernels/paged_attention.py (imported only where Triton is).

The decode kernels (the split one's merge, the one-program tiles) may also write their output's
int8 rounding per run of 32 for the dp4a GEMV of a packed o_proj (kernels/triton_dp4a.py's
hand-off; ``runs``): the program that stores a (token, head)'s head_dim values owns whole runs of
the [tokens, heads · head_dim] rows o_proj reads, so it rounds them as ``quantize_runs`` would and
o_proj launches no ``quantize_runs`` of its own. The 16-bit output is the same either way."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rung.kernels import triton_dp4a
from rung.kernels.paged_attention import tile_rows
from rung.kernels.triton_dp4a import round_runs
from rung.kernels.triton_pdl import pdl_wait, pdl_wanted


@triton.jit
def _store_runs(out, XQ, STEP, XSUM, at, live, D: tl.constexpr, D_P: tl.constexpr, ROWS: tl.constexpr):
    """out [ROWS, D_P] (the values as stored, in the model dtype): each row's int8 rounding per run
    of 32 (triton_dp4a's ``round_runs``) into the rows o_proj reads, XQ [N, hq · D], STEP and XSUM
    [N, hq · D / 32]; ``at`` [ROWS]: where a row starts there (token · hq · D + head · D, a whole
    number of runs since D is)."""
    RUNS: tl.constexpr = D_P // 32  # a padded row's runs; those past D are masked
    q, step, xsum = round_runs(tl.reshape(out.to(tl.float32), (ROWS * RUNS, 32)))
    dd = tl.arange(0, D_P)
    tl.store(XQ + at[:, None] + dd[None, :], tl.reshape(q, (ROWS, D_P)), mask=live[:, None] & (dd < D)[None, :])
    j = tl.arange(0, RUNS)
    run = at[:, None] // 32 + j[None, :]
    r_in = live[:, None] & (j < D // 32)[None, :]
    tl.store(STEP + run, tl.reshape(step, (ROWS, RUNS)), mask=r_in)
    tl.store(XSUM + run, tl.reshape(xsum, (ROWS, RUNS)), mask=r_in)


@triton.jit
def paged_attention_kernel(
    Q, K, V, O, Tables, Pos, TileFirst, TileCount, TileRow, Sinks, XQ, STEP, XSUM,
    scale, window,
    sq_t, sq_h, sk_s, sk_h, sv_s, sv_h, so_t, so_h, st_r, sxq_t,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, IEEE: tl.constexpr,
    EARLY_V: tl.constexpr = False, PDL: tl.constexpr = False, RUNS_OUT: tl.constexpr = False,
):
    """RUNS_OUT: the output's int8 rounding too (``_store_runs``; XQ's rows ``sxq_t`` apart)."""
    pdl_wait(PDL)  # programmatic dependent launch (kernels/triton_pdl.py): q is the kernel before's
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
        if EARLY_V:  # decode: the values' load issued with the keys' (both need only the slots), one
            # memory round trip a step instead of two, which is what a decode tile's few steps wait on
            v = tl.load(V + slot[:, None] * sv_s + h * sv_h + dd[None, :], mask=k_in[:, None] & dmask[None, :],
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
        if not EARLY_V:
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
    out = (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(O.dtype.element_ty)
    tl.store(O + tok[:, None] * so_t + head[:, None] * so_h + dd[None, :], out, mask=live[:, None] & dmask[None, :])
    if RUNS_OUT:
        _store_runs(out, XQ, STEP, XSUM, tok * sxq_t + head * D, live, D, D_P, BLOCK_M)


@triton.jit
def paged_decode_split_kernel(
    Q, K, V, O, Tables, Pos, TileFirst, TileRow, Sinks, PartAcc, PartM, PartL, Counter, XQ, STEP, XSUM,
    scale, window,
    sq_t, sq_h, sk_s, sk_h, sv_s, sv_h, so_t, so_h, st_r, sxq_t,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    D_P: tl.constexpr, PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, IEEE: tl.constexpr,
    SPLITS: tl.constexpr, SPLITS_P: tl.constexpr, PDL: tl.constexpr = False, RUNS_OUT: tl.constexpr = False,
):
    """A decode token's keys cut into SPLITS ranges of whole BLOCK_N steps, one program each
    (flash-decoding): a batch-1 step is a handful of (token, kv head) tiles, and one program
    walking 100+ keys in a row waits on a memory round trip per step. Each program writes its
    running max, sum and unnormalised output for the GROUP query heads; the last of a tile's
    programs to finish (an atomic count, reset by that program for the next launch) merges them
    and folds in the sink (and with RUNS_OUT writes the output's int8 rounding, ``_store_runs``).
    PDL: launched with programmatic dependent launch (kernels/triton_pdl.py), it waits first thing:
    q, the pool and the counters are earlier kernels'."""
    pdl_wait(PDL)
    tile = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    tok = tl.load(TileFirst + tile).to(tl.int64)
    row = tl.load(TileRow + tile).to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    live = r < GROUP
    head = h * GROUP + r
    dd = tl.arange(0, D_P)
    dmask = dd < D
    q = tl.load(Q + tok * sq_t + head[:, None] * sq_h + dd[None, :], mask=live[:, None] & dmask[None, :], other=0.0)
    q_pos = tl.load(Pos + tok)
    hi = q_pos + 1
    if HAS_WINDOW:
        lo = tl.maximum(q_pos - window + 1, 0)
    else:
        lo = q_pos * 0
    first_step = lo // BLOCK_N
    steps = (hi + BLOCK_N - 1) // BLOCK_N - first_step
    per = (steps + SPLITS - 1) // SPLITS  # steps per program; the last programs may get none
    k_begin = (first_step + sp * per) * BLOCK_N
    k_end = tl.minimum((first_step + (sp + 1) * per) * BLOCK_N, hi)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_N):
        k_pos = k0 + tl.arange(0, BLOCK_N)
        k_in = (k_pos >= lo) & (k_pos < hi)
        block = tl.load(Tables + row * st_r + k_pos // PAGE, mask=k_in, other=0).to(tl.int64)
        slot = block * PAGE + k_pos % PAGE
        kv_mask = k_in[:, None] & dmask[None, :]
        k = tl.load(K + slot[:, None] * sk_s + h * sk_h + dd[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + slot[:, None] * sv_s + h * sv_h + dd[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(k_in[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_ref[:, None])
        alpha = tl.exp(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    pair = tile * tl.num_programs(1) + h  # this (tile, kv head)'s partials and counter
    part = (pair * SPLITS + sp) * GROUP_P + r
    tl.store(PartAcc + part[:, None] * D_P + dd[None, :], acc, mask=live[:, None])
    tl.store(PartM + part, m_i, mask=live)
    tl.store(PartL + part, l_i, mask=live)
    tl.debug_barrier()  # every thread's partials written before the count says so
    done = tl.atomic_add(Counter + pair, 1, sem="acq_rel", scope="gpu")
    if done == SPLITS - 1:  # the last program of this pair: merge the SPLITS partials
        g = tl.arange(0, GROUP_P)
        sl = tl.arange(0, SPLITS_P)
        idx = (pair * SPLITS + sl[:, None]) * GROUP_P + g[None, :]  # [SPLITS_P, GROUP_P]
        gm = (sl < SPLITS)[:, None] & (g < GROUP)[None, :]
        ms = tl.load(PartM + idx, mask=gm, other=float("-inf"), cache_modifier=".cg")
        ls = tl.load(PartL + idx, mask=gm, other=0.0, cache_modifier=".cg")
        accs = tl.load(PartAcc + idx[:, :, None] * D_P + dd[None, None, :], mask=gm[:, :, None], other=0.0,
                       cache_modifier=".cg")
        big = tl.max(ms, 0)  # [GROUP_P]
        big_ref = tl.where(big == float("-inf"), 0.0, big)
        wgt = tl.exp(ms - big_ref[None, :])
        total = tl.sum(ls * wgt, 0)
        out = tl.sum(accs * wgt[:, :, None], 0)  # [GROUP_P, D_P]
        heads = h * GROUP + g
        if HAS_SINKS:
            sink = tl.load(Sinks + heads, mask=g < GROUP, other=0.0).to(tl.float32)
            m_f = tl.maximum(big, sink)
            a = tl.exp(big - m_f)
            total = total * a + tl.exp(sink - m_f)
            out = out * a[:, None]
        out = (out / tl.where(total == 0.0, 1.0, total)[:, None]).to(O.dtype.element_ty)
        tl.store(O + tok * so_t + heads[:, None] * so_h + dd[None, :], out, mask=(g < GROUP)[:, None] & dmask[None, :])
        if RUNS_OUT:
            _store_runs(out, XQ, STEP, XSUM, tok * sxq_t + heads * D, g < GROUP, D, D_P, GROUP_P)
        tl.atomic_xchg(Counter + pair, 0)  # ready for the next launch (a graph replays the same buffer)


_COUNTERS: dict = {}  # per device: the split kernel's (token, kv head) counters, zero between launches
SPLIT_PAIRS = 128  # decode batches with fewer (token, kv head) pairs than this split their keys
SPLIT_MIN_WINDOW = 512  # ... unless the layer's window is this short
SPLIT_PROGRAMS = 128  # programs a split decode aims at (an H200 has 132 SMs): a batch-1 step's pairs are few
MAX_SPLITS = 16  # the merging program holds SPLITS x GROUP x D partials in registers


def decode_splits(pairs: int) -> int:
    """Programs per (token, kv head) pair: enough for about SPLIT_PROGRAMS in all, at least 8, at
    most MAX_SPLITS. Qwen3-8B at batch 1 (8 pairs) splits 16 ways: at 128K tokens of context its
    decode went from 32.8 to 55.9 tok/s on an H200 (8 ways left half of the SMs idle), at short
    contexts 0.5% slower (more empty programs; skipping them inside the kernel cost more).
    A function of the batch alone, so a CUDA graph captured for a batch size keeps it.
    RUNG_ATTN_SPLITS=N forces N (comparisons)."""
    forced = os.environ.get("RUNG_ATTN_SPLITS")
    if forced:
        return max(1, int(forced))
    return max(8, min(MAX_SPLITS, triton.next_power_of_2(-(-SPLIT_PROGRAMS // max(pairs, 1)))))


def _counters(device) -> torch.Tensor:
    key = str(device)
    if key not in _COUNTERS:  # made on the first (eager) call, before any graph capture
        _COUNTERS[key] = torch.zeros(SPLIT_PAIRS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def _output(q: torch.Tensor, runs: bool):
    """The attention's output [N, hq, d] and, where ``runs`` asks for it and o_proj's dp4a GEMV
    would take the rows [N, hq · d] (triton_dp4a.fuse_wanted; head_dim whole runs of 32), the three
    tensors of their rounding, else None. With them, the output is contiguous: o_proj's x is then
    a view of it (model/attention.py's transpose and reshape copy nothing), which the hand-off
    needs."""
    n, hq, d = q.shape
    if not runs:
        return torch.empty_like(q), None
    out = torch.empty(n, hq, d, dtype=q.dtype, device=q.device)
    if d % 32:
        triton_dp4a.forget()
        return out, None
    return out, triton_dp4a.rounding_buffers(out.view(n, hq * d))


def _record(out: torch.Tensor, rounding) -> None:
    if rounding is not None:
        triton_dp4a.record(out, *rounding)


def split_decode_attention(q, k_pool, v_pool, tables, positions, tiles, block_size, window, sinks, scale,
                           splits: int | None = None, runs: bool = False):
    """Decode tiles (one token each) over ``splits`` programs per (token, kv head) (None:
    ``decode_splits``). ``runs``: the output's int8 rounding too, for o_proj's dp4a GEMV (``_output``)."""
    n, hq, d = q.shape
    hkv = k_pool.shape[1]
    group = hq // hkv
    first, _, row = tiles
    out, rounding = _output(q, runs)
    group_p, d_p = 1 << (group - 1).bit_length(), 1 << (d - 1).bit_length()
    pairs = first.shape[0] * hkv
    splits = splits or decode_splits(pairs)
    part_acc = torch.empty(pairs * splits * group_p, d_p, dtype=torch.float32, device=q.device)
    part_m = torch.empty(pairs * splits * group_p, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    pdl = pdl_wanted(q.device)
    paged_decode_split_kernel[(first.shape[0], hkv, splits)](
        q, k_pool, v_pool, out, tables, positions, first, row, sinks if sinks is not None else q,
        part_acc, part_m, part_l, _counters(q.device), *(rounding or (out, out, out)), float(scale), int(window or 0),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        out.stride(0), out.stride(1), tables.stride(0), hq * d,
        GROUP=group, GROUP_P=group_p, BLOCK_M=max(16, group_p), BLOCK_N=32, D=d, D_P=d_p, PAGE=block_size,
        HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None, IEEE=q.dtype == torch.float32, SPLITS=splits,
        SPLITS_P=triton.next_power_of_2(splits), PDL=pdl, launch_pdl=pdl, RUNS_OUT=rounding is not None,
        num_warps=4)
    _record(out, rounding)
    return out


def triton_paged_attention(q, k_pool, v_pool, tables, positions, tiles, block_size, window, sinks, scale, decode,
                           split: bool = True, runs: bool = False):
    """``runs``: the output's int8 rounding too, for o_proj's dp4a GEMV (``_output``)."""
    n, hq, d = q.shape
    hkv = k_pool.shape[1]
    group = hq // hkv
    block_m = tile_rows(group, decode, d)
    first, count, row = tiles
    k_pool = k_pool if k_pool.stride(-1) == 1 else k_pool.contiguous()
    v_pool = v_pool if v_pool.stride(-1) == 1 else v_pool.contiguous()
    split = split and os.environ.get("RUNG_ATTN_SPLIT") != "0"  # =0: one program per tile (comparisons)
    # a sliding window of a few hundred keys is a few steps for one program: splitting costs more
    # than it saves there (gpt-oss's 128-key layers: 6.5 µs split against 4.8–5.9 on an H200)
    short = window is not None and window <= SPLIT_MIN_WINDOW
    if decode and split and not short and first.shape[0] * hkv < SPLIT_PAIRS and group <= 16 and d <= 256:
        return split_decode_attention(q, k_pool, v_pool, tables, positions, tiles, block_size, window, sinks, scale,
                                      runs=runs)
    out, rounding = _output(q, runs)
    grid = (first.shape[0], hkv)
    pdl = pdl_wanted(q.device)
    paged_attention_kernel[grid](
        q, k_pool, v_pool, out, tables, positions, first, count, row, sinks if sinks is not None else q,
        *(rounding or (out, out, out)), float(scale), int(window or 0),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        out.stride(0), out.stride(1), tables.stride(0), hq * d,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=64 if d <= 128 else 32, D=d, D_P=1 << (d - 1).bit_length(),
        PAGE=block_size, HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None,
        IEEE=q.dtype == torch.float32, EARLY_V=decode, PDL=pdl, launch_pdl=pdl, RUNS_OUT=rounding is not None,
        num_warps=4 if block_m <= 64 else 8,
    )
    _record(out, rounding)
    return out


@triton.jit
def write_kv_kernel(KP, VP, Slots, K, V, skp_s, skp_h, svp_s, svp_h, sk_n, sk_h, sv_n, sv_h,
                    D: tl.constexpr, D_P: tl.constexpr, PDL: tl.constexpr = False):
    pdl_wait(PDL)
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
    pdl = pdl_wanted(k.device)
    write_kv_kernel[(n, hkv)](k_pool, v_pool, slots, k, v, k_pool.stride(0), k_pool.stride(1), v_pool.stride(0),
                              v_pool.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                              D=d, D_P=1 << (d - 1).bit_length(), PDL=pdl, launch_pdl=pdl, num_warps=1)


# ---- prefill: FlashAttention-2 over the paged pool --------------------------------------------------

LOG2E = 1.4426950408889634


@triton.jit
def _flash_step(acc, m_i, l_i, q, K, V, Tables, row, k0, lo, hi, q_pos, h, sk_s, sk_h, sv_s, sv_h, st_r,
                qk_scale, window, softcap,
                BLOCK_N: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, PAGE: tl.constexpr, MASK: tl.constexpr,
                HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    """One BLOCK_N-key step of the online softmax, in base 2 (exp2 of scores scaled by log2 e).
    MASK: a step on the window's edge or the causal diagonal, which masks per (query, key);
    the steps between them see every key and skip the mask's arithmetic."""
    k_pos = k0 + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, D_P)
    dmask = dd < D
    k_in = (k_pos >= lo) & (k_pos < hi)
    if MASK:
        block = tl.load(Tables + row * st_r + k_pos // PAGE, mask=k_in, other=0).to(tl.int64)
    else:
        block = tl.load(Tables + row * st_r + k_pos // PAGE).to(tl.int64)
    slot = block * PAGE + k_pos % PAGE
    kt = tl.load(K + slot[None, :] * sk_s + h * sk_h + dd[:, None], mask=k_in[None, :] & dmask[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")  # [BLOCK_M, BLOCK_N]
    else:
        s = tl.dot(q, kt)
    if SOFTCAP:  # cap · tanh(score / cap), tanh through exp (the interpreter has no tanh)
        x = s * (qk_scale / softcap)
        s = (softcap * 1.4426950408889634) * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))
    else:
        s = s * (qk_scale * 1.4426950408889634)
    if MASK:
        seen = k_in[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            seen = seen & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + slot[:, None] * sv_s + h * sv_h + dd[None, :], mask=k_in[:, None] & dmask[None, :], other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def flash_prefill_kernel(
    Q, K, V, O, Tables, Pos, TileFirst, TileCount, TileRow, Sinks,
    scale, window, softcap,
    sq_t, sq_h, sk_s, sk_h, sv_s, sv_h, so_t, so_h, st_r,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, SOFTCAP: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One program: BLOCK_M consecutive query tokens of one chunk × one query head (FlashAttention-2's
    tile). Query heads vary fastest over the grid, so the GROUP heads of a kv head run side by side
    and read its keys once from memory, then from the L2; tiles run last-first, so a chunk's
    longest rows (the most keys) start first and the short ones fill in at the end."""
    hq = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    h = hq // GROUP  # kv head
    first = tl.load(TileFirst + tile)
    count = tl.load(TileCount + tile)
    row = tl.load(TileRow + tile).to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    live = r < count
    tok = (first + r).to(tl.int64)
    dd = tl.arange(0, D_P)
    dmask = dd < D
    q_pos = tl.load(Pos + tok, mask=live, other=0)
    q = tl.load(Q + tok[:, None] * sq_t + hq * sq_h + dd[None, :], mask=live[:, None] & dmask[None, :], other=0.0)
    q_lo = tl.load(Pos + first)  # a chunk's positions are consecutive
    hi = q_lo + count  # keys [lo, hi) cover every query of the tile
    if HAS_WINDOW:
        lo = tl.maximum(q_lo - window + 1, 0)  # the oldest key any query sees
        lo_all = tl.maximum(hi - window, 0)  # the oldest key every query sees
    else:
        lo = q_lo * 0
        lo_all = lo
    start = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(((lo_all + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, start)
    full_hi = tl.maximum(((q_lo + 1) // BLOCK_N) * BLOCK_N, full_lo)  # steps every query sees whole
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    for k0 in range(start, full_lo, BLOCK_N):  # the window's lower edge
        acc, m_i, l_i = _flash_step(acc, m_i, l_i, q, K, V, Tables, row, k0, lo, hi, q_pos, h, sk_s, sk_h, sv_s,
                                    sv_h, st_r, scale, window, softcap, BLOCK_N, D, D_P, PAGE, True, HAS_WINDOW,
                                    SOFTCAP, IEEE)
    for k0 in range(full_lo, full_hi, BLOCK_N):  # the bulk: no mask
        acc, m_i, l_i = _flash_step(acc, m_i, l_i, q, K, V, Tables, row, k0, lo, hi, q_pos, h, sk_s, sk_h, sv_s,
                                    sv_h, st_r, scale, window, softcap, BLOCK_N, D, D_P, PAGE, False, HAS_WINDOW,
                                    SOFTCAP, IEEE)
    for k0 in range(full_hi, hi, BLOCK_N):  # the causal diagonal
        acc, m_i, l_i = _flash_step(acc, m_i, l_i, q, K, V, Tables, row, k0, lo, hi, q_pos, h, sk_s, sk_h, sv_s,
                                    sv_h, st_r, scale, window, softcap, BLOCK_N, D, D_P, PAGE, True, HAS_WINDOW,
                                    SOFTCAP, IEEE)
    if HAS_SINKS:  # the sink joins the denominator (in base 2 like the scores)
        sink = tl.load(Sinks + hq).to(tl.float32) * 1.4426950408889634
        m_f = tl.maximum(m_i, sink)
        alpha = tl.math.exp2(m_i - m_f)
        l_i = l_i * alpha + tl.math.exp2(sink - m_f)
        acc = acc * alpha[:, None]
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + tok[:, None] * so_t + hq * so_h + dd[None, :], out.to(O.dtype.element_ty),
             mask=live[:, None] & dmask[None, :])


def flash_prefill_attention(q, k_pool, v_pool, tables, positions, tiles, block_size, window, sinks, scale,
                            softcap=None, config=None):
    """Prefill chunks (tiles of ``flash_config(...)[0]`` tokens, kernels/paged_attention.py's
    ``chunk_tiles``) over the paged pool; ``config`` (BLOCK_M, BLOCK_N, warps, stages) overrides the
    rule for measurements, and must keep BLOCK_M equal to the tiles' token count."""
    from rung.kernels.paged_attention import flash_config

    n, hq, d = q.shape
    hkv = k_pool.shape[1]
    first, count, row = tiles
    block_m, block_n, warps, stages = config or flash_config(d, q.dtype)
    k_pool = k_pool if k_pool.stride(-1) == 1 else k_pool.contiguous()
    v_pool = v_pool if v_pool.stride(-1) == 1 else v_pool.contiguous()
    out = torch.empty_like(q)
    flash_prefill_kernel[(hq, first.shape[0])](
        q, k_pool, v_pool, out, tables, positions, first, count, row, sinks if sinks is not None else q,
        float(scale), int(window or 0), float(softcap or 1.0),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        out.stride(0), out.stride(1), tables.stride(0),
        GROUP=hq // hkv, BLOCK_M=block_m, BLOCK_N=block_n, D=d, D_P=1 << (d - 1).bit_length(), PAGE=block_size,
        HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None, SOFTCAP=softcap is not None,
        IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )
    return out
