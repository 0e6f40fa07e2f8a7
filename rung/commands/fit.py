"""`rung fit`: which presets and formats fit a memory budget at a context length (no torch import)."""

from __future__ import annotations

import argparse
import json

from rung.commands.base import Command, CommandError
from rung.commands import display


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", required=True, metavar="SIZE", help="the budget: 24GB (10^9 B), 16GiB (2^30 B), 512MiB")
    p.add_argument("--context", type=int, default=4096, metavar="N", help="tokens per sequence (default 4096)")
    p.add_argument("--concurrency", type=int, default=1, metavar="N", help="sequences held at once (default 1)")
    p.add_argument("--format", action="append", dest="formats", choices=("fp32", "bf16", "int8", "int4", "mxfp4"),
                   help="only these formats (repeatable)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="tensor parallel over N GPUs: --memory is per GPU, and so is the plan (default 1)")
    p.add_argument("models", nargs="*", metavar="PRESET", help="only these presets (default: all)")
    p.add_argument("--all", action="store_true", help="list what does not fit too")
    p.add_argument("--json", action="store_true", help="print every (preset, format) as JSON")


def _fit(args: argparse.Namespace) -> int:
    from rung.bench.decide import parse_bytes
    from rung.bench.fit import RUNTIME_BYTES, plan

    try:
        budget = parse_bytes(args.memory)
    except ValueError as e:
        raise CommandError(f"--memory: {e}") from None
    if args.context < 1 or args.concurrency < 1 or args.gpus < 1:
        raise CommandError("--context, --concurrency and --gpus must be at least 1")
    fits = plan(args.context, args.concurrency, args.models or None, args.formats, gpus=args.gpus)
    if args.json:
        print(json.dumps([f.to_dict(budget, args.context) for f in fits], indent=2))
        return 0

    from rich.table import Table

    shown = [f for f in fits if args.all or f.fits(budget, args.context)]
    title = (f"fits in {display.gb(budget)} at {args.context:,} tokens × {args.concurrency} "
             f"sequence{'s' if args.concurrency > 1 else ''}"
             + (f", per GPU of {args.gpus} (tensor parallel)" if args.gpus > 1 else ""))
    table = Table(title=title, title_justify="left")
    for col in ("preset", "format", "params", "weights", "KV cache", "overhead", "needed", "headroom", "fits"):
        table.add_column(col, justify="left" if col in ("preset", "format", "fits") else "right")
    for f in shown:
        ok = f.fits(budget, args.context)
        why = ("yes" if ok else "beyond max context" if f.beyond_context(args.context)
               else f"heads do not split {f.gpus} ways" if not f.splits else "no")
        sizes = (f.weight_bytes, f.kv_bytes, f.overhead_bytes, f.needed_bytes, budget - f.needed_bytes)
        table.add_row(f.model, f.format, display.params(f.total_params, m=".0f"), *map(display.gb, sizes),
                      f"[green]{why}[/green]" if ok else f"[red]{why}[/red]", style=None if ok else "dim")
    console = display.console()
    if shown:
        console.print(table)
    else:
        console.print(f"nothing fits in {display.gb(budget)} at {args.context:,} tokens × {args.concurrency}")
    left_out = len(fits) - len(shown)
    console.print(f"[dim]needed = weights + KV cache (bf16; fp32 rows fp32) + overhead "
                  f"({display.gb(RUNTIME_BYTES)} runtime + "
                  f"activations). An estimate: `rung bench` measures the real peak."
                  + (f" {left_out} more (preset, format) pairs do not fit: --all lists them." if left_out else "")
                  + "[/dim]")
    return 0


FIT = Command("fit", "which presets and formats fit a memory budget (weights + KV cache + overhead)", _arguments, _fit)
