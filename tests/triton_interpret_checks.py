"""Run under TRITON_INTERPRET=1 (tests/test_triton_kernels.py starts it in a subprocess, since the
interpreter must be chosen before Triton compiles anything): every Triton kernel against its
PyTorch reference on the CPU. Prints one line per check and exits non-zero on the first miss."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

from interpret import check, rel  # noqa: E402, F401

from rung.kernels import elementwise, fused_moe as fm, paged_attention as pa  # noqa: E402
from rung.kernels import linear as lin, triton_attention, triton_elementwise, triton_gemv, triton_moe  # noqa: E402, F401
from rung.weights.mxfp4 import quantize_mxfp4  # noqa: E402


def elementwise_checks(g, dt) -> None:
    """float16 rounds as IEEE in NumPy, so there the kernels must equal the PyTorch chains bit for
    bit; the interpreter's bfloat16 is emulated (its roundings differ by an ulp), hence bf16's
    looser bound. On the GPU, benchmarks/gpu.py measures bf16 bit-equality."""
    tol = 1e-6 if dt == torch.float16 else 2e-2
    x = torch.randn(5, 96, generator=g).to(dt)
    w = torch.randn(96, generator=g).to(dt)
    for offset, f32 in ((0.0, False), (1.0, False), (0.0, True)):
        check(f"rms_norm {dt} offset={offset} f32={f32}", triton_elementwise.triton_rms_norm(x, w, 1e-6, offset, f32),
              elementwise.rms_norm_ref(x, w, 1e-6, offset, f32), tol)
    x = torch.randn(2, 3, 4, 64, generator=g).to(dt)
    for rot in (64, 32):
        cos = torch.randn(2, 1, 4, rot, generator=g).to(dt)
        sin = torch.randn(2, 1, 4, rot, generator=g).to(dt)
        check(f"rotary {dt} rot={rot}", triton_elementwise.triton_rotary(x, cos, sin),
              elementwise.rotary_ref(x, cos, sin), tol)
    y = torch.randn(3, 2, 2 * 1100, generator=g).to(dt)  # more than one 1024-wide block
    # exp differs from torch's by an ulp now and then, which can flip a float16 rounding
    check(f"silu_mul {dt}", triton_elementwise.triton_silu_mul(y), elementwise.silu_mul_ref(y), max(tol, 1e-4))


def add_norm_checks(g, dt) -> None:
    """The residual add + RMSNorm kernel: both outputs against the two ops."""
    tol = 1e-6 if dt == torch.float16 else 2e-2
    x, r = torch.randn(3, 96, generator=g).to(dt), torch.randn(3, 96, generator=g).to(dt)
    w = torch.randn(96, generator=g).to(dt)
    for offset, f32 in ((0.0, False), (1.0, True)):
        got = triton_elementwise.triton_add_rms_norm(x, r, w, 1e-6, offset, f32)
        want = elementwise.add_rms_norm_ref(x, r, w, 1e-6, offset, f32)
        check(f"add+rms_norm {dt} offset={offset} f32={f32} sum", got[0], want[0], tol)
        check(f"add+rms_norm {dt} offset={offset} f32={f32} norm", got[1], want[1], tol)


def gemv_checks(g) -> None:
    """The decode GEMV against F.linear (float16: float32 sums in another order, so within 1e-3),
    plain and gated (SwiGLU epilogue), with and without bias, 1–4 rows, K not a multiple of the
    step and N not of the tile."""
    dt = torch.float16
    k, n = 200, 44
    w = (torch.randn(n, k, generator=g) * 0.1).to(dt)
    b = (torch.randn(n, generator=g) * 0.1).to(dt)
    for rows in (1, 2, 3, 4):
        x = torch.randn(rows, k, generator=g).to(dt)
        for bias in (None, b):
            for gated in (False, True):
                want = (lin.gated_linear_ref if gated else lin.linear_ref)(x.float(), w.float(),
                                                                           None if bias is None else bias.float())
                got = triton_gemv.triton_gemv(x, w, bias, gated)
                check(f"linear gemv rows={rows} bias={bias is not None} gated={gated}", got, want, 2e-3)
    x = torch.randn(1, 1, k, generator=g).to(dt)  # a decode step's [b, t, hidden], through the dispatch
    check("linear gemv dispatch [1, 1, K]", lin.linear(x, w, b), lin.linear_ref(x.float(), w.float(), b.float()), 2e-3)


def qk_checks(g, DT) -> None:
    """The fused q/k norm + RoPE kernel against the model's chain: Qwen3 (norm, RoPE), Gemma 3
    (offset gain), gpt-oss (RoPE only), partial rotary."""
    hq, hkv, d = 4, 2, 32
    qkv = torch.randn(2, 3, (hq + 2 * hkv) * d, generator=g).to(DT)
    w = torch.randn(d, generator=g).to(DT), torch.randn(d, generator=g).to(DT)
    for label, norm, rot in (("qwen3", (0.0, False), d), ("gemma3", (1.0, False), d), ("gpt-oss", None, d),
                             ("f32 gain, partial rotary", (0.0, True), d // 2), ("norm only", (0.0, False), 0)):
        cos = torch.randn(2, 3, rot, generator=g).to(DT) if rot else None
        sin = torch.randn(2, 3, rot, generator=g).to(DT) if rot else None
        norms = (None, None) if norm is None else ((w[0], 1e-6, *norm), (w[1], 1e-6, *norm))
        got = elementwise.qk_norm_rope(qkv, hq, hkv, d, *norms, cos, sin)
        want = elementwise.qk_norm_rope_ref(qkv, hq, hkv, d, *norms, cos, sin)
        for part, a, b in (("q", got[0], want[0]), ("k", got[1], want[1])):
            assert a.shape == b.shape and a.is_contiguous(), (label, a.shape, b.shape)
            check(f"qk norm+rope {DT} {label} {part}", a, b, 1e-6 if DT == torch.float16 else 2e-2)
        # keys and values straight into paged pools (the CUDA-graph decode step), against the reference's copy
        slots = torch.tensor([5, 0, 11, 3, 8, 2])
        pools = [torch.zeros(12, hkv, d).to(DT) for _ in range(4)]
        q_got, k_none = elementwise.qk_norm_rope(qkv, hq, hkv, d, *norms, cos, sin, kv_dest=(pools[0], pools[1], slots))
        q_want, _ = elementwise.qk_norm_rope_ref(qkv, hq, hkv, d, *norms, cos, sin, kv_dest=(pools[2], pools[3], slots))
        assert k_none is None
        check(f"qk norm+rope to the pools {DT} {label}", torch.cat([q_got.flatten(), pools[0].flatten(), pools[1].flatten()]),
              torch.cat([q_want.flatten(), pools[2].flatten(), pools[3].flatten()]), 1e-6 if DT == torch.float16 else 2e-2)


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
        got = triton_attention.triton_paged_attention(q, k_pool, v_pool, tables, pos, tiles, bs, window, sk, 0.25, True,
                                                      split=False)
        check(f"paged attention decode, one program a tile, window={window}", got, want, 1e-4)
        for splits in (1, 3, 16):  # a program walking several steps; uneven ranges; most programs empty
            got = triton_attention.split_decode_attention(q, k_pool, v_pool, tables, pos, tiles, bs, window, sk, 0.25,
                                                          splits)
            check(f"paged attention decode, {splits} splits, window={window}", got, want, 1e-4)
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
                if packed and n * 2 <= triton_moe.GEMV_MAX:  # decode sizes: the GEMV, and the slot-layout GEMM
                    check(name + " GEMV", triton_moe.triton_moe_gemv(x, weights, experts, w, act), want, 1e-4)
                    os.environ["RUNG_MOE_GEMV"] = "0"
                check(name + " GEMM", triton_moe.triton_fused_moe(x, weights, experts, w, act), want, 1e-4)
                os.environ.pop("RUNG_MOE_GEMV", None)
                if packed and n == 40:  # a prefill's size: the experts dequantized first, then dense tiles
                    least = triton_moe.DEQUANT_SLOTS_PER_EXPERT
                    triton_moe.DEQUANT_SLOTS_PER_EXPERT = 2 * n // w.num_experts
                    check(name + " GEMM dequantized", triton_moe.triton_fused_moe(x, weights, experts, w, act), want, 1e-4)
                    triton_moe.DEQUANT_SLOTS_PER_EXPERT = least
        if packed:  # the dequantization pass is exact: bit for bit the reference's values
            from rung.model.mxfp4 import dequantize_mxfp4

            for dt in (torch.float32, torch.bfloat16, torch.float16):
                for blocks, scales in ((w.gate, w.gate_scales), (w.down, w.down_scales)):
                    got = triton_moe.mxfp4_dequantize(blocks, scales, dt)
                    want = dequantize_mxfp4(blocks.view(*scales.shape, 16), scales, dt)
                    assert torch.equal(got, want), (dt, (got.float() - want.float()).abs().max())
            print("mxfp4_dequantize: equal (float32, bfloat16, float16)")
    # the tiny Qwen3-MoE that overflowed an H200's shared memory in float32 (hidden 48, experts 20 wide,
    # 6 experts, top-3): tiles clamped to the problem, decode and prefill
    e, h, i = 6, 48, 20
    w = fm.ExpertWeights(*(torch.randn(*shape, generator=g) * 0.2 for shape in ((e, i, h), (e, i, h), (e, h, i))))
    for n in (1, 50):
        x = torch.randn(n, h, generator=g)
        top, experts = torch.topk(torch.randn(n, e, generator=g), 3, dim=-1)
        weights = torch.softmax(top, -1)
        want = fm.fused_moe_ref(x, weights, experts, w, fm.Activation("silu"))
        check(f"fused MoE dense small silu tokens={n} GEMM",
              triton_moe.triton_fused_moe(x, weights, experts, w, fm.Activation("silu")), want, 1e-4)


def routing_checks(g) -> None:
    for e, k, router, norm in ((32, 4, "topk_softmax", False), (128, 8, "softmax_topk", True),
                               (60, 6, "softmax_topk", False), (128, 8, "topk_softmax", False)):
        logits = torch.randn(5, e, generator=g).to(torch.float16)
        w, ids = triton_moe.triton_route(logits, k, router == "topk_softmax", norm)
        w_ref, ids_ref = fm.route_ref(logits, k, router, norm)
        # float16 logits tie now and then: the chosen logits (in order) must be the reference's
        chosen, chosen_ref = logits.gather(1, ids.long()), logits.gather(1, ids_ref)
        if not torch.equal(chosen, chosen_ref):
            sys.exit(f"FAIL routing E={e} k={k} {router}: experts {ids.tolist()} != {ids_ref.tolist()}")
        ties = int((ids.long() != ids_ref).sum())
        check(f"routing E={e} k={k} {router} norm={norm} ({ties} tied picks)", w, w_ref, 1e-3)
    # the combine: each token's k rows summed, or weighted by its routing weights (packed experts' decode)
    for dtype in (torch.float32, torch.bfloat16):
        y, w = torch.randn(3 * 4, 1100, generator=g).to(dtype), torch.rand(3, 4, generator=g).to(dtype)
        rows = y.double().view(3, 4, 1100)
        check(f"combine {dtype}", triton_moe.combine(y, 3, 4), rows.sum(1), 1e-6 if dtype == torch.float32 else 6e-3)
        check(f"combine weighted {dtype}", triton_moe.combine(y, 3, 4, w),
              (w.double()[..., None] * rows).sum(1), 1e-6 if dtype == torch.float32 else 6e-3)


def write_kv_checks(g) -> None:
    k_pool, v_pool = torch.zeros(40, 2, 24), torch.zeros(40, 2, 24)
    qkv = torch.randn(3, 5, 2, 24, generator=g)  # k and v as strided views, as the model hands them over
    slots = torch.tensor([7, 0, 39])
    triton_attention.triton_write_kv(k_pool, v_pool, slots, qkv[:, 1], qkv[:, 3])
    want_k, want_v = torch.zeros(40, 2, 24), torch.zeros(40, 2, 24)
    pa.write_kv_ref(want_k, want_v, slots, qkv[:, 1], qkv[:, 3])
    if not (torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)):
        sys.exit("FAIL write_kv")
    print("write_kv: equal")


def model_checks(g) -> None:
    """Whole tiny models (float16) with the kernels attached (kernels/rewrite.py: the one-kernel
    q/k norm + RoPE, the fused norms and MoE, the GEMV) against the same models left plain."""
    import copy

    from rung.config import ModelConfig
    from rung.kernels.rewrite import attach_kernels
    from rung.model import Decoder

    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_theta=10000.0, tie_word_embeddings=False)
    for raw in (dict(base, model_type="qwen3"),
                dict(base, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     decoder_sparse_step=1, norm_topk_prob=True, mlp_only_layers=[])):
        torch.manual_seed(0)
        model = Decoder(ModelConfig.from_hf(raw)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        plain = model.half()
        model = attach_kernels(copy.deepcopy(plain))
        ids = torch.randint(0, 96, (2, 7), generator=g)
        with torch.no_grad():
            want = plain(ids)
            calls = []
            fused_qk = triton_elementwise.triton_qk_norm_rope
            triton_elementwise.triton_qk_norm_rope = lambda *a: calls.append(1) or fused_qk(*a)
            got = model(ids)
            triton_elementwise.triton_qk_norm_rope = fused_qk
        if len(calls) != 2:  # one per layer: the seam really took the kernel
            sys.exit(f"FAIL model {raw['model_type']}: the one-kernel q/k path ran {len(calls)} times, not 2")
        check(f"model {raw['model_type']} float16, kernels against the plain chains", got, want, 2e-3)
        # one token (a decode step's row count): the projections take the GEMV (kernels/linear.py)
        with torch.no_grad():
            want = plain(ids[:1, :1])
            gemvs = []
            gemv = triton_gemv.triton_gemv
            triton_gemv.triton_gemv = lambda *a, **k: gemvs.append(1) or gemv(*a, **k)
            got = model(ids[:1, :1])
            triton_gemv.triton_gemv = gemv
        dense = raw["model_type"] == "qwen3"  # per layer: q|k|v, o; a dense MLP's gate|up and down, or the router
        if len(gemvs) != 2 * (4 if dense else 3):
            sys.exit(f"FAIL model {raw['model_type']}: the GEMV ran {len(gemvs)} times")
        check(f"model {raw['model_type']} float16, one token through the decode gemv", got, want, 2e-3)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    elementwise_checks(g, torch.float16)
    elementwise_checks(g, torch.bfloat16)
    add_norm_checks(g, torch.float16)
    add_norm_checks(g, torch.bfloat16)
    gemv_checks(g)
    qk_checks(g, torch.float16)
    qk_checks(g, torch.bfloat16)
    attention_checks(g)
    moe_checks(g)
    routing_checks(g)
    write_kv_checks(g)
    model_checks(g)
    print("all Triton kernels agree with their references")
