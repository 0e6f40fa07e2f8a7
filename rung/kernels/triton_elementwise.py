"""Triton kernels of kernels/elementwise.py (imported only where Triton is)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rung.kernels import triton_dp4a
from rung.kernels.triton_dp4a import round_runs
from rung.kernels.triton_pdl import pdl_wait, pdl_wanted


@triton.jit
def _write_runs(out, XQ, STEP, XSUM, row, n_cols, BLOCK: tl.constexpr):
    """The row's int8 rounding per run of 32 (triton_dp4a's ``round_runs``, of the values as stored:
    ``out`` is already in the model dtype) into XQ [M, n_cols], STEP and XSUM [M, n_cols / 32]."""
    runs = tl.arange(0, BLOCK // 32)
    r_in = runs < n_cols // 32
    k = runs[:, None] * 32 + tl.arange(0, 32)[None, :]
    q, step, xsum = round_runs(tl.reshape(out.to(tl.float32), (BLOCK // 32, 32)))
    tl.store(XQ + row * n_cols + k, q, mask=r_in[:, None])
    tl.store(STEP + row * (n_cols // 32) + runs, step, mask=r_in)
    tl.store(XSUM + row * (n_cols // 32) + runs, xsum, mask=r_in)


@triton.jit
def rms_norm_kernel(X, W, Y, n_cols, sx, sy, eps, offset, XQ, STEP, XSUM, W_F32: tl.constexpr,
                    BLOCK: tl.constexpr, RUNS_OUT: tl.constexpr = False, PDL: tl.constexpr = False):
    """RUNS_OUT: the output's int8 rounding too (``_write_runs``), for the dp4a GEMV that reads it.
    PDL: launched with programmatic dependent launch (kernels/triton_pdl.py); it waits first thing
    (the gain, W = offset + w may be computed by the kernel just before)."""
    pdl_wait(PDL)
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
    if RUNS_OUT:
        _write_runs(out, XQ, STEP, XSUM, row, n_cols, BLOCK)


@triton.jit
def add_rms_norm_kernel(X, R, W, S, Y, n_cols, sx, sr, eps, offset, XQ, STEP, XSUM, W_F32: tl.constexpr,
                        BLOCK: tl.constexpr, RUNS_OUT: tl.constexpr = False, PDL: tl.constexpr = False):
    """s = x + r (rounded to the dtype, as PyTorch's add), then rms_norm_kernel's row of s: both
    written (and with RUNS_OUT the norm's rounding, as rms_norm_kernel's)."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < n_cols
    xin = tl.load(X + row * sx + c, mask=m, other=0.0)
    s = (xin.to(tl.float32) + tl.load(R + row * sr + c, mask=m, other=0.0).to(tl.float32)).to(xin.dtype)
    tl.store(S + row * n_cols + c, s, mask=m)
    x = s.to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(W + c, mask=m, other=0.0)
    if W_F32:
        out = (y * (offset + w.to(tl.float32))).to(xin.dtype)
    else:
        out = (y.to(xin.dtype).to(tl.float32) * w.to(tl.float32)).to(xin.dtype)
    tl.store(Y + row * n_cols + c, out, mask=m)
    if RUNS_OUT:
        _write_runs(out, XQ, STEP, XSUM, row, n_cols, BLOCK)


def _runs_out(out: torch.Tensor, runs: bool):
    """The three tensors a norm writes its output's rounding into when ``runs`` asks for it and the
    dp4a GEMV would take these rows (triton_dp4a.fuse_wanted), else None (and the slot emptied)."""
    return triton_dp4a.rounding_buffers(out.view(-1, out.shape[-1])) if runs else None


def _record(out, runs_out) -> None:
    if runs_out is not None:
        triton_dp4a.record(out, *runs_out)


def triton_add_rms_norm(x, residual, weight, eps, offset, weight_in_float32, runs: bool = False):
    """``runs``: the norm's int8 rounding too, handed to the dp4a GEMV that reads it (triton_dp4a)."""
    d = x.shape[-1]
    rows, res = x.reshape(-1, d), residual.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if res.stride(-1) != 1:
        res = res.contiguous()
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    w = weight if weight_in_float32 or not offset else (offset + weight)
    block = triton.next_power_of_2(d)
    runs_out = _runs_out(out, runs)
    pdl = pdl_wanted(x.device)
    add_rms_norm_kernel[(rows.shape[0],)](rows, res, w, total, out, d, rows.stride(0), res.stride(0), float(eps),
                                          float(offset), *(runs_out or (out, out, out)), W_F32=weight_in_float32,
                                          BLOCK=block, RUNS_OUT=runs_out is not None, PDL=pdl, launch_pdl=pdl,
                                          num_warps=max(1, min(16, block // 256)))
    _record(out, runs_out)
    return total, out


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


def triton_rms_norm(x, weight, eps, offset, weight_in_float32, runs: bool = False):
    """``runs``: the norm's int8 rounding too, handed to the dp4a GEMV that reads it (triton_dp4a)."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    w = weight if weight_in_float32 or not offset else (offset + weight)
    block = triton.next_power_of_2(d)
    runs_out = _runs_out(out, runs)
    pdl = pdl_wanted(x.device)
    rms_norm_kernel[(rows.shape[0],)](rows, w, out, d, rows.stride(0), d, float(eps), float(offset),
                                      *(runs_out or (out, out, out)), W_F32=weight_in_float32, BLOCK=block,
                                      RUNS_OUT=runs_out is not None, PDL=pdl, launch_pdl=pdl,
                                      num_warps=max(1, min(16, block // 256)))
    _record(out, runs_out)
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


@triton.jit
def qk_norm_rope_kernel(QKV, QW, KW, C, S, Q_OUT, K_OUT, T, HQ, HKV, sqkv, sc_b, sc_t, ss_b, ss_t, eps,
                        KP, VP, Slots, skp_s, skp_h, svp_s, svp_h,
                        D: tl.constexpr, ROT: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr,
                        W_F32: tl.constexpr, ROPE: tl.constexpr, TO_POOL: tl.constexpr = False,
                        PDL: tl.constexpr = False):
    """One head of one token: the per-head RMSNorm, then RoPE, read from the fused q|k|v row and
    written to a contiguous q or k. The rotation's partner half is read a second time from memory
    (registers cannot be permuted), normalised with the same statistic. TO_POOL: a key head's
    program writes its key, and the token's value head of the same index, straight into the paged
    pools at the token's slot (kernels/paged_attention.py's write_kv, one launch less). PDL: as
    rms_norm_kernel's."""
    pdl_wait(PDL)
    tok = tl.program_id(0)
    h = tl.program_id(1)  # 0..HQ-1: a query head; HQ..HQ+HKV-1: a key head
    b = tok // T
    t = tok % T
    c = tl.arange(0, BLOCK)
    m = c < D
    row = QKV + tok.to(tl.int64) * sqkv + h * D
    xin = tl.load(row + c, mask=m, other=0.0)
    partner = tl.where(c < ROT // 2, c + ROT // 2, c - ROT // 2)
    rot = c < ROT
    xp = tl.load(row + partner, mask=m & rot, other=0.0)
    is_q = h < HQ
    if NORM:
        x32 = xin.to(tl.float32)
        inv = tl.rsqrt(tl.sum(x32 * x32, 0) / D + eps)
        w = tl.where(is_q, tl.load(QW + c, mask=m, other=0.0), tl.load(KW + c, mask=m, other=0.0))
        wp = tl.where(is_q, tl.load(QW + partner, mask=m & rot, other=0.0), tl.load(KW + partner, mask=m & rot, other=0.0))
        if W_F32:
            x = (x32 * inv * w.to(tl.float32)).to(xin.dtype)
            xr = (xp.to(tl.float32) * inv * wp.to(tl.float32)).to(xin.dtype)
        else:
            x = ((x32 * inv).to(xin.dtype).to(tl.float32) * w.to(tl.float32)).to(xin.dtype)
            xr = ((xp.to(tl.float32) * inv).to(xin.dtype).to(tl.float32) * wp.to(tl.float32)).to(xin.dtype)
    else:
        x = xin
        xr = xp
    if ROPE:
        cs = tl.load(C + b.to(tl.int64) * sc_b + t.to(tl.int64) * sc_t + c, mask=rot, other=0.0)
        sn = tl.load(S + b.to(tl.int64) * ss_b + t.to(tl.int64) * ss_t + c, mask=rot, other=0.0)
        a = (x.to(tl.float32) * cs.to(tl.float32)).to(xin.dtype).to(tl.float32)
        r = (xr.to(tl.float32) * sn.to(tl.float32)).to(xin.dtype).to(tl.float32)
        out = tl.where(rot, (a + r).to(xin.dtype), x)
    else:
        out = x
    if is_q:
        tl.store(Q_OUT + (tok.to(tl.int64) * HQ + h) * D + c, out, mask=m)
    elif TO_POOL:
        slot = tl.load(Slots + tok).to(tl.int64)
        kh = h - HQ
        tl.store(KP + slot * skp_s + kh * skp_h + c, out, mask=m)
        val = tl.load(row + HKV * D + c, mask=m, other=0.0)  # v head kh sits HKV heads after key head kh
        tl.store(VP + slot * svp_s + kh * svp_h + c, val, mask=m)
    else:
        tl.store(K_OUT + (tok.to(tl.int64) * HKV + (h - HQ)) * D + c, out, mask=m)


def triton_qk_norm_rope(qkv, hq, hkv, d, q_weight, k_weight, eps, weight_in_float32, cos, signed_sin, kv_dest=None):
    """qkv [b, t, (hq + 2·hkv)·d] → q [b, t, hq, d], k [b, t, hkv, d] (new, contiguous); with
    ``kv_dest`` (k_pool, v_pool, slots [b·t]) k and v go into the pools instead and k is None."""
    b, t, _ = qkv.shape
    rows = qkv.reshape(b * t, -1)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q = torch.empty(b, t, hq, d, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(b, t, hkv, d, dtype=qkv.dtype, device=qkv.device) if kv_dest is None else None
    if kv_dest is None:
        kp = vp = slots = q
        pool_strides = (0, 0, 0, 0)
    else:
        kp, vp, slots = kv_dest
        pool_strides = kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1)
    rope = cos is not None
    if rope:
        rot = cos.shape[-1]
        cos, signed_sin = cos.expand(b, t, rot), signed_sin.expand(b, t, rot)
        if cos.stride(-1) != 1 or signed_sin.stride(-1) != 1:
            cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
        strides = cos.stride(0), cos.stride(1), signed_sin.stride(0), signed_sin.stride(1)
    else:
        rot, cos, signed_sin, strides = 0, qkv, qkv, (0, 0, 0, 0)
    norm = q_weight is not None
    qkv_kernel_w = (q_weight, k_weight) if norm else (qkv, qkv)
    pdl = pdl_wanted(qkv.device)
    qk_norm_rope_kernel[(b * t, hq + hkv)](rows, *qkv_kernel_w, cos, signed_sin, q, q if k is None else k, t, hq, hkv,
                                           rows.stride(0), *strides, float(eps), kp, vp, slots, *pool_strides,
                                           D=d, ROT=rot, BLOCK=triton.next_power_of_2(d), NORM=norm,
                                           W_F32=weight_in_float32, ROPE=rope, TO_POOL=kv_dest is not None,
                                           PDL=pdl, launch_pdl=pdl, num_warps=1)
    return q, k


@triton.jit
def silu_mul_kernel(Y, O, n_cols, sy, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """[gate | up] rows → silu(gate) · up, rounding where PyTorch's two ops do (silu, then the product)."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < n_cols
    g = tl.load(Y + row * sy + c, mask=m, other=0.0)
    u = tl.load(Y + row * sy + n_cols + c, mask=m, other=0.0)
    g32 = g.to(tl.float32)
    s = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
    tl.store(O + row * n_cols + c, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


def triton_silu_mul(y):
    """y [..., 2·I] → [..., I]."""
    width = y.shape[-1] // 2
    rows = y.reshape(-1, 2 * width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(*y.shape[:-1], width, dtype=y.dtype, device=y.device)
    pdl = pdl_wanted(y.device)
    silu_mul_kernel[(rows.shape[0], triton.cdiv(width, 1024))](rows, out, width, rows.stride(0), BLOCK=1024,
                                                               PDL=pdl, launch_pdl=pdl, num_warps=4)
    return out
