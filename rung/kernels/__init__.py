"""GPU kernels behind the model's and the engine's seams, each beside a plain-PyTorch reference.

Every kernel here has a reference function with the same signature that runs anywhere (CPU
included) and defines what the kernel computes; tests compare the two, and CI runs the references
against the model's plain path. Triton is optional: without it, or off CUDA, callers use the
reference. Kernels may build on the model's plain pieces (fused_moe's reference routing is
model/moe.py's), never the reverse: modules.py holds the model's modules with the kernels inside,
and rewrite.py's ``attach_kernels`` swaps them into a model; rung/model/ knows nothing of devices.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def triton_available() -> bool:
    """Triton importable and allowed (RUNG_NO_TRITON=1 turns the kernels off)."""
    if os.environ.get("RUNG_NO_TRITON") == "1":
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(*tensors) -> bool:
    """The kernels run for CUDA tensors when Triton is there, or anywhere under Triton's
    interpreter (TRITON_INTERPRET=1, for testing the kernels on a CPU)."""
    # the tensors first: importing Triton costs ~70 MB of resident memory, which a CPU-only
    # process (int4 on a laptop) should not pay for a kernel it will never run
    if os.environ.get("TRITON_INTERPRET") == "1":
        return triton_available()
    return all(t.is_cuda for t in tensors) and triton_available()
