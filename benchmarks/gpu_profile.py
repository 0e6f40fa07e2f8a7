"""Where one batch-1 decode step goes on the GPU: the static decode path (what the CUDA graph
replays) run eagerly under torch.profiler, kernels grouped by name, per step; and the graph's
own replay time for comparison. Random weights at the real shapes (benchmarks/gpu.py's models).
``--kernels``: the decode GEMV (kernels/triton_gemv.py) against cuBLAS on every projection shape of
those models, over a sweep of tiles, each timed as a CUDA graph of back-to-back launches over
distinct weight copies (≥ 256 MB, so every launch reads its weights from memory, as a decode step
does): what ``triton_gemv.gemv_config``'s rule was drawn from; and decode attention split over
the keys against one program a (token, kv head).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_profile.py [--models ...] [--steps 5] [--kernels]
    ... --prefill 32768 --models gpt-oss-20b   (where a long prompt's prefill goes instead)
"""

from __future__ import annotations

import argparse
import collections
import math

import torch

import gpu  # benchmarks/gpu.py: its random models
from rung.engine.cuda_graphs import DecodeGraphs
from rung.kernels.rewrite import attach_kernels
from rung.engine.paged import Chunk, KVPool


def profile(name: str, steps: int, top: int, fmt: str | None = None) -> None:
    model = gpu.rung_model(name)
    if fmt:  # a packed format (rung.quant), experts included: "q8", "q4" (groups of 32), "f8"
        from rung.quant.rewrite import pack_model

        pack_model(model, fmt, 32 if fmt == "q4" else None)
    attach_kernels(model)
    c = model.config
    pool = KVPool(c, 16, 16, torch.bfloat16, "cuda")
    table = list(range(9))
    chunk = Chunk([table] * len(pool.groups), 128, 1)
    ids = torch.tensor([7], device="cuda")
    with torch.inference_mode():
        eager = DecodeGraphs(model, pool, max_model_len=256, max_seqs=1, capture=False)
        for _ in range(3):
            eager.run(ids, [chunk])
        graph = DecodeGraphs(model, pool, max_model_len=256, max_seqs=1, capture=True)
        graph.run(ids, [chunk])
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            graph.graphs[1][0].replay()
        b.record()
        torch.cuda.synchronize()
        replay_us = a.elapsed_time(b) * 1e3 / 20
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                eager.run(ids, [chunk])
            torch.cuda.synchronize()
    kernels = _grouped(prof)
    total = sum(v[1] for v in kernels.values()) / steps
    count = sum(v[0] for v in kernels.values()) / steps
    print(f"\n## {name}: graph replay {replay_us:.0f} µs/step; eager kernels {total:.0f} µs/step busy in "
          f"{count:.0f} kernels ({c.num_layers} layers)")
    for kname, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {us / steps:8.1f} µs  {n / steps:5.0f}×  {kname}")
    del model, pool, eager, graph
    gpu.free()


# (name, N, K, gated, bias): the fused projections of a batch-1 decode step
GEMV_SHAPES = [("0.6b qkv", 4096, 1024, False, False), ("0.6b o", 1024, 2048, False, False),
               ("0.6b gate_up", 6144, 1024, True, False), ("0.6b down", 1024, 3072, False, False),
               ("8b qkv", 6144, 4096, False, False), ("8b o", 4096, 4096, False, False),
               ("8b gate_up", 24576, 4096, True, False), ("8b down", 4096, 12288, False, False),
               ("oss qkv", 5120, 2880, False, True), ("oss o", 2880, 4096, False, True),
               ("oss router", 32, 2880, False, True), ("30b qkv", 5120, 2048, False, False),
               ("30b o", 2048, 4096, False, False), ("30b router", 128, 2048, False, False),
               ("0.6b lm_head", 151936, 1024, False, False)]
SWEEP = [(1, 1024, 4, 1), (2, 1024, 4, 1), (4, 512, 4, 1), (4, 1024, 4, 1), (8, 256, 4, 1), (8, 512, 4, 1),
         (8, 1024, 4, 1), (16, 256, 4, 1), (16, 512, 4, 1), (16, 1024, 4, 1), (32, 256, 4, 1), (32, 512, 4, 1),
         (2, 2048, 4, 1), (4, 2048, 4, 1), (8, 512, 4, 3), (16, 512, 4, 3), (8, 1024, 8, 1), (16, 1024, 8, 1),
         (32, 512, 8, 1), (2, 1024, 4, 3), (4, 512, 4, 3), (1, 2048, 4, 1), (2, 512, 4, 1), (8, 1024, 8, 3)]


def _precompile(jobs):
    """Compile sweep variants in a worker (Triton's disk cache then serves the main process)."""
    from rung.kernels.triton_gemv import triton_gemv

    for config, gated, bias, rows in jobs:
        w = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(256, device="cuda", dtype=torch.bfloat16) if bias else None
        triton_gemv(x, w, b, gated, config)
    torch.cuda.synchronize()


def _graph_time(fn, copies: int) -> float:
    """µs per call of fn(i) for i in range(copies), captured back to back in one graph."""
    return gpu.graph_us([lambda i=i: fn(i) for i in range(copies)])


def gemv_sweep() -> None:
    import concurrent.futures
    import multiprocessing

    import torch.nn.functional as F

    from rung.kernels.elementwise import silu_mul
    from rung.kernels.linear import gated_linear_ref, linear_ref
    from rung.kernels.triton_gemv import gemv_config, triton_gemv

    jobs = sorted({(c, g, b, 1) for _, _, _, g, b in GEMV_SHAPES for c in SWEEP}
                  | {(gemv_config(n, k, 1, g) or SWEEP[0], g, b, 1) for _, n, k, g, b in GEMV_SHAPES})
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(12, mp_context=ctx) as pool:
        list(pool.map(_precompile, [jobs[i::12] for i in range(12)]))
    print("\n## decode GEMV: µs per call (TB/s of the weight bytes), CUDA graph of back-to-back launches, cold weights")
    print("| shape | N × K | MB | rows | cuBLAS | rule (tile) | best of sweep (tile) | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(3)
    for name, n, k, gated, bias in GEMV_SHAPES:
        mb = n * k * 2 / 1e6
        copies = max(2, min(48, math.ceil(256 / mb)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(copies)]
        bs = [torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1 if bias else None
              for _ in range(copies)]
        for rows in (1,):  # 2–4 rows: cuBLAS (triton_gemv.gemv_config)
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g)
            ref_fn = gated_linear_ref if gated else linear_ref
            # what the decode step ran before: cuBLAS, and the one-kernel SwiGLU after it when gated
            base = (lambda i: silu_mul(F.linear(x, ws[i], bs[i]))) if gated else (lambda i: F.linear(x, ws[i], bs[i]))
            t_ref = _graph_time(base, copies)
            rule = gemv_config(n, k, rows, gated)
            cands = [rule] if rule else []
            if rows == 1 and "lm_head" not in name:
                cands += [c for c in SWEEP if c != rule]
            results = []
            for c in cands:
                out = triton_gemv(x, ws[0], bs[0], gated, c)
                err = gpu.rel_err(out, ref_fn(x.double(), ws[0].double(), None if bs[0] is None else bs[0].double()))
                results.append((_graph_time(lambda i: triton_gemv(x, ws[i], bs[i], gated, c), copies), c, err))
            tb = lambda us: mb / us  # noqa: E731  (MB / µs = TB/s)
            rule_s = f"{results[0][0]:.1f} ({tb(results[0][0]):.2f}) {rule}" if rule else "cuBLAS"
            best = min(results) if results else None
            best_s = f"{best[0]:.1f} ({tb(best[0]):.2f}) {best[1]}" if best else "—"
            err = max(r[2] for r in results) if results else float("nan")
            print(f"| {name} | {n} × {k} | {mb:.1f} | {rows} | {t_ref:.1f} ({tb(t_ref):.2f}) | {rule_s} | {best_s} | "
                  f"{err:.1e} |", flush=True)
            if rows == 1 and len(results) > 1:
                print("    sweep:", " ".join(f"{c[0]}x{c[1]}w{c[2]}s{c[3]}={t:.1f}" for t, c, _ in sorted(results)))
        del ws, bs
        gpu.free()


def attention_timing() -> None:
    """Decode attention for one token (batch 1) at the benchmark models' head shapes: the split
    kernel against one program a (token, kv head), a graph of one launch per layer over each
    layer's own pool, as µs a launch."""
    from rung.kernels.paged_attention import decode_tiles, paged_attention_ref
    from rung.kernels.triton_attention import triton_paged_attention

    print("\n## decode attention, one token: µs per layer (graph of a launch per layer, each its own pool)")
    print("| heads (hq/hkv/d) | window | sinks | context | one program a tile | split | rel err split |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(4)
    bs = 16
    for hq, hkv, d, window, sinks, layers in ((16, 8, 128, None, False, 28), (32, 8, 128, None, False, 36),
                                               (64, 8, 64, 128, True, 24), (64, 8, 64, None, True, 24),
                                               (32, 4, 128, None, False, 48)):
        for context in (129, 256, 2048):
            blocks = context // bs + 2
            pools = [(torch.randn(blocks * bs + 1, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g),
                      torch.randn(blocks * bs + 1, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g))
                     for _ in range(layers)]
            table = torch.randperm(blocks, device="cuda", generator=g)[None].int()
            pos = torch.tensor([context - 1], device="cuda")
            q = torch.randn(1, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
            s = torch.randn(hq, device="cuda", dtype=torch.bfloat16, generator=g) if sinks else None
            tiles = decode_tiles(1, "cuda")
            times = {}
            for split in (False, True):
                times[split] = _graph_time(lambda i: triton_paged_attention(
                    q, pools[i][0], pools[i][1], table, pos, tiles, bs, window, s, d**-0.5, True, split=split), layers)
            ref = paged_attention_ref(q, pools[0][0], pools[0][1], table, torch.zeros(1, dtype=torch.long, device="cuda"),
                                      pos, bs, window, s, d**-0.5)
            out = triton_paged_attention(q, pools[0][0], pools[0][1], table, pos, tiles, bs, window, s, d**-0.5, True)
            print(f"| {hq}/{hkv}/{d} | {window} | {sinks} | {context} | {times[False]:.1f} | {times[True]:.1f} | "
                  f"{gpu.rel_err(out, ref):.1e} |", flush=True)
            del pools
    gpu.free()


def _grouped(prof) -> dict:
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[ev.name[:90]]
            k[0] += 1
            k[1] += ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
    return kernels


def profile_prefill(name: str, tokens: int, top: int) -> None:
    """Where a ``tokens``-long prompt's prefill goes (the engine's chunked prefill, 8K tokens a
    step, as benchmarks/gpu.py times TTFT): kernels grouped by name, µs for the whole prompt."""
    import time

    from rung.engine.engine import Engine, EngineConfig
    from rung.engine.sampling_params import SamplingParams

    model = gpu.rung_model(name)
    engine = Engine(model, gpu.NullTokenizer(), EngineConfig(block_size=16, num_blocks=tokens // 16 + 128,
                                                             max_batch_tokens=8192, max_seqs=4, prefix_caching=False),
                    max_model_len=tokens + 1024)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    c = model.config
    with torch.inference_mode():
        engine.run([(gpu.prompt(c.vocab_size, min(tokens, 16384), 1), one)])  # warm-up: kernel variants
        gpu.sync()
        t0 = time.perf_counter()
        engine.run([(gpu.prompt(c.vocab_size, tokens, 2), one)])
        gpu.sync()
        ttft = time.perf_counter() - t0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.run([(gpu.prompt(c.vocab_size, tokens, 3), one)])
            torch.cuda.synchronize()
    kernels = _grouped(prof)
    total = sum(v[1] for v in kernels.values())
    print(f"\n## {name}: prefill of {tokens} tokens, TTFT {ttft * 1e3:.0f} ms; kernels {total / 1e3:.0f} ms busy "
          f"in {sum(v[0] for v in kernels.values())} launches ({c.num_layers} layers)")
    for kname, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {us / 1e3:8.1f} ms  {100 * us / total:4.1f}%  {n:5d}×  {kname}")
    del engine, model
    gpu.free()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=gpu.MODELS)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--format", default=None, help="pack the model first: q8, q4 or f8")
    ap.add_argument("--kernels", "--gemv", action="store_true", help="the GEMV sweep and the attention timing only")
    ap.add_argument("--prefill", type=int, default=0, help="profile the prefill of a prompt this long instead")
    args = ap.parse_args()
    if args.prefill:
        for name in args.models:
            profile_prefill(name, args.prefill, args.top)
        return
    if args.kernels:
        gemv_sweep()
        attention_timing()
        return
    for name in args.models:
        profile(name, args.steps, args.top, args.format)


if __name__ == "__main__":
    main()
