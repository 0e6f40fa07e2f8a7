"""The CUDA weight-only int8 / int4 kernels (rung/kernels/triton_quant.py) on the CPU under Triton's
interpreter, against the dequantizing reference: every path (decode GEMV, dequantizing matmul,
dequantize + F.linear), per-channel and grouped scales, gated and biased layers. Speed is
benchmarks/gpu_quant.py's business."""

from __future__ import annotations

import pytest

from interpret import needs_interpreter, run_checks


@needs_interpreter
def test_quant_kernels_agree_with_the_dequantizing_reference_under_the_interpreter():
    lines = run_checks("triton_quant_checks.py", timeout=600)
    assert lines[-1] == "all quant kernels agree with the dequantizing reference"
    assert sum(line.startswith("dequantize kernel ") for line in lines) == 5
    assert sum(line.startswith("quant_linear ") for line in lines) == 12
    assert sum(line.startswith("GEMV ") for line in lines) == 16
    assert sum("in chunks" in line for line in lines) == 2 and sum("PackedLinear.triton" in line for line in lines) == 2


def test_the_tuner_times_configs_in_turn_and_keeps_each_ones_best_round():
    """A slow spell during the first round (a clock still rising, a neighbour's burst) slows the
    configs timed in it; timed one after another, the one timed after the spell would win although
    another is faster. In turn over three rounds, each config's best round decides. A config the
    compiler refuses is skipped; when none compiles, the first is used."""
    pytest.importorskip("triton")
    from rung.kernels.triton_quant import fastest

    true_ms = {"a": 1.0, "b": 0.8, "c": 0.9, "refused": 0.1}
    calls = []

    def compile_(cfg):
        if cfg == "refused":
            raise RuntimeError("out of resources")

    def time_ms(cfg):
        calls.append(cfg)
        return true_ms[cfg] * (3.0 if len(calls) <= 2 else 1.0)  # the first two timings are slow

    assert fastest(["a", "b", "refused", "c"], compile_, time_ms) == "b"
    assert calls == ["a", "b", "c"] * 3  # in turn, the refused one never timed
    # one round (the old way) is fooled by the spell: b, timed in it, loses to c
    calls.clear()
    assert fastest(["a", "b", "c"], compile_, time_ms, rounds=1) == "c"
    assert fastest(["refused"], compile_, time_ms) == "refused"
