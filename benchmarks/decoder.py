"""rung's decoder beside transformers on the CPU: same random weights at real model shapes.

Prefill (one forward pass over a 128-token prompt) and greedy decode with each library's own
KV cache, float32, batch 1. Prints a table of tokens/s and rung/transformers ratios.

    .venv/bin/python benchmarks/decoder.py [--presets smollm2-135m qwen3-0.6b] [--prompt 128] [--new 32]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

import rung
from rung.config import preset_dict


def hf_random_model(preset: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {k: v for k, v in preset_dict(preset).items() if not k.startswith("_")}
    config = AutoConfig.for_model(**raw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def rung_speed(model, ids, new: int, repeats: int) -> tuple[float, float]:
    prefill = best_of(lambda: model(ids), repeats)

    def decode():
        cache = model.new_cache()
        tok = model(ids, cache)[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new):
            tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0

    return ids.shape[1] / prefill, new / min(decode() for _ in range(repeats))


@torch.no_grad()
def hf_speed(model, ids, new: int, repeats: int) -> tuple[float, float]:
    prefill = best_of(lambda: model(ids, use_cache=False), repeats)

    def decode():
        out = model(ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0

    return ids.shape[1] / prefill, new / min(decode() for _ in range(repeats))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["smollm2-135m", "qwen3-0.6b"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for preset in args.presets:
        reference = hf_random_model(preset)
        with tempfile.TemporaryDirectory() as folder:
            reference.save_pretrained(folder)
            model = rung.load_model(folder)
        ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        r = rung_speed(model, ids, args.new, args.repeats)
        h = hf_speed(reference, ids, args.new, args.repeats)
        rows.append((preset, r, h))
        del reference, model

    print(f"\nCPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"float32, batch 1, prompt {args.prompt}, {args.new} new tokens")
    print(f"{'model':<16}{'rung prefill':>14}{'hf prefill':>12}{'ratio':>7}{'rung decode':>13}{'hf decode':>11}{'ratio':>7}")
    for preset, (rp, rd), (hp, hd) in rows:
        print(f"{preset:<16}{rp:>14.1f}{hp:>12.1f}{rp / hp:>7.2f}{rd:>13.1f}{hd:>11.1f}{rd / hd:>7.2f}")


if __name__ == "__main__":
    main()
