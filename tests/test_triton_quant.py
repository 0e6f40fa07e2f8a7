"""The CUDA weight-only int8 / int4 kernels (rung/kernels/triton_quant.py) on the CPU under Triton's
interpreter, against the dequantizing reference: every path (decode GEMV, dequantizing matmul,
dequantize + F.linear), per-channel and grouped scales, gated and biased layers. Speed is
benchmarks/gpu_quant.py's business."""

from __future__ import annotations



from interpret import needs_interpreter, run_checks


@needs_interpreter
def test_quant_kernels_agree_with_the_dequantizing_reference_under_the_interpreter():
    lines = run_checks("triton_quant_checks.py", timeout=600)
    assert lines[-1] == "all quant kernels agree with the dequantizing reference"
    assert sum(line.startswith("dequantize kernel ") for line in lines) == 5
    assert sum(line.startswith("quant_linear ") for line in lines) == 12
    assert sum(line.startswith("GEMV ") for line in lines) == 16
    assert sum("in chunks" in line for line in lines) == 2 and sum("PackedLinear.triton" in line for line in lines) == 2
