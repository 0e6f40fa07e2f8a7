"""Run under TRITON_INTERPRET=1 (tests/test_fp8.py starts it in a subprocess): the fp8 decode GEMV
(rung/kernels/triton_fp8.py) against the dequantizing reference, on the CPU: plain, biased and
gated layers, odd N and K, one to four rows. Prints one line per check; exits non-zero on a miss."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

from interpret import check, rel  # noqa: E402, F401

from rung.kernels import triton_fp8 as tf  # noqa: E402
from rung.quant.formats import quantize, quantize_fp8  # noqa: E402
from rung.quant.linear import PackedLinear  # noqa: E402


def main() -> None:
    g = torch.Generator().manual_seed(0)
    # every e4m3 code (subnormals, both signs) through the kernel's bit decode, one weight row at a time
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = codes[~codes.float().isnan()]
    k = finite.numel()  # 254
    data = torch.diag_embed(finite.float()).to(torch.float8_e4m3fn)  # row i holds code i at column i
    scale = torch.ones(k, 1)
    x = torch.ones(1, k)
    got = tf.gemv(x, data, scale)
    if not torch.equal(got[0], finite.float()):
        sys.exit("FAIL every e4m3 code decodes to its value")
    print("every e4m3 code decodes to its value")
    # (N, K, gated activation, bias, M, dtype)
    cases = [(37, 128, None, True, 1, torch.float32), (48, 200, "silu", False, 3, torch.float32),
             (32, 96, "gelu_tanh", True, 4, torch.float16), (19, 64, None, False, 2, torch.bfloat16)]
    for n, k, act, bias, m, dtype in cases:
        w = torch.randn(n, k, generator=g) * (1 + torch.rand(n, 1, generator=g))
        p = quantize_fp8(w, k)  # the kernel takes any K (the format asks for multiples of 32)
        b = torch.randn(n, generator=g) if bias else None
        x = torch.randn(m, k, generator=g).to(dtype)
        want = tf.fp8_linear_ref(x.float(), p.data, p.scale, b, act)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        check(f"GEMV f8 N={n} K={k} act={act} bias={bias} M={m} {dtype}",
              tf.fp8_linear(x, p.data, p.scale, b, act).float(), want, tol)
    # PackedLinear routes an f8 layer's decode rows to the GEMV under the interpreter
    w = torch.randn(64, 128, generator=g)
    layer = PackedLinear(quantize(w, "f8"), torch.randn(64, generator=g), gated="silu")
    x = torch.randn(2, 128, generator=g)
    check("PackedLinear.triton f8 gated", layer.triton(x), layer.reference(x), 1e-5)
    # a stack dequantized in one pass (a MoE layer's experts): bit for bit the reference, every code
    # and odd widths, in each 16-bit dtype and float32
    for n, k in ((254, 254), (7, 1500), (3, 32)):
        data = (torch.randn(n, k, generator=g) * 100).to(torch.float8_e4m3fn) if k != 254 else \
            torch.diag_embed(finite.float()).to(torch.float8_e4m3fn)  # every finite code on the diagonal
        scale = torch.rand(n, 1, generator=g) * 1e-2 + 1e-4
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            got, want = tf.fp8_dequantize(data, scale, dtype), tf.fp8_dequantize_ref(data, scale, dtype)
            if not torch.equal(got, want):
                sys.exit(f"FAIL fp8_dequantize [{n}, {k}] {dtype}")
        print(f"fp8_dequantize [{n}, {k}] equal")
    print("all fp8 kernels agree with the dequantizing reference")


if __name__ == "__main__":
    main()
