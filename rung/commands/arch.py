"""`rung arch`: the lineage side by side, from presets or config.json files (no torch import)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from rung.commands.base import Command
from rung.commands import display


def _positive_int(text: str) -> int:
    try:
        n = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 token, got {n}")
    return n


def _arch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME_OR_PATH",
                   help="preset name (see `rung arch`) or a Hugging Face folder / config.json")
    p.add_argument("--context", type=_positive_int, default=4096, metavar="N",
                   help="tokens for the KV cache figure (default 4096)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON (a list, one object per model)")


def _arch(args: argparse.Namespace) -> int:
    from rung.describe import describe

    if not args.names:
        _print_presets(as_json=args.json)
        return 0
    from rung.quant.spec import parse_spec

    # a model spec names a format too (smollm2-135m@int4): the figures are the model's, every format's
    # weight bytes among them; the format itself is shown beside the name
    specs = [parse_spec(name) for name in args.names]
    descriptions = [describe(s.model, context=args.context) for s in specs]
    descriptions = [dataclasses.replace(d, name=f"{d.name}@{s.format_name}") if s.weights or s.dtype else d
                    for s, d in zip(specs, descriptions)]
    if args.json:
        print(json.dumps([d.to_dict() for d in descriptions], indent=2))
    elif len(descriptions) == 1:
        _print_report(descriptions[0])
    else:
        _print_table(descriptions)
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _experts(d) -> str:
    return f"{d.num_experts} ({d.active_experts} active)" if d.num_experts else "—"


def _lineage_rows(d) -> list[tuple[str, str]]:
    return [
        ("family (model_type)", d.family),
        ("norm", d.norm),
        ("positions", d.positions),
        ("attention q/kv×head_dim", d.attention),
        ("sliding window", d.sliding_window or "—"),
        ("attention sinks", _yes(d.sinks)),
        ("QK-norm", _yes(d.qk_norm)),
        ("feed-forward", d.ffn),
        ("experts", _experts(d)),
        ("tied embeddings", _yes(d.tied_embeddings)),
        ("max context", f"{d.max_context:,}" if d.max_context else "—"),
    ]


def _print_presets(as_json: bool) -> None:
    from rung.config import preset_dict, preset_names
    from rung.describe import describe

    rows = []
    for name in preset_names():
        d = describe(name)
        rows.append({"name": name, "family": d.family, "total_params": d.total_params,
                     "active_params": d.active_params, "source": preset_dict(name).get("_source", "")})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="rung presets (rung arch NAME [NAME ...] for details)")
    for col in ("preset", "family", "params", "active", "from"):
        table.add_column(col, justify="right" if col in ("params", "active") else "left")
    for r in rows:
        table.add_row(r["name"], r["family"], display.params(r["total_params"]), display.params(r["active_params"]),
                      r["source"])
    display.console().print(table)


def _print_report(d) -> None:
    from rich.table import Table

    from rung.describe import CONTEXT_128K, FORMAT_SCOPE, FORMATS

    console = display.console()
    arch = Table(title=f"{d.name}", show_header=False, title_justify="left")
    arch.add_column(style="bold")
    arch.add_column()
    for key, value in _lineage_rows(d):
        arch.add_row(key, value)
    console.print(arch)

    params = Table(title="parameters", title_justify="left", show_header=False)
    params.add_column(style="bold")
    params.add_column(justify="right")
    params.add_column(justify="right")
    params.add_row("total", f"{d.total_params:,}", display.params(d.total_params))
    params.add_row("active per token", f"{d.active_params:,}", display.params(d.active_params))
    for part, n in d.params_by_part.items():
        label = part.replace("_", "-")
        if part == "embeddings" and d.tied_embeddings:
            label += " (tied: also the LM head, so active)"
        if n:
            params.add_row(f"  {label}", f"{n:,}", display.params(n))
    console.print(params)
    console.print(f"[dim]{d.active_convention}[/dim]\n")

    kv = Table(title="KV cache (bf16 K+V)", title_justify="left", show_header=False)
    kv.add_column(style="bold")
    kv.add_column(justify="right")
    kv.add_column(justify="right")
    kv.add_row(f"at {d.context:,} tokens", f"{d.kv_bytes:,} B", display.gib(d.kv_bytes))
    kv.add_row(f"per token at {d.context:,}", f"{d.kv_bytes_per_token:,.0f} B", display.gib(d.kv_bytes_per_token))
    beyond = " (beyond max context)" if d.max_context and CONTEXT_128K > d.max_context else ""
    kv.add_row(f"per token at {CONTEXT_128K:,}{beyond}", f"{d.kv_bytes_per_token_128k:,.0f} B",
               display.gib(d.kv_bytes_per_token_128k))
    console.print(kv)
    if d.sliding_window:
        console.print(f"[dim]sliding layers hold at most their window: {d.sliding_window}[/dim]\n")

    weights = Table(title="weight bytes by format (GB = 10^9 B, GiB = 2^30 B)", title_justify="left")
    for col, justify in (("format", "left"), ("bytes", "right"), ("GB", "right"), ("GiB", "right"), ("scope", "left")):
        weights.add_column(col, justify=justify)
    for fmt in FORMATS:
        n = d.weight_bytes[fmt]
        weights.add_row(fmt, f"{n:,}", f"{n / 1e9:.2f}", f"{n / 2**30:.2f}", FORMAT_SCOPE[fmt])
    console.print(weights)


def _print_table(ds) -> None:
    from rich.table import Table

    from rung.describe import CONTEXT_128K, CONTEXT_4K

    def kv_cell(d, per_token: float, context: int) -> str:
        beyond = d.max_context is not None and context > d.max_context
        return display.gib(per_token) + (" †" if beyond else "")

    table = Table(caption=None)
    table.add_column("")
    for d in ds:
        table.add_column(d.name, justify="left")
    rows = [(key, [dict(_lineage_rows(d))[key] for d in ds]) for key, _ in _lineage_rows(ds[0])]
    rows += [
        ("total params", [display.params(d.total_params) for d in ds]),
        ("active params", [display.params(d.active_params) for d in ds]),
        ("KV / token @ 4K", [kv_cell(d, d.kv_bytes_per_token_4k, CONTEXT_4K) for d in ds]),
        ("KV / token @ 128K", [kv_cell(d, d.kv_bytes_per_token_128k, CONTEXT_128K) for d in ds]),
        (f"KV cache @ {ds[0].context:,} tok", [kv_cell(d, d.kv_bytes, d.context) for d in ds]),
    ]
    rows += [(f"weights {fmt}", [display.gb(d.weight_bytes[fmt], mb=".1f") for d in ds])
             for fmt in ("bf16", "int8", "int4", "mxfp4")]
    for key, cells in rows:
        table.add_row(key, *cells)
    console = display.console()
    console.print(table)
    console.print(
        "[dim]KV: bf16 K and V (MLA: its latent + RoPE key), sliding layers capped at their window; † beyond the "
        "model's max context. "
        "Weights in GB / MB (10^9 / 10^6 B); int8/int4 as @int8/@int4 load: dense Linear matrices packed, MoE "
        "experts and routers kept bf16; mxfp4 the feed-forward matrices (see rung.describe).\n"
        f"{ds[0].active_convention}[/dim]"
    )


ARCH = Command(
    "arch",
    "parameters, active parameters, KV cache and weight bytes of presets or config.json files",
    _arch_arguments,
    _arch,
)

