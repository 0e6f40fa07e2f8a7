"""Programmatic dependent launch (rung/kernels/triton_pdl.py) on the batch-1 decode step, off
against on in one run (RUNG_PDL=0 / 1), on Hopper.

1. Whether the PDL edges survive torch's CUDA-graph capture: a kernel that spins for 20 µs after
   ``gdc_launch_dependents``, then a PDL-launched probe that reads the global timer before and
   after its ``gdc_wait``. With the edge, the probe starts before the spinner ends; without, after.
   Eagerly and replayed from a captured graph, with the probe launched with and without PDL.
2. Per model and format (random weights at the real shapes, benchmarks/gpu.py; int8 = q8 per row,
   int4 = q4 in groups of 32, as benchmarks/gpu_quant.py packs them): the static decode step
   (engine/cuda_graphs.py) captured once with RUNG_PDL=0 and once with 1, both replayed in
   alternating rounds (µs a step, median); the logits of one step equal bit for bit (graph and
   eager); then two engines, one captured each way, decoding the same prompt greedily in turn:
   the same tokens, and decode tok/s (median of the rounds).

    PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks python3 benchmarks/gpu_pdl.py [--models ...] [--formats ...]

``--moe`` runs the mixture-of-experts models instead (routing, the fused MoE kernels and the combine
take PDL too): Qwen3-30B-A3B bf16 and int4 (the int4 / bf16 ratio off and on) and gpt-oss-20b,
whose "bf16" keeps its experts MXFP4 as benchmarks/gpu.py builds it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
import gpu  # noqa: E402  (benchmarks/gpu.py: random models)
from gpu import NullTokenizer, free, log, prompt  # noqa: E402

from rung.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from rung.engine.engine import Engine, EngineConfig  # noqa: E402
from rung.engine.paged import Chunk, KVPool  # noqa: E402
from rung.engine.sampling_params import SamplingParams  # noqa: E402
from rung.kernels.rewrite import attach_kernels  # noqa: E402
from rung.kernels.triton_pdl import pdl_wanted  # noqa: E402
from rung.quant.rewrite import pack_model  # noqa: E402

FORMATS = {"bf16": None, "int8": ("q8", None), "int4": ("q4", 32), "fp8": ("f8", None)}
MOE_RUNS = [("qwen3-30b-a3b", "bf16"), ("qwen3-30b-a3b", "int4"), ("gpt-oss-20b", "bf16")]  # --moe


# ---- 1. do the edges survive graph capture? ------------------------------------------------------

@triton.jit
def _spin_kernel(T, ns):
    tl.extra.cuda.gdc_launch_dependents()
    start = tl.extra.cuda.globaltimer()
    now = start
    while now - start < ns:
        now = tl.extra.cuda.globaltimer()
    tl.store(T + tl.program_id(0), now)


@triton.jit
def _probe_kernel(T, n):
    before = tl.extra.cuda.globaltimer()
    tl.extra.cuda.gdc_wait()
    after = tl.extra.cuda.globaltimer()
    tl.store(T + n, before)
    tl.store(T + n + 1, after)


def edges() -> dict:
    """µs from the spinner's end to the probe's start (negative: the probe started while the
    spinner still ran) and to the probe's wait returning, eager and from a graph, probe with and
    without launch_pdl."""
    n = 8
    t = torch.zeros(n + 2, dtype=torch.int64, device="cuda")

    def pair(pdl: bool):
        _spin_kernel[(n,)](t, 20_000, num_warps=1)
        _probe_kernel[(1,)](t, n, num_warps=1, launch_pdl=pdl)

    def read() -> tuple[float, float]:
        torch.cuda.synchronize()
        end = int(t[:n].max())
        return (int(t[n]) - end) / 1e3, (int(t[n + 1]) - end) / 1e3

    out = {}
    for pdl in (False, True):
        pair(pdl)  # compiles
        torch.cuda.synchronize()
        pair(pdl)
        out[f"eager pdl={int(pdl)}"] = read()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            pair(pdl)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pair(pdl)
        for _ in range(3):
            graph.replay()
        out[f"graph pdl={int(pdl)}"] = read()
    return out


# ---- 2. the decode step, off against on ----------------------------------------------------------

def set_pdl(on: bool) -> None:
    os.environ["RUNG_PDL"] = "1" if on else "0"


def build(name: str, fmt: str):
    free()
    torch.manual_seed(0)
    model = gpu.rung_model(name)
    if FORMATS[fmt] is not None:
        pack_model(model, *FORMATS[fmt])
        free()
    attach_kernels(model)
    return model


def replay_us(graph: torch.cuda.CUDAGraph, n: int) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / n


def step_ab(model, rounds: int, replays: int) -> dict:
    """The static decode step with RUNG_PDL=0 and 1: logits equal? µs a step from graph replays."""
    c = model.config
    pool = KVPool(c, 16, 16, torch.bfloat16, "cuda")
    for t in pool.keys + pool.values:  # 160 cached tokens' keys and values, not zeros
        t.normal_()
    table = list(range(12))
    chunk = Chunk([table] * len(pool.groups), 160, 1)  # a decode token at position 160
    ids = torch.tensor([7], device="cuda")
    graphs, eager_logits, graph_logits = {}, {}, {}
    with torch.inference_mode():
        for on in (False, True):
            set_pdl(on)
            eager = DecodeGraphs(model, pool, max_model_len=256, max_seqs=1, capture=False)
            for _ in range(2):  # compiles, tunes
                eager_logits[on] = eager.run(ids, [chunk]).clone()
            g = DecodeGraphs(model, pool, max_model_len=256, max_seqs=1, capture=True)
            graph_logits[on] = g.run(ids, [chunk]).clone()
            graph_logits[on] = g.run(ids, [chunk]).clone()  # a replay
            graphs[on] = g  # alive: its graph reads its input buffers
        torch.cuda.synchronize()
        r = dict(eager_equal=torch.equal(eager_logits[False], eager_logits[True]),
                 graph_equal=torch.equal(graph_logits[False], graph_logits[True]),
                 graph_eq_eager=torch.equal(graph_logits[True], eager_logits[True]))
        times = {False: [], True: []}
        for g in graphs.values():
            replay_us(g.graphs[1][0], 10)
        for i in range(rounds):
            for on in ((False, True) if i % 2 == 0 else (True, False)):
                times[on].append(replay_us(graphs[on].graphs[1][0], replays))
    r["us_off"], r["us_on"] = statistics.median(times[False]), statistics.median(times[True])
    r["us_off_all"], r["us_on_all"] = [round(x, 1) for x in times[False]], [round(x, 1) for x in times[True]]
    del graphs, pool
    return r


def engine_ab(model, rounds: int, new: int) -> dict:
    """Two engines, the decode graph captured with RUNG_PDL=0 in one and 1 in the other, decoding
    the same 128-token prompt greedily in turn: tokens equal? decode tok/s."""
    c = model.config
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    engines = {}
    for on in (False, True):
        set_pdl(on)
        engines[on] = Engine(model, NullTokenizer(), EngineConfig(block_size=16, num_blocks=64, max_batch_tokens=2048,
                                                                  max_seqs=4, prefix_caching=False),
                             max_model_len=1024)
        engines[on].run([(prompt(c.vocab_size, 128, 0), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))])
    tokens, speed = {}, {False: [], True: []}
    for i in range(rounds):
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            set_pdl(on)
            e = engines[on]
            tok_s, seq = gpu.decode_tok_s(e, prompt(c.vocab_size, 128, 1), greedy)
            speed[on].append(tok_s)
            tokens.setdefault(on, list(seq.output_ids))
            assert tokens[on] == list(seq.output_ids), "greedy tokens changed between rounds"
    graphs_on = all(e.graphs is not None and e.graphs.steps > 0 for e in engines.values())
    del engines
    free()
    return dict(tokens_equal=tokens[False] == tokens[True], engine_graphs=graphs_on,
                tok_s_off=statistics.median(speed[False]), tok_s_on=statistics.median(speed[True]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["qwen3-0.6b", "qwen3-8b"])
    ap.add_argument("--formats", nargs="*", default=["bf16", "int8", "int4"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--replays", type=int, default=100)
    ap.add_argument("--engine-rounds", type=int, default=4)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--moe", action="store_true", help="(model, format) runs: " + ", ".join(map(" ".join, MOE_RUNS))
                    + " instead of --models x --formats")
    args = ap.parse_args()
    runs = MOE_RUNS if args.moe else [(name, fmt) for name in args.models for fmt in args.formats]
    log(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
        "capability", torch.cuda.get_device_capability())
    set_pdl(True)
    log("pdl_wanted(cuda):", pdl_wanted("cuda"))
    e = edges()
    for k, (start, waited) in e.items():
        log(f"edge check {k}: probe started {start:+.1f} µs after the spinner's end, its wait returned {waited:+.1f}")
    rows = []
    for name, fmt in runs:
        t = time.perf_counter()
        model = build(name, fmt)
        r = dict(model=name, fmt=fmt)
        r.update(step_ab(model, args.rounds, args.replays))
        log(name, fmt, "step", {k: v for k, v in r.items() if k not in ("model", "fmt")})
        r.update(engine_ab(model, args.engine_rounds, args.new))
        log(name, fmt, "engine", r["tokens_equal"], r["tok_s_off"], r["tok_s_on"], f"{time.perf_counter() - t:.0f} s")
        rows.append(r)
        del model
        free()
    print()
    for k, (start, waited) in e.items():
        print(f"edge {k}: probe start {start:+.1f} µs, wait returned {waited:+.1f} µs (vs the spinner's end)")
    print("| model | format | graph replay µs off / on | engine tok/s off / on | on/off | logits equal eager / graph | tokens equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['fmt']} | {r['us_off']:.0f} / {r['us_on']:.0f} | {r['tok_s_off']:.1f} / "
              f"{r['tok_s_on']:.1f} | {r['tok_s_on'] / r['tok_s_off']:.3f} | {r['eager_equal']} / {r['graph_equal']} | "
              f"{r['tokens_equal']} |")
    base = {r["model"]: r for r in rows if r["fmt"] == "bf16"}
    for r in rows:
        if r["fmt"] != "bf16" and r["model"] in base:
            b = base[r["model"]]
            print(f"{r['model']} {r['fmt']} vs bf16: off {r['tok_s_off'] / b['tok_s_off']:.2f}x, "
                  f"on {r['tok_s_on'] / b['tok_s_on']:.2f}x")


if __name__ == "__main__":
    main()
