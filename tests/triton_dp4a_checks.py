"""Run under TRITON_INTERPRET=1 (tests/test_triton_dp4a.py starts it in a subprocess): the int8-
activation decode GEMV (rung/kernels/triton_dp4a.py) against its PyTorch restatement (same rounding,
exact integer sums) and against the dequantizing reference (the activations' rounding only).
Prints one line per check and exits non-zero on the first miss."""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

from interpret import check, rel  # noqa: E402

from rung.kernels import triton_dp4a as td  # noqa: E402
from rung.kernels import triton_quant as tq  # noqa: E402
from rung.quant.formats import quantize  # noqa: E402


def main() -> None:
    g = torch.Generator().manual_seed(0)
    # the activations' rounding: the kernel's int8 codes equal the reference's exactly
    x = torch.randn(3, 160, generator=g) * torch.rand(3, 160, generator=g) * 4
    x[1, 32:64] = 0  # an all-zero run: step 0, codes 0, no division by zero
    q, step, xsum = td.quantize_runs(x)
    q_ref, step_ref, xsum_ref = td.quantize_runs_ref(x)
    assert torch.equal(q, q_ref), (q - q_ref).abs().max()
    check("quantize_runs step", step, step_ref, 1e-7)
    check("quantize_runs sum", xsum, xsum_ref, 1e-6)
    assert int(q.abs().max()) == 127 and bool((step[1, 1] == 0).item())
    # (fmt, group, N, K, gated activation, bias, M): per-channel and grouped scales, odd N, K not a
    # multiple of a step's runs, gated and biased layers, 1-4 rows
    cases = [
        ("q8", None, 37, 96, None, True, 1),
        ("q8", 32, 48, 128, "silu", False, 2),
        ("q8", 64, 16, 192, "gelu_tanh", True, 4),
        ("q4", 32, 37, 96, None, False, 1),
        ("q4", 64, 48, 128, "silu", True, 3),
        ("q4", 128, 32, 256, "gelu", False, 1),
        ("q4", 32, 32, 64, "relu", True, 4),
    ]
    for fmt, group, n, k, act, bias, m in cases:
        w = torch.randn(n, k, generator=g) * (1 + torch.rand(n, 1, generator=g))
        p = quantize(w, fmt, group)
        b = torch.randn(n, generator=g) if bias else None
        args = (p.fmt, p.data, p.scale, p.offset, p.group, b, act)
        x = torch.randn(m, k, generator=g)
        name = f"{fmt} group={p.group} N={n} K={k} act={act} bias={bias} M={m}"
        # float32 activations: the kernel's float32 sums against the float64 restatement
        check(f"gemv_dp4a {name} float32", td.gemv_dp4a(x, *args), td.gemv_dp4a_ref(x, *args), 2e-6)
        for cfg in ((1, 4, 4), (8, 1, 2)):
            check(f"gemv_dp4a {cfg} {name}", td.gemv_dp4a(x, *args, config=cfg), td.gemv_dp4a_ref(x, *args), 2e-6)
        # 16-bit activations take this path through quant_linear; against the exact weights the
        # error is the activations' rounding to int8 (~1/254 of each run's largest, relative)
        for dt in (torch.float16, torch.bfloat16):
            xd = x.to(dt)
            assert td.usable(xd, fmt, p.data)
            got = tq.quant_linear(xd, *args)
            check(f"quant_linear {name} {dt}", got, td.gemv_dp4a_ref(xd, *args), 1e-2 if dt == torch.bfloat16 else 2e-3)
            err = rel(got, tq.quant_linear_ref(xd.double(), *args))
            assert err < 3e-2, (name, dt, err)
    # mixture-of-experts rows: row r is x[r // k] through expert ids[r] (stacks [E, N, ...]), gated
    # gate|up then down, q8 / q4 through the dp4a GEMV and f8 through the fp8 one
    from rung.kernels import triton_fp8 as tf

    e, n, kk, tokens, k = 5, 32, 64, 2, 3
    ids = torch.tensor([4, 0, 4, 2, 1, 3], dtype=torch.int32)
    x = torch.randn(tokens, kk, generator=g)
    for fmt, group in (("q8", None), ("q4", 32), ("f8", None)):
        for act, x_div in (("silu", k), (None, 1)):
            xs = x if x_div == k else torch.randn(tokens * k, kk, generator=g)
            parts = [quantize(torch.randn(n, kk, generator=g), fmt, group) for _ in range(e)]
            data = torch.stack([p.data for p in parts])
            scale = torch.stack([p.scale for p in parts])
            offset = None if parts[0].offset is None else torch.stack([p.offset for p in parts])
            name = f"experts {fmt} act={act} x_div={x_div}"
            if fmt == "f8":
                got = tf.gemv(xs, data, scale, None, act, experts=ids, x_div=x_div)
                want = torch.cat([tf.fp8_linear_ref(xs[r // x_div:r // x_div + 1], data[i], scale[i], None, act)
                                  for r, i in enumerate(ids.tolist())])
                check(f"gemv_dp4a {name}", got, want, 1e-5)
                continue
            got = td.gemv_dp4a(xs, fmt, data, scale, offset, parts[0].group, None, act, experts=ids, x_div=x_div)
            check(f"gemv_dp4a {name}", got, td.moe_gemv_ref(xs, fmt, data, scale, offset, parts[0].group, ids, x_div, act), 2e-6)
            dense = torch.cat([tq.quant_linear_ref(xs[r // x_div:r // x_div + 1].double(), fmt, data[i], scale[i],
                                                   None if offset is None else offset[i], parts[0].group, None, act)
                               for r, i in enumerate(ids.tolist())])
            assert rel(got, dense) < 3e-2, (name, rel(got, dense))
    # a whole MoE layer with packed experts: the decode rows (≤ 4 tokens) and the prefill path
    # (dequantized experts, the fused MoE kernels) against MoE.mix over the dequantized experts
    from rung.config import ModelConfig, MoEConfig
    from rung.model.moe import MoE
    from rung.quant.experts import PackedMoE, pack_experts

    config = ModelConfig("qwen3_moe", vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                         head_dim=16, intermediate_size=64,
                         moe=MoEConfig(num_experts=6, top_k=2, expert_intermediate_size=32, norm_topk_prob=True))
    for fmt in ("q8", "q4", "f8"):
        torch.manual_seed(1)
        moe = MoE(config)
        with torch.no_grad():
            for p in (moe.gate_proj, moe.up_proj, moe.down_proj):
                p.normal_(0, 0.3)
        pack_experts(moe, fmt, 32 if fmt == "q4" else None)
        assert isinstance(moe, PackedMoE)
        for tokens in (3, 7):
            x = torch.randn(tokens, 64, generator=g).half()
            weights, experts = MoE.choose(moe, moe.router_logits(x.float()).half())
            got = moe.mix(x, weights, experts)
            want = MoE.mix(moe, x.float(), weights.float(), experts).half()
            tol = 2e-3 if tokens > 4 else (3e-2 if fmt != "f8" else 2e-3)  # decode rows: x rounded to int8
            check(f"PackedMoE {fmt} tokens={tokens}", got, want, tol)
    # what stays off this path: float32 activations, more than GEMV_M rows, unaligned weights
    p = quantize(torch.randn(16, 64, generator=g), "q8", None)
    assert not td.usable(torch.randn(1, 64), "q8", p.data)
    assert not td.usable(torch.randn(5, 64).half(), "q8", p.data)
    assert not td.usable(torch.randn(1, 64).half(), "q8", p.data[:, 1:33])
    print("the dp4a GEMV agrees with its reference")


if __name__ == "__main__":
    main()
