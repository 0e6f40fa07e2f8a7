"""rung beside transformers on one GPU, in one run: decode speed against the memory roofline.

Random bf16 weights at the real shapes of Qwen3-0.6B, Qwen3-8B, gpt-oss-20b (rung: MXFP4 experts
kept packed; transformers: bf16 experts) and Qwen3-30B-A3B, from rung's presets; nothing is
downloaded. Each library builds its own random model from the same config, one model on the GPU
at a time. First the kernels are checked against their references (relative error), then per
shape: batch-1 decode tok/s, time to first token at 128 / 2K / 32K prompt tokens, throughput of
64 concurrent requests (rung's engine) against transformers' batch of 16, peak memory, and the
roofline: weight bytes a batch-1 decode step must read over the device-to-device copy bandwidth
measured here. Prefill: each kind of prefill attention (SDPA, the flash kernel under a few tile
configs, the packed kernel) timed per shape at 32K context (the table that kernels/paged_attention.py's
``prefill_kernel`` rule and ``flash_config`` come from), prefill MFU (the prompt's matrix FLOPs over
TTFT, against the peak of a large bf16 matmul measured in the same run), and Qwen3-8B with YaRN
factor 4 at 128K tokens (TTFT and decode speed at that context). The short prefill table comes last.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu.py [--models qwen3-0.6b ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import time
import traceback
from pathlib import Path

import torch

import rung.kernels as kernels
from rung.config import ModelConfig, preset_dict
from rung.engine.cuda_graphs import DecodeGraphs
from rung.engine.engine import Engine, EngineConfig
from rung.engine.paged import Chunk, KVPool, PagedStep
from rung.engine.sampling_params import SamplingParams
from rung.model import Decoder
from rung.model.moe import MoE

MODELS = ["qwen3-0.6b", "qwen3-8b", "gpt-oss-20b", "qwen3-30b-a3b"]
START = time.perf_counter()
DEV = "cuda"  # --device cpu: a smoke test of this script (tiny --layers, reference paths)


def log(*args):
    print(f"[{time.perf_counter() - START:6.1f}s]", *args, flush=True)


class NullTokenizer:
    """Random weights emit random ids: nothing to detokenize, no EOS."""

    eos_token_ids = ()

    def decode(self, ids, skip_special_tokens=False):
        return ""


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if DEV == "cuda" else float("nan")


def free():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def graph_us(fns, reps: int = 1) -> float:
    """µs per call of ``fns`` (one launch each, e.g. on different copies of a weight, so none stays
    in the L2), captured ``reps`` times back to back in one CUDA graph: the median of 5 replays.
    benchmarks/gpu_quant.py and gpu_profile.py time their kernels with it too."""
    for f in fns:
        f()
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in fns:
                f()
    graph.replay()
    sync()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        sync()
        times.append(a.elapsed_time(b) * 1e3 / (reps * len(fns)))
    return sorted(times)[2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def set_triton(on: bool) -> None:
    os.environ["RUNG_NO_TRITON"] = "0" if on else "1"
    kernels.triton_available.cache_clear()


# ---- the two ceilings -------------------------------------------------------------------------------

def copy_bandwidth() -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy (median of 10)."""
    if DEV != "cuda":
        return 20e9
    src = torch.empty(2**31, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        sync()
        if i >= 3:
            times.append(a.elapsed_time(b) / 1e3)
    bw = 2 * src.numel() * 2 / sorted(times)[len(times) // 2]
    del src, dst
    torch.cuda.empty_cache()
    return bw


def matmul_peak() -> float:
    """bf16 FLOP/s of an 8192³ matrix product on random data (median of 10): MFU's denominator."""
    if DEV != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    times = []
    for i in range(13):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        a @ b
        e1.record()
        sync()
        if i >= 3:
            times.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    return 2 * 8192**3 / sorted(times)[len(times) // 2]


def prefill_flops(c: ModelConfig, n: int) -> float:
    """Matrix FLOPs of one n-token prompt from position 0: 2 per weight per token for the blocks'
    projections (experts at top_k, plus the router), the LM head once (the last token only), and
    attention's QKᵀ and PV: 4·head_dim per query head per visible (query, key) pair (a sliding
    layer's queries see at most its window)."""
    per_token = 0
    for layer in range(c.num_layers):
        per_token += c.hidden_size * (2 * c.q_width + 2 * c.kv_width)
        if c.moe and c.moe_layers[layer]:
            per_token += c.moe.top_k * 3 * c.moe.expert_intermediate_size * c.hidden_size
            per_token += c.moe.num_experts * c.hidden_size
        else:
            per_token += 3 * c.intermediate_size * c.hidden_size
    flops = 2 * per_token * n + 2 * c.vocab_size * c.hidden_size
    for layer in range(c.num_layers):
        w = c.layer_window(layer)
        pairs = n * (n + 1) / 2 if w is None or w >= n else w * (w + 1) / 2 + (n - w) * w
        flops += 4 * c.head_dim * c.num_heads * pairs
    return flops


# ---- kernel checks ----------------------------------------------------------------------------------

def check_kernels() -> list[tuple[str, float]]:
    from rung.kernels.fused_moe import Activation, ExpertWeights, fused_moe, fused_moe_ref
    from rung.kernels.paged_attention import (chunk_tiles, decode_tiles, paged_attention, paged_attention_ref,
                                              tokens_per_tile)

    rows = []
    g = torch.Generator(device=DEV).manual_seed(0)
    dt = torch.bfloat16
    for hq, hkv, d, window, sinks in ((64, 8, 64, 128, True), (32, 8, 128, None, False), (16, 8, 128, None, False)):
        bs, blocks = 16, 600
        kp = torch.randn(blocks * bs + 1, hkv, d, device=DEV, generator=g, dtype=dt)
        vp = torch.randn_like(kp)
        tables = torch.stack([torch.randperm(blocks, device=DEV, generator=g)[:200] for _ in range(4)]).int()
        s = torch.randn(hq, device=DEV, generator=g, dtype=dt) if sinks else None
        pos = torch.tensor([5, 700, 1999, 130], device=DEV)
        q = torch.randn(4, hq, d, device=DEV, generator=g, dtype=dt)
        out = paged_attention(q, kp, vp, tables, pos, decode_tiles(4, DEV), bs, window, s, d**-0.5, decode=True)
        ref = paged_attention_ref(q, kp, vp, tables, torch.arange(4, device=DEV), pos, bs, window, s, d**-0.5)
        rows.append((f"paged attention decode hq={hq} hkv={hkv} d={d} window={window} sinks={sinks}", rel_err(out, ref)))
        if DEV == "cuda":  # the one-program-a-tile decode that batches of 16+ sequences take
            from rung.kernels.triton_attention import triton_paged_attention

            out = triton_paged_attention(q, kp, vp, tables, pos, decode_tiles(4, DEV), bs, window, s, d**-0.5, True,
                                         split=False)
            rows.append((f"paged attention decode (one program a tile) hq={hq} hkv={hkv} d={d} window={window}",
                         rel_err(out, ref)))
        layout = [(0, 1, 0), (1, 300, 1), (301, 77, 2)]
        starts = [900, 0, 1500]
        pos = torch.cat([torch.arange(st, st + n) for (_, n, _), st in zip(layout, starts)]).to(DEV)
        row_of = torch.cat([torch.full((n,), r) for _, n, r in layout]).to(DEV)
        q = torch.randn(pos.numel(), hq, d, device=DEV, generator=g, dtype=dt)
        tiles = chunk_tiles(layout, tokens_per_tile(hq, hkv, d, False), DEV)
        out = paged_attention(q, kp, vp, tables, pos, tiles, bs, window, s, d**-0.5, decode=False, rows=row_of)
        ref = paged_attention_ref(q, kp, vp, tables, row_of, pos, bs, window, s, d**-0.5)
        rows.append((f"paged attention prefill hq={hq} hkv={hkv} d={d} window={window}", rel_err(out, ref)))
    from rung.kernels.elementwise import rms_norm, rms_norm_ref, rotary, rotary_ref

    for d, in_f32 in ((4096, False), (2880, True), (128, False)):
        x = torch.randn(37, d, device=DEV, generator=g, dtype=dt)
        w = torch.randn(d, device=DEV, generator=g, dtype=dt)
        out, ref = rms_norm(x, w, 1e-6, 0.0, in_f32), rms_norm_ref(x, w, 1e-6, 0.0, in_f32)
        rows.append((f"RMSNorm d={d} gain in fp32={in_f32} ({100 * float((out == ref).float().mean()):.1f}% bit-equal)",
                     rel_err(out, ref)))
    for d, rot in ((128, 128), (64, 64)):
        x = torch.randn(2, 7, 32, d, device=DEV, generator=g, dtype=dt).transpose(1, 2)  # [b, h, t, d] as the model has it
        cos = torch.randn(7, rot, device=DEV, generator=g, dtype=dt)[None].expand(2, -1, -1)[:, None]
        sin = torch.randn(7, rot, device=DEV, generator=g, dtype=dt)[None].expand(2, -1, -1)[:, None]
        out, ref = rotary(x, cos, sin), rotary_ref(x, cos, sin)
        rows.append((f"RoPE d={d} ({100 * float((out == ref).float().mean()):.1f}% bit-equal)", rel_err(out, ref)))
    from rung.kernels.elementwise import add_rms_norm, add_rms_norm_ref

    for d, in_f32 in ((1024, False), (2880, True)):
        x = torch.randn(3, d, device=DEV, generator=g, dtype=dt)
        r = torch.randn(3, d, device=DEV, generator=g, dtype=dt)
        w = torch.randn(d, device=DEV, generator=g, dtype=dt)
        (s1, y1), (s2, y2) = add_rms_norm(x, r, w, 1e-6, 0.0, in_f32), add_rms_norm_ref(x, r, w, 1e-6, 0.0, in_f32)
        equal = float(((s1 == s2).float().mean() + (y1 == y2).float().mean()) / 2)
        rows.append((f"add + RMSNorm d={d} gain in fp32={in_f32} ({100 * equal:.1f}% bit-equal)",
                     max(rel_err(s1, s2), rel_err(y1, y2))))
    from rung.kernels.linear import gated_linear, gated_linear_ref, linear, linear_ref

    for n, k, gated, bias in ((4096, 1024, False, False), (6144, 1024, True, False), (5120, 2880, False, True),
                              (4096, 12288, False, False), (32, 2880, False, True)):
        w = torch.randn(n, k, device=DEV, generator=g, dtype=dt) * 0.02
        b = torch.randn(n, device=DEV, generator=g, dtype=dt) * 0.1 if bias else None
        for m in (1, 2, 3, 4):  # one row through the dispatch (the rule's tile); more through the kernel itself
            x = torch.randn(m, k, device=DEV, generator=g, dtype=dt)
            if m == 1 or DEV != "cuda":
                out = (gated_linear if gated else linear)(x, w, b)
            else:
                from rung.kernels.triton_gemv import gemv_config, triton_gemv

                out = triton_gemv(x, w, b, gated, gemv_config(n, k, 1, gated))
            ref = (gated_linear_ref if gated else linear_ref)(x.double(), w.double(), None if b is None else b.double())
            rows.append((f"decode GEMV {n}x{k} gated={gated} bias={bias} rows={m}", rel_err(out, ref)))
    for e, k, h, i, kind, packed in ((128, 8, 2048, 768, "silu", False), (32, 4, 2880, 2880, "swiglu_clamped", True)):
        for n in (1, 333):
            x = torch.randn(n, h, device=DEV, generator=g, dtype=dt)
            top, experts = torch.topk(torch.randn(n, e, device=DEV, generator=g), k)
            weights = torch.softmax(top, -1).to(dt)
            if packed:
                def mx(rows_, cols):
                    return (torch.randint(0, 256, (e, rows_, cols // 2), device=DEV, dtype=torch.uint8, generator=g),
                            torch.randint(118, 124, (e, rows_, cols // 32), device=DEV, dtype=torch.uint8, generator=g))
                (gb, gs), (ub, us), (db, ds) = mx(i, h), mx(i, h), mx(h, i)
                bias = [torch.randn(e, i, device=DEV, dtype=dt, generator=g) * 0.1 for _ in range(2)]
                w = ExpertWeights(gb, ub, db, gs, us, ds, bias[0], bias[1],
                                  torch.randn(e, h, device=DEV, dtype=dt, generator=g) * 0.1)
            else:
                w = ExpertWeights(*(torch.randn(e, a, b, device=DEV, dtype=dt, generator=g) * 0.03
                                    for a, b in ((i, h), (i, h), (h, i))))
            act = Activation(kind)
            out = fused_moe(x, weights, experts, w, act)
            ref = fused_moe_ref(x, weights, experts, w, act)
            rows.append((f"fused MoE {'MXFP4' if packed else 'bf16'} E={e} k={k} tokens={n}", rel_err(out, ref)))
    return rows


def moe_kernel_timing() -> list[dict]:
    """One token through one MoE layer at the real shapes, replayed from a CUDA graph (no launch
    cost), as µs a layer and the bandwidth of the active experts' bytes: for packed MXFP4 experts
    the decode GEMV against the slot-layout GEMM (RUNG_MOE_GEMV=0); bf16 experts always take the
    GEMM (kernels/triton_moe.py: GEMV_MAX), so they have one row."""
    from rung.kernels.fused_moe import Activation, ExpertWeights, fused_moe

    if DEV != "cuda":
        return []
    out = []
    g = torch.Generator(device=DEV).manual_seed(5)
    dt = torch.bfloat16
    for name, e, k, h, i, kind, packed in (("qwen3-30b-a3b", 128, 8, 2048, 768, "silu", False),
                                           ("gpt-oss-20b", 32, 4, 2880, 2880, "swiglu_clamped", True)):
        if packed:
            def mx(r_, c_):
                return (torch.randint(0, 256, (e, r_, c_ // 2), device=DEV, dtype=torch.uint8, generator=g),
                        torch.randint(116, 120, (e, r_, c_ // 32), device=DEV, dtype=torch.uint8, generator=g))
            (gb, gs), (ub, us), (db, ds) = mx(i, h), mx(i, h), mx(h, i)
            w = ExpertWeights(gb, ub, db, gs, us, ds, *(torch.zeros(e, n_, device=DEV, dtype=dt) for n_ in (i, i, h)))
            active = k * (3 * i * h // 2 + 3 * i * h // 32)
        else:
            w = ExpertWeights(*(torch.randn(e, a, b, device=DEV, dtype=dt, generator=g) * 0.03
                                for a, b in ((i, h), (i, h), (h, i))))
            active = k * 3 * i * h * 2
        for n in (1, 4):
            x = torch.randn(n, h, device=DEV, generator=g, dtype=dt)
            top, experts = torch.topk(torch.randn(n, e, device=DEV, generator=g), k)
            weights = torch.softmax(top, -1).to(dt)
            row = dict(shape=name, tokens=n, active_MB=n * active / 1e6)
            for label, flag in ((("gemv", "1"), ("gemv_portable", "1")) if packed else ()) + (("gemm", "0"),):
                os.environ["RUNG_MOE_GEMV"] = flag
                os.environ["RUNG_MXFP4_ASM"] = "0" if label == "gemv_portable" else "1"  # the PTX decode or not
                act = Activation(kind)
                try:
                    for _ in range(2):
                        fused_moe(x, weights, experts, w, act)  # tune, compile (graph_us runs it once more)
                    us = graph_us([lambda: fused_moe(x, weights, experts, w, act)], reps=20)
                    row[f"{label}_us"] = us
                    row[f"{label}_TBps"] = n * active / (us * 1e-6) / 1e12
                except Exception as exc:
                    row[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:200]
            os.environ.pop("RUNG_MOE_GEMV", None)
            os.environ.pop("RUNG_MXFP4_ASM", None)
            log("MoE layer timing", row)
            out.append(row)
    return out


ATTN_SHAPES = (("qwen3-8b", 32, 8, 128, None, False), ("qwen3-0.6b", 16, 8, 128, None, False),
               ("qwen3-30b-a3b", 32, 4, 128, None, False), ("gpt-oss-20b", 64, 8, 64, None, True),
               ("gpt-oss-20b sliding", 64, 8, 64, 128, True))
FLASH_CONFIGS = {128: ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)),
                 64: ((128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3))}


def prefill_attention_timing(context: int = 32768, chunk: int = 8192) -> list[dict]:
    """One layer's prefill attention for an ``chunk``-token chunk at the start of a prompt and at
    its end (keys [0, context)), per kind: SDPA on the chunk's own k/v (fresh prompts only; and, for
    the last chunk, SDPA's flash kernel on keys gathered from the pool, the gather timed with it),
    the flash kernel under each of FLASH_CONFIGS, the packed kernel; and a 64-token chunk at the end
    (speculative / tail chunks: flash against packed). TFLOP/s of the visible (query, key) pairs."""
    from rung.kernels.paged_attention import chunk_tiles, flash_config, sdpa_prefill, tokens_per_tile
    from rung.kernels.triton_attention import flash_prefill_attention, triton_paged_attention

    if DEV != "cuda":
        return []
    import triton.testing

    rows = []
    g = torch.Generator(device=DEV).manual_seed(7)
    dt, bs = torch.bfloat16, 16
    for name, hq, hkv, d, window, has_sinks in ATTN_SHAPES:
        kp = torch.randn(context + bs, hkv, d, device=DEV, dtype=dt, generator=g)
        vp = torch.randn_like(kp)
        tables = torch.arange(context // bs + 1, device=DEV, dtype=torch.int32)[None]
        sinks = torch.randn(hq, device=DEV, dtype=dt, generator=g) if has_sinks else None
        for start, n in ((0, chunk), (context - chunk, chunk), (context - 64, 64)):
            pos = torch.arange(start, start + n, device=DEV)
            q = torch.randn(n, hq, d, device=DEV, dtype=dt, generator=g)
            pairs = sum(min(p + 1, window or p + 1) for p in range(start, start + n))
            flop = 4 * d * hq * pairs
            row = dict(shape=name, start=start, tokens=n)
            fns = {}
            for cfg in FLASH_CONFIGS[d]:
                tiles = chunk_tiles([(0, n, 0)], cfg[0], DEV)
                fns[f"flash{cfg}"] = (lambda tiles=tiles, cfg=cfg: flash_prefill_attention(
                    q, kp, vp, tables, pos, tiles, bs, window, sinks, d**-0.5, config=cfg))
            packed_tiles = chunk_tiles([(0, n, 0)], tokens_per_tile(hq, hkv, d, False), DEV)
            fns["packed"] = lambda: triton_paged_attention(q, kp, vp, tables, pos, packed_tiles, bs, window, sinks,
                                                           d**-0.5, False)
            if sinks is None and window is None:
                qs = q.transpose(0, 1)[None]  # [1, hq, n, d] as the model has it
                if start == 0:
                    ks, vs = kp[:n].transpose(0, 1)[None], vp[:n].transpose(0, 1)[None]
                    fns["sdpa"] = lambda: sdpa_prefill(qs, ks, vs, d**-0.5)
                elif n > 64:
                    def gathered():  # bottom-right causal: flash's is_causal with fewer queries than keys
                        idx = torch.arange(start + n, device=DEV)
                        kg, vg = kp[idx].transpose(0, 1)[None], vp[idx].transpose(0, 1)[None]
                        return torch.ops.aten._scaled_dot_product_flash_attention(qs, kg, vg, 0.0, is_causal=True,
                                                                                  scale=d**-0.5)[0]
                    fns["sdpa_gathered"] = gathered
            ref = None
            for label, fn in fns.items():
                try:
                    out = fn()
                    if label.startswith("flash") or label == "packed":
                        ref = out if ref is None else ref
                        row[f"{label}_err"] = rel_err(out, ref)
                    ms = triton.testing.do_bench(fn, warmup=5, rep=40)
                    row[label] = flop / (ms * 1e-3) / 1e12
                except Exception as exc:
                    row[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:160]
            row["rule"] = flash_config(d, dt)
            log("prefill attention TFLOP/s", json.dumps(row, default=str))
            rows.append(row)
        del kp, vp
        free()
    return rows


# ---- models -----------------------------------------------------------------------------------------

def model_config(name: str, layers: int | None) -> dict:
    raw = preset_dict(name)
    if layers:  # a cut-down stack (smoke tests; shapes that would not fit the time)
        raw = dict(raw, num_hidden_layers=layers)
        if "layer_types" in raw:
            raw["layer_types"] = raw["layer_types"][:layers]
    return raw


def rung_model(name: str, layers: int | None = None) -> Decoder:
    """Random bf16 weights on the GPU; gpt-oss's experts packed as MXFP4 (random bytes, scales
    2^-11..2^-8 so the decoded weights spread like std-0.02 ones: larger ones make the random
    model chaotic, and bf16 rounding alone then moves its logits by tens of percent)."""
    config = ModelConfig.from_hf(model_config(name, layers))
    with torch.device("meta"):
        model = Decoder(config).to(torch.bfloat16)
    packed = "gpt-oss" in name
    if packed:
        for m in model.modules():
            if isinstance(m, MoE):
                e, i, h = m.gate_proj.shape
                meta = lambda r, c: (torch.empty(e, r, c // 32, 16, dtype=torch.uint8, device="meta"),  # noqa: E731
                                     torch.empty(e, r, c // 32, dtype=torch.uint8, device="meta"))
                m.keep_packed(meta(i, h), meta(i, h), meta(h, i))
    model = model.to_empty(device=DEV)
    with torch.no_grad():
        for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.dtype == torch.uint8:
                if pname.endswith("_scales"):
                    p.random_(116, 120)
                else:
                    p.random_(0, 256)
            elif "norm" in pname:
                p.fill_(1.0)
            elif pname.endswith("bias") or pname.endswith("sinks"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model.requires_grad_(False).eval()


def decode_bytes(model: torch.nn.Module, config: ModelConfig) -> int:
    """Weight bytes one batch-1 decode step reads: everything but the embedding table (one row),
    which the LM head reads whole when tied; experts at top_k / num_experts."""
    total = 0
    frac = config.moe.top_k / config.moe.num_experts if config.moe else 1.0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point() and t.dtype != torch.uint8:
            continue
        nbytes = t.numel() * t.element_size()
        if name.startswith("embed.") and not config.tie_word_embeddings:
            continue
        if ".mlp." in name and any(k in name for k in ("gate_proj", "up_proj", "down_proj", "_bias")) and config.moe:
            nbytes *= frac
        total += nbytes
    return int(total)


def check_model(model: Decoder) -> tuple[float, float]:
    """A 64-token prefill through PagedStep and one decode step through a captured CUDA graph,
    against the model's plain path (SDPA, expert loop, no Triton): relative logit error."""
    c = model.config
    g = torch.Generator(device=DEV).manual_seed(1)
    ids = torch.randint(0, c.vocab_size, (1, 64), device=DEV, generator=g)
    with torch.inference_mode():
        set_triton(False)
        ref = model(ids)[0]  # [64, V]
        nxt = ref[-1].argmax().view(1, 1)
        ref2 = model(torch.cat((ids, nxt), 1))[0, -1]
        set_triton(True)
        pool = KVPool(c, 8, 16, torch.bfloat16, DEV)
        table = list(range(5))
        step = PagedStep(pool, [Chunk([table] * len(pool.groups), 0, 64)], DEV)
        fast = model.logits(model.hidden_states(ids, step)[0])
        graphs = DecodeGraphs(model, pool, max_model_len=128, max_seqs=2, capture=DEV == "cuda")
        fast2 = graphs.run(nxt[0], [Chunk([table] * len(pool.groups), 64, 1)])
        captured = graphs.steps == 1 and (1 in graphs.graphs or not graphs.capture)
    return rel_err(fast, ref), rel_err(fast2[0], ref2) if captured else float("nan")


def prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode_tok_s(engine: Engine, ids: list[int], params: SamplingParams):
    """Batch-1 decode speed of one request: (tok/s over the steps after its first token, its Sequence)."""
    rid = engine.add_request(ids, params)
    seq = engine._sequences[rid][0]
    while not seq.output_ids:
        engine.step()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return (len(seq.output_ids) - 1) / (time.perf_counter() - t0), seq


def rung_bench(name: str, args, bw: float) -> dict:
    reset_peak()
    t = time.perf_counter()
    model = rung_model(name, args.layers)
    c = model.config
    r = dict(build_s=time.perf_counter() - t, bytes=decode_bytes(model, c))
    long = args.long if args.long else 0
    tokens = max(64 * (args.prompt + args.new64 + 16), long + 1024)
    engine = Engine(model, NullTokenizer(), EngineConfig(block_size=16, num_blocks=tokens // 16 + 64,
                                                         max_batch_tokens=8192, max_seqs=64, prefix_caching=False),
                    max_model_len=max(long + 1024, 4096))
    # checked as it will be timed: the engine has attached the kernels (kernels/rewrite.py)
    r["check_prefill"], r["check_graph_decode"] = check_model(model)
    log(name, "rung built", f"{r['bytes'] / 1e9:.2f} GB/step", "checks", r["check_prefill"], r["check_graph_decode"])
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    seed = iter(range(10_000))
    engine.run([(prompt(c.vocab_size, args.prompt, next(seed)), greedy(8))])  # warm-up: kernels, 1-row graph
    # batch-1 decode: steps after the first token
    r["decode_tok_s"], _ = decode_tok_s(engine, prompt(c.vocab_size, args.prompt, next(seed)), greedy(args.new1))
    r["graph_steps"] = engine.graphs.steps if engine.graphs else 0
    r["steps_ahead"] = engine.stats["steps_ahead"]
    # the same with each step's tokens read before the next is enqueued (engine/overlap.py off)
    engine.config.overlap = False
    r["decode_tok_s_no_overlap"], _ = decode_tok_s(engine, prompt(c.vocab_size, args.prompt, next(seed)),
                                                   greedy(args.new1))
    engine.config.overlap = True
    # time to first token
    for n in (128, 2048, long):
        if not n:
            continue
        if n > 128:  # warm-up once: kernel variants for longer tables, and past one step's chunk the
            # flash kernel that continuing chunks take (kernels/paged_attention.py's prefill_kernel)
            engine.run([(prompt(c.vocab_size, min(n, 2048 if n <= 8192 else 16384), next(seed)), greedy(1))])
        sync()
        t0 = time.perf_counter()
        engine.run([(prompt(c.vocab_size, n, next(seed)), greedy(1))])
        sync()
        r[f"ttft_{n}"] = time.perf_counter() - t0
    if long:
        r["prefill_tflops"] = prefill_flops(c, long) / r[f"ttft_{long}"] / 1e12
    # 64 concurrent requests
    engine.run([(prompt(c.vocab_size, args.prompt, next(seed)), greedy(4)) for _ in range(64)])  # 64-row graph
    reqs = [(prompt(c.vocab_size, args.prompt, next(seed)), greedy(args.new64)) for _ in range(64)]
    before = engine.stats["generated_tokens"]
    t0 = time.perf_counter()
    engine.run(reqs)
    r["tput64_tok_s"] = (engine.stats["generated_tokens"] - before) / (time.perf_counter() - t0)
    r["peak_gb"] = peak_gb()
    r["roofline_tok_s"] = bw / r["bytes"]
    r["kv_pool_gb"] = engine.pool.bytes / 1e9
    del engine, model
    free()
    return r


def long_context_bench(args) -> dict:
    """Qwen3-8B with YaRN factor 4 (``rope_scaling`` as Qwen documents it for 131,072 tokens) on one
    GPU: TTFT of an ``args.ctx128`` -token prompt (chunked prefill: 8K tokens a step bound the
    activations; the paged pool holds the whole context), then greedy decode tok/s at that context."""
    reset_peak()
    raw = dict(model_config("qwen3-8b", args.layers), max_position_embeddings=131072,
               rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    config = ModelConfig.from_hf(raw)
    with torch.device("meta"):
        model = Decoder(config).to(torch.bfloat16)
    model = model.to_empty(device=DEV)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.fill_(1.0) if "norm" in pname else p.normal_(0.0, 0.02)
    model.requires_grad_(False).eval()
    n, new = args.ctx128, 65
    engine = Engine(model, NullTokenizer(), EngineConfig(block_size=16, num_blocks=(n + new) // 16 + 64,
                                                         max_batch_tokens=8192, max_seqs=4, prefix_caching=False),
                    max_model_len=n + new + 16)
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    # warm-up: SDPA's first chunk, the flash kernel's continuing ones, the decode graphs
    engine.run([(prompt(config.vocab_size, min(16384, n // 2), 1), SamplingParams(temperature=0, max_tokens=4,
                                                                                 ignore_eos=True))])
    sync()
    t0 = time.perf_counter()
    rid = engine.add_request(prompt(config.vocab_size, n, 2), greedy)
    seq = engine._sequences[rid][0]
    while not seq.output_ids:
        engine.step()
    sync()
    r = dict(tokens=n, ttft=time.perf_counter() - t0)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    r["decode_tok_s"] = (len(seq.output_ids) - 1) / (time.perf_counter() - t0)
    r["prefill_tflops"] = prefill_flops(config, n) / r["ttft"] / 1e12
    r["kv_pool_gb"] = engine.pool.bytes / 1e9
    r["peak_gb"] = peak_gb()
    del engine, model
    free()
    return r


def hf_model(name: str, layers: int | None = None):
    import transformers as tf

    raw = {k: v for k, v in model_config(name, layers).items() if not k.startswith("_") and k != "quantization_config"}
    config = tf.AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device(DEV):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def hf_bench(name: str, args, bw: float) -> dict:
    reset_peak()
    t = time.perf_counter()
    model = hf_model(name, args.layers)
    cfg = ModelConfig.from_hf(model_config(name, args.layers))
    frac = cfg.moe.top_k / cfg.moe.num_experts if cfg.moe else 1.0
    nbytes = 0
    for pname, p in model.named_parameters():
        if "embed_tokens" in pname and not cfg.tie_word_embeddings:
            continue
        nbytes += p.numel() * p.element_size() * (frac if ".experts." in pname else 1.0)
    r = dict(build_s=time.perf_counter() - t, bytes=int(nbytes), attn=model.config._attn_implementation)
    vocab = cfg.vocab_size

    def gen(batch, n_prompt, new, seed):
        ids = torch.tensor([prompt(vocab, n_prompt, seed + b) for b in range(batch)], device=DEV)
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t0

    gen(1, 16, 2, 0)  # warm-up
    t1 = gen(1, args.prompt, 1, 1)
    tn = gen(1, args.prompt, args.hf_new, 2)
    r["decode_tok_s"] = (args.hf_new - 1) / (tn - t1)
    r["ttft_128"] = gen(1, 128, 1, 3)
    r["ttft_2048"] = gen(1, 2048, 1, 4)
    long = args.long
    eager = r["attn"] == "eager"
    # eager attention materialises [heads, n, n] scores: 32K would not fit; a long prefill is skipped
    # too when the 2K one says it would take longer than the budget
    if long and eager and DEV == "cuda":
        # transformers runs gpt-oss's sinks in eager or flex attention (no SDPA): its best runnable
        # attention for a long prompt is flex; the first call compiles it for the shape, the second is timed
        try:
            model.set_attn_implementation("flex_attention")
            gen(1, long, 1, 5)
            r[f"ttft_{long}"] = gen(1, long, 1, 6)
            r["attn_long"] = "flex_attention"
        except Exception as exc:
            r[f"ttft_{long}"] = None
            r["skipped_long"] = f"eager: [heads, 32K, 32K] scores do not fit; flex: {type(exc).__name__}: {exc}"[:300]
    elif long and not eager and r["ttft_2048"] * (long / 2048) * 2 < args.hf_long_budget:
        r[f"ttft_{long}"] = gen(1, long, 1, 5)
    else:
        r[f"ttft_{long}"] = None
        r["skipped_long"] = "eager attention: [heads, 32K, 32K] scores do not fit" if eager else "over the time budget"
    if r.get(f"ttft_{long}"):
        r["prefill_tflops"] = prefill_flops(cfg, long) / r[f"ttft_{long}"] / 1e12
    if r.get("attn_long"):
        model.set_attn_implementation(r["attn"])
    r["tput16_tok_s"] = 16 * args.hf_new16 / gen(16, args.prompt, args.hf_new16, 100)
    r["peak_gb"] = peak_gb()
    r["roofline_tok_s"] = bw / r["bytes"]
    del model
    free()
    return r


# ---- report -------------------------------------------------------------------------------------------

def fmt(v, spec=".1f"):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(results: dict, long: int) -> str:
    lines = ["| shape | lib | decode b=1 tok/s | % roofline | roofline tok/s | TTFT 128 ms | TTFT 2K ms | "
             f"TTFT {long // 1024}K ms | throughput tok/s | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, libs in results.items():
        for lib, r in libs.items():
            if "error" in r:
                lines.append(f"| {name} | {lib} | error: {r['error'][:80]} |||||||")
                continue
            tput = r.get("tput64_tok_s", r.get("tput16_tok_s"))
            label = "64 concurrent" if "tput64_tok_s" in r else "batch 16"
            ttl = r.get(f"ttft_{long}")
            lines.append(
                f"| {name} | {lib} | {fmt(r['decode_tok_s'])} | {fmt(100 * r['decode_tok_s'] / r['roofline_tok_s'], '.0f')}% | "
                f"{fmt(r['roofline_tok_s'], '.0f')} | {fmt(1e3 * r['ttft_128'], '.0f')} | {fmt(1e3 * r['ttft_2048'], '.0f')} | "
                f"{fmt(None if ttl is None else 1e3 * ttl, '.0f')} | {fmt(tput, '.0f')} ({label}) | {fmt(r['peak_gb'])} |")
        libs_ = results[name]
        if "rung" in libs_ and "transformers" in libs_ and "error" not in libs_["rung"] and "error" not in libs_["transformers"]:
            a, b = libs_["rung"], libs_["transformers"]
            lines.append(f"| {name} | rung ÷ transformers | {a['decode_tok_s'] / b['decode_tok_s']:.1f}× | | | "
                         f"{b['ttft_128'] / a['ttft_128']:.1f}× | {b['ttft_2048'] / a['ttft_2048']:.1f}× | | "
                         f"{a['tput64_tok_s'] / b['tput16_tok_s']:.1f}× | |")
    return "\n".join(lines)


def prefill_table(results: dict, long: int, peak: float, long_row: dict | None) -> str:
    """The short table: TTFT at ``long`` tokens, rung against transformers, and prefill MFU."""
    lines = [f"| shape | rung TTFT {long // 1024}K ms | transformers TTFT ms (attention) | rung ÷ transformers | "
             "rung MFU | transformers MFU |", "|---|---|---|---|---|---|"]
    for name, libs in results.items():
        a, b = libs.get("rung", {}), libs.get("transformers", {})
        ta, tb = a.get(f"ttft_{long}"), b.get(f"ttft_{long}")
        attn = b.get("attn_long", b.get("attn", "—"))
        lines.append(f"| {name} | {fmt(None if ta is None else 1e3 * ta, '.0f')} | "
                     f"{fmt(None if tb is None else 1e3 * tb, '.0f')} ({attn}) | "
                     f"{fmt(ta / tb if ta and tb else None, '.2f')} | "
                     f"{fmt(100e12 * a['prefill_tflops'] / peak if 'prefill_tflops' in a else None, '.0f')}% | "
                     f"{fmt(100e12 * b['prefill_tflops'] / peak if 'prefill_tflops' in b else None, '.0f')}% |")
    if long_row and "error" not in long_row:
        lines.append(f"| qwen3-8b YaRN ×4, {long_row['tokens']:,} tokens | {1e3 * long_row['ttft']:.0f} | — | — | "
                     f"{100e12 * long_row['prefill_tflops'] / peak:.0f}% | — |")
        lines.append(f"\n128K: decode {long_row['decode_tok_s']:.1f} tok/s at that context; KV pool "
                     f"{long_row['kv_pool_gb']:.1f} GB, peak {long_row['peak_gb']:.1f} GB")
    elif long_row:
        lines.append(f"\n128K: error: {long_row['error'][:200]}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new1", type=int, default=128, help="rung batch-1 decode tokens")
    ap.add_argument("--new64", type=int, default=128, help="new tokens per request, 64 concurrent")
    ap.add_argument("--hf-new", type=int, default=24, help="transformers batch-1 decode tokens")
    ap.add_argument("--hf-new16", type=int, default=24, help="transformers batch-16 new tokens")
    ap.add_argument("--long", type=int, default=32768, help="the long TTFT prompt (0: skip)")
    ap.add_argument("--hf-long-budget", type=float, default=25.0, help="seconds allowed for transformers' long prefill")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-moe-timing", action="store_true")
    ap.add_argument("--no-attention-timing", action="store_true")
    ap.add_argument("--attention-only", action="store_true", help="the prefill attention table, no models")
    ap.add_argument("--ctx128", type=int, default=131072, help="the YaRN Qwen3-8B prompt (0: skip)")
    ap.add_argument("--layers", type=int, default=None, help="cut every stack to this many layers (labelled)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    global DEV
    DEV = args.device

    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, triton=triton_version, layers=args.layers,
               transformers=transformers.__version__, python=platform.python_version(),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    log(env)
    bw = copy_bandwidth()
    env["copy_bw_TBps"] = bw / 1e12
    log(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)")
    peak = matmul_peak()
    env["matmul_peak_TFLOPs"] = peak / 1e12
    log(f"bf16 8192³ matmul: {peak / 1e12:.0f} TFLOP/s")
    attn_rows = []
    if not args.no_attention_timing:
        try:
            attn_rows = prefill_attention_timing()
        except Exception:
            traceback.print_exc()
    if args.attention_only:
        return
    try:
        import rung.kernels.triton_moe as triton_moe
    except ImportError:
        triton_moe = None
    checks = []
    try:
        checks = check_kernels()
    except Exception:
        traceback.print_exc()
    for what, err in checks:
        log(f"check {what}: rel err {err:.2e} {'ok' if err < 2e-2 else 'FAIL'}")
    moe_rows = []
    if not args.no_moe_timing:
        try:
            moe_rows = moe_kernel_timing()
        except Exception:
            traceback.print_exc()
    results: dict = {}
    long_row = None
    for name in args.models:
        results[name] = {}
        for lib, fn in (("rung", rung_bench), ("transformers", hf_bench)):
            if lib == "transformers" and args.no_hf:
                continue
            log(f"{name}: {lib} ...")
            try:
                results[name][lib] = fn(name, args, bw)
            except Exception as exc:
                traceback.print_exc()
                results[name][lib] = dict(error=f"{type(exc).__name__}: {exc}")
                free()
            if triton_moe is not None and lib == "rung":
                results[name][lib]["mxfp4_dot_scaled"] = {str(k): v for k, v in triton_moe.DOT_SCALED_OK.items()}
            log(name, lib, json.dumps(results[name][lib], default=str))
            Path(args.out, "gpu_results.json").write_text(json.dumps(dict(env=env, checks=checks, moe_layer=moe_rows,
                                                                          results=results),
                                                                     indent=1, default=str))
    if args.ctx128:
        log("qwen3-8b YaRN x4 at", args.ctx128, "tokens ...")
        try:
            long_row = long_context_bench(args)
        except Exception as exc:
            traceback.print_exc()
            long_row = dict(error=f"{type(exc).__name__}: {exc}")
            free()
        log("128K", json.dumps(long_row, default=str))
    Path(args.out, "gpu_results.json").write_text(json.dumps(dict(env=env, checks=checks, moe_layer=moe_rows,
                                                                  attention=attn_rows, results=results,
                                                                  long_context=long_row), indent=1, default=str))
    print()
    print(f"{env['date']} · {env['device']} · torch {env['torch']} · triton {env['triton']} · "
          f"transformers {env['transformers']} · copy {bw / 1e12:.2f} TB/s"
          + (f" · every stack cut to {args.layers} layers" if args.layers else ""))
    print(f"checks: {sum(e < 2e-2 for _, e in checks)}/{len(checks)} kernels within 2e-2 relative error; "
          + ", ".join(f"{n} prefill {fmt(r['rung'].get('check_prefill'), '.1e')} / graph decode "
                      f"{fmt(r['rung'].get('check_graph_decode'), '.1e')}" for n, r in results.items() if "rung" in r))
    if moe_rows:
        print("one MoE layer, one CUDA-graph replay: µs (TB/s of the active experts' bytes)")
        for r in moe_rows:
            gemv = (f"decode GEMV {fmt(r['gemv_us'])} µs ({fmt(r['gemv_TBps'], '.2f')}), portable decode "
                    f"{fmt(r.get('gemv_portable_us'))} µs ({fmt(r.get('gemv_portable_TBps'), '.2f')}) · "
                    if "gemv_us" in r else "")
            print(f"  {r['shape']} tokens={r['tokens']} ({r['active_MB']:.0f} MB): {gemv}slot-layout GEMM "
                  f"{fmt(r.get('gemm_us'))} µs ({fmt(r.get('gemm_TBps'), '.2f')})")
    print("batch-1 decode with each step's tokens read before the next is enqueued (overlap off): "
          + ", ".join(f"{n} {fmt(r['rung'].get('decode_tok_s_no_overlap'))}" for n, r in results.items() if "rung" in r))
    print(table(results, args.long))
    if attn_rows:
        print("prefill attention, one layer, TFLOP/s of the visible pairs (bf16; chunk at the start / end of a "
              "32K prompt; the rule's flash config marked *):")
        for r in attn_rows:
            chosen = f"flash{tuple(r['rule'])}"
            cells = ", ".join(f"{k}{'*' if k == chosen else ''} {v:.0f}" for k, v in r.items()
                              if isinstance(v, float) and not k.endswith("_err"))
            print(f"  {r['shape']} start={r['start']} tokens={r['tokens']}: {cells}")
    print()
    print(f"prefill (bf16 matmul peak {peak / 1e12:.0f} TFLOP/s):")
    print(prefill_table(results, args.long, peak, long_row))


if __name__ == "__main__":
    main()
