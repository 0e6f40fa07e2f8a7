"""fp8 (e4m3) weight-only linear layers on CUDA, beside their PyTorch reference.

Layout (rung/quant/formats.py ``f8``): float8_e4m3fn [N, K], one float32 scale per output row,
w = scale · q. A gated layer's rows hold gate and up interleaved in blocks of 8, as q8 / q4.

Two paths, by the number of activation rows M:

- ``gemv`` (M ≤ ``GEMV_M``, a decode step): one program per ``BLOCK_N`` outputs and x row streams
  the rows' bytes once. A byte becomes a float without a conversion table: its 7 low bits shifted
  into a float16's exponent and mantissa are e4m3's value / 256 (the two formats share the
  mantissa's top bits; e4m3's bias is 7, float16's 15, so 2^-8 apart, subnormals included), and
  the 256 goes into the row's scale, applied once after the loop. Works on any GPU (no fp8 unit
  needed) and under the interpreter; on sm89+ the hardware's pairwise conversion does it in fewer
  instructions (``hardware_cvt``).
- larger M (prefill, batched steps): ``torch._scaled_mm`` on Hopper / Ada (the tensor cores' fp8
  path): x quantized per row to e4m3 (scale max|x| / 448), the weight's bytes and scales as they
  are, bf16 out. Elsewhere, or for shapes it refuses: dequantize + ``F.linear``.

``fp8_linear_ref`` (dequantize + F.linear + the gated epilogue) is what the GEMV is tested
against; ``scaled_mm_ref`` restates ``_scaled_mm``'s function (x rounded to e4m3 per row first).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rung.kernels.triton_pdl import pdl_wait, pdl_wanted
from rung.kernels.triton_quant import ACTS, INTERPRET, _epilogue, _rows, _tuned, gated_ref

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
GEMV_M = 4


# ---- references ---------------------------------------------------------------------------------

def fp8_dequantize_ref(data: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """float8_e4m3fn [N, K], float32 scale [N, 1] → [N, K] (rung.quant.formats.dequantize, restated)."""
    return (data.float() * scale.float()).to(dtype)


def fp8_linear_ref(x, data, scale, bias=None, act: str | None = None):
    """x [M, K] → x @ dequantize(W)ᵀ + bias, then act(gate) · up for a gated layer."""
    y = F.linear(x, fp8_dequantize_ref(data, scale, x.dtype), None if bias is None else bias.to(x.dtype))
    return y if act is None else gated_ref(y, act)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → (e4m3 [M, K], float32 scale [M, 1]): per row, max|x| onto 448."""
    s = (x.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (x.float() / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8), s


def scaled_mm_ref(x, data, scale, bias=None, act: str | None = None):
    """``scaled_linear``'s function in plain PyTorch: x rounded to e4m3 per row, then the reference."""
    xq, sx = quantize_rows_fp8(x)
    return fp8_linear_ref((xq.float() * sx).to(x.dtype), data, scale, bias, act)


# ---- decode: GEMV --------------------------------------------------------------------------------

@triton.jit
def _e4m3_over_256(b):
    """uint8 codes (int32) → their e4m3 values / 256, float32: the bits moved into a float16."""
    h = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
    return h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _fp8_codes(D, row, n_in, k0, K, BLOCK_K: tl.constexpr):
    """The codes of rows ``row`` [BN] over one K step: [BN, BLOCK_K] uint8."""
    kk = k0 + tl.arange(0, BLOCK_K)
    return tl.load(D + row[:, None].to(tl.int64) * K + kk[None, :], mask=n_in[:, None] & (kk < K)[None, :], other=0)


@triton.jit
def _fp8_row_dots(xr, b, acc, k0, K, BLOCK_K: tl.constexpr, CVT: tl.constexpr):
    """acc + the codes ``b`` (``_fp8_codes``) times x over one K step, elementwise."""
    kk = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(xr + kk, mask=kk < K, other=0.0).to(tl.float32)
    if CVT:  # the codes as float8e4nv: the hardware's pairwise e4m3 → float16 conversion (sm89+)
        return acc + b.to(tl.float8e4nv, bitcast=True).to(tl.float32) * x[None, :]
    return acc + _e4m3_over_256(b.to(tl.int32)) * x[None, :]


@triton.jit
def fp8_gemv_kernel(X, D, S, B, Y, NOUT, K, sxm, sym, EIDS, rows_e, x_div,
                    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CVT: tl.constexpr, EXPERTS: tl.constexpr,
                    PDL: tl.constexpr = False):
    """One output row (program_id 1) against BLOCK_N weight rows: products summed per element over
    the K loop, reduced once, scaled by the row's scale · 256. EXPERTS: D and S are stacks of
    ``rows_e``-row matrices; output row r reads expert EIDS[r] and x row r // x_div. PDL: launched
    with programmatic dependent launch (kernels/triton_pdl.py): the first K step's codes are
    loaded before the wait (no kernel writes weights; an expert's are chosen by data, so EXPERTS
    waits first), x and everything after it."""
    EARLY_W: tl.constexpr = PDL and not EXPERTS
    if not EARLY_W:
        pdl_wait(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < NOUT
    row = _rows(n, GATED)
    m = tl.program_id(1).to(tl.int64)
    if EXPERTS:
        e = tl.load(EIDS + m).to(tl.int64)
        D += e * rows_e * K
        S += e * rows_e
        m = m // x_div
    xr = X + m * sxm
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if EARLY_W:  # the loop's first step, its codes loaded before the wait
        b1 = _fp8_codes(D, row, n_in, 0, K, BLOCK_K)
        b2 = b1
        if GATED:
            b2 = _fp8_codes(D, row + 8, n_in, 0, K, BLOCK_K)
        pdl_wait(PDL)
        acc1 = _fp8_row_dots(xr, b1, acc1, 0, K, BLOCK_K, CVT)
        if GATED:
            acc2 = _fp8_row_dots(xr, b2, acc2, 0, K, BLOCK_K, CVT)
    for k0 in range(BLOCK_K if EARLY_W else 0, K, BLOCK_K):
        acc1 = _fp8_row_dots(xr, _fp8_codes(D, row, n_in, k0, K, BLOCK_K), acc1, k0, K, BLOCK_K, CVT)
        if GATED:
            acc2 = _fp8_row_dots(xr, _fp8_codes(D, row + 8, n_in, k0, K, BLOCK_K), acc2, k0, K, BLOCK_K, CVT)
    unit: tl.constexpr = 1.0 if CVT else 256.0
    r1 = tl.sum(acc1, 1) * (tl.load(S + row, mask=n_in, other=0.0) * unit)
    r2 = tl.sum(acc2, 1)
    if GATED:
        r2 = r2 * (tl.load(S + row + 8, mask=n_in, other=0.0) * unit)
    mm = tl.program_id(1) + tl.arange(0, 1)
    _epilogue(r1[None, :], r2[None, :], B, Y, mm, mm < mm + 1, row, n, n_in, sym, GATED, ACT, HAS_BIAS)


def gemv_configs(n_out: int, k: int) -> list[tuple[int, int, int]]:
    """(BLOCK_N, BLOCK_K, num_warps) candidates, the default first (timed once per shape, cold L2)."""
    if INTERPRET:
        return [(8, 64, 4)]
    bk = min(1024, triton.next_power_of_2(k))
    return [(4, min(512, bk), 4), (8, min(256, bk), 4), (4, bk, 8), (16, min(256, bk), 8), (2, bk, 4),
            (8, min(512, bk), 8)]


def gemv(x, data, scale, bias=None, act=None, config=None, experts: torch.Tensor | None = None, x_div: int = 1):
    """x [M ≤ GEMV_M, K] rows through an f8 weight [N, K]; [M, N] (or [M, N / 2] gated). With
    ``experts`` (int32 [R]): data / scale are stacks [E, N, ...], output row r is x[r // x_div]
    through expert experts[r]."""
    n, k = data.shape[-2:]
    n_out = n // 2 if act else n
    m = x.shape[0] if experts is None else experts.numel()
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    cvt = hardware_cvt(x)
    codes = data.view(torch.uint8)
    scale = scale.reshape(-1) if experts is None else scale
    pdl = pdl_wanted(x.device)

    def launch(cfg):
        bn, bk, warps = cfg
        fp8_gemv_kernel[(triton.cdiv(n_out, bn), m)](
            x, codes, scale, bias if bias is not None else scale, y, n_out, k, x.stride(0), y.stride(0),
            scale if experts is None else experts, n, x_div,
            GATED=act is not None, ACT=ACTS[act], HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk, CVT=cvt,
            EXPERTS=experts is not None, PDL=pdl, launch_pdl=pdl, num_warps=warps)
        return y

    if config is not None:
        return launch(config)
    key = ("fp8-gemv", n, k, m if experts is None else -1, act is not None, x.dtype, cvt)
    return _tuned(key, gemv_configs(n_out, k), launch)


def hardware_cvt(x: torch.Tensor) -> bool:
    """Whether the GEMV converts codes with the GPU's e4m3 → float16 instruction (compute capability
    ≥ 8.9; RUNG_FP8_CVT=0 turns it off) rather than moving their bits into a float16 (anywhere,
    the interpreter included: both give the same values)."""
    if INTERPRET or not x.is_cuda or os.environ.get("RUNG_FP8_CVT") == "0":
        return False
    return _capability(x.device.index or 0) >= (8, 9)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    """A device's compute capability, asked once (this runs on every eager decode GEMV call)."""
    return torch.cuda.get_device_capability(index)


# ---- a whole stack dequantized (a MoE layer's experts before the fused bf16 kernels) ----------------

@triton.jit
def fp8_dequantize_kernel(D, S, W, K, BLOCK_K: tl.constexpr):
    """One program per (row, BLOCK_K codes): w = code · scale, the codes through the bit decode
    (exact: code / 256 · scale · 256 is code · scale rounded once, as the reference rounds it; the
    NaN codes, which rung's quantizer never writes, decode as finite values)."""
    n = tl.program_id(0).to(tl.int64)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = kk < K
    b = tl.load(D + n * K + kk, mask=m, other=0).to(tl.int32)
    s = tl.load(S + n).to(tl.float32) * 256.0
    w = _e4m3_over_256(b) * s
    if W.dtype.element_ty == tl.bfloat16:  # rounded to nearest even by hand: the interpreter's cast truncates
        u = w.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        tl.store(W + n * K + kk, u.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=m)
    else:
        tl.store(W + n * K + kk, w.to(W.dtype.element_ty), mask=m)


def fp8_dequantize(data: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """``fp8_dequantize_ref`` in one pass: a byte read and a ``dtype`` written per weight (the
    reference makes a float32 copy first: 854 → 321 ms of Qwen3-30B-A3B fp8's 2K prefill went
    there)."""
    n, k = data.shape
    out = torch.empty(n, k, dtype=dtype, device=data.device)
    block = 1024
    fp8_dequantize_kernel[(n, triton.cdiv(k, block))](data.contiguous().view(torch.uint8), scale.contiguous(), out, k,
                                                      BLOCK_K=block, num_warps=4)
    return out


# ---- prefill and batches: torch._scaled_mm --------------------------------------------------------

_SCALED_MM_OK: dict = {}  # device index → whether _scaled_mm with per-row scales ran there


def scaled_mm_available(x: torch.Tensor, n: int, k: int) -> bool:
    """Hopper / Ada (compute capability ≥ 8.9) and the shapes _scaled_mm takes (multiples of 16)."""
    if not x.is_cuda or n % 16 or k % 16:
        return False
    idx = x.device.index or 0
    if idx not in _SCALED_MM_OK:
        _SCALED_MM_OK[idx] = torch.cuda.get_device_capability(idx) >= (8, 9) and hasattr(torch, "_scaled_mm")
    return _SCALED_MM_OK[idx]


def scaled_linear(x, data, scale, bias=None, act=None):
    """x [M, K] → ``scaled_mm_ref``'s function through the tensor cores' fp8 path."""
    xq, sx = quantize_rows_fp8(x)
    y = torch._scaled_mm(xq, data.t(), scale_a=sx, scale_b=scale.reshape(1, -1), out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = y.to(x.dtype)
    return y if act is None else gated_ref(y, act)


def fp8_linear(x, data, scale, bias=None, act=None):
    """x [M, K] through an f8 weight: the GEMV for decode rows, _scaled_mm for more (where it runs),
    else the reference."""
    m = x.shape[0]
    if x.stride(-1) != 1 or (m > 1 and x.stride(0) != x.shape[1]):
        x = x.contiguous()
    if m <= GEMV_M:
        return gemv(x, data, scale, bias, act)
    n, k = data.shape
    if scaled_mm_available(x, n, k):
        try:
            return scaled_linear(x, data, scale, bias, act)
        except RuntimeError:  # a torch build or shape _scaled_mm refuses: remember, use the reference
            _SCALED_MM_OK[x.device.index or 0] = False
    return fp8_linear_ref(x, data, scale, bias, act)
