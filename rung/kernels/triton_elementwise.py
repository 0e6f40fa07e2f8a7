"""Triton kernels of kernels/elementwise.py (imported only where Triton is)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(X, W, Y, n_cols, sx, sy, eps, offset, W_F32: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < n_cols
    xin = tl.load(X + row * sx + c, mask=m, other=0.0)
    x = xin.to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(W + c, mask=m, other=0.0)
    if W_F32:  # gain in float32, one rounding at the end (gpt-oss, Gemma)
        out = (y * (offset + w.to(tl.float32))).to(xin.dtype)
    else:  # Llama / Qwen: round, then the gain in the model dtype (w already holds offset + w)
        out = (y.to(xin.dtype).to(tl.float32) * w.to(tl.float32)).to(xin.dtype)
    tl.store(Y + row * sy + c, out, mask=m)


@triton.jit
def rotary_kernel(X, C, S, Y, H, T, sxb, sxh, sxt, scb, sct, ssb, sst,
                  D: tl.constexpr, ROT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = pid % T
    h = (pid // T) % H
    b = pid // (T * H)
    c = tl.arange(0, BLOCK)
    m = c < D
    rot = c < ROT
    base = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + t.to(tl.int64) * sxt
    x = tl.load(base + c, mask=m, other=0.0)
    partner = tl.where(c < ROT // 2, c + ROT // 2, c - ROT // 2)  # roll by rot/2
    xr = tl.load(base + partner, mask=m & rot, other=0.0)
    cs = tl.load(C + b.to(tl.int64) * scb + t.to(tl.int64) * sct + c, mask=rot, other=0.0)
    sn = tl.load(S + b.to(tl.int64) * ssb + t.to(tl.int64) * sst + c, mask=rot, other=0.0)
    # x·cos and roll(x)·sin each rounded, then their sum: PyTorch's three ops
    a = (x.to(tl.float32) * cs.to(tl.float32)).to(x.dtype).to(tl.float32)
    r = (xr.to(tl.float32) * sn.to(tl.float32)).to(x.dtype).to(tl.float32)
    out = tl.where(rot, (a + r).to(x.dtype), x)
    yrow = ((b * H + h) * T + t).to(tl.int64) * D
    tl.store(Y + yrow + c, out, mask=m)


def triton_rms_norm(x, weight, eps, offset, weight_in_float32):
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    w = weight if weight_in_float32 or not offset else (offset + weight)
    block = triton.next_power_of_2(d)
    rms_norm_kernel[(rows.shape[0],)](rows, w, out, d, rows.stride(0), d, float(eps), float(offset),
                                      W_F32=weight_in_float32, BLOCK=block, num_warps=max(1, min(16, block // 256)))
    return out


def triton_rotary(x, cos, signed_sin):
    b, h, t, d = x.shape
    rot = cos.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos.expand(b, 1, t, rot)
    signed_sin = signed_sin.expand(b, 1, t, rot)
    if cos.stride(-1) != 1 or signed_sin.stride(-1) != 1:
        cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
    out = torch.empty(b, h, t, d, dtype=x.dtype, device=x.device)
    rotary_kernel[(b * h * t,)](x, cos, signed_sin, out, h, t, x.stride(0), x.stride(1), x.stride(2),
                                cos.stride(0), cos.stride(2), signed_sin.stride(0), signed_sin.stride(2),
                                D=d, ROT=rot, BLOCK=triton.next_power_of_2(d), num_warps=1)
    return out
