"""Weight-only int8 / int4 linear layers on CUDA: Triton kernels that read rung's packed layouts as
they are stored (rung/quant/formats.py), each beside a plain-PyTorch reference of the same signature.

Layouts (nothing is re-laid out at load; ``state_dict`` and saved checkpoints are unchanged):

- ``q8``: int8 [N, K], one float16 scale per group of ``group`` along K (``group == K``: per row).
- ``q4``: uint8 [N, K / 2], runs of 32 values in 16 bytes (byte j = value j | value j + 16 << 4,
  GGUF's block order), float16 scale and offset per group: w = scale · q + offset.
- ``act`` (a gated layer): rows hold gate and up interleaved in blocks of 8 (8 gate rows, their 8
  up rows, ...); the layer returns act(gate) · up, [M, N / 2].

Paths, by the number of activation rows M:

- 16-bit activations, M ≤ ``GEMV_M`` (a decode step): rung/kernels/triton_dp4a.py, activations
  rounded to int8 per run of 32 and four products an instruction (RUNG_DP4A=0 turns it off).
- ``gemv`` (M ≤ ``GEMV_M``, float32 activations): one program per ``BLOCK_N`` outputs streams their
  rows once, ``RUNS`` runs of 32 weights a step. Each run's 32 products are summed unscaled and
  the run's scale (and offset · Σx) applied once to the sum. The codes become floats without a
  conversion instruction: their bits go into a float32 mantissa (1 + q/16 for a nibble, 1 + u/256
  for an int8 biased by 128), and the constant part is taken out through Σx of the run.
- ``skinny`` (M ≤ ``DOT_M`` of the format, 16-bit activations): a tiled matmul that dequantizes each weight
  tile in registers and feeds ``tl.dot``; x split into each run's low and high halves for q4.
- larger M (prefill): ``dequantize`` into a scratch matrix in the activation dtype (a Triton
  kernel, at most ``SCRATCH`` elements at a time) and cuBLAS through ``F.linear``.

``quant_linear`` picks the path; ``quant_linear_ref`` (dequantize + F.linear + the gated
epilogue) is what every path is tested against (tests/triton_quant_checks.py, under the
interpreter in CI; benchmarks/gpu_quant.py on the GPU). Imported only where Triton is.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

GATE_BLOCK = 8  # rung/quant/linear.py
ACTS = {None: 0, "silu": 1, "gelu_tanh": 2, "gelu": 3, "relu": 4}
GEMV_M = 4  # rows the GEMV takes in one program (weights read once for all of them)
DOT_M = {"q8": 64, "q4": 16}  # up to here the dequantizing matmul, above it dequantize + cuBLAS (H200)
SCRATCH = 1 << 26  # elements of one dequantized chunk (128 MB in bf16) on the cuBLAS path
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---- references ---------------------------------------------------------------------------------

def dequantize_ref(fmt: str, data, scale, offset, group: int, dtype=torch.float32) -> torch.Tensor:
    """Packed → [N, K] (rung.quant.formats.dequantize, restated here: kernels import nothing of rung)."""
    n = data.shape[0]
    k = data.shape[1] * (2 if fmt == "q4" else 1)
    g = k // group
    s = scale.float().view(n, g, 1)
    if fmt == "q8":
        return (data.view(n, g, group).float() * s).view(n, k).to(dtype)
    runs = data.view(n, k // 32, 1, 16)
    q = torch.cat((runs & 0x0F, runs >> 4), dim=2).reshape(n, g, group).float()
    return (q * s + offset.float().view(n, g, 1)).view(n, k).to(dtype)


def _act_ref(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "gelu":
        return F.gelu(y)
    return F.relu(y)


def gated_ref(y: torch.Tensor, act: str) -> torch.Tensor:
    """[M, N] rows interleaved in blocks of 8 → act(gate) · up [M, N / 2]."""
    m = y.shape[0]
    y = y.view(m, -1, 2, GATE_BLOCK)
    return (_act_ref(y[:, :, 0], act) * y[:, :, 1]).reshape(m, -1)


def quant_linear_ref(x, fmt: str, data, scale, offset, group: int, bias=None, act: str | None = None):
    """x [M, K] → x @ dequantize(W)ᵀ + bias, then act(gate) · up for a gated layer (PackedLinear.reference)."""
    w = dequantize_ref(fmt, data, scale, offset, group, x.dtype)
    y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return y if act is None else gated_ref(y, act)


# ---- shared pieces --------------------------------------------------------------------------------

@triton.jit
def _activate(g, ACT: tl.constexpr):
    """float32 gate → act(gate); ACT as in ``ACTS``."""
    out = g
    if ACT == 1:
        out = g / (1.0 + tl.exp(tl.minimum(-g, 80.0)))
    elif ACT == 2:  # 0.5 g (1 + tanh(u)) = g σ(2u)
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        out = g / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))
    elif ACT == 3:
        out = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 4:
        out = tl.maximum(g, 0.0)
    return out


@triton.jit
def _rows(n, GATED: tl.constexpr):
    """Output column n → the weight row it reads (the gate row for a gated layer; up is 8 further)."""
    if GATED:
        return (n // 8) * 16 + n % 8
    return n


@triton.jit
def _run_dots(X, D, S, O, m, m_in, row, n_in, run, r_in, sxm, K, group,
              FMT: tl.constexpr, BITS: tl.constexpr):
    """One step of the GEMV for one set of weight rows: [BM, BN, RUNS] partial sums, scaled.
    x rows m [BM], weight rows row [BN], runs run [RUNS] (32 weights each)."""
    ng = K // group
    sidx = row[:, None].to(tl.int64) * ng + (run * 32 // group)[None, :]  # [BN, RUNS]
    smask = n_in[:, None] & r_in[None, :]
    s = tl.load(S + sidx, mask=smask, other=0.0).to(tl.float32)
    xm = m_in[:, None, None] & r_in[None, :, None]
    xrow = X + m[:, None, None].to(tl.int64) * sxm
    wm = n_in[:, None, None] & r_in[None, :, None]
    if FMT == 8:
        kk = run[:, None] * 32 + tl.arange(0, 32)[None, :]  # [RUNS, 32]
        x = tl.load(xrow + kk[None], mask=xm, other=0.0).to(tl.float32)  # [BM, RUNS, 32]
        q = tl.load(D + row[:, None, None].to(tl.int64) * K + kk[None], mask=wm, other=0)  # [BN, RUNS, 32] int8
        if BITS:
            # u = q + 128 in a float32 mantissa: f = 1 + u / 256, so q = 256 f - 384
            u = (q.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80) << 15
            f = (u | 0x3F800000).to(tl.float32, bitcast=True)
            d = tl.sum(f[None] * x[:, None], 3)  # [BM, BN, RUNS]
            xs = tl.sum(x, 2)  # [BM, RUNS]
            out = (256.0 * d - 384.0 * xs[:, None, :]) * s[None]
        else:
            d = tl.sum(q.to(tl.float32)[None] * x[:, None], 3)
            out = d * s[None]
    else:
        o = tl.load(O + sidx, mask=smask, other=0.0).to(tl.float32)
        j = tl.arange(0, 16)
        kk = run[:, None] * 32 + j[None, :]  # [RUNS, 16]: the low nibbles' x; the high ones are 16 further
        xlo = tl.load(xrow + kk[None], mask=xm, other=0.0).to(tl.float32)  # [BM, RUNS, 16]
        xhi = tl.load(xrow + kk[None] + 16, mask=xm, other=0.0).to(tl.float32)
        xs = tl.sum(xlo + xhi, 2)  # [BM, RUNS]
        bidx = run[:, None] * 16 + j[None, :]
        b = tl.load(D + row[:, None, None].to(tl.int64) * (K // 2) + bidx[None], mask=wm, other=0).to(tl.int32)
        if BITS:
            # a nibble q in the mantissa's top bits: f = 1 + q / 16, so q = 16 f - 16
            flo = (((b << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            fhi = (((b << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            d = tl.sum(flo[None] * xlo[:, None] + fhi[None] * xhi[:, None], 3)  # [BM, BN, RUNS]
            s16 = 16.0 * s
            out = s16[None] * d + (o - s16)[None] * xs[:, None, :]
        else:
            lo = (b & 15).to(tl.float32)
            hi = (b >> 4).to(tl.float32)
            d = tl.sum(lo[None] * xlo[:, None] + hi[None] * xhi[:, None], 3)
            out = s[None] * d + o[None] * xs[:, None, :]
    return out


@triton.jit
def _run_dots1(x_row, D, S, O, row, n_in, run, r_in, K, group, FMT: tl.constexpr, BITS: tl.constexpr):
    """``_run_dots`` for one x row (a batch-1 decode step), in three dimensions: [BN, RUNS]."""
    ng = K // group
    sidx = row[:, None].to(tl.int64) * ng + (run * 32 // group)[None, :]  # [BN, RUNS]
    smask = n_in[:, None] & r_in[None, :]
    s = tl.load(S + sidx, mask=smask, other=0.0).to(tl.float32)
    wm = n_in[:, None, None] & r_in[None, :, None]
    if FMT == 8:
        kk = run[:, None] * 32 + tl.arange(0, 32)[None, :]  # [RUNS, 32]
        x = tl.load(x_row + kk, mask=r_in[:, None], other=0.0).to(tl.float32)
        q = tl.load(D + row[:, None, None].to(tl.int64) * K + kk[None], mask=wm, other=0)  # [BN, RUNS, 32] int8
        if BITS:
            u = (q.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80) << 15
            f = (u | 0x3F800000).to(tl.float32, bitcast=True)
            d = tl.sum(f * x[None], 2)  # [BN, RUNS]
            out = (256.0 * d - 384.0 * tl.sum(x, 1)[None, :]) * s
        else:
            out = tl.sum(q.to(tl.float32) * x[None], 2) * s
    else:
        o = tl.load(O + sidx, mask=smask, other=0.0).to(tl.float32)
        j = tl.arange(0, 16)
        kk = run[:, None] * 32 + j[None, :]  # [RUNS, 16]
        xlo = tl.load(x_row + kk, mask=r_in[:, None], other=0.0).to(tl.float32)
        xhi = tl.load(x_row + kk + 16, mask=r_in[:, None], other=0.0).to(tl.float32)
        xs = tl.sum(xlo + xhi, 1)[None, :]  # [1, RUNS]
        bidx = run[:, None] * 16 + j[None, :]
        b = tl.load(D + row[:, None, None].to(tl.int64) * (K // 2) + bidx[None], mask=wm, other=0).to(tl.int32)
        if BITS:
            flo = (((b << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            fhi = (((b << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            d = tl.sum(flo * xlo[None] + fhi * xhi[None], 2)
            s16 = 16.0 * s
            out = s16 * d + (o - s16) * xs
        else:
            d = tl.sum((b & 15).to(tl.float32) * xlo[None] + (b >> 4).to(tl.float32) * xhi[None], 2)
            out = s * d + o * xs
    return out


@triton.jit
def _epilogue(acc1, acc2, B, Y, m, m_in, row, n, n_in, sym,
              GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """[BM, BN] float32 sums → + bias, act(gate) · up, stored in Y's dtype."""
    if HAS_BIAS:
        acc1 += tl.load(B + row, mask=n_in, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc2 += tl.load(B + row + 8, mask=n_in, other=0.0).to(tl.float32)[None, :]
    out = acc1
    if GATED:
        out = _activate(acc1, ACT) * acc2
    tl.store(Y + m[:, None].to(tl.int64) * sym + n[None, :], out.to(Y.dtype.element_ty),
             mask=m_in[:, None] & n_in[None, :])


# ---- decode: GEMV --------------------------------------------------------------------------------

@triton.jit
def gemv_kernel(X, D, S, O, B, Y, M, NOUT, K, group, sxm, sym,
                FMT: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RUNS: tl.constexpr,
                STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = m < M
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < NOUT
    row = _rows(n, GATED)
    ri = tl.arange(0, RUNS)
    if BLOCK_M == 1:
        x_row = X + tl.program_id(1).to(tl.int64) * sxm
        acc1 = tl.zeros([BLOCK_N, RUNS], tl.float32)
        acc2 = tl.zeros([BLOCK_N, RUNS], tl.float32)
        for r0 in tl.range(0, K // 32, RUNS, num_stages=STAGES):
            run = r0 + ri
            r_in = run < K // 32
            acc1 += _run_dots1(x_row, D, S, O, row, n_in, run, r_in, K, group, FMT, BITS)
            if GATED:
                acc2 += _run_dots1(x_row, D, S, O, row + 8, n_in, run, r_in, K, group, FMT, BITS)
        r1 = tl.sum(acc1, 1)[None, :]
        r2 = tl.sum(acc2, 1)[None, :]
    else:
        acc1 = tl.zeros([BLOCK_M, BLOCK_N, RUNS], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N, RUNS], tl.float32)
        for r0 in tl.range(0, K // 32, RUNS, num_stages=STAGES):
            run = r0 + ri
            r_in = run < K // 32
            acc1 += _run_dots(X, D, S, O, m, m_in, row, n_in, run, r_in, sxm, K, group, FMT, BITS)
            if GATED:
                acc2 += _run_dots(X, D, S, O, m, m_in, row + 8, n_in, run, r_in, sxm, K, group, FMT, BITS)
        r1 = tl.sum(acc1, 2)
        r2 = tl.sum(acc2, 2)
    _epilogue(r1, r2, B, Y, m, m_in, row, n, n_in, sym, GATED, ACT, HAS_BIAS)


@triton.jit
def _row_tile(X, D, S, O, acc, row4, n_in4, run, K, group,
              FMT: tl.constexpr, BITS: tl.constexpr, PER_ROW: tl.constexpr, T: tl.constexpr):
    """acc [BN, RUNS, H, T] += w · x over RUNS runs of the rows row4 [BN, 1, 1, 1], elementwise:
    every load (weight bytes, x, scales) has the tile's own shape, T contiguous elements a thread,
    so all share one layout and nothing moves through shared memory inside the loop (x and the
    scales are re-read per row, from L1)."""
    H: tl.constexpr = (32 if FMT == 8 else 16) // T
    h = tl.arange(0, H)
    t = tl.arange(0, T)
    m = n_in4 & (run < K // 32)[None, :, None, None]
    zero = row4 * 0
    sidx = row4 * (K // group) + (run * 32 // group)[None, :, None, None] + h[None, None, :, None] * 0
    if not PER_ROW or FMT == 4:
        s = tl.load(S + sidx, mask=m, other=0.0).to(tl.float32)
    if FMT == 8:
        kk = run[:, None, None] * 32 + h[None, :, None] * T + t[None, None, :]  # [RUNS, H, T]
        q = tl.load(D + row4 * K + kk[None], mask=m, other=0)
        x = tl.load(X + kk[None] + zero, mask=m, other=0.0).to(tl.float32)
        if BITS:  # q + 128 into a float32 mantissa: f = 1 + (q + 128) / 256 = (q + 384) / 256
            u = (q.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80) << 15
            w = (u | 0x3F800000).to(tl.float32, bitcast=True) * 256.0 - 384.0
        else:
            w = q.to(tl.float32)
        if PER_ROW:
            acc += w * x
        else:
            acc += w * s * x
    else:
        o = tl.load(O + sidx, mask=m, other=0.0).to(tl.float32)
        kk = run[:, None, None] * 16 + h[None, :, None] * T + t[None, None, :]  # bytes [RUNS, H, T]
        xk = run[:, None, None] * 32 + h[None, :, None] * T + t[None, None, :]  # their low nibbles' x; high: +16
        b = tl.load(D + row4 * (K // 2) + kk[None], mask=m, other=0).to(tl.int32)
        xlo = tl.load(X + xk[None] + zero, mask=m, other=0.0).to(tl.float32)
        xhi = tl.load(X + xk[None] + 16 + zero, mask=m, other=0.0).to(tl.float32)
        if BITS:  # a nibble into a float32 mantissa: f = 1 + q / 16, w = s q + o = 16 s f + (o - 16 s)
            s16 = 16.0 * s
            o16 = o - s16
            flo = (((b << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            fhi = (((b << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            acc += (flo * s16 + o16) * xlo + (fhi * s16 + o16) * xhi
        else:
            acc += ((b & 15).to(tl.float32) * s + o) * xlo + ((b >> 4).to(tl.float32) * s + o) * xhi
    return acc


@triton.jit
def gemv1_kernel(X, D, S, O, B, Y, NOUT, K, group, sxm, sym,
                 FMT: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BITS: tl.constexpr, PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr, RUNS: tl.constexpr,
                 T: tl.constexpr):
    """The GEMV for one x row (a batch-1 decode step): one program per BLOCK_N outputs, RUNS runs a
    step, float32 sums kept per element and reduced once after the loop (``_row_tile``)."""
    H: tl.constexpr = (32 if FMT == 8 else 16) // T
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < NOUT
    row = _rows(n, GATED)
    row4 = row[:, None, None, None].to(tl.int64)
    n_in4 = n_in[:, None, None, None]
    xr = X + tl.program_id(1).to(tl.int64) * sxm
    ri = tl.arange(0, RUNS)
    acc1 = tl.zeros([BLOCK_N, RUNS, H, T], tl.float32)
    acc2 = tl.zeros([BLOCK_N, RUNS, H, T], tl.float32)
    for r0 in range(0, K // 32, RUNS):
        run = r0 + ri
        acc1 = _row_tile(xr, D, S, O, acc1, row4, n_in4, run, K, group, FMT, BITS, PER_ROW, T)
        if GATED:
            acc2 = _row_tile(xr, D, S, O, acc2, row4 + 8, n_in4, run, K, group, FMT, BITS, PER_ROW, T)
    r1 = tl.sum(tl.sum(tl.sum(acc1, 3), 2), 1)
    r2 = tl.sum(tl.sum(tl.sum(acc2, 3), 2), 1)
    if PER_ROW and FMT == 8:
        r1 = r1 * tl.load(S + row, mask=n_in, other=0.0).to(tl.float32)
        if GATED:
            r2 = r2 * tl.load(S + row + 8, mask=n_in, other=0.0).to(tl.float32)
    m = tl.program_id(1) + tl.arange(0, 1)
    _epilogue(r1[None, :], r2[None, :], B, Y, m, m < m + 1, row, n, n_in, sym, GATED, ACT, HAS_BIAS)


# ---- small batches: dequantizing matmul ------------------------------------------------------------

@triton.jit
def _tile_dots(X, D, S, O, acc, m, m_in, row, n_in, k0, sxm, K, group,
               FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BM, BN] += x[m, k0:k0 + BLOCK_K] @ W[row, k0:k0 + BLOCK_K]ᵀ, W dequantized in registers."""
    RUNS: tl.constexpr = BLOCK_K // 32
    run = k0 // 32 + tl.arange(0, RUNS)
    r_in = run < K // 32
    ng = K // group
    sidx = row[:, None].to(tl.int64) * ng + (run * 32 // group)[None, :]  # [BN, RUNS]
    smask = n_in[:, None] & r_in[None, :]
    s = tl.load(S + sidx, mask=smask, other=0.0).to(tl.float32)[:, :, None]
    wm = n_in[:, None, None] & r_in[None, :, None]
    xrow = X + m[:, None].to(tl.int64) * sxm
    if FMT == 8:
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(xrow + kk[None, :], mask=m_in[:, None] & (kk < K)[None, :], other=0.0)  # [BM, BK]
        k3 = run[:, None] * 32 + tl.arange(0, 32)[None, :]
        q = tl.load(D + row[:, None, None].to(tl.int64) * K + k3[None], mask=wm, other=0)  # [BN, RUNS, 32]
        w = tl.reshape((q.to(tl.float32) * s).to(x.dtype), [BLOCK_N, BLOCK_K])
        acc = tl.dot(x, tl.trans(w), acc)
    else:
        o = tl.load(O + sidx, mask=smask, other=0.0).to(tl.float32)[:, :, None]
        j = tl.arange(0, 16)
        k3 = run[:, None] * 32 + j[None, :]  # [RUNS, 16]
        k2 = tl.reshape(k3, [BLOCK_K // 2])
        xm = m_in[:, None] & (k2 < K)[None, :]
        xlo = tl.load(xrow + k2[None, :], mask=xm, other=0.0)  # [BM, BK / 2]
        xhi = tl.load(xrow + k2[None, :] + 16, mask=xm, other=0.0)
        bidx = run[:, None] * 16 + j[None, :]
        b = tl.load(D + row[:, None, None].to(tl.int64) * (K // 2) + bidx[None], mask=wm, other=0).to(tl.int32)
        lo = tl.reshape(((b & 15).to(tl.float32) * s + o).to(xlo.dtype), [BLOCK_N, BLOCK_K // 2])
        hi = tl.reshape(((b >> 4).to(tl.float32) * s + o).to(xlo.dtype), [BLOCK_N, BLOCK_K // 2])
        acc = tl.dot(xlo, tl.trans(lo), acc)
        acc = tl.dot(xhi, tl.trans(hi), acc)
    return acc


@triton.jit
def skinny_kernel(X, D, S, O, B, Y, M, NOUT, K, group, sxm, sym,
                  FMT: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = m < M
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < NOUT
    row = _rows(n, GATED)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc1 = _tile_dots(X, D, S, O, acc1, m, m_in, row, n_in, k0, sxm, K, group, FMT, BLOCK_N, BLOCK_K)
        if GATED:
            acc2 = _tile_dots(X, D, S, O, acc2, m, m_in, row + 8, n_in, k0, sxm, K, group, FMT, BLOCK_N, BLOCK_K)
    _epilogue(acc1, acc2, B, Y, m, m_in, row, n, n_in, sym, GATED, ACT, HAS_BIAS)


# ---- prefill: dequantize, then cuBLAS -----------------------------------------------------------------

@triton.jit
def dequantize_kernel(D, S, O, W, N, K, group, FMT: tl.constexpr, BLOCK_N: tl.constexpr, RUNS: tl.constexpr):
    """W [N, K] = the packed rows' values, in 8-element chunks: the bytes, the scales ([.., 1, 1]
    pointers, one load a chunk) and the stores share one layout, as in ``_row_tile``."""
    T: tl.constexpr = 8
    H: tl.constexpr = (32 if FMT == 8 else 16) // T
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    run = tl.program_id(1) * RUNS + tl.arange(0, RUNS)
    h = tl.arange(0, H)
    t = tl.arange(0, T)
    row4 = n[:, None, None, None].to(tl.int64)
    m = (n < N)[:, None, None, None] & (run < K // 32)[None, :, None, None]
    sidx = row4 * (K // group) + (run * 32 // group)[None, :, None, None] + h[None, None, :, None] * 0
    s = tl.load(S + sidx, mask=m, other=0.0).to(tl.float32)
    wk = run[:, None, None] * 32 + h[None, :, None] * T + t[None, None, :]  # [RUNS, H, T]
    if FMT == 8:
        q = tl.load(D + row4 * K + wk[None], mask=m, other=0)
        tl.store(W + row4 * K + wk[None], (q.to(tl.float32) * s).to(W.dtype.element_ty), mask=m)
    else:
        o = tl.load(O + sidx, mask=m, other=0.0).to(tl.float32)
        bk = run[:, None, None] * 16 + h[None, :, None] * T + t[None, None, :]
        b = tl.load(D + row4 * (K // 2) + bk[None], mask=m, other=0).to(tl.int32)
        tl.store(W + row4 * K + wk[None], ((b & 15).to(tl.float32) * s + o).to(W.dtype.element_ty), mask=m)
        tl.store(W + row4 * K + wk[None] + 16, ((b >> 4).to(tl.float32) * s + o).to(W.dtype.element_ty), mask=m)


# ---- launchers --------------------------------------------------------------------------------------

def _shape(fmt, data):
    n = data.shape[0]
    return n, data.shape[1] * (2 if fmt == "q4" else 1)


def _out(x, n_out):
    return torch.empty(x.shape[0], n_out, dtype=x.dtype, device=x.device)


def _dummy(t, like):
    return t if t is not None else like


def gemv(x, fmt, data, scale, offset, group, bias=None, act=None, config=None, out=None):
    """M ≤ GEMV_M rows. ``config``: (BLOCK_N, RUNS, num_warps, bits[, stages]) or None (tuned / default)."""
    n, k = _shape(fmt, data)
    n_out = n // 2 if act else n
    m = x.shape[0]
    y = _out(x, n_out) if out is None else out
    bm = 1 if m == 1 else (2 if m == 2 else 4)

    def launch(cfg):
        if cfg[0] == "row":  # one x row at a time through gemv1_kernel (m programs along the grid's y)
            _, bn, runs, warps, bits = cfg
            runs = triton.next_power_of_2(min(runs, k // 32))
            gemv1_kernel[(triton.cdiv(n_out, bn), m)](
                x, data, scale, _dummy(offset, scale), _dummy(bias, scale), y, n_out, k, group, x.stride(0),
                y.stride(0), FMT=8 if fmt == "q8" else 4, GATED=act is not None, ACT=ACTS[act],
                HAS_BIAS=bias is not None, BITS=bits, PER_ROW=group == k, BLOCK_N=bn, RUNS=runs, T=8, num_warps=warps)
            return y
        bn, runs, warps, bits, stages = (*cfg, 1)[:5]
        runs = min(runs, k // 32)
        grid = (triton.cdiv(n_out, bn), triton.cdiv(m, bm))
        gemv_kernel[grid](x, data, scale, _dummy(offset, scale), _dummy(bias, scale), y, m, n_out, k, group,
                          x.stride(0), y.stride(0), FMT=8 if fmt == "q8" else 4, GATED=act is not None,
                          ACT=ACTS[act], HAS_BIAS=bias is not None, BITS=bits, BLOCK_M=bm, BLOCK_N=bn,
                          RUNS=triton.next_power_of_2(runs), STAGES=stages, num_warps=warps)
        return y

    if config is not None:
        return launch(config)
    return _tuned(("gemv", fmt, n, k, bm, act is not None, x.dtype), gemv_configs(fmt, n_out, k, m), launch)


def gemv_configs(fmt: str, n_out: int, k: int, m: int = 1) -> list[tuple]:
    """Candidates, the default first. ("row", BLOCK_N, RUNS, num_warps, bits): gemv1_kernel, one x
    row a program; (BLOCK_N, RUNS, num_warps, bits[, stages]): gemv_kernel, all rows a program. RUNS
    runs of 32 weights are 32·RUNS bytes of a q8 row, 16·RUNS of a q4 one. From the sweep of
    benchmarks/gpu_quant.py on an H200 (Qwen3-8B's layers, weights cold): ("row", 4, 32 | 64, 4)
    was the best or within 10% of it on all eight layers; wider programs (16-32 rows) and 2 KB
    steps were slower; gemv_kernel (per-run sums) matched it only on the q8 QKV and q4 gate/up."""
    if INTERPRET:
        return [("row", 8, 2, 4, True)] if m == 1 else [(8, 2, 4, True)]
    r = 32 if fmt == "q8" else 64
    if m == 1:
        return [("row", 4, r, 4, True), ("row", 8, r // 2, 4, True), ("row", 8, r, 8, True), (8, r, 4, True)]
    return [(8, r, 4, True), (16, r, 8, True), (4, 2 * r, 4, True), (8, 2 * r, 8, True)]


def skinny(x, fmt, data, scale, offset, group, bias=None, act=None, config=None, out=None):
    """16-bit x, any M (meant for GEMV_M < M ≤ DOT_M). ``config``: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, stages)."""
    n, k = _shape(fmt, data)
    n_out = n // 2 if act else n
    m = x.shape[0]
    y = _out(x, n_out) if out is None else out

    def launch(cfg):
        bm, bn, bk, warps, stages = cfg
        bk = min(bk, triton.next_power_of_2(k))
        grid = (triton.cdiv(n_out, bn), triton.cdiv(m, bm))
        skinny_kernel[grid](x, data, scale, _dummy(offset, scale), _dummy(bias, scale), y, m, n_out, k, group,
                            x.stride(0), y.stride(0), FMT=8 if fmt == "q8" else 4, GATED=act is not None,
                            ACT=ACTS[act], HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                            num_warps=warps, num_stages=stages)
        return y

    if config is not None:
        return launch(config)
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    from rung.kernels.moe_tiles import HOPPER_SMEM_BYTES, device_smem_limit

    limit = device_smem_limit(x.device.index or 0) if x.is_cuda else HOPPER_SMEM_BYTES
    configs = fitting_skinny_configs(skinny_configs(bm), fmt, x.element_size(), limit)
    return _tuned(("skinny", fmt, n, k, bm, act is not None, x.dtype), configs, launch)


def skinny_configs(bm: int) -> list[tuple]:
    if INTERPRET:
        return [(16, 16, 64, 4, 1)]
    return [(bm, 32, 128, 4, 3), (bm, 64, 128, 4, 3), (bm, 32, 256, 4, 3), (bm, 64, 256, 8, 3),
            (bm, 16, 256, 4, 4)]


def skinny_smem_bytes(cfg: tuple, fmt: str, x_bytes: int) -> int:
    """Shared memory ``skinny_kernel`` asks for with ``cfg``: the pipeliner keeps ``stages`` copies
    of the x tile and the packed weight bytes of one K step, and the dequantized weight tile goes
    through shared memory once more on its way into ``tl.dot`` (as moe_tiles.smem_bytes counts)."""
    bm, bn, bk, _, stages = cfg
    packed = bn * bk if fmt == "q8" else bn * bk // 2  # int8 bytes, or two nibbles a byte
    scales = bn * max(1, bk // 32) * 2 * (1 if fmt == "q8" else 2)  # fp16 scales (and q4's offsets), groups ≥ 32
    return stages * (bm * bk * x_bytes + packed + scales) + bn * bk * x_bytes


def fitting_skinny_configs(configs: list[tuple], fmt: str, x_bytes: int, limit: int) -> list[tuple]:
    """The configs whose shared memory fits ``limit`` (a launch past it raises OutOfResources,
    inside a CUDA-graph capture too, where nothing is tuned and the first config runs), in order;
    if none fits, the first shrunk (stages, then K step, then N) until it does."""
    fit = [c for c in configs if skinny_smem_bytes(c, fmt, x_bytes) <= limit]
    if fit:
        return fit
    bm, bn, bk, warps, stages = configs[0]
    for _ in range(16):  # bounded: every step drops a stage or halves a block, down to 16 x 16 x 32, one stage
        if skinny_smem_bytes((bm, bn, bk, warps, stages), fmt, x_bytes) <= limit:
            break
        if stages > 1:
            stages -= 1
        elif bk > 32:
            bk //= 2
        elif bn > 16:
            bn //= 2
        elif bm > 16:
            bm //= 2
    return [(bm, bn, bk, warps, stages)]


def dequantize(fmt, data, scale, offset, group, dtype=torch.bfloat16, rows: slice | None = None):
    """Packed → [N, K] in ``dtype`` (or the rows ``rows`` of it): the reference's values."""
    if rows is not None:
        data, scale = data[rows], scale[rows]
        offset = None if offset is None else offset[rows]
    n, k = _shape(fmt, data)
    w = torch.empty(n, k, dtype=dtype, device=data.device)
    bn, runs = 16, triton.next_power_of_2(min(16, k // 32))
    grid = (triton.cdiv(n, bn), triton.cdiv(k // 32, runs))
    dequantize_kernel[grid](data, scale, _dummy(offset, scale), w, n, k, group, FMT=8 if fmt == "q8" else 4,
                            BLOCK_N=bn, RUNS=runs, num_warps=8)
    return w


def dequant_linear(x, fmt, data, scale, offset, group, bias=None, act=None):
    """Dequantize (in chunks of rows of at most SCRATCH elements) and F.linear: the prefill path."""
    n, k = _shape(fmt, data)
    step = max(16, (SCRATCH // k) // 16 * 16)
    b = None if bias is None else bias.to(x.dtype)
    if n <= step:
        y = F.linear(x, dequantize(fmt, data, scale, offset, group, x.dtype), b)
        return y if act is None else gated_ref(y, act)
    out = _out(x, n // 2 if act else n)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        y = F.linear(x, dequantize(fmt, data, scale, offset, group, x.dtype, slice(r0, r1)),
                     None if b is None else b[r0:r1])
        if act is None:
            out[:, r0:r1] = y
        else:
            out[:, r0 // 2:r1 // 2] = gated_ref(y, act)
    return out


def quant_linear(x, fmt, data, scale, offset, group, bias=None, act=None):
    """x [M, K] (contiguous rows) through a packed weight: the GEMV, the dequantizing matmul or
    dequantize + cuBLAS by M (module docstring); the same function as ``quant_linear_ref``."""
    m = x.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if m <= GEMV_M:
        from rung.kernels import triton_dp4a  # imports this module: here, not at the top

        if os.environ.get("RUNG_DP4A") != "0" and triton_dp4a.usable(x, fmt, data):
            return triton_dp4a.gemv_dp4a(x, fmt, data, scale, offset, group, bias, act)
        return gemv(x, fmt, data, scale, offset, group, bias, act)
    if m <= DOT_M[fmt] and x.dtype in (torch.float16, torch.bfloat16):
        return skinny(x, fmt, data, scale, offset, group, bias, act)
    return dequant_linear(x, fmt, data, scale, offset, group, bias, act)


# ---- tuning -------------------------------------------------------------------------------------------

_TUNED: dict = {}


TUNE_ROUNDS = 3  # rounds of the configs in turn; each config's time is its best round's median


def fastest(configs: list, compile_, time_ms, rounds: int = TUNE_ROUNDS):
    """The config of least time: each is compiled (``compile_``; one that raises, a config the
    compiler refuses, is skipped), then all are timed by ``time_ms`` in ``rounds`` rounds in turn,
    each keeping its best round; the first config when none compiles."""
    usable = []
    for cfg in configs:
        try:
            compile_(cfg)
        except Exception:
            continue
        usable.append(cfg)
    if not usable:
        return configs[0]
    best = [float("inf")] * len(usable)
    for _ in range(rounds):
        for i, cfg in enumerate(usable):
            best[i] = min(best[i], time_ms(cfg))
    return usable[best.index(min(best))]


def _tuned(key, configs, launch):
    """The fastest of ``configs`` for this key, timed once on first use with the L2 cache flushed
    before each launch (a decode step reads each weight once, cold: timed warm, a layer that fits
    the 60 MB L2 picked configs twice as slow as the best cold one); the first config where there
    is nothing to time (the interpreter, a CUDA-graph capture, RUNG_QUANT_TUNE=0). The configs are
    timed in TUNE_ROUNDS rounds, in turn, not one after another: a clock or neighbour that changes
    during the tuning then touches every config, not only the ones timed while it lasted."""
    cfg = _TUNED.get(key)
    if cfg is not None:
        return launch(cfg)
    if (len(configs) == 1 or INTERPRET or os.environ.get("RUNG_QUANT_TUNE") == "0"
            or torch.cuda.is_current_stream_capturing()):
        return launch(configs[0])
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")  # 256 MB

    def cold_ms(cfg) -> float:  # the median of 5 launches, each after the flush
        times = []
        for _ in range(5):
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            launch(cfg)
            b.record()
            times.append((a, b))
        torch.cuda.synchronize()
        return sorted(a.elapsed_time(b) for a, b in times)[2]

    best = fastest(configs, launch, cold_ms)
    del flush
    _TUNED[key] = best
    return launch(best)
