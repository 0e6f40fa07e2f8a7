"""Triton kernels of kernels/fused_moe.py (imported only where Triton is)."""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from rung.kernels.fused_moe import Activation, ExpertWeights, moe_align, moe_slot_layout

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
def moe_gemm(
    X, W1, W2, S1, S2, B1, B2, Y, SortedIds, BlockExpert, Total, RouteW,
    N, K, num_slots, sx_m, sw_e, sw_n, ss_e, ss_n, sb_e, sy_m, limit, alpha,
    X_DIV: tl.constexpr, TWO: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    MUL_ROUTE: tl.constexpr, PACKED: tl.constexpr, DOT_SCALED: tl.constexpr, LHS_FMT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
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
    if ACT == 1:  # silu(gate) * up
        out = acc1 / (1.0 + tl.exp(-acc1)) * acc2
    elif ACT == 2:  # gpt-oss: gate clamped from above, up both ways, x·σ(αx)·(up + 1)
        g = tl.minimum(acc1, limit)
        u = tl.minimum(tl.maximum(acc2, -limit), limit)
        out = g / (1.0 + tl.exp(-g * alpha)) * (u + 1.0)
    else:
        out = acc1
    if MUL_ROUTE:
        out = out * tl.load(RouteW + slot, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(Y + slot[:, None].to(tl.int64) * sy_m + n[None, :], out.to(Y.dtype.element_ty),
             mask=valid[:, None] & n_in[None, :])


@triton.jit
def moe_gemv(
    X, W1, W2, S1, S2, B1, B2, Y, Experts, RouteW,
    N, K, sx_m, sw_e, sw_n, ss_e, ss_n, sb_e, sy_m, limit, alpha,
    X_DIV: tl.constexpr, TWO: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    MUL_ROUTE: tl.constexpr, PACKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode: one program per (slot, BLOCK_N output rows), a plain multiply-and-reduce over K.
    With one token per expert there is nothing for a matrix unit to share, and ``moe_gemm``'s
    16-row tiles would spend their registers on padding; here every register holds weights in
    flight, which is what a memory-bound step needs."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(Experts + slot).to(tl.int64)
    x_row = X + (slot // X_DIV).to(tl.int64) * sx_m
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < N
    w_rows = e * sw_e + n[:, None].to(tl.int64) * sw_n
    if PACKED:
        acc1 = tl.zeros([BLOCK_N, BLOCK_K // 2], tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K // 2], tl.float32)
        s_rows = e * ss_e + n[:, None].to(tl.int64) * ss_n
        for k0 in range(0, K, BLOCK_K):
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte j: elements 2j (low nibble) and 2j + 1
            j_in = j < K // 2
            x_even = tl.load(x_row + 2 * j, mask=j_in, other=0.0).to(tl.float32)[None, :]
            x_odd = tl.load(x_row + 2 * j + 1, mask=j_in, other=0.0).to(tl.float32)[None, :]
            wm = n_in[:, None] & j_in[None, :]
            b = tl.load(W1 + w_rows + j[None, :], mask=wm, other=0)
            sc = tl.load(S1 + s_rows + (j // 16)[None, :], mask=wm, other=0)
            acc1 += fp4_to_float(b & 15, sc) * x_even + fp4_to_float(b >> 4, sc) * x_odd
            if TWO:
                b = tl.load(W2 + w_rows + j[None, :], mask=wm, other=0)
                sc = tl.load(S2 + s_rows + (j // 16)[None, :], mask=wm, other=0)
                acc2 += fp4_to_float(b & 15, sc) * x_even + fp4_to_float(b >> 4, sc) * x_odd
    else:
        acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_in = kk < K
            xt = tl.load(x_row + kk, mask=k_in, other=0.0).to(tl.float32)[None, :]
            wm = n_in[:, None] & k_in[None, :]
            acc1 += tl.load(W1 + w_rows + kk[None, :], mask=wm, other=0.0).to(tl.float32) * xt
            if TWO:
                acc2 += tl.load(W2 + w_rows + kk[None, :], mask=wm, other=0.0).to(tl.float32) * xt
    r1 = tl.sum(acc1, 1)
    r2 = tl.sum(acc2, 1)
    if HAS_BIAS:
        r1 += tl.load(B1 + e * sb_e + n, mask=n_in, other=0.0).to(tl.float32)
        if TWO:
            r2 += tl.load(B2 + e * sb_e + n, mask=n_in, other=0.0).to(tl.float32)
    if ACT == 1:
        out = r1 / (1.0 + tl.exp(-r1)) * r2
    elif ACT == 2:
        g = tl.minimum(r1, limit)
        u = tl.minimum(tl.maximum(r2, -limit), limit)
        out = g / (1.0 + tl.exp(-g * alpha)) * (u + 1.0)
    else:
        out = r1
    if MUL_ROUTE:
        out = out * tl.load(RouteW + slot).to(tl.float32)
    tl.store(Y + slot.to(tl.int64) * sy_m + n, out.to(Y.dtype.element_ty), mask=n_in)


SLOT_LAYOUT_MAX = 64  # up to this many slots, one slot per block and no sort (decode batches)
GEMV_MAX = 64  # up to this many slots, moe_gemv (RUNG_MOE_GEMV=0: moe_gemm's slot layout instead)

# The GEMV's tile is a bandwidth question answered per shape on the device it runs on (the first,
# eager call of a shape times these and keeps the fastest, before any graph capture).
_GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
                 for n, k, w in ((4, 512, 2), (8, 256, 4), (8, 512, 4), (16, 256, 4), (16, 512, 4),
                                 (32, 128, 4), (32, 256, 8), (64, 128, 8))]
_moe_gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["N", "K", "TWO", "PACKED"])(moe_gemv)


def _gemv_launch(grid_rows: int, n_out: int, *args, **meta) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter checks values, not speed: one tile
        moe_gemv[(grid_rows, triton_cdiv(n_out, 16))](*args, **meta, BLOCK_N=16, BLOCK_K=64)
        return
    _moe_gemv_tuned[lambda m: (grid_rows, triton_cdiv(n_out, m["BLOCK_N"]))](*args, **meta)


def triton_moe_gemv(x, weights, experts, w: ExpertWeights, act: Activation) -> torch.Tensor:
    """Decode batches (few slots): each slot's expert read once, one program per slot × row tile."""
    n, k = experts.shape
    s = n * k
    x = x.contiguous()
    inter, hidden_size = w.gate.shape[1], x.shape[1]
    hidden = torch.empty(s, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(s, hidden_size, dtype=x.dtype, device=x.device)
    ids = experts.reshape(-1).to(torch.int32)
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
                     X_DIV=x_div, TWO=two, ACT=act_code, HAS_BIAS=b1 is not None, MUL_ROUTE=mul_route,
                     PACKED=w.packed)

    launch(x, k, _rows(w.gate), _rows(w.up), w.gate_scales, w.up_scales, w.gate_bias if has_bias else None,
           w.up_bias if has_bias else None, hidden, inter, hidden_size, True, act_id, False)
    launch(hidden, 1, _rows(w.down), None, w.down_scales, None, w.down_bias if has_bias else None, None,
           y, hidden_size, inter, False, 0, True)
    return y.view(n, k, hidden_size).sum(1, dtype=torch.float32).to(x.dtype)


def _config(slots: int):
    """(block_m, block_n, block_k, warps): small blocks while few slots share an expert (decode,
    where a block holds one slot and the job is streaming weights), GEMM-sized ones for prefill."""
    if slots <= 128:  # a long K step keeps more bytes in flight per program: decode is latency-bound
        return 16, 32, 256, 4
    return 64, 128, 64, 8


def triton_fused_moe(x, weights, experts, w: ExpertWeights, act: Activation) -> torch.Tensor:
    n, k = experts.shape
    s = n * k
    if s <= GEMV_MAX and os.environ.get("RUNG_MOE_GEMV") != "0":
        return triton_moe_gemv(x, weights, experts, w, act)
    block_m, block_n, block_k, warps = _config(s)
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

    def launch(xin, x_div, w1, w2, s1, s2, b1, b2, out, n_out, k_in, two, act_code, mul_route, dot_scaled):
        sw = w1.stride()
        ss = s1.stride() if s1 is not None else (0, 0, 0)
        grid = (blocks, triton_cdiv(n_out, block_n))
        moe_gemm[grid](
            xin, w1, w2 if w2 is not None else w1, s1 if s1 is not None else w1, s2 if s2 is not None else w1,
            b1 if b1 is not None else xin, b2 if b2 is not None else xin, out, sorted_ids, block_expert, total, route_w,
            n_out, k_in, s, xin.stride(0), sw[0], sw[1], ss[0], ss[1], b1.stride(0) if b1 is not None else 0,
            out.stride(0), float(act.limit), float(act.alpha),
            X_DIV=x_div, TWO=two, ACT=act_code, HAS_BIAS=b1 is not None, MUL_ROUTE=mul_route, PACKED=w.packed,
            DOT_SCALED=dot_scaled, LHS_FMT="bf16" if xin.dtype == torch.bfloat16 else "fp16",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        )

    def run(dot_scaled):
        launch(x, k, _rows(w.gate), _rows(w.up), w.gate_scales, w.up_scales, w.gate_bias if has_bias else None,
               w.up_bias if has_bias else None, hidden, inter, hidden_size, True, act_id, False, dot_scaled)
        launch(hidden, 1, _rows(w.down), None, w.down_scales, None, w.down_bias if has_bias else None, None,
               y, hidden_size, inter, False, 0, True, dot_scaled)
        return y.view(n, k, hidden_size).sum(1, dtype=torch.float32).to(x.dtype)

    if not w.packed:
        return run(False)
    key = (block_m, block_n, block_k, x.dtype, act_id, has_bias)
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
