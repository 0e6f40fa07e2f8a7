"""Run under TRITON_INTERPRET=1 (tests/test_triton_quant.py starts it in a subprocess): the CUDA
weight-only int8 / int4 kernels (rung/kernels/triton_quant.py) against the dequantizing reference,
on the CPU. Small shapes (the interpreter runs each program in NumPy). Prints one line per check and
exits non-zero on the first miss."""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET") == "1"
os.environ["RUNG_DP4A"] = "0"  # the float GEMV here; the int8-activation one: triton_dp4a_checks.py

import torch  # noqa: E402

from interpret import check, rel  # noqa: E402, F401

from rung.kernels import triton_quant as tq  # noqa: E402
from rung.quant.formats import dequantize, quantize  # noqa: E402
from rung.quant.linear import PackedLinear  # noqa: E402


def layer(g, fmt, group, n, k, act, bias):
    w = torch.randn(n, k, generator=g) * (1 + torch.rand(n, 1, generator=g))
    p = quantize(w, fmt, group)
    b = torch.randn(n, generator=g) if bias else None
    return p, b


def main() -> None:
    g = torch.Generator().manual_seed(0)
    # the kernels' own dequantization and the reference's restatement equal rung.quant's exactly
    for fmt, group in (("q8", None), ("q8", 32), ("q4", 32), ("q4", 64), ("q4", 128)):
        p, _ = layer(g, fmt, group, 19, 256, None, False)
        args = (p.fmt, p.data, p.scale, p.offset, p.group)
        ref = dequantize(p)
        assert torch.equal(tq.dequantize_ref(*args), ref), fmt
        check(f"dequantize kernel {fmt} group={p.group}", tq.dequantize(*args, dtype=torch.float32), ref, 1e-7)
    # (fmt, group, N, K, gated activation, bias, M, dtype): every path (GEMV M ≤ 4, dequantizing
    # matmul M ≤ 64, dequantize + F.linear above), odd N, per-channel and grouped scales
    cases = [
        ("q8", None, 37, 128, None, True, 1, torch.float32),
        ("q8", None, 48, 192, "silu", False, 3, torch.float16),
        ("q8", 32, 37, 128, None, False, 16, torch.float16),
        ("q8", 64, 32, 128, "gelu_tanh", True, 40, torch.float16),
        ("q4", 32, 37, 128, None, True, 1, torch.float32),
        ("q4", 32, 48, 128, "silu", True, 3, torch.float16),
        ("q4", 64, 37, 256, None, False, 16, torch.float16),
        ("q4", 128, 32, 256, "silu", False, 40, torch.float16),
        ("q4", 64, 48, 128, "gelu", True, 1, torch.float16),
        ("q8", 32, 48, 96, "silu", True, 1, torch.bfloat16),
        ("q8", 32, 37, 96, None, True, 70, torch.float16),
        ("q4", 32, 32, 64, "silu", True, 70, torch.float32),
    ]
    for fmt, group, n, k, act, bias, m, dt in cases:
        p, b = layer(g, fmt, group, n, k, act, bias)
        x = torch.randn(m, k, generator=g).to(dt)
        args = (p.fmt, p.data, p.scale, p.offset, p.group, b, act)
        want = tq.quant_linear_ref(x.double(), *args)
        got = tq.quant_linear(x, *args)
        # float32 activations: float32 sums over the exact weights; float16: one output rounding
        # (the GEMV), or weights rounded to float16 on the way to the dot (the matmul paths)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dt]
        check(f"quant_linear {fmt} group={p.group} N={n} K={k} act={act} bias={bias} M={m} {dt}", got, want, tol)
        if m <= tq.GEMV_M:  # the codes converted plainly (no mantissa bits), and the other GEMV kernel
            for cfg in ([("row", 8, 2, 4, False)] if m == 1 else []) + [(8, 2, 4, False, 2), (8, 2, 4, True)]:
                check(f"GEMV {cfg} {fmt} M={m}", tq.gemv(x, *args, config=cfg), want, tol)
    # the prefill path in chunks of rows (a scratch smaller than the matrix), gated and not
    scratch = tq.SCRATCH
    tq.SCRATCH = 32 * 128
    try:
        for act in (None, "silu"):
            p, b = layer(g, "q4", 32, 96, 128, act, True)
            x = torch.randn(70, 128, generator=g).to(torch.float16)
            args = (p.fmt, p.data, p.scale, p.offset, p.group, b, act)
            check(f"dequantize + linear in chunks act={act}", tq.quant_linear(x, *args),
                  tq.quant_linear_ref(x.double(), *args), 2e-3)
    finally:
        tq.SCRATCH = scratch
    # PackedLinear's Triton path is the same function as its reference
    for fmt, gated in (("q8", "silu"), ("q4", None)):
        p, b = layer(g, fmt, None, 32, 128, gated, True)
        lin = PackedLinear(p, b, gated=gated)
        x = torch.randn(2, 128, generator=g).to(torch.bfloat16)
        assert lin._triton_ok(x)
        check(f"PackedLinear.triton {fmt} gated={gated} bf16", lin.triton(x), lin.reference(x.float()), 1e-2)
    print("all quant kernels agree with the dequantizing reference")


if __name__ == "__main__":
    main()
