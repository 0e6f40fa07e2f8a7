"""Triton kernel of kernels/linear.py (imported only where Triton is)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rung.kernels.triton_pdl import pdl_wait, pdl_wanted


@triton.jit
def _row_dot(X, r, sx, M, k0, kk, k_in, w, w2, acc, acc2, GATED: tl.constexpr):
    """acc += w · x[r] (and acc2 += w2 · x[r]) over one K step; a padding row (r ≥ M) reads nothing."""
    x = tl.load(X + r * sx + k0 + kk, mask=k_in & (kk * 0 + r < M), other=0.0).to(tl.float32)
    acc += tl.sum(w * x[None, :], 1)
    if GATED:
        acc2 += tl.sum(w2 * x[None, :], 1)
    return acc, acc2


@triton.jit
def _rows_dot(X, sx, M, k0, kk, k_in, w, w2, a0, a1, a2, a3, g0, g1, g2, g3, M_P: tl.constexpr, GATED: tl.constexpr):
    """``_row_dot`` for each of the M_P rows: one K step of every sum."""
    a0, g0 = _row_dot(X, 0, sx, M, k0, kk, k_in, w, w2, a0, g0, GATED)
    if M_P > 1:
        a1, g1 = _row_dot(X, 1, sx, M, k0, kk, k_in, w, w2, a1, g1, GATED)
    if M_P > 2:
        a2, g2 = _row_dot(X, 2, sx, M, k0, kk, k_in, w, w2, a2, g2, GATED)
        a3, g3 = _row_dot(X, 3, sx, M, k0, kk, k_in, w, w2, a3, g3, GATED)
    return a0, a1, a2, a3, g0, g1, g2, g3


@triton.jit
def _row_out(Y, B, r, sy, M, N, n, n_in, acc, acc2, GATED: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n_in, other=0.0).to(tl.float32)
        if GATED:
            acc2 += tl.load(B + N + n, mask=n_in, other=0.0).to(tl.float32)
    out = acc.to(Y.dtype.element_ty)
    if GATED:  # silu(gate) rounded, then the product rounded (silu_mul_ref's two ops)
        g = out.to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)
        out = (s * acc2.to(Y.dtype.element_ty).to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + r * sy + n, out, mask=n_in & (n * 0 + r < M))


@triton.jit
def gemv_kernel(X, W, B, Y, N, K, sx, sw, sy, M,
                M_P: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr = False):
    """y[m, n] = Σ_k x[m, k]·w[n, k] (+ b[n]) for M ≤ M_P ≤ 4 rows: one program per BLOCK_N
    outputs, BLOCK_K of each weight row a step (16-byte loads along the row), float32 sums, the
    weight tile read once for all rows. GATED: ``W`` holds 2·N rows, gate then up; the program
    reads rows n and N + n and writes silu(gate)·up, each product rounded to the output dtype
    first, as F.linear and kernels/elementwise.py's SwiGLU chain round. PDL: launched with
    programmatic dependent launch (kernels/triton_pdl.py): the first K step's weight tile is loaded
    before the wait (no kernel writes weights), x and the rest after it."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < N
    kk = tl.arange(0, BLOCK_K)
    w_ptr = W + n[:, None].to(tl.int64) * sw + kk[None, :]  # [BLOCK_N, BLOCK_K]
    a0 = tl.zeros([BLOCK_N], tl.float32)
    a1 = tl.zeros([BLOCK_N], tl.float32)
    a2 = tl.zeros([BLOCK_N], tl.float32)
    a3 = tl.zeros([BLOCK_N], tl.float32)
    g0 = tl.zeros([BLOCK_N], tl.float32)  # the up rows' sums (GATED)
    g1 = tl.zeros([BLOCK_N], tl.float32)
    g2 = tl.zeros([BLOCK_N], tl.float32)
    g3 = tl.zeros([BLOCK_N], tl.float32)
    if PDL:  # the loop's first step, its weight tile loaded before the wait
        k_in = kk < K
        wm = n_in[:, None] & k_in[None, :]
        w = tl.load(w_ptr, mask=wm, other=0.0).to(tl.float32)
        w2 = w
        if GATED:
            w2 = tl.load(w_ptr + N * sw, mask=wm, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        a0, a1, a2, a3, g0, g1, g2, g3 = _rows_dot(X, sx, M, 0, kk, k_in, w, w2, a0, a1, a2, a3, g0, g1, g2, g3,
                                                   M_P, GATED)
    for k0 in tl.range(BLOCK_K if PDL else 0, K, BLOCK_K, num_stages=STAGES):
        k_in = (k0 + kk) < K
        wm = n_in[:, None] & k_in[None, :]
        w = tl.load(w_ptr + k0, mask=wm, other=0.0).to(tl.float32)
        w2 = w
        if GATED:
            w2 = tl.load(w_ptr + N * sw + k0, mask=wm, other=0.0).to(tl.float32)
        a0, a1, a2, a3, g0, g1, g2, g3 = _rows_dot(X, sx, M, k0, kk, k_in, w, w2, a0, a1, a2, a3, g0, g1, g2, g3,
                                                   M_P, GATED)
    _row_out(Y, B, 0, sy, M, N, n, n_in, a0, g0, GATED, HAS_BIAS)
    if M_P > 1:
        _row_out(Y, B, 1, sy, M, N, n, n_in, a1, g1, GATED, HAS_BIAS)
    if M_P > 2:
        _row_out(Y, B, 2, sy, M, N, n, n_in, a2, g2, GATED, HAS_BIAS)
        _row_out(Y, B, 3, sy, M, N, n, n_in, a3, g3, GATED, HAS_BIAS)


# Which shapes take the GEMV, and its tile, as measured on an H200 (benchmarks/gpu_profile.py
# --gemv, 2026-12-02: every projection of the four benchmark models, weights read cold from a CUDA
# graph of back-to-back launches). One row: small tiles over many programs win (2 × 1024 within
# 5% of the best of 19 tiles on 12 of 14 shapes; 1.1–3.6x faster than cuBLAS on the 2–25 MB
# matrices, which cuBLAS reads at 0.3–2.6 TB/s); rows of 8K+ take a pipelined 8 × 512 (8B's down
# projection: 26.7 µs against cuBLAS's 30.1), gated ones 4 × 512 (each program reads two rows).
# Two to four rows: cuBLAS is faster on all but the smallest shapes (this kernel's per-row
# reductions), so they keep F.linear, as do the matrices over 128 MB (cuBLAS streams the LM heads
# and 8B's gate|up at 3.9–4.1 TB/s). None: F.linear.
def gemv_config(n: int, k: int, rows: int, gated: bool = False):
    """(BLOCK_N, BLOCK_K, num_warps, stages) for a [n, k] weight and ``rows`` rows, or None."""
    if rows != 1 or n * k > MAX_ELEMENTS or k < 64:
        return None
    if gated:
        return 4, 512, 4, 1
    if k >= 8192:
        return 8, 512, 4, 3
    return 2, 1024, 4, 1


MAX_ELEMENTS = 64 * 2**20  # 128 MB in 16 bits


def triton_gemv(x, weight, bias, gated: bool, config=None) -> torch.Tensor:
    """x [..., K] (≤ 4 rows) · weight [N, K]ᵀ → [..., N], or [..., N/2] gated."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if os.environ.get("TRITON_INTERPRET") == "1" and config is None:  # values, not speed: a small tile
        config = (4, 32, 1, 1)
    block_n, block_k, warps, stages = config or gemv_config(weight.shape[0], k, m, gated)
    pdl = pdl_wanted(x.device)
    gemv_kernel[(triton.cdiv(n, block_n),)](
        rows, weight, bias if bias is not None else weight, out, n, k, rows.stride(0), weight.stride(0), n, m,
        M_P=triton.next_power_of_2(m), GATED=gated, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, PDL=pdl, launch_pdl=pdl, num_warps=warps)
    return out
