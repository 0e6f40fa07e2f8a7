"""Triton kernels of kernels/fused_moe.py (imported only where Triton is)."""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from rung.kernels.fused_moe import Activation, ExpertWeights, moe_align, moe_slot_layout
from rung.kernels.moe_tiles import HOPPER_SMEM_BYTES, MoETile, choose_tile, device_smem_limit
from rung.kernels.triton_pdl import pdl_wait, pdl_wanted

log = logging.getLogger(__name__)


@triton.jit
def fp4_to_float(code, scale):
    """E2M1 codes (0..15) and E8M0 scales → float32 values, built as bits: a normal E2M1 value
    (1 + m/2)·2^(e-1) times 2^(s-127) has the float32 exponent field e + s - 1; the subnormal
    0.5·2^(s-127) has s - 1 and no mantissa."""
    c = code.to(tl.int32)
    s = scale.to(tl.int32)
    mag = c & 7
    e = mag >> 1
    m = mag & 1
    bits = tl.where(e == 0, tl.where(m == 1, (s - 1) << 23, 0), ((e + s - 1) << 23) | (m << 22))
    bits = tl.where(s <= 1, 0, bits)  # a scale of 2^-126 or less: flush (never in a real checkpoint)
    bits = bits | ((c & 8) << 28)
    return bits.to(tl.float32, bitcast=True)

@triton.jit
def expert_activation(gate, up, limit, alpha, ACT: tl.constexpr):
    """ACT 1: silu(gate) · up; 2: gpt-oss's gate clamped from above, up both ways, x·σ(αx)·(up + 1);
    0: the first product as it is (the down projection)."""
    out = gate
    if ACT == 1:
        out = gate / (1.0 + tl.exp(-gate)) * up
    elif ACT == 2:
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        out = g / (1.0 + tl.exp(-g * alpha)) * (u + 1.0)
    return out


@triton.jit
def moe_gemm(
    X, W1, W2, S1, S2, B1, B2, Y, SortedIds, BlockExpert, Total, RouteW,
    N, K, num_slots, sx_m, sw_e, sw_n, ss_e, ss_n, sb_e, sy_m, limit, alpha,
    X_DIV: tl.constexpr, TWO: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    MUL_ROUTE: tl.constexpr, PACKED: tl.constexpr, DOT_SCALED: tl.constexpr, LHS_FMT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
):
    """One program per (block of BLOCK_M slots, BLOCK_N outputs) of one expert (kernels/fused_moe.py).
    PDL: launched with programmatic dependent launch (kernels/triton_pdl.py), it waits first thing:
    the layout, the expert ids and hence every weight address are data of the kernels before."""
    pdl_wait(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(Total):
        return
    e = tl.load(BlockExpert + pid_m).to(tl.int64)
    slot = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slot < num_slots
    x_row = (slot // X_DIV).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < N
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_rows = e * sw_e + n[:, None].to(tl.int64) * sw_n
    for k0 in range(0, K, BLOCK_K):
        if PACKED and DOT_SCALED:  # Triton's own microscaled dot: it upcasts e2m1 on the way to the MMA
            kk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(X + x_row[:, None] * sx_m + kk[None, :], mask=valid[:, None] & (kk < K)[None, :],
                         other=0.0)
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            wm = n_in[:, None] & (j < K // 2)[None, :]
            gidx = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            sm = n_in[:, None] & (gidx < K // 32)[None, :]
            s_rows = e * ss_e + n[:, None].to(tl.int64) * ss_n + gidx[None, :]
            b = tl.load(W1 + w_rows + j[None, :], mask=wm, other=0)
            sc = tl.load(S1 + s_rows, mask=sm, other=0)
            acc1 = tl.dot_scaled(xt, None, LHS_FMT, tl.trans(b), sc, "e2m1", acc1)
            if TWO:
                b = tl.load(W2 + w_rows + j[None, :], mask=wm, other=0)
                sc = tl.load(S2 + s_rows, mask=sm, other=0)
                acc2 = tl.dot_scaled(xt, None, LHS_FMT, tl.trans(b), sc, "e2m1", acc2)
        elif PACKED:
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte j holds elements 2j (low) and 2j + 1 (high)
            j_in = j < K // 2
            xm = valid[:, None] & j_in[None, :]
            x_even = tl.load(X + x_row[:, None] * sx_m + 2 * j[None, :], mask=xm, other=0.0)
            x_odd = tl.load(X + x_row[:, None] * sx_m + 2 * j[None, :] + 1, mask=xm, other=0.0)
            wm = n_in[:, None] & j_in[None, :]
            s_rows = e * ss_e + n[:, None].to(tl.int64) * ss_n + (j // 16)[None, :]
            b = tl.load(W1 + w_rows + j[None, :], mask=wm, other=0)
            sc = tl.load(S1 + s_rows, mask=wm, other=0)
            lo = fp4_to_float(b & 15, sc).to(x_even.dtype)
            hi = fp4_to_float(b >> 4, sc).to(x_even.dtype)
            acc1 = tl.dot(x_even, tl.trans(lo), acc1)
            acc1 = tl.dot(x_odd, tl.trans(hi), acc1)
            if TWO:
                b = tl.load(W2 + w_rows + j[None, :], mask=wm, other=0)
                sc = tl.load(S2 + s_rows, mask=wm, other=0)
                lo = fp4_to_float(b & 15, sc).to(x_even.dtype)
                hi = fp4_to_float(b >> 4, sc).to(x_even.dtype)
                acc2 = tl.dot(x_even, tl.trans(lo), acc2)
                acc2 = tl.dot(x_odd, tl.trans(hi), acc2)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            k_in = kk < K
            xt = tl.load(X + x_row[:, None] * sx_m + kk[None, :], mask=valid[:, None] & k_in[None, :], other=0.0)
            wm = n_in[:, None] & k_in[None, :]
            w1 = tl.load(W1 + w_rows + kk[None, :], mask=wm, other=0.0)
            acc1 = tl.dot(xt, tl.trans(w1), acc1)
            if TWO:
                w2 = tl.load(W2 + w_rows + kk[None, :], mask=wm, other=0.0)
                acc2 = tl.dot(xt, tl.trans(w2), acc2)
    if HAS_BIAS:
        acc1 += tl.load(B1 + e * sb_e + n, mask=n_in, other=0.0).to(tl.float32)[None, :]
        if TWO:
            acc2 += tl.load(B2 + e * sb_e + n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    out = expert_activation(acc1, acc2, limit, alpha, ACT)
    if MUL_ROUTE:
        out = out * tl.load(RouteW + slot, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(Y + slot[:, None].to(tl.int64) * sy_m + n[None, :], out.to(Y.dtype.element_ty),
             mask=valid[:, None] & n_in[None, :])


@triton.jit
def fp4_pair(b):
    """A byte of two E2M1 codes → their float32 values without the block scale, in a handful of
    integer ops each (what bounds a decode GEMV over MXFP4): the code's three magnitude bits
    become the float's two low exponent bits and its top mantissa bit, which reads
    2^(e-127)·(1 + m/2) for e ≥ 1 and m·2^-127 (a subnormal) for e = 0; times 2^126 both are the
    E2M1 value. (The multiply keeps subnormal inputs: Triton flushes only inside libdevice.)"""
    w = b.to(tl.int32)
    lo = (((w << 22) & 0x01C00000) | ((w & 0x08) << 28)).to(tl.float32, bitcast=True)
    hi = (((w << 18) & 0x01C00000) | ((w & 0x80) << 24)).to(tl.float32, bitcast=True)
    return lo * 8.507059173023462e37, hi * 8.507059173023462e37


@triton.jit
def fp4_pair_scaled(b, ASM: tl.constexpr):
    """A byte of two E2M1 codes → their values times 2^-14, in float32 (the caller's activations
    carry the 2^14). ASM: four bytes at a time in PTX, the codes of two bytes placed as the
    exponent and mantissa bits of a pair of float16s in one register (an E2M1 code's three
    magnitude bits are a float16's two low exponent bits and top mantissa bit: 2^(e-15)·(1 + m/2)
    for e ≥ 1, m·2^-15 for e = 0, the E2M1 value times 2^-14), four integer ops a pair and a
    hardware float16 → float32 conversion each: a third of the integer work of ``fp4_pair``, which
    is what bounds the decode GEMV. Otherwise (Triton's interpreter) ``fp4_pair`` times 2^-14."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 w, t, u, a;
            .reg .b16 h0, h1;
            prmt.b32 w, $8, 0, 0x3120;
            shl.b32 t, w, 9;
            shl.b32 u, w, 12;
            and.b32 t, t, 0x0E000E00;
            lop3.b32 a, t, u, 0x80008000, 0xF8;
            mov.b32 {h0, h1}, a;
            cvt.f32.f16 $0, h0;
            cvt.f32.f16 $1, h1;
            shl.b32 t, w, 1;
            shl.b32 u, w, 4;
            and.b32 t, t, 0x0E000E00;
            lop3.b32 a, t, u, 0x80008000, 0xF8;
            mov.b32 {h0, h1}, a;
            cvt.f32.f16 $2, h0;
            cvt.f32.f16 $3, h1;
            shl.b32 t, w, 5;
            shl.b32 u, w, 8;
            and.b32 t, t, 0x0E000E00;
            lop3.b32 a, t, u, 0x80008000, 0xF8;
            mov.b32 {h0, h1}, a;
            cvt.f32.f16 $4, h0;
            cvt.f32.f16 $5, h1;
            shr.b32 t, w, 3;
            and.b32 t, t, 0x0E000E00;
            lop3.b32 a, t, w, 0x80008000, 0xF8;
            mov.b32 {h0, h1}, a;
            cvt.f32.f16 $6, h0;
            cvt.f32.f16 $7, h1;
            }
            """,
            constraints="=r,=r,=r,=r,=r,=r,=r,=r,r",
            args=[b], dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    else:
        lo, hi = fp4_pair(b)
        lo = lo * 6.103515625e-05
        hi = hi * 6.103515625e-05
    return lo, hi


@triton.jit
def moe_gemv_mxfp4(
    X, W1, W2, S1, S2, B1, B2, Y, Experts, RouteW,
    N, K, sx_m, sw_e, sw_n, ss_e, ss_n, sb_e, sy_m, limit, alpha,
    X_DIV: tl.constexpr, TWO: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    MUL_ROUTE: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, ASM: tl.constexpr = False,
    STAGES: tl.constexpr = 1, PDL: tl.constexpr = False,
):
    """Decode over packed MXFP4 experts: one program per (slot, BLOCK_N output rows), GROUPS
    blocks of 32 weights (16 bytes, one scale) per step. Each block's 32 products are summed
    unscaled and the block's power of two is applied once to the sum, so a weight costs a few
    integer ops, a multiply and a multiply-add, and the scales are read once per block rather
    than per byte (what kept ``moe_gemm``'s decode at a fraction of the bandwidth). PDL: launched
    with programmatic dependent launch (kernels/triton_pdl.py), it waits first thing: which
    expert's bytes a program reads is data of the routing kernel, so no weight is known before."""
    pdl_wait(PDL)
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(Experts + slot).to(tl.int64)
    x_row = X + (slot // X_DIV).to(tl.int64) * sx_m
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < N
    gi = tl.arange(0, GROUPS)
    bi = tl.arange(0, 16)
    w_rows = e * sw_e + n[:, None, None].to(tl.int64) * sw_n  # [BLOCK_N, 1, 1]
    s_rows = e * ss_e + n[:, None].to(tl.int64) * ss_n  # [BLOCK_N, 1]
    acc1 = tl.zeros([BLOCK_N, GROUPS], tl.float32)
    acc2 = tl.zeros([BLOCK_N, GROUPS], tl.float32)
    for g0 in tl.range(0, K // 32, GROUPS, num_stages=STAGES):  # STAGES > 1: the next steps' bytes in flight
        grp = g0 + gi
        g_in = grp < K // 32
        byte = grp[:, None] * 16 + bi[None, :]  # [GROUPS, 16]: byte j holds weights 2j (low) and 2j + 1
        # the activations times 2^14, which fp4_pair_scaled's values lack (exact: a power of two)
        x_even = (tl.load(x_row + 2 * byte, mask=g_in[:, None], other=0.0).to(tl.float32) * 16384.0)[None]
        x_odd = (tl.load(x_row + 2 * byte + 1, mask=g_in[:, None], other=0.0).to(tl.float32) * 16384.0)[None]
        wm = n_in[:, None, None] & g_in[None, :, None]
        sm = n_in[:, None] & g_in[None, :]
        lo, hi = fp4_pair_scaled(tl.load(W1 + w_rows + byte[None], mask=wm, other=0), ASM)
        scale = tl.exp2(tl.load(S1 + s_rows + grp[None, :], mask=sm, other=127).to(tl.float32) - 127.0)
        acc1 += tl.sum(lo * x_even + hi * x_odd, 2) * scale
        if TWO:
            lo, hi = fp4_pair_scaled(tl.load(W2 + w_rows + byte[None], mask=wm, other=0), ASM)
            scale = tl.exp2(tl.load(S2 + s_rows + grp[None, :], mask=sm, other=127).to(tl.float32) - 127.0)
            acc2 += tl.sum(lo * x_even + hi * x_odd, 2) * scale
    r1 = tl.sum(acc1, 1)
    r2 = tl.sum(acc2, 1)
    if HAS_BIAS:
        r1 += tl.load(B1 + e * sb_e + n, mask=n_in, other=0.0).to(tl.float32)
        if TWO:
            r2 += tl.load(B2 + e * sb_e + n, mask=n_in, other=0.0).to(tl.float32)
    out = expert_activation(r1, r2, limit, alpha, ACT)
    if MUL_ROUTE:
        out = out * tl.load(RouteW + slot).to(tl.float32)
    tl.store(Y + slot.to(tl.int64) * sy_m + n, out.to(Y.dtype.element_ty), mask=n_in)


@triton.jit
def route_kernel(L, W, I, E, sl, K: tl.constexpr, K_P: tl.constexpr, BLOCK_E: tl.constexpr,
                 TOPK_SOFTMAX: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr = False):
    """One token: top-k by repeated arg-max over its E logits in registers (ties to the lower
    id), then gpt-oss's softmax over the k chosen logits, or Qwen's softmax over all E (float32)
    with the optional renormalisation of the k. PDL: launched with programmatic dependent launch
    (kernels/triton_pdl.py), it waits first thing (the logits are the router GEMV's)."""
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    x = tl.load(L + t * sl + e, mask=e < E, other=float("-inf")).to(tl.float32)
    if not TOPK_SOFTMAX:
        p = tl.exp(x - tl.max(x, 0))
        x = tl.where(e < E, p / tl.sum(p, 0), -1.0)
    kk = tl.arange(0, K_P)
    top = tl.full([K_P], float("-inf"), tl.float32)
    ids = tl.zeros([K_P], tl.int32)
    for j in tl.static_range(K):
        best = tl.max(x, 0)
        pick = tl.min(tl.where(x == best, e, BLOCK_E), 0)
        top = tl.where(kk == j, best, top)
        ids = tl.where(kk == j, pick, ids)
        x = tl.where(e == pick, float("-inf"), x)
    if TOPK_SOFTMAX:  # the k logits as the model dtype rounded them, softmax in float32
        p = tl.exp(top - tl.max(top, 0))
        top = p / tl.sum(p, 0)
    elif NORM:
        top = top / tl.sum(tl.where(kk < K, top, 0.0), 0)
    tl.store(W + t * K + kk, top.to(W.dtype.element_ty), mask=kk < K)
    tl.store(I + t * K + kk, ids, mask=kk < K)


def triton_route(logits, top_k: int, topk_softmax: bool, norm: bool):
    n, e = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(n, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(n, top_k, dtype=torch.int32, device=logits.device)
    pdl = pdl_wanted(logits.device)
    route_kernel[(n,)](logits, weights, ids, e, logits.stride(0), K=top_k, K_P=triton.next_power_of_2(top_k),
                       BLOCK_E=triton.next_power_of_2(e), TOPK_SOFTMAX=topk_softmax, NORM=norm, PDL=pdl,
                       launch_pdl=pdl, num_warps=1 if e <= 256 else 4)
    return weights, ids


@triton.jit
def combine_kernel(Y, O, Wr, H, K: tl.constexpr, BLOCK: tl.constexpr, WEIGHTED: tl.constexpr = False,
                   PDL: tl.constexpr = False):
    """out[t] = Σ_j y[t·K + j] (WEIGHTED: · w[t, j]) in float32, one rounding (torch's sum(1, float32)
    then a cast: two kernels; a weighted bmm: a cast of the weights and cuBLAS, neither with PDL).
    PDL: launched with programmatic dependent launch (kernels/triton_pdl.py), it waits first thing."""
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < H
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(K):
        y = tl.load(Y + (t * K + j) * H + c, mask=m, other=0.0).to(tl.float32)
        if WEIGHTED:
            y = y * tl.load(Wr + t * K + j).to(tl.float32)
        acc += y
    tl.store(O + t * H + c, acc.to(O.dtype.element_ty), mask=m)


def combine(y: torch.Tensor, n: int, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """y [n·k, H] (contiguous) → [n, H]: each token's k rows summed, times ``weights`` [n, k] if given."""
    h = y.shape[1]
    out = torch.empty(n, h, dtype=y.dtype, device=y.device)
    w = y if weights is None else weights.contiguous()  # unread unless WEIGHTED
    pdl = pdl_wanted(y.device)
    combine_kernel[(n, triton_cdiv(h, 1024))](y, out, w, h, K=k, BLOCK=1024, WEIGHTED=weights is not None, PDL=pdl,
                                              launch_pdl=pdl, num_warps=4)
    return out


SLOT_LAYOUT_MAX = 64  # up to this many slots, one slot per block and no sort (decode batches)
# Up to this many slots, packed experts run moe_gemv_mxfp4 (RUNG_MOE_GEMV=0: moe_gemm's slot layout).
# bf16 experts keep moe_gemm: on an H200 its slot layout streams a Qwen3-30B-A3B layer at 2.45 TB/s,
# a plain GEMV at 2.1 (benchmarks/gpu.py, 2026-12-02).
GEMV_MAX = 64

# The GEMV's tile is a bandwidth question answered per shape on the device it runs on (the first,
# eager call of a shape times these and keeps the fastest, before any graph capture).
# Triton pipelines only loads that feed a dot, so the bytes in flight come from the tile itself:
# wide K steps (up to whole rows) are in the set.
_GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "GROUPS": g, "STAGES": st}, num_warps=w)
                 for n, g, w, st in ((8, 8, 4, 1), (16, 8, 4, 1), (4, 32, 4, 1), (8, 32, 4, 1), (2, 128, 4, 1),
                                     (4, 128, 8, 1), (8, 64, 8, 1), (16, 32, 8, 1), (32, 16, 8, 1), (4, 64, 4, 1),
                                     (8, 16, 4, 3), (16, 16, 4, 3), (8, 32, 4, 3), (16, 32, 4, 3), (4, 64, 4, 3),
                                     (32, 8, 4, 3))]
# PDL stays out of the key: a shape runs the tile tuned at its first call whether PDL is on or off,
# so RUNG_PDL=0 and 1 give bit-identical outputs (a tile's GROUPS set the order of the sums), as
# every other PDL kernel's do.
_moe_gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["N", "K", "TWO", "ASM"])(moe_gemv_mxfp4)


def _gemv_launch(grid_rows: int, n_out: int, *args, **meta) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter checks values, not speed: one tile
        moe_gemv_mxfp4[(grid_rows, triton_cdiv(n_out, 8))](*args, **meta, BLOCK_N=8, GROUPS=2)
        return
    # the PTX decode (RUNG_MXFP4_ASM=0: the portable one, for comparison)
    asm = os.environ.get("RUNG_MXFP4_ASM") != "0"
    _moe_gemv_tuned[lambda m: (grid_rows, triton_cdiv(n_out, m["BLOCK_N"]))](*args, **meta, ASM=asm)


def triton_moe_gemv(x, weights, experts, w: ExpertWeights, act: Activation) -> torch.Tensor:
    """Decode batches over packed experts (few slots): each slot's expert read once, one program
    per slot × row tile."""
    n, k = experts.shape
    s = n * k
    x = x.contiguous()
    inter, hidden_size = w.gate.shape[1], x.shape[1]
    hidden = torch.empty(s, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(s, hidden_size, dtype=x.dtype, device=x.device)
    ids = experts.reshape(-1).to(torch.int32)
    pdl = pdl_wanted(x.device)
    route_w = weights.reshape(-1).contiguous()
    has_bias = w.gate_bias is not None
    act_id = 2 if act.kind == "swiglu_clamped" else 1

    def launch(xin, x_div, w1, w2, s1, s2, b1, b2, out, n_out, k_in, two, act_code, mul_route):
        sw = w1.stride()
        ss = s1.stride() if s1 is not None else (0, 0, 0)
        _gemv_launch(s, n_out, xin, w1, w2 if w2 is not None else w1, s1 if s1 is not None else w1,
                     s2 if s2 is not None else w1, b1 if b1 is not None else xin, b2 if b2 is not None else xin,
                     out, ids, route_w, n_out, k_in, xin.stride(0), sw[0], sw[1], ss[0], ss[1],
                     b1.stride(0) if b1 is not None else 0, out.stride(0), float(act.limit), float(act.alpha),
                     X_DIV=x_div, TWO=two, ACT=act_code, HAS_BIAS=b1 is not None, MUL_ROUTE=mul_route, PDL=pdl,
                     launch_pdl=pdl)

    launch(x, k, _rows(w.gate), _rows(w.up), w.gate_scales, w.up_scales, w.gate_bias if has_bias else None,
           w.up_bias if has_bias else None, hidden, inter, hidden_size, True, act_id, False)
    launch(hidden, 1, _rows(w.down), None, w.down_scales, None, w.down_bias if has_bias else None, None,
           y, hidden_size, inter, False, 0, True)
    return combine(y, n, k)


def _tile(x: torch.Tensor, w: ExpertWeights, slots: int, packed: bool) -> MoETile:
    """moe_gemm's tile for this layer and batch, within the device's shared memory (kernels/moe_tiles.py);
    ``packed``: the GEMM reads MXFP4 bytes (else weights of x's dtype)."""
    inter, hidden = w.gate.shape[1], x.shape[1]
    # Triton's interpreter (x on the CPU) has no shared memory: it checks the tiles a Hopper GPU gets
    limit = device_smem_limit(x.device.index or 0) if x.is_cuda else HOPPER_SMEM_BYTES
    return choose_tile(slots, [(inter, hidden, 2), (hidden, inter, 1)], x.element_size(),
                       w.gate.element_size() if packed else x.element_size(), packed, limit)


@triton.jit
def mxfp4_dequantize_kernel(B, S, Y, groups, BLOCK_G: tl.constexpr):
    """BLOCK_G groups of 32 MXFP4 values a program: 16 bytes and a scale each → 32 values of Y's
    dtype, element t from byte t // 2's low (t even) or high nibble (exact in bf16, fp16 for the
    exponents a checkpoint holds, and float32: each value has at most two significant bits). The
    output tile is written whole, row after row (each byte is read twice, from L1)."""
    base = tl.program_id(0).to(tl.int64) * BLOCK_G
    r = tl.arange(0, BLOCK_G)
    g_in = base + r < groups
    t = tl.arange(0, 32)
    b = tl.load(B + base * 16 + r[:, None] * 16 + (t // 2)[None, :], mask=g_in[:, None], other=0)
    sc = tl.load(S + base + r, mask=g_in, other=0)[:, None]
    code = (b >> (4 * (t % 2))[None, :].to(tl.uint8)) & 15
    tl.store(Y + base * 32 + r[:, None] * 32 + t[None, :], fp4_to_float(code, sc).to(Y.dtype.element_ty),
             mask=g_in[:, None])


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed experts [E, rows, cols / 2] (or [E, rows, G, 16]) and scales [E, rows, cols / 32] →
    [E, rows, cols] in ``dtype``: rung.model.mxfp4.dequantize_mxfp4 in one pass (scales of 2^-126
    and below decode to 0 here, as in the fused kernels; no checkpoint holds them)."""
    e, rows, groups = scales.shape
    y = torch.empty(e, rows, groups * 32, dtype=dtype, device=blocks.device)
    n = e * rows * groups
    block = 32
    mxfp4_dequantize_kernel[(triton_cdiv(n, block),)](blocks.contiguous(), scales.contiguous(), y, n, BLOCK_G=block,
                                                        num_warps=4)
    return y


# A prefill step of DEQUANT_SLOTS_PER_EXPERT (token, expert) slots per expert or more dequantizes a
# packed layer's experts to the activations' dtype first (one pass a matrix, gate and up before down
# so that only one projection's copy is alive at a time) and runs moe_gemm's dense tiles. On an H200
# (gpt-oss-20b, a 32K-token prompt in 8K chunks, 2026-12-05) the dense tiles ran the experts at ~390
# TFLOP/s where decoding E2M1 in the GEMM's K loop ran at ~180, and the dequantization pass took
# 0.38 ms a matrix of 32 experts: TTFT 1,444 → 1,079 ms. The pass costs in proportion to the experts,
# the saving to the slots: with gpt-oss's 2880-wide matrices the two meet near 240 slots an expert
# (1 / 180 − 1 / 390 TFLOP/s on 16.6 MFLOP a slot against 12 µs an expert), hence 256.
# The dequantized gate and up are alive together (4 bytes a packed byte in bf16: 2.1 GB each for
# gpt-oss-120b's 128 experts): without room for them the step keeps the packed tiles instead of
# running out of memory. RUNG_MXFP4_DEQUANT=0 turns it off.
DEQUANT_SLOTS_PER_EXPERT = 256
DEQUANT_MARGIN = 256 << 20  # bytes left over beside the two copies


def _dequantized_prefill(s: int, w: ExpertWeights, dtype: torch.dtype = torch.bfloat16) -> bool:
    on = os.environ.get("RUNG_MXFP4_DEQUANT", "1") != "0"
    if not (w.packed and on and s >= DEQUANT_SLOTS_PER_EXPERT * w.num_experts):
        return False
    copies = 2 * (w.gate.numel() * 2) * dtype.itemsize  # gate and up, [E, I, H]: two values a packed byte
    return _room_for(copies + DEQUANT_MARGIN, w.gate.device)


def _room_for(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` fit on ``device`` now: free memory plus what torch's allocator holds unused."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) >= nbytes


def triton_fused_moe(x, weights, experts, w: ExpertWeights, act: Activation) -> torch.Tensor:
    n, k = experts.shape
    s = n * k
    if w.packed and s <= GEMV_MAX and os.environ.get("RUNG_MOE_GEMV") != "0":
        return triton_moe_gemv(x, weights, experts, w, act)
    dense = _dequantized_prefill(s, w, x.dtype)
    tile = _tile(x, w, s, packed=w.packed and not dense)
    block_m, block_n, block_k = tile.block_m, tile.block_n, tile.block_k
    layout = moe_slot_layout if s <= SLOT_LAYOUT_MAX else moe_align
    sorted_ids, block_expert, total = layout(experts, w.num_experts, block_m)
    x = x.contiguous()
    inter = w.gate.shape[1]
    hidden_size = x.shape[1]
    hidden = torch.empty(s, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(s, hidden_size, dtype=x.dtype, device=x.device)
    route_w = weights.reshape(-1).contiguous()
    blocks = sorted_ids.shape[0] // block_m
    has_bias = w.gate_bias is not None
    act_id = 2 if act.kind == "swiglu_clamped" else 1
    pdl = pdl_wanted(x.device)

    def launch(xin, x_div, w1, w2, s1, s2, b1, b2, out, n_out, k_in, two, act_code, mul_route, dot_scaled):
        packed = s1 is not None
        sw = w1.stride()
        ss = s1.stride() if s1 is not None else (0, 0, 0)
        grid = (blocks, triton_cdiv(n_out, block_n))
        moe_gemm[grid](
            xin, w1, w2 if w2 is not None else w1, s1 if s1 is not None else w1, s2 if s2 is not None else w1,
            b1 if b1 is not None else xin, b2 if b2 is not None else xin, out, sorted_ids, block_expert, total, route_w,
            n_out, k_in, s, xin.stride(0), sw[0], sw[1], ss[0], ss[1], b1.stride(0) if b1 is not None else 0,
            out.stride(0), float(act.limit), float(act.alpha),
            X_DIV=x_div, TWO=two, ACT=act_code, HAS_BIAS=b1 is not None, MUL_ROUTE=mul_route, PACKED=packed,
            DOT_SCALED=dot_scaled, LHS_FMT="bf16" if xin.dtype == torch.bfloat16 else "fp16",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, launch_pdl=pdl, num_warps=tile.warps,
            num_stages=tile.stages,
        )

    def run(dot_scaled):
        launch(x, k, _rows(w.gate), _rows(w.up), w.gate_scales, w.up_scales, w.gate_bias if has_bias else None,
               w.up_bias if has_bias else None, hidden, inter, hidden_size, True, act_id, False, dot_scaled)
        launch(hidden, 1, _rows(w.down), None, w.down_scales, None, w.down_bias if has_bias else None, None,
               y, hidden_size, inter, False, 0, True, dot_scaled)
        return combine(y, n, k)

    if dense:  # (see DEQUANT_SLOTS_PER_EXPERT)
        gate, up = mxfp4_dequantize(w.gate, w.gate_scales, x.dtype), mxfp4_dequantize(w.up, w.up_scales, x.dtype)
        launch(x, k, gate, up, None, None, w.gate_bias if has_bias else None, w.up_bias if has_bias else None,
               hidden, inter, hidden_size, True, act_id, False, False)
        del gate, up
        down = mxfp4_dequantize(w.down, w.down_scales, x.dtype)
        launch(hidden, 1, down, None, None, None, w.down_bias if has_bias else None, None,
               y, hidden_size, inter, False, 0, True, False)
        return combine(y, n, k)
    if not w.packed:
        return run(False)
    key = (tile, x.dtype, act_id, has_bias)
    if key not in DOT_SCALED_OK:  # first (eager) call of this variant: prove tl.dot_scaled right here, once
        DOT_SCALED_OK[key] = _dot_scaled_agrees(run)
    return run(DOT_SCALED_OK[key])


DOT_SCALED_OK: dict = {}  # per kernel variant: tl.dot_scaled compiled and agreed with the explicit decode


def _dot_scaled_agrees(run) -> bool:
    if os.environ.get("RUNG_MXFP4_DOT_SCALED") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    explicit = run(False).clone()
    try:
        scaled = run(True)
    except Exception as exc:  # a Triton without it, or a lowering that fails here
        log.warning("tl.dot_scaled unavailable for MXFP4 experts (%s); decoding in registers", exc)
        return False
    err = float((scaled.double() - explicit.double()).norm() / explicit.double().norm().clamp(min=1e-30))
    if not err < 1e-2:
        log.warning("tl.dot_scaled disagrees with the explicit MXFP4 decode (relative error %.2e); not used", err)
    return err < 1e-2


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[E, rows, cols] with unit stride along cols (packed bytes are [E, rows, G, 16] → [E, rows, G·16])."""
    if t.dim() == 4:
        t = t.reshape(t.shape[0], t.shape[1], -1)
    return t if t.stride(-1) == 1 else t.contiguous()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
