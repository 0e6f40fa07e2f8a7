"""Where one batch-1 decode step goes on the GPU: the static decode path (what the CUDA graph
replays) run eagerly under torch.profiler, kernels grouped by name, per step; and the graph's
own replay time for comparison. Random weights at the real shapes (benchmarks/gpu.py's models).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_profile.py [--models ...] [--steps 5]
"""

from __future__ import annotations

import argparse
import collections

import torch

import gpu  # benchmarks/gpu.py: its random models
from rung.engine.cuda_graphs import DecodeGraphs, fuse_projections
from rung.engine.paged import Chunk, KVPool


def profile(name: str, steps: int, top: int) -> None:
    model = gpu.rung_model(name)
    fuse_projections(model)
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
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[ev.name[:90]]
            k[0] += 1
            k[1] += ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
    total = sum(v[1] for v in kernels.values()) / steps
    count = sum(v[0] for v in kernels.values()) / steps
    print(f"\n## {name}: graph replay {replay_us:.0f} µs/step; eager kernels {total:.0f} µs/step busy in "
          f"{count:.0f} kernels ({c.num_layers} layers)")
    for kname, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {us / steps:8.1f} µs  {n / steps:5.0f}×  {kname}")
    del model, pool, eager, graph
    gpu.free()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=gpu.MODELS)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()
    for name in args.models:
        profile(name, args.steps, args.top)


if __name__ == "__main__":
    main()
