"""`rung quantize MODEL --to int4 --out DIR`: write a packed checkpoint that loads back as is."""

from __future__ import annotations

import argparse
import time

from rung.commands.base import Command, CommandError


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name, .gguf file or Hugging Face folder")
    p.add_argument("--to", required=True, choices=("int8", "int4", "fp8", "fp32"),
                   help="int8: per-channel scales; int4: groups of 32, asymmetric (GGUF Q4_0/Q4_1 blocks kept); "
                        "fp8: e4m3, per-channel scales")
    p.add_argument("--group", type=int, default=None, help="group size along the input (a multiple of 32)")
    p.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer)")


def _run(args: argparse.Namespace) -> int:
    from rung.llm import _tokenizer_for
    from rung.quant.checkpoint import save_packed
    from rung.quant.rewrite import default_head_format, packed_bytes
    from rung.quant.spec import parse_spec
    from rung.weights.loader import load_model
    from rung.weights.resolve import resolve_model

    if "@" in args.model and parse_spec(args.model).weights:
        raise CommandError(f"{args.model}: give the format with --to, not in the model name")
    fmt = {"int8": "q8", "int4": "q4", "fp8": "f8", "fp32": "f32"}[args.to]
    if fmt == "f8" and args.group:
        raise CommandError("--to fp8 has one scale per output row; --group does not apply")
    spec = args.model + (f"@{args.to}" + (f"g{args.group}" if args.group else "") if fmt != "f32" else "")
    t0 = time.perf_counter()
    model = load_model(spec, fast=True)
    path = resolve_model(parse_spec(args.model).model)
    quantization = {"format": args.to, "group_size": args.group or (32 if fmt == "q4" else None),
                    # an fp8 head stays float (default_head_format): float32, as this command loads the model
                    "head_format": {"q8": "int8", "q4": "int4", "f32": "fp32"}[default_head_format(fmt) or "f32"],
                    "source": str(args.model)}
    out = save_packed(model, args.out, _tokenizer_for(path), quantization)
    print(f"wrote {out} ({packed_bytes(model) / 1e6:.1f} MB of weights, {args.to}) in {time.perf_counter() - t0:.1f} s")
    return 0


QUANTIZE = Command("quantize", "write a quantized (packed) checkpoint that loads without re-quantizing",
                   _arguments, _run)
