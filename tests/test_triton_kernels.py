"""The Triton kernels themselves, on the CPU: Triton's interpreter (TRITON_INTERPRET=1) runs each
kernel in NumPy, so CI checks what the GPU runs against the PyTorch references (kernels/), not only
the references against the model. Speed is the GPU benchmark's business (benchmarks/gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _triton_version():
    try:
        import triton
    except Exception:
        return None
    return tuple(int(p) for p in triton.__version__.split(".")[:2])


@pytest.mark.skipif((_triton_version() or (0, 0)) < (3, 8), reason="needs Triton ≥ 3.8 (its interpreter, NumPy 2)")
def test_triton_kernels_agree_with_their_references_under_the_interpreter():
    script = Path(__file__).with_name("triton_interpret_checks.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "RUNG_NO_TRITON": "0"}
    env.pop("RUNG_MOE_GEMV", None)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "all Triton kernels agree with their references"
    assert sum("GEMV" in line for line in lines) == 4 and sum("paged attention" in line for line in lines) == 10
    assert sum(line.startswith("qk norm+rope torch") for line in lines) == 20 and sum(line.startswith("model ") for line in lines) == 4
    assert sum(line.startswith("routing") for line in lines) == 4 and "write_kv: equal" in lines
    assert sum(line.startswith("linear gemv") for line in lines) == 17
    assert sum(line.startswith("add+rms_norm") for line in lines) == 8
    assert sum(line.startswith("qk norm+rope to the pools") for line in lines) == 10
