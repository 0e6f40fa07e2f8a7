"""The CUDA weight-only int8 / int4 kernels (rung/kernels/triton_quant.py) on the CPU under Triton's
interpreter, against the dequantizing reference: every path (decode GEMV, dequantizing matmul,
dequantize + F.linear), per-channel and grouped scales, gated and biased layers. Speed is
benchmarks/gpu_quant.py's business."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_triton_kernels import _triton_version


@pytest.mark.skipif((_triton_version() or (0, 0)) < (3, 8), reason="needs Triton ≥ 3.8 (its interpreter, NumPy 2)")
def test_quant_kernels_agree_with_the_dequantizing_reference_under_the_interpreter():
    script = Path(__file__).with_name("triton_quant_checks.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "RUNG_NO_TRITON": "0"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "all quant kernels agree with the dequantizing reference"
    assert sum(line.startswith("dequantize kernel ") for line in lines) == 5
    assert sum(line.startswith("quant_linear ") for line in lines) == 12
    assert sum(line.startswith("GEMV ") for line in lines) == 16
    assert sum("in chunks" in line for line in lines) == 2 and sum("PackedLinear.triton" in line for line in lines) == 2
