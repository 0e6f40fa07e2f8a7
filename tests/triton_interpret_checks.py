"""Run under TRITON_INTERPRET=1 (tests/test_triton_kernels.py starts it in a subprocess, since the
interpreter must be chosen before Triton compiles anything): every Triton kernel against its
PyTorch reference on the CPU. Prints one line per check and exits non-zero on the first miss."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

from rung.kernels import elementwise, fused_moe as fm, paged_attention as pa  # noqa: E402
from rung.kernels import triton_attention, triton_elementwise, triton_moe  # noqa: E402, F401
from rung.weights.mxfp4 import quantize_mxfp4  # noqa: E402


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check(name: str, got, want, tol: float) -> None:
    err = rel(got, want)
    print(f"{name}: rel err {err:.2e}")
    if not err <= tol:
        sys.exit(f"FAIL {name}: {err:.2e} > {tol:.0e}")


def elementwise_checks(g) -> None:
    x = torch.randn(5, 96, generator=g).to(torch.bfloat16)
    w = torch.randn(96, generator=g).to(torch.bfloat16)
    for offset, f32 in ((0.0, False), (1.0, False), (0.0, True)):
        check(f"rms_norm offset={offset} f32={f32}", triton_elementwise.triton_rms_norm(x, w, 1e-6, offset, f32),
              elementwise.rms_norm_ref(x, w, 1e-6, offset, f32), 1e-2)
    x = torch.randn(2, 3, 4, 64, generator=g).to(torch.bfloat16)
    for rot in (64, 32):
        cos = torch.randn(2, 1, 4, rot, generator=g).to(torch.bfloat16)
        sin = torch.randn(2, 1, 4, rot, generator=g).to(torch.bfloat16)
        check(f"rotary rot={rot}", triton_elementwise.triton_rotary(x, cos, sin), elementwise.rotary_ref(x, cos, sin), 1e-2)


def attention_checks(g) -> None:
    hq, hkv, d, bs = 8, 2, 16, 4
    blocks = 48
    k_pool = torch.randn(blocks * bs + 1, hkv, d, generator=g)
    v_pool = torch.randn(blocks * bs + 1, hkv, d, generator=g)
    tables = torch.stack([torch.randperm(blocks, generator=g)[:16] for _ in range(3)]).to(torch.int32)
    sinks = torch.randn(hq, generator=g)
    for window, sk in ((None, None), (9, sinks)):
        pos = torch.tensor([37, 5, 60])  # decode: one token per sequence, token i on row i
        q = torch.randn(3, hq, d, generator=g)
        tiles = pa.decode_tiles(3, "cpu")
        got = triton_attention.triton_paged_attention(q, k_pool, v_pool, tables, pos, tiles, bs, window, sk, 0.25, True)
        want = pa.paged_attention_ref(q, k_pool, v_pool, tables, torch.arange(3), pos, bs, window, sk, 0.25)
        check(f"paged attention decode window={window}", got, want, 1e-4)
        layout = [(0, 12, 0), (12, 5, 2)]  # prefill chunks: (first token, count, table row)
        pos = torch.cat([torch.arange(20, 32), torch.arange(0, 5)])
        rows = torch.cat([torch.zeros(12, dtype=torch.long), torch.full((5,), 2)])
        q = torch.randn(17, hq, d, generator=g)
        tiles = pa.chunk_tiles(layout, pa.tokens_per_tile(hq, hkv, d, False), "cpu")
        got = triton_attention.triton_paged_attention(q, k_pool, v_pool, tables, pos, tiles, bs, window, sk, 0.25, False)
        want = pa.paged_attention_ref(q, k_pool, v_pool, tables, rows, pos, bs, window, sk, 0.25)
        check(f"paged attention prefill window={window}", got, want, 1e-4)


def moe_checks(g) -> None:
    e, h, i = 6, 64, 96
    for packed in (False, True):
        dense = [torch.randn(e, i, h, generator=g) * 0.2, torch.randn(e, i, h, generator=g) * 0.2,
                 torch.randn(e, h, i, generator=g) * 0.2]
        biases = [torch.randn(e, i, generator=g) * 0.1, torch.randn(e, i, generator=g) * 0.1,
                  torch.randn(e, h, generator=g) * 0.1]
        if packed:
            q = [quantize_mxfp4(t) for t in dense]
            w = fm.ExpertWeights(*(b.reshape(e, b.shape[1], -1) for b, _ in q), *(s for _, s in q), *biases)
        else:
            w = fm.ExpertWeights(*dense, None, None, None, *biases)
        for kind in ("silu", "swiglu_clamped"):
            act = fm.Activation(kind)
            for n in (1, 3, 40):  # GEMV (decode), GEMV with shared experts, the sorted GEMM
                x = torch.randn(n, h, generator=g)
                logits = torch.randn(n, e, generator=g)
                top, experts = torch.topk(logits, 2, dim=-1)
                weights = torch.softmax(top, -1)
                want = fm.fused_moe_ref(x, weights, experts, w, act)
                name = f"fused MoE {'MXFP4' if packed else 'dense'} {kind} tokens={n}"
                if n * 2 <= triton_moe.GEMV_MAX:  # decode sizes: the GEMV, and the slot-layout GEMM
                    check(name + " GEMV", triton_moe.triton_moe_gemv(x, weights, experts, w, act), want, 1e-4)
                    os.environ["RUNG_MOE_GEMV"] = "0"
                check(name + " GEMM", triton_moe.triton_fused_moe(x, weights, experts, w, act), want, 1e-4)
                os.environ.pop("RUNG_MOE_GEMV", None)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    elementwise_checks(g)
    attention_checks(g)
    moe_checks(g)
    print("all Triton kernels agree with their references")
