"""Weight-only int8 / int4 on one GPU, in one run: rung's Triton kernels over the packed formats
(rung/kernels/triton_quant.py) against cuBLAS bf16, and whole models through the engine.

Random bf16 weights at the real shapes of Qwen3-8B and Qwen3-0.6B, built as benchmarks/gpu.py
builds them (its helpers are imported), then re-quantized on the GPU by rung.quant: int8 = q8 with
per-channel scales, int4 = q4 in groups of 32 (the LM head q8, rung's default). Nothing is downloaded.

1. Per layer (one decode row, replayed from a CUDA graph over enough copies of the weight that
   none stays in the 60 MB L2): the kernel's µs and TB/s of the packed bytes against cuBLAS bf16
   F.linear on the same shape, each kernel first checked against the dequantizing reference
   (relative error); the GEMV configurations swept; small batches (M = 16, 64) and a 2K prefill
   through each path.
2. Per model and format: the fast path checked against the plain one (gpu.check_model: a 64-token
   prefill and a CUDA-graph decode step, relative logit error), then batch-1 decode tok/s with CUDA
   graphs, the roofline (weight bytes a step reads / measured copy bandwidth), TTFT at a 2K prompt,
   peak memory. transformers bf16 at batch 1 beside it for context (no torchao on the machine).
   ``-fgemv`` / ``-unfused`` / ``-bits`` rows are the same format with one kernel choice undone
   (the float GEMV; each GEMV rounding its own x, not the norm before it; fp8 decoded by bits), for
   the A/B in one call: e.g. ``--no-kernels --no-hf --formats bf16 int8 int8-unfused int4 int4-unfused``.

    PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks python3 benchmarks/gpu_quant.py [--models ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import gpu  # noqa: E402  (benchmarks/gpu.py: random models, copy bandwidth, checks)
from gpu import NullTokenizer, free, graph_us, log, peak_gb, prompt, rel_err, reset_peak, sync  # noqa: E402

from rung.config import ModelConfig, preset_dict  # noqa: E402
from rung.engine.engine import Engine, EngineConfig  # noqa: E402
from rung.engine.sampling_params import SamplingParams  # noqa: E402
from rung.quant.formats import quantize  # noqa: E402
from rung.quant.experts import PackedMoE  # noqa: E402
from rung.quant.linear import PackedLinear  # noqa: E402
from rung.quant.rewrite import pack_model, packed_bytes  # noqa: E402

MODELS = ["qwen3-8b", "qwen3-0.6b"]
FORMATS = {"bf16": None, "int8": ("q8", None), "int4": ("q4", 32), "fp8": ("f8", None),
           "int8-fgemv": ("q8", None), "int4-fgemv": ("q4", 32),  # -fgemv: decode rows through the float GEMV
           "int8-unfused": ("q8", None), "int4-unfused": ("q4", 32),  # -unfused: every dp4a GEMV rounds its x itself
           "fp8-bits": ("f8", None)}  # codes decoded by moving bits, not the sm89+ conversion instruction


def dp4a_env(label: str) -> None:
    """int8 / int4 decode rows: the int8-activation (dp4a) GEMV, or with RUNG_DP4A=0 the float one;
    its x rounded by the norm before it (q|k|v, gate|up) or the decode attention (o), or with
    RUNG_FUSED_XQ=0 by a launch of its own."""
    os.environ["RUNG_DP4A"] = "0" if label.endswith("-fgemv") else "1"
    os.environ["RUNG_FUSED_XQ"] = "0" if label.endswith("-unfused") else "1"
    os.environ["RUNG_FP8_CVT"] = "0" if label.endswith("-bits") else "1"
ROTATE_BYTES = 256 << 20  # weight copies per timing: more than four times the L2


def layer_shapes(name: str) -> list[tuple[str, int, int, str | None]]:
    c = ModelConfig.from_hf(preset_dict(name))
    h = c.hidden_size
    return [("qkv", c.q_width + 2 * c.kv_width, h, None), ("o", h, c.q_width, None),
            ("gate_up", 2 * c.intermediate_size, h, "silu"), ("down", h, c.intermediate_size, None),
            ("lm_head", c.vocab_size, h, None)]


def event_ms(fn, n: int = 5) -> float:
    fn()
    sync()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    sync()
    return a.elapsed_time(b) / n


def _paths(fmt: str, label: str = ""):
    """(kernel path, reference, tuned-config key prefix, GEMV sweep) for a packed format."""
    from rung.kernels import triton_dp4a as td
    from rung.kernels import triton_fp8 as tf
    from rung.kernels import triton_quant as tq

    if fmt == "f8":
        return (lambda x, q, act: tf.fp8_linear(x, q.data, q.scale, None, act),
                lambda x, q, act: tf.fp8_linear_ref(x, q.data, q.scale, None, act),
                lambda n, k, act: tq._TUNED.get(("fp8-gemv", n, k, 1, act is not None, torch.bfloat16,
                                                  not label.endswith("-bits"))),
                lambda n_out, k: tf.gemv_configs(n_out, k),
                lambda x, q, act, c: tf.gemv(x, q.data, q.scale, None, act, config=c))
    args = lambda q, act: (q.fmt, q.data, q.scale, q.offset, q.group, None, act)  # noqa: E731
    if not label.endswith("-fgemv"):
        return (lambda x, q, act: tq.quant_linear(x, *args(q, act)),
                lambda x, q, act: tq.quant_linear_ref(x, *args(q, act)),
                lambda n, k, act: tq._TUNED.get(("dp4a", fmt, n, k, act is not None, False)),
                lambda n_out, k: td.dp4a_configs(fmt),
                lambda x, q, act, c: td.gemv_dp4a(x, *args(q, act), config=c))
    return (lambda x, q, act: tq.quant_linear(x, *args(q, act)),
            lambda x, q, act: tq.quant_linear_ref(x, *args(q, act)),
            lambda n, k, act: tq._TUNED.get(("gemv", fmt, n, k, 1, act is not None, torch.bfloat16)),
            lambda n_out, k: tq.gemv_configs(fmt, n_out, k),
            lambda x, q, act, c: tq.gemv(x, *args(q, act), config=c))


def kernel_bench(names: list[str], sweep: bool) -> tuple[list[dict], list[dict]]:
    from rung.kernels import triton_fp8 as tf
    from rung.kernels import triton_quant as tq

    rows, batch_rows = [], []
    g = torch.Generator(device="cuda").manual_seed(3)
    for name in names:
        for layer, n, k, act in layer_shapes(name):
            w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
            wb = w.numel() * 2
            copies_bf16 = [w] + [w.clone() for _ in range(max(0, math.ceil(ROTATE_BYTES / wb) - 1))]
            x = torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16)
            if act is None:
                cublas = graph_us([lambda w_=w_: F.linear(x, w_) for w_ in copies_bf16], reps=4)
            else:
                from rung.kernels.elementwise import silu_mul

                cublas = graph_us([lambda w_=w_: silu_mul(F.linear(x, w_)) for w_ in copies_bf16], reps=4)
            del copies_bf16
            free()
            fmts = [("int8", "q8", None), ("int8-fgemv", "q8", None)]
            fmts += [] if layer == "lm_head" else [("int4", "q4", 32), ("int4-fgemv", "q4", 32)]
            for label, fmt, group in fmts + [("fp8", "f8", None), ("fp8-bits", "f8", None)]:
                dp4a_env(label)
                p = quantize(w, fmt, group)
                nbytes = p.nbytes
                call, ref, tuned, configs, gemv_with = _paths(fmt, label)
                r = dict(shape=name, layer=layer, N=n, K=k, fmt=label, MB=nbytes / 1e6, cublas_bf16_us=cublas,
                         cublas_bf16_TBps=wb / cublas / 1e6)
                try:
                    for m in (1, 16, 64):
                        xm = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
                        r[f"err_M{m}"] = rel_err(call(xm, p, act), ref(xm.float(), p, act))
                    copies = [p] + [quantize(w, fmt, group) for _ in range(max(0, math.ceil(ROTATE_BYTES / nbytes) - 1))]
                    call(x, p, act)  # tuned here, once
                    us = graph_us([lambda q=q: call(x, q, act) for q in copies], reps=4)
                    r.update(us=us, TBps=nbytes / us / 1e6, config=str(tuned(n, k, act)))
                    if sweep and name == names[0] and layer != "lm_head":
                        for cfg in configs(n // 2 if act else n, k):
                            try:
                                t = graph_us([lambda q=q, c=cfg: gemv_with(x, q, act, c) for q in copies], reps=2)
                                r[f"sweep {cfg}"] = round(nbytes / t / 1e6, 3)
                            except Exception as exc:
                                r[f"sweep {cfg}"] = f"{type(exc).__name__}"
                    del copies
                except Exception as exc:
                    traceback.print_exc()
                    r["error"] = f"{type(exc).__name__}: {exc}"[:300]
                log("layer", json.dumps(r))
                rows.append(r)
                # batches: the dequantizing matmul against dequantize + cuBLAS, and bf16 cuBLAS
                if name == names[0] and layer in ("gate_up", "down") and label in ("int8", "int4", "fp8"):
                    for m in (16, 64, 2048):
                        xm = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
                        b = dict(shape=name, layer=layer, fmt=label, M=m)
                        try:
                            b["bf16_cublas_ms"] = event_ms(lambda: F.linear(xm, w))
                            if fmt == "f8":  # torch._scaled_mm (x rounded to e4m3 per row)
                                b["dequant_cublas_ms"] = event_ms(lambda: tf.fp8_linear(xm, p.data, p.scale, None, act))
                            else:
                                args = (p.fmt, p.data, p.scale, p.offset, p.group, None, act)
                                b["dequant_cublas_ms"] = event_ms(lambda: tq.dequant_linear(xm, *args))
                                if m <= 64:
                                    tq.skinny(xm, *args)
                                    b["skinny_ms"] = event_ms(lambda: tq.skinny(xm, *args))
                        except Exception as exc:
                            b["error"] = f"{type(exc).__name__}: {exc}"[:300]
                        log("batch", json.dumps(b))
                        batch_rows.append(b)
                del p
                free()
            del w
            free()
    return rows, batch_rows


def decode_bytes(model, config: ModelConfig) -> int:
    """Weight bytes a batch-1 decode step reads: parameters and packed buffers, each storage once,
    but not an untied embedding table (one row of it is read)."""
    seen, total = set(), 0
    tensors = [(n, t) for n, t in model.named_parameters()]
    tensors += [(f"{mn}.{bn}", b) for mn, m in model.named_modules() if isinstance(m, (PackedLinear, PackedMoE))
                for bn, b in m.named_buffers(recurse=False)]
    for name, t in tensors:
        if t is None or (name.startswith("embed.") and not config.tie_word_embeddings):
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


BF16_LOGITS: dict = {}  # model name → the bf16 model's (prefill, decode) logits, the formats' reference


def logits_pair(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-position logits of a 64-token prefill (the batched path: M = 64) and of one decode row
    after 63 cached tokens (the GEMV path), float32 on the CPU."""
    c = model.config
    ids = torch.randint(0, c.vocab_size, (1, 64), generator=torch.Generator().manual_seed(5)).to(gpu.DEV)
    with torch.inference_mode():
        prefill = model(ids)[0, -1].float().cpu()
        cache = model.new_cache()
        model(ids[:, :63], cache)
        decode = model(ids[:, 63:], cache)[0, -1].float().cpu()
    return prefill, decode


def fmt_key(fmt: str) -> str:
    """The format's name inside the GEMV tuner's keys (q8, q4; fp8's keys say fp8-gemv)."""
    packed = FORMATS[fmt][0] if FORMATS[fmt] else None
    return "fp8-gemv" if packed == "f8" else packed


def model_bench(name: str, fmt: str, args, bw: float) -> dict:
    from rung.kernels import triton_quant as tq

    free()
    reset_peak()
    dp4a_env(fmt)
    t = time.perf_counter()
    torch.manual_seed(0)  # the same random weights for every format: logit errors against bf16
    model = gpu.rung_model(name, args.layers)
    c = model.config
    if FORMATS[fmt] is not None:
        pack_model(model, *FORMATS[fmt])
        free()
    r = dict(build_s=time.perf_counter() - t, weights_gb=packed_bytes(model) / 1e9, bytes=decode_bytes(model, c))
    try:
        pair = logits_pair(model)
        if fmt == "bf16":
            BF16_LOGITS[name] = pair
        if name in BF16_LOGITS:
            r["err_vs_bf16_prefill"] = rel_err(pair[0], BF16_LOGITS[name][0])
            r["err_vs_bf16_decode"] = rel_err(pair[1], BF16_LOGITS[name][1])
    except Exception as exc:
        r["err_vs_bf16"] = f"{type(exc).__name__}: {exc}"[:200]
    reset_peak()
    engine = Engine(model, NullTokenizer(), EngineConfig(block_size=16, num_blocks=(4096 + 512) // 16 + 64,
                                                         max_batch_tokens=8192, max_seqs=4, prefix_caching=False),
                    max_model_len=4096)
    r["graphs"] = engine.graphs is not None
    r["check_prefill"], r["check_graph_decode"] = gpu.check_model(model)
    log(name, fmt, f"{r['bytes'] / 1e9:.2f} GB/step", "checks", r["check_prefill"], r["check_graph_decode"])
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    seed = iter(range(10_000))
    engine.run([(prompt(c.vocab_size, 128, next(seed)), greedy(8))])  # warm-up: tuning, compiles, the 1-row graph
    r["decode_tok_s"], _ = gpu.decode_tok_s(engine, prompt(c.vocab_size, 128, next(seed)), greedy(args.new1))
    r["graph_steps"] = engine.graphs.steps if engine.graphs else 0
    r["tuned"] = {" ".join(map(str, k)): str(v) for k, v in tq._TUNED.items() if fmt_key(fmt) in k}  # the picks
    engine.run([(prompt(c.vocab_size, 2048, next(seed)), greedy(1))])  # warm-up at this length
    sync()
    t0 = time.perf_counter()
    engine.run([(prompt(c.vocab_size, 2048, next(seed)), greedy(1))])
    sync()
    r["ttft_2048"] = time.perf_counter() - t0
    r["peak_gb"] = peak_gb()
    r["roofline_tok_s"] = bw / r["bytes"]
    r["pct_roofline"] = 100 * r["decode_tok_s"] / r["roofline_tok_s"]
    del engine, model
    free()
    return r


def hf_bench(name: str, args, bw: float) -> dict:
    free()
    reset_peak()
    model = gpu.hf_model(name, args.layers)
    cfg = ModelConfig.from_hf(gpu.model_config(name, args.layers))
    nbytes = sum(p.numel() * p.element_size() for pn, p in model.named_parameters()
                 if not ("embed_tokens" in pn and not cfg.tie_word_embeddings))

    def gen(n_prompt, new, seed):
        ids = torch.tensor([prompt(cfg.vocab_size, n_prompt, seed)], device="cuda")
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t0

    gen(16, 2, 0)
    t1, tn = gen(128, 1, 1), gen(128, args.hf_new, 2)
    r = dict(bytes=nbytes, decode_tok_s=(args.hf_new - 1) / (tn - t1), ttft_2048=gen(2048, 1, 3), peak_gb=peak_gb())
    r["roofline_tok_s"] = bw / nbytes
    r["pct_roofline"] = 100 * r["decode_tok_s"] / r["roofline_tok_s"]
    del model
    free()
    return r


def fmt(v, spec=".1f"):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--formats", nargs="*", default=list(FORMATS))
    ap.add_argument("--new1", type=int, default=128)
    ap.add_argument("--hf-new", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (models only, tiny --layers)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import transformers
    import triton

    gpu.DEV = args.device
    if args.device != "cuda":
        args.no_kernels = args.no_hf = True
    env = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__, triton=triton.__version__,
               transformers=transformers.__version__, torchao=importlib.util.find_spec("torchao") is not None,
               python=platform.python_version(), layers=args.layers,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    log(env)
    bw = gpu.copy_bandwidth()
    env["copy_bw_TBps"] = bw / 1e12
    log(f"device-to-device copy: {bw / 1e12:.2f} TB/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # $OUT/q on the device: a folder of its own
    layers, batches, results = [], [], {}

    def save():
        (out / "gpu_quant.json").write_text(json.dumps(dict(env=env, layers=layers, batches=batches, results=results),
                                                       indent=1, default=str))

    if not args.no_kernels:
        try:
            layers, batches = kernel_bench(args.models, not args.no_sweep)
        except Exception:
            traceback.print_exc()
        save()
    for name in args.models:
        results[name] = {}
        for f in args.formats:
            log(f"{name} {f} ...")
            try:
                results[name][f] = model_bench(name, f, args, bw)
            except Exception as exc:
                traceback.print_exc()
                results[name][f] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
                free()
            log(name, f, json.dumps(results[name][f], default=str))
            save()
        if not args.no_hf:
            try:
                results[name]["transformers bf16"] = hf_bench(name, args, bw)
            except Exception as exc:
                traceback.print_exc()
                results[name]["transformers bf16"] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
            log(name, "transformers", json.dumps(results[name]["transformers bf16"], default=str))
            save()

    print()
    print(f"{env['date']} · {env['device']} · torch {env['torch']} · triton {env['triton']} · transformers "
          f"{env['transformers']} · torchao {'yes' if env['torchao'] else 'not installed'} · copy {bw / 1e12:.2f} TB/s"
          + (f" · stacks cut to {args.layers} layers" if args.layers else ""))
    if layers:
        print("one layer, one decode row, CUDA-graph replay over rotated weights: µs (TB/s of the bytes read); "
              "rel err vs dequantize + F.linear at M=1/16/64")
        for r in layers:
            if "error" in r:
                print(f"  {r['shape']} {r['layer']} {r['fmt']}: error {r['error'][:120]}")
                continue
            print(f"  {r['shape']:10} {r['layer']:7} {r['N']}x{r['K']} {r['fmt']}: {r['us']:.1f} µs "
                  f"({r['TBps']:.2f} TB/s, {r['MB']:.0f} MB) · cuBLAS bf16 {r['cublas_bf16_us']:.1f} µs "
                  f"({r['cublas_bf16_TBps']:.2f}) · {r['cublas_bf16_us'] / r['us']:.2f}x · err "
                  f"{r['err_M1']:.1e}/{r['err_M16']:.1e}/{r['err_M64']:.1e} · {r['config']}")
    if batches:
        print("batches (ms): bf16 cuBLAS · dequantize + cuBLAS · dequantizing matmul")
        for b in batches:
            print(f"  {b['shape']} {b['layer']} {b['fmt']} M={b['M']}: {fmt(b.get('bf16_cublas_ms'), '.3f')} · "
                  f"{fmt(b.get('dequant_cublas_ms'), '.3f')} · {fmt(b.get('skinny_ms'), '.3f')} {b.get('error', '')}")
    print("| shape | format | decode b=1 tok/s | vs bf16 | achieved GB/s | % roofline | GB/step | TTFT 2K ms | "
          "peak GB | logit err vs bf16 prefill / decode | check prefill / graph decode |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rs in results.items():
        for f, r in rs.items():
            if "error" in r:
                print(f"| {name} | {f} | error: {r['error'][:100]} |||||||")
                continue
            checks = (f"{fmt(r.get('check_prefill'), '.1e')} / {fmt(r.get('check_graph_decode'), '.1e')}"
                      if "check_prefill" in r else "")
            base = rs.get("bf16", {}).get("decode_tok_s")
            ratio = r["decode_tok_s"] / base if base else None
            errs = (f"{fmt(r.get('err_vs_bf16_prefill'), '.1e')} / {fmt(r.get('err_vs_bf16_decode'), '.1e')}"
                    if "err_vs_bf16_prefill" in r else r.get("err_vs_bf16", ""))
            print(f"| {name} | {f} | {fmt(r['decode_tok_s'])} | {fmt(ratio, '.2f')} | "
                  f"{fmt(r['decode_tok_s'] * r['bytes'] / 1e9, '.0f')} | {fmt(r['pct_roofline'], '.0f')}% | "
                  f"{r['bytes'] / 1e9:.2f} | {fmt(1e3 * r['ttft_2048'], '.0f')} | {fmt(r['peak_gb'])} | {errs} | {checks} |")


if __name__ == "__main__":
    main()
