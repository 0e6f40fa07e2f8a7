"""Programmatic dependent launch (PDL, Hopper and later): a decode step's next kernel starts while
the one before it finishes.

A batch-1 decode step is a CUDA graph of ~10 small kernels a layer, and each costs its launch
and ramp-up (a few µs) on top of its work: a 4-25 MB GEMV reads its weights at 2.0-2.5 TB/s of
the H200's 4.2. With PDL (as SGLang and TensorRT-LLM use it for decode), a kernel launched with
``launch_pdl=True`` may have its programs scheduled once every program of the kernel before it
has called ``gdc_launch_dependents``; its programs then block in ``gdc_wait`` until that kernel
has completed and its writes are visible.

The rules every PDL-launched kernel here keeps (its ``PDL: tl.constexpr`` is True exactly when it
is launched with ``launch_pdl``):
- ``gdc_wait`` before any load of data an earlier kernel writes (activations, the KV pool, expert
  ids, the split attention's counters) and before any store (a graph's buffer may still be read by
  the kernel before). Because every kernel waits, waiting for the one before waits for them all.
- only weights, which no kernel writes, are read before it: a GEMV loads its first weight tile,
  then waits, then reads x (the loads of that tile overlap the previous kernel's tail).
- ``gdc_launch_dependents`` right after the wait: the next kernel's programs take the SMs this
  kernel's last wave leaves free, and never before this kernel has all of its programs running.
With ``PDL`` False the kernels are what they were (the interpreter in CI never meets the gdc
calls), and the outputs are bit-identical either way: only when programs start changes.

RUNG_PDL=0 turns it off (comparisons; docs/quantization.md). Imported only where Triton is.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With PDL: wait for the kernel before (its writes visible from here on), then let the next
    kernel's programs launch. Without: nothing (the interpreter never sees the gdc calls)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def triton_has_gdc() -> bool:
    """Triton ≥ 3.4: ``tl.extra.cuda.gdc_wait`` / ``gdc_launch_dependents`` and ``launch_pdl``."""
    cuda = getattr(getattr(tl, "extra", None), "cuda", None)
    return hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")


@functools.cache
def cuda_capability(index: int) -> tuple[int, int]:
    """A device's compute capability, asked once (a launcher asks on every eager launch)."""
    return torch.cuda.get_device_capability(index)


def pdl_wanted(device) -> bool:
    """Whether kernels launched on ``device`` take PDL: a CUDA device of compute capability ≥ 9.0
    (Hopper), compiled Triton (not the interpreter) that has the gdc calls, and RUNG_PDL not 0."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("RUNG_PDL") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    return cuda_capability(index) >= (9, 0) and triton_has_gdc()
