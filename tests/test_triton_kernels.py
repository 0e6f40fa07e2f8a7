"""The Triton kernels themselves, on the CPU: Triton's interpreter (TRITON_INTERPRET=1) runs each
kernel in NumPy, so CI checks what the GPU runs against the PyTorch references (kernels/), not only
the references against the model. Speed is the GPU benchmark's business (benchmarks/gpu.py)."""

from __future__ import annotations



from interpret import needs_interpreter, run_checks


@needs_interpreter
def test_triton_kernels_agree_with_their_references_under_the_interpreter():
    lines = run_checks("triton_interpret_checks.py", timeout=600, drop_env=("RUNG_MOE_GEMV",))
    assert lines[-1] == "all Triton kernels agree with their references"
    assert sum("GEMV" in line for line in lines) == 4 and sum("paged attention" in line for line in lines) == 10
    assert sum(line.startswith("qk norm+rope torch") for line in lines) == 20 and sum(line.startswith("model ") for line in lines) == 4
    assert sum(line.startswith("routing") for line in lines) == 4 and "write_kv: equal" in lines
    assert sum(line.startswith("linear gemv") for line in lines) == 17
    assert sum(line.startswith("add+rms_norm") for line in lines) == 8
    assert sum(line.startswith("qk norm+rope to the pools") for line in lines) == 10
