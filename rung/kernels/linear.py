"""x @ wᵀ (+ b) for the few rows of a decode step, and the same with a SwiGLU epilogue.

cuBLAS reads the 2–30 MB matrices of a small model's decode step at 1.3–2.5 TB/s on an H200
(the copy bandwidth is 4.2): each GEMV is too short for its launch shape. The Triton GEMV
(kernels/triton_gemv.py) gives every program a tile of whole rows (or long row segments) and
streams them with 16-byte loads from enough programs to keep the memory busy; the gated form reads
the gate and up rows of the same outputs and writes silu(gate)·up, one kernel instead of a GEMV
and an elementwise one. Which shapes take the kernel is a rule measured on the device
(``triton_gemv.gemv_config``); the others keep ``F.linear``.

``linear_ref`` / ``gated_linear_ref`` define what the kernels compute: PyTorch's F.linear, and
its output rounded to the model dtype before kernels/elementwise.py's SwiGLU chain.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from rung.kernels import use_triton
from rung.kernels.elementwise import silu_mul, silu_mul_ref

MAX_ROWS = 4  # the kernel's limit; which row counts take it is triton_gemv.gemv_config's rule (one, today)


def linear_ref(x, weight, bias=None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def gated_linear_ref(x, weight, bias=None) -> torch.Tensor:
    """weight [2·I, K] = [gate | up] rows → silu(x·gateᵀ) · (x·upᵀ) [.., I]."""
    return silu_mul_ref(F.linear(x, weight, bias))


def _gemv_ok(x, weight, gated: bool) -> bool:
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype or not use_triton(x, weight):
        return False
    if os.environ.get("RUNG_GEMV") == "0":  # benchmarks compare against cuBLAS with this
        return False
    rows = x.numel() // max(1, x.shape[-1])
    if rows > MAX_ROWS or rows == 0 or weight.stride(-1) != 1:
        return False
    from rung.kernels.triton_gemv import gemv_config

    return gemv_config(weight.shape[0], weight.shape[1], rows, gated) is not None


def linear(x, weight, bias=None) -> torch.Tensor:
    """F.linear, through the Triton GEMV for a decode step's few rows where it is the faster."""
    if not _gemv_ok(x, weight, False):
        return F.linear(x, weight, bias)
    from rung.kernels.triton_gemv import triton_gemv

    return triton_gemv(x, weight, bias, gated=False)


def gated_linear(x, weight, bias=None) -> torch.Tensor:
    """silu(gate)·up of a fused [gate | up] projection: one GEMV kernel where it runs, else F.linear
    and the one-kernel SwiGLU (kernels/elementwise.py)."""
    if not _gemv_ok(x, weight, True):
        return silu_mul(F.linear(x, weight, bias))
    from rung.kernels.triton_gemv import triton_gemv

    return triton_gemv(x, weight, bias, gated=True)
