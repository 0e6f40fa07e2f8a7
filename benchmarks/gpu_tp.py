"""Tensor parallelism on one multi-GPU host, in one run: decode speed at TP = 1, 2, 4 (8).

Random bf16 weights at the real shapes of rung's presets (every rank builds only its own shard;
nothing is downloaded): batch-1 decode tok/s and its speed-up over TP=1 in the same run, % of the
per-GPU roofline (the weight bytes one rank reads per step over the copy bandwidth measured on
GPU 0), time to first token at 2K and 32K prompt tokens, throughput of 64 concurrent requests.

    PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks python3 benchmarks/gpu_tp.py [--runs qwen3-8b:1,2,4 ...]

Targets (issue 22): Qwen3-8B TP=2 >= 1.6x TP=1, TP=4 >= 2.4x; Qwen3-32B and gpt-oss-120b (MXFP4
experts) at TP=2; Qwen3-235B-A22B bf16 at TP=4 or 8. A smoke test on the CPU (gloo):
``--device cpu --layers 2 --runs qwen3-0.6b:1,2 --long 0 --new1 8``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from gpu import decode_tok_s, prompt  # benchmarks/gpu.py: the batch-1 decode timing and random prompts
from rung.config import ModelConfig, preset_dict
from rung.distributed.collectives import install_collectives
from rung.distributed.shard import ShardPlan, sharded_meta_decoder
from rung.distributed.workers import TensorParallelGroup
from rung.engine.engine import Engine, EngineConfig
from rung.engine.sampling_params import SamplingParams
from rung.kernels.rewrite import attach_kernels
from rung.model.moe import MoE

RUNS = ["qwen3-8b:1,2,4", "qwen3-32b:1,2", "gpt-oss-120b:1,2", "qwen3-235b-a22b:4,8"]
START = time.perf_counter()


def log(*args):
    print(f"[{time.perf_counter() - START:6.1f}s]", *args, flush=True)


class NullTokenizer:
    eos_token_ids = ()

    def decode(self, ids, skip_special_tokens=False):
        return ""


def config_of(name: str) -> ModelConfig:
    raw = preset_dict(name)
    layers = int(os.environ.get("RUNG_BENCH_LAYERS", "0"))
    if layers:  # a cut-down stack (smoke tests)
        raw = dict(raw, num_hidden_layers=layers)
        if "layer_types" in raw:
            raw["layer_types"] = raw["layer_types"][:layers]
    return ModelConfig.from_hf(raw)


def random_shard(name: str, dtype: str, device, rank: int, world: int):
    """This rank's random shard (the TensorParallelGroup loader hook); gpt-oss's experts as MXFP4."""
    config = config_of(name)
    plan = ShardPlan(config, rank, world)
    model = sharded_meta_decoder(plan) if world > 1 else _meta(config)
    model = model.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    if config.model_type == "gpt_oss" and torch.device(device).type == "cuda":
        for m in model.modules():
            if isinstance(m, MoE):
                e, i, h = m.gate_proj.shape
                meta = lambda r, c: (torch.empty(e, r, c // 32, 16, dtype=torch.uint8, device="meta"),  # noqa: E731
                                     torch.empty(e, r, c // 32, dtype=torch.uint8, device="meta"))
                m.keep_packed(meta(i, h), meta(i, h), meta(h, i))
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(1234 + rank)
    with torch.no_grad():
        for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.dtype == torch.uint8:
                p.random_(116, 120, generator=g) if pname.endswith("_scales") else p.random_(0, 256, generator=g)
            elif "norm" in pname:
                p.fill_(1.0)
            elif pname.endswith("bias") or pname.endswith("sinks"):
                p.zero_()
            elif p.is_floating_point():
                p.normal_(0.0, 0.02, generator=g)
    model = attach_kernels(model.requires_grad_(False).eval())
    return install_collectives(model, plan)


def _meta(config: ModelConfig):
    from rung.model.decoder import meta_decoder

    return meta_decoder(config)


def step_bytes(model) -> int:
    """Weight bytes one rank reads per batch-1 decode step (experts at top_k / num_experts)."""
    c = model.config
    frac = c.moe.top_k / c.moe.num_experts if c.moe else 1.0
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not (t.is_floating_point() or t.dtype == torch.uint8) or (name.startswith("embed.") and not c.tie_word_embeddings):
            continue
        n = t.numel() * t.element_size()
        total += n * frac if (c.moe and ".mlp." in name and "router" not in name) else n
    return int(total)


def copy_bandwidth(device) -> float:
    if torch.device(device).type != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 2 * 10 / (time.perf_counter() - t)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, tp: int, args, bw: float) -> dict:
    device = args.device
    os.environ["RUNG_BENCH_LAYERS"] = str(args.layers or 0)
    t = time.perf_counter()
    group = None
    if tp == 1:
        model = random_shard(name, "bfloat16", torch.device(device, 0) if device == "cuda" else device, 0, 1)
    else:
        group, model = TensorParallelGroup.start(name, tp, "bfloat16", device, loader="gpu_tp:random_shard")
    r = dict(model=name, tp=tp, build_s=time.perf_counter() - t, bytes_per_rank=step_bytes(model))
    try:
        c = model.config
        tokens = max(64 * (args.prompt + args.new64 + 16), args.long + 1024)
        options = dict(block_size=16, num_blocks=tokens // 16 + 64, max_batch_tokens=8192, max_seqs=64,
                       prefix_caching=False)
        if group is not None:
            options.update(cuda_graphs=False, cpu_decode=False, overlap=False)
        engine = Engine(model, NullTokenizer(), EngineConfig(**options), max_model_len=max(args.long + 1024, 4096))
        if group is not None:
            engine.runner = group.driver(engine.runner, engine.pool)
        greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
        seeds = iter(range(10_000))
        engine.run([(prompt(c.vocab_size, args.prompt, next(seeds)), greedy(8))])  # warm-up
        r["decode_tok_s"], _ = decode_tok_s(engine, prompt(c.vocab_size, args.prompt, next(seeds)), greedy(args.new1))
        r["roofline_pct"] = 100 * r["decode_tok_s"] * r["bytes_per_rank"] / bw
        for n in (2048, args.long):
            if n:
                engine.run([(prompt(c.vocab_size, min(n, 2048), next(seeds)), greedy(1))])  # warm-up at this length
                sync(device)
                t0 = time.perf_counter()
                engine.run([(prompt(c.vocab_size, n, next(seeds)), greedy(1))])
                sync(device)
                r[f"ttft_{n}_ms"] = 1000 * (time.perf_counter() - t0)
        engine.run([(prompt(c.vocab_size, args.prompt, next(seeds)), greedy(4)) for _ in range(64)])  # 64-row warm-up
        reqs = [(prompt(c.vocab_size, args.prompt, next(seeds)), greedy(args.new64)) for _ in range(64)]
        before = engine.stats["generated_tokens"]
        t0 = time.perf_counter()
        engine.run(reqs)
        r["tput64_tok_s"] = (engine.stats["generated_tokens"] - before) / (time.perf_counter() - t0)
        if torch.device(device).type == "cuda":
            r["peak_gb_rank0"] = torch.cuda.max_memory_allocated(0) / 1e9
    finally:
        if group is not None:
            group.shutdown()
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="*", default=RUNS, help="PRESET:TP,TP,... (TP above the visible GPUs is skipped)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new1", type=int, default=128)
    ap.add_argument("--new64", type=int, default=64)
    ap.add_argument("--long", type=int, default=32768)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 8
    bw = copy_bandwidth("cuda:0") if args.device == "cuda" else float("nan")
    log(f"{gpus} GPUs, copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for run in args.runs:
        name, _, sizes = run.partition(":")
        for tp in [int(s) for s in sizes.split(",")]:
            if tp > gpus and os.environ.get("RUNG_TP_BACKEND", "nccl") == "nccl":
                log(name, f"TP={tp}: skipped, {gpus} GPUs (RUNG_TP_BACKEND=gloo shares them: a correctness run)")
                continue
            try:
                rows.append(measure(name, tp, args, bw))
                log(json.dumps(rows[-1]))
            except Exception as e:  # noqa: BLE001 - one shape failing (out of memory) must not lose the others
                log(name, f"TP={tp} failed: {type(e).__name__}: {e}")
                rows.append(dict(model=name, tp=tp, error=f"{type(e).__name__}: {e}"))
    with open(os.path.join(args.out, "gpu_tp_results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    base = {r["model"]: r.get("decode_tok_s") for r in rows if r["tp"] == 1}
    print("\n| model | TP | decode b=1 tok/s | × TP=1 | % roofline/GPU | TTFT 2K ms | TTFT long ms | 64-conc tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['tp']} | {r['error'][:60]} | | | | | |")
            continue
        x = r["decode_tok_s"] / base[r["model"]] if base.get(r["model"]) else float("nan")
        print(f"| {r['model']} | {r['tp']} | {r['decode_tok_s']:.1f} | {x:.2f} | {r['roofline_pct']:.0f}% | "
              f"{r.get('ttft_2048_ms', float('nan')):.0f} | {r.get(f'ttft_{args.long}_ms', float('nan')):.0f} | "
              f"{r['tput64_tok_s']:.0f} |")


if __name__ == "__main__":
    main()
