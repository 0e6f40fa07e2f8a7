"""rung beside transformers on one GPU, in one run: decode speed against the memory roofline.

Random bf16 weights at the real shapes of Qwen3-0.6B, Qwen3-8B, gpt-oss-20b (rung: MXFP4 experts
kept packed; transformers: bf16 experts) and Qwen3-30B-A3B, from rung's presets; nothing is
downloaded. Each library builds its own random model from the same config, one model on the GPU
at a time. First the kernels are checked against their references (relative error), then per
shape: batch-1 decode tok/s, time to first token at 128 / 2K / 32K prompt tokens, throughput of
64 concurrent requests (rung's engine) against transformers' batch of 16, peak memory, and the
roofline: weight bytes a batch-1 decode step must read over the device-to-device copy bandwidth
measured here.

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
    rid = engine.add_request(prompt(c.vocab_size, args.prompt, next(seed)), greedy(args.new1))
    seq = engine._sequences[rid][0]
    while not seq.output_ids:
        engine.step()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    r["decode_tok_s"] = (len(seq.output_ids) - 1) / (time.perf_counter() - t0)
    r["graph_steps"] = engine.graphs.steps if engine.graphs else 0
    r["steps_ahead"] = engine.stats["steps_ahead"]
    # the same with each step's tokens read before the next is enqueued (engine/overlap.py off)
    engine.config.overlap = False
    rid = engine.add_request(prompt(c.vocab_size, args.prompt, next(seed)), greedy(args.new1))
    seq = engine._sequences[rid][0]
    while not seq.output_ids:
        engine.step()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    r["decode_tok_s_no_overlap"] = (len(seq.output_ids) - 1) / (time.perf_counter() - t0)
    engine.config.overlap = True
    # time to first token
    for n in (128, 2048, long):
        if not n:
            continue
        if n > 128:  # warm-up at this length once (kernel variants for longer tables)
            engine.run([(prompt(c.vocab_size, min(n, 2048), next(seed)), greedy(1))])
        sync()
        t0 = time.perf_counter()
        engine.run([(prompt(c.vocab_size, n, next(seed)), greedy(1))])
        sync()
        r[f"ttft_{n}"] = time.perf_counter() - t0
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
    if long and not eager and r["ttft_2048"] * (long / 2048) * 2 < args.hf_long_budget:
        r[f"ttft_{long}"] = gen(1, long, 1, 5)
    else:
        r[f"ttft_{long}"] = None
        r["skipped_long"] = "eager attention: [heads, 32K, 32K] scores do not fit" if eager else "over the time budget"
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


if __name__ == "__main__":
    main()
