"""One kernel each for RMSNorm and RoPE in bf16/fp16, rounding exactly where PyTorch's op chain does.

A decode step is a few dozen tiny kernels per layer; launched back to back from a CUDA graph each
still costs a few microseconds, so the model's eight-kernel bf16 RMSNorm (cast, square, mean,
add, rsqrt, multiply, cast back, gain) and four-kernel RoPE (roll, two multiplies, add) per
tensor dominate a small model's step. These kernels compute the same values in one pass: the
statistics in float32, then a rounding to the model dtype at each point where the PyTorch chain
rounds (model/norm.py and model/rope.py). Measured on an H200: RMSNorm bit-equal to the chain,
RoPE within one bf16 rounding on a quarter of the elements (the compiler may contract the
multiply-add). ``rms_norm_ref`` / ``rotary_ref`` are those chains.
"""

from __future__ import annotations

import torch

from rung.kernels import use_triton


def rms_norm_ref(x, weight, eps: float, offset: float, weight_in_float32: bool) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight_in_float32:
        return (x32 * (offset + weight.float())).to(x.dtype)
    return (offset + weight) * x32.to(x.dtype)


def rotary_ref(x, cos, signed_sin) -> torch.Tensor:
    rot = cos.shape[-1]
    xr, rest = x[..., :rot], x[..., rot:]
    out = xr * cos + xr.roll(rot // 2, dims=-1) * signed_sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def rms_norm(x, weight, eps: float, offset: float = 0.0, weight_in_float32: bool = False,
             runs: bool = False) -> torch.Tensor:
    """RMSNorm over the last axis: the kernel on CUDA for 16-bit inputs, the reference elsewhere.
    ``runs``: a dp4a GEMV may read the output (a packed model's block norm), so the kernel also
    writes its int8 rounding for it where that GEMV would take the rows (kernels/triton_dp4a.py)."""
    if x.dtype == torch.float32 or not use_triton(x):
        return rms_norm_ref(x, weight, eps, offset, weight_in_float32)
    from rung.kernels.triton_elementwise import triton_rms_norm

    return triton_rms_norm(x, weight, eps, offset, weight_in_float32, runs)


def add_rms_norm_ref(x, residual, weight, eps: float, offset: float, weight_in_float32: bool):
    """(x + residual, RMSNorm(x + residual)): a block's residual add and the next norm (model/norm.py's add_norm)."""
    s = x + residual
    return s, rms_norm_ref(s, weight, eps, offset, weight_in_float32)


def add_rms_norm(x, residual, weight, eps: float, offset: float = 0.0, weight_in_float32: bool = False,
                 runs: bool = False):
    """One kernel for the add and the norm (two launches, and the sum written and read back, in
    PyTorch) on CUDA in 16 bits: the sum rounded to the dtype, as the add rounds, then the norm of
    that; the reference elsewhere. ``runs``: as ``rms_norm``'s."""
    if x.dtype == torch.float32 or not use_triton(x) or residual.shape != x.shape or residual.dtype != x.dtype:
        return add_rms_norm_ref(x, residual, weight, eps, offset, weight_in_float32)
    from rung.kernels.triton_elementwise import triton_add_rms_norm

    return triton_add_rms_norm(x, residual, weight, eps, offset, weight_in_float32, runs)


def rotary(x, cos, signed_sin) -> torch.Tensor:
    """x [b, h, t, d], tables [b, 1, t, rot] → x rotated on its first rot dims (model/rope.py)."""
    if x.dtype == torch.float32 or not use_triton(x) or cos.dtype != x.dtype:
        return rotary_ref(x, cos, signed_sin)
    from rung.kernels.triton_elementwise import triton_rotary

    return triton_rotary(x, cos, signed_sin)


def qk_norm_rope_ref(qkv, hq: int, hkv: int, d: int, q_norm, k_norm, cos, signed_sin, kv_dest=None):
    """The model's chain (model/attention.py) for a fused q|k|v row: split, per-head RMSNorm
    (``q_norm``/``k_norm``: (weight, eps, offset, weight_in_float32) or None), RoPE (``cos`` None:
    none) → q [b, t, hq, d], k [b, t, hkv, d]. With ``kv_dest`` (k_pool, v_pool, slots [b·t]):
    k and the row's v are written into the pools at the slots (paged_attention.write_kv_ref), and
    k comes back None."""
    b, t, _ = qkv.shape
    q = qkv[..., : hq * d].reshape(b, t, hq, d).transpose(1, 2)
    k = qkv[..., hq * d: (hq + hkv) * d].reshape(b, t, hkv, d).transpose(1, 2)
    if q_norm is not None:
        q, k = rms_norm_ref(q, *q_norm), rms_norm_ref(k, *k_norm)
    if cos is not None:
        q, k = rotary_ref(q, cos[:, None], signed_sin[:, None]), rotary_ref(k, cos[:, None], signed_sin[:, None])
    if kv_dest is not None:
        k_pool, v_pool, slots = kv_dest
        v = qkv[..., (hq + hkv) * d:].reshape(b * t, hkv, d)
        k_pool[slots] = k.transpose(1, 2).reshape(b * t, hkv, d)
        v_pool[slots] = v
        return q.transpose(1, 2), None
    return q.transpose(1, 2), k.transpose(1, 2)


def qk_norm_rope(qkv, hq: int, hkv: int, d: int, q_norm, k_norm, cos, signed_sin, kv_dest=None):
    """One kernel for what is four to six in a decode step (two norms, two rotations and the
    copies between them), and with ``kv_dest`` the key/value write too; the reference elsewhere.
    Arguments as ``qk_norm_rope_ref``."""
    if qkv.dtype == torch.float32 or not use_triton(qkv):
        return qk_norm_rope_ref(qkv, hq, hkv, d, q_norm, k_norm, cos, signed_sin, kv_dest)
    from rung.kernels.triton_elementwise import triton_qk_norm_rope

    if q_norm is None:
        qw = kw = None
        eps, in_f32 = 0.0, False
    else:
        (qw, eps, offset, in_f32), (kw, _, _, _) = q_norm, k_norm
        if offset and not in_f32:  # the kernel takes the gain as the chain applies it (offset + w)
            qw, kw = offset + qw, offset + kw
        elif offset:
            qw, kw = qw.float() + offset, kw.float() + offset
    return triton_qk_norm_rope(qkv, hq, hkv, d, qw, kw, eps, in_f32, cos, signed_sin, kv_dest)


def silu_mul_ref(y) -> torch.Tensor:
    """y [..., 2·I] = [gate | up] → silu(gate) · up (a fused gate_up projection's epilogue)."""
    gate, up = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_mul(y) -> torch.Tensor:
    """One kernel for PyTorch's two (and no [.., I] temporary) on CUDA in 16 bits; the reference elsewhere."""
    if y.dtype == torch.float32 or not use_triton(y):
        return silu_mul_ref(y)
    from rung.kernels.triton_elementwise import triton_silu_mul

    return triton_silu_mul(y)
