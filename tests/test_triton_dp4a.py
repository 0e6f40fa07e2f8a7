"""The int8-activation decode GEMV (rung/kernels/triton_dp4a.py) on the CPU under Triton's
interpreter (its dp4a in plain Triton there), against its PyTorch restatement and the dequantizing
reference; speed is benchmarks/gpu_quant.py's business. The reference itself is checked here
against an independent float computation."""

from __future__ import annotations

import pytest
import torch

from interpret import needs_interpreter, run_checks


@needs_interpreter
def test_dp4a_gemv_agrees_with_its_reference_under_the_interpreter():
    lines = run_checks("triton_dp4a_checks.py", timeout=600)
    assert lines[-1] == "the dp4a GEMV agrees with its reference"
    assert sum(line.startswith("gemv_dp4a ") for line in lines) == 27  # 6 of them experts' rows
    assert sum(line.startswith("PackedMoE ") for line in lines) == 6
    assert sum(line.startswith("quant_linear ") for line in lines) == 14


def _reference_module():
    pytest.importorskip("triton")
    from rung.kernels import triton_dp4a

    return triton_dp4a


@pytest.mark.parametrize("fmt,group", [("q8", None), ("q8", 64), ("q4", 32), ("q4", 128)])
def test_reference_is_the_codes_dot_the_rounded_activations(fmt, group):
    td = _reference_module()
    from rung.quant.formats import dequantize, quantize

    g = torch.Generator().manual_seed(1)
    p = quantize(torch.randn(24, 256, generator=g), fmt, group)
    x = torch.randn(2, 256, generator=g)
    q, step, _ = td.quantize_runs_ref(x)
    x_rounded = (q.double().view(2, -1, 32) * step.double()[..., None]).view(2, 256)
    w = dequantize(p).double()
    if fmt == "q8":
        want = x_rounded @ w.T
    else:  # w = s·q + o: the codes meet the rounded activations, the offsets the exact ones (Σx)
        o = p.offset.double().repeat_interleave(p.group, dim=1)
        want = x_rounded @ (w - o).T + x.double() @ o.T
    got = td.gemv_dp4a_ref(x.double(), p.fmt, p.data, p.scale, p.offset, p.group)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # dequantize rounds to float32


def test_activation_rounding_is_within_half_a_step_and_keeps_each_runs_largest():
    td = _reference_module()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 128, generator=g) * 10
    q, step, xsum = td.quantize_runs_ref(x)
    back = q.float().view(3, -1, 32) * step[..., None]
    assert float((back - x.view(3, -1, 32)).abs().max() / step.max()) <= 0.5 + 1e-5
    assert bool((q.view(3, -1, 32).abs().amax(-1) == 127).all())
    torch.testing.assert_close(xsum, x.view(3, -1, 32).sum(-1))


@needs_interpreter
def test_norms_hand_their_int8_rounding_to_the_dp4a_gemv_under_the_interpreter():
    lines = run_checks("triton_fused_xq_checks.py", timeout=600, drop_env=("RUNG_FUSED_XQ", "RUNG_DP4A"))
    assert lines[-1] == "the norms' rounding is quantize_runs' and the GEMV takes it only for their output"
    # (a) 2 norms x 2 dtypes x 5 shapes: xq, step, xsum against the reference and quantize_runs, and the output
    assert sum(line.startswith("rounding ") for line in lines) == 20 * 7
    assert sum(line.startswith("no rounding for ") for line in lines) == 5
    assert sum(line.startswith("gemv_dp4a through the norm's rounding ") for line in lines) == 8  # (b)
    assert sum(line.startswith("hand-off not taken: ") for line in lines) == 7  # (c)
    # (d) identical logits, and 2 launches fewer per layer and decode step (2 layers, 2 steps)
    assert sum(line.startswith("model q") and line.endswith("RUNG_FUSED_XQ=1 vs 0: equal") for line in lines) == 2
    assert sum(line.endswith("quantize_runs launches 18 -> 10") for line in lines) == 2


@needs_interpreter
def test_decode_attention_hands_its_int8_rounding_to_o_proj_under_the_interpreter():
    lines = run_checks("triton_attention_xq_checks.py", timeout=600,
                       drop_env=("RUNG_FUSED_XQ", "RUNG_DP4A", "RUNG_ATTN_SPLIT", "RUNG_ATTN_SPLITS"))
    assert lines[-1] == "the attention's rounding is quantize_runs' and o_proj's GEMV takes it"
    # (a) split and one-program decode: 4 shapes x 2 (window, sinks); a short prefill chunk: 2 x 2;
    # xq, step, xsum against the reference and quantize_runs, and the 16-bit output
    assert sum(line.startswith("rounding ") for line in lines) == 20 * 7
    assert sum(line.startswith("no rounding for ") for line in lines) == 12
    assert sum(line.startswith("o_proj gemv_dp4a through the attention's rounding ") for line in lines) == 4  # (b)
    # (c) identical logits, and 3 launches fewer per layer and decode step (2 layers, 1 step; 1 and
    # 2 sequences), one more than the norms alone save
    assert sum(line.startswith("model q") and line.endswith("RUNG_FUSED_XQ=1 vs 0: equal") for line in lines) == 2
    assert any(line.endswith("1 sequence(s) split: quantize_runs launches 10 -> 4") for line in lines)
    assert any(line.endswith("2 sequence(s) one program: quantize_runs launches 11 -> 5") for line in lines)
