"""load_model: a built-in model name, a .gguf file or a Hugging Face folder → a rung Decoder.

Names and paths are resolved by weights/resolve.py.

A Hugging Face folder (config.json + safetensors) is planned before anything is allocated: every
safetensors header is checked against its file, config.json's layer count against the layers the
tensors hold, and then the model the config describes is built on the meta device and every
parameter is matched, by its key-map rule, with tensors of the right shape and kind (no tensor
data is read). A missing, misshaped or excess tensor is an error naming file and tensor. Only then
is the model materialised on the target device and filled, each parameter by exactly one rule.

A GGUF file goes the same way (``load_gguf_model``): weights/gguf.py reads it, its ModelConfig
comes from weights/gguf_config.py and its key map from keymaps.gguf_rules.
"""

from __future__ import annotations

from pathlib import Path

import json

import torch

from rung.config import ModelConfig
from rung.distributed.collectives import install_collectives
from rung.distributed.shard import ShardPlan, sharded_meta_decoder
from rung.kernels.rewrite import attach_kernels
from rung.model import Decoder
from rung.model.decoder import meta_decoder
from rung.weights.gguf import GGUFError, GGUFFile, read_gguf
from rung.weights.gguf_config import config_from_gguf
from rung.weights.keymaps import Rule, converted, expert_indices, gguf_rules, keymap, layer_indices, mtp_layer
from rung.weights.resolve import resolve_model
from rung.weights.safetensors_io import CheckpointError, SafetensorsFolder, torch_dtype

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def empty_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> Decoder:
    """A Decoder with uninitialised parameters on ``device`` (its derived tables are computed)."""
    return meta_decoder(config).to(dtype).to_empty(device=device)


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               progress=None, fast: bool = False, tensor_parallel: tuple[int, int] | None = None) -> Decoder:
    """Load a model: a built-in name (``smollm2-135m``, ``gemma3-270m``), a .gguf file or a Hugging
    Face folder, optionally with a format (``smollm2-135m@int4``: rung/quant/spec.py). Returns a
    Decoder in eval mode: model(ids [b, t]) → logits [b, t, vocab].

    ``fast``: a float32 model on the CPU gets fused projections and rung's native kernels
    (rung/quant/rewrite.py; the same logits up to float rounding), as ``LLM`` asks for; by default
    the model keeps the plain layout (q|k|v and gate|up fused at load). Either way the kernels for
    its device are attached (rung/kernels/rewrite.py: the same function, computed faster).

    ``tensor_parallel``: (rank, world) of a tensor-parallel group that has been initialised
    (torch.distributed): this process builds and fills only its shard (rung/distributed/shard.py),
    and the model's collectives are attached (rung/distributed/collectives.py)."""
    from rung.quant.rewrite import pack_model, packed_targets
    from rung.quant.spec import parse_spec

    spec = parse_spec(str(path)) if not isinstance(path, Path) else None
    if spec is not None:
        path, dtype = spec.model, spec.dtype or dtype
    path = resolve_model(path)
    from rung.quant.checkpoint import is_packed_checkpoint, load_packed

    if path.is_dir() and is_packed_checkpoint(path):  # written by rung quantize: loads as it was saved
        if tensor_parallel is not None and tensor_parallel[1] > 1:
            raise ValueError(f"{path}: a folder written by rung quantize cannot be split over ranks yet; load the "
                             "original checkpoint with a format suffix (@int4, @int8) instead")
        if spec is not None and spec.weights:
            raise ValueError(f"{path}: already a packed checkpoint; load it without @{spec.format_name}")
        return attach_kernels(load_packed(path, device))
    if spec is not None and spec.weights and path.is_file():
        # a GGUF keeps its blocks where rung's format holds them; nothing is expanded to float first
        with read_gguf(path) as gf:
            config = config_from_gguf(gf)
            shard = _plan_for(config, tensor_parallel)
            targets = packed_targets(meta_decoder(config) if shard is None else sharded_meta_decoder(shard),
                                     spec.weights, spec.group)
        model, packed = load_gguf_model(path, dtype, device, progress, packed_formats=targets,
                                        tensor_parallel=tensor_parallel)
        return _parallel(attach_kernels(pack_model(model, spec.weights, spec.group, packed=packed)), shard)
    model = _load(path, dtype, device, progress, tensor_parallel)
    if spec is not None and spec.weights:
        pack_model(model, spec.weights, spec.group)
    elif fast and resolve_dtype(dtype) == torch.float32 and torch.device(device).type == "cpu":
        pack_model(model, "f32")
    return _parallel(attach_kernels(model), getattr(model, "_shard_plan", None))


def _plan_for(config: ModelConfig, tensor_parallel: tuple[int, int] | None):
    """The rank's ShardPlan (None for one process)."""
    if tensor_parallel is None or tensor_parallel[1] == 1:
        return None
    rank, world = tensor_parallel
    return ShardPlan(config, rank, world)


def _parallel(model: Decoder, shard) -> Decoder:
    """The collectives, last (they hook the modules packing and kernels left in place)."""
    if shard is None:
        return model
    model.__dict__.pop("_shard_plan", None)
    return install_collectives(model, shard)


def _empty(config: ModelConfig, dtype: torch.dtype, device, shard) -> Decoder:
    """The whole model, or this rank's shard of it, with uninitialised parameters on ``device``."""
    if shard is None:
        return empty_model(config, dtype, device)
    model = sharded_meta_decoder(shard).to(dtype).to_empty(device=device)
    model._shard_plan = shard  # for load_model to attach the collectives after packing
    return model


def _load(path: Path, dtype, device, progress, tensor_parallel=None) -> Decoder:
    if path.is_file():
        return load_gguf_model(path, dtype, device, progress, tensor_parallel=tensor_parallel, _collectives=False)
    checkpoint = SafetensorsFolder(path)  # every header checked against its file; no tensor data read
    config = ModelConfig.from_hf(path)  # every field checked first (rung/config.py), layers capped at MAX_LAYERS
    check_declared_layers(path, checkpoint)
    rules = plan(config, checkpoint)
    shard = _plan_for(config, tensor_parallel)
    model = _empty(config, resolve_dtype(dtype), device, shard)  # the first allocation the config sizes
    fill_parameters(model, rules, checkpoint, progress, shard)
    checkpoint.close()
    return model.requires_grad_(False).eval()


def _span(indices: set[int], what: str) -> str:
    return f"{what}s 0..{max(indices)} ({len(indices)} distinct)" if indices else f"no {what} tensors"


def _check_count(declared: int, indices: set[int], field: str, what: str, where) -> None:
    """``declared`` layers (experts) must be exactly the ones numbered 0..declared-1 in the tensors."""
    if len(indices) != declared or (indices and max(indices) != declared - 1):
        raise CheckpointError(f"{where}: {field} is {declared} but the checkpoint holds {_span(indices, what)}")


def check_declared_layers(folder: Path, checkpoint: SafetensorsFolder) -> None:
    """config.json's layer count against the layers the tensors hold, named by the file's own field
    (`n_layer` for GPT-2): a config claiming 10^6 layers over 2 layers of tensors is refused before
    anything is planned. ModelConfig.from_hf runs first, so a malformed field (zero heads) is named
    as such rather than as a layer mismatch; it caps layers at MAX_LAYERS."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(raw, dict):
        return
    if raw.get("model_type") == "gemma3" and isinstance(raw.get("text_config"), dict):
        raw = raw["text_config"]  # the multimodal config: from_hf reads the text model's fields
    found = layer_indices(checkpoint.names())
    mtp = raw.get("num_nextn_predict_layers")  # DeepSeek-V3's multi-token-prediction layers, after the decoder's
    mtp = mtp if isinstance(mtp, int) and not isinstance(mtp, bool) and mtp > 0 else 0
    for field in ("num_hidden_layers", "n_layer"):
        declared = raw.get(field)
        if isinstance(declared, int) and not isinstance(declared, bool):
            _check_count(declared, {i for i in found if not declared <= i < declared + mtp}, field, "layer",
                         folder / "config.json")


def plan(config: ModelConfig, checkpoint: SafetensorsFolder) -> list[Rule]:
    """The key map's rules for ``config``, checked against the safetensors headers on the meta
    device: every parameter filled once, by tensors that exist, hold what the rule reads (floats,
    or MXFP4's bytes) and convert to the parameter's shape. No tensor data is read and nothing the
    config sizes is allocated; the counts that size the plan itself (layers, experts) come first."""
    names = set(checkpoint.names())
    config_file = checkpoint.folder / "config.json"
    _check_count(config.num_layers, layer_indices(n for n in names if not mtp_layer(config, n)),
                 "num_hidden_layers", "layer", config_file)
    experts = expert_indices(names)
    if config.moe is not None and experts:  # one tensor per expert: the key map lists each one
        _check_count(config.moe.num_experts, experts, "num_experts", "expert", config_file)
    _check_head_dim(config, checkpoint)
    params = dict(meta_decoder(config).named_parameters())
    rules, ignored = keymap(config, names)
    used: set[str] = set()
    filled: set[str] = set()
    for rule in rules:
        for source in rule.sources:
            if source not in checkpoint:
                raise CheckpointError(f"{checkpoint.folder}: tensor {source!r} is missing "
                                      f"(needed for {config.model_type} parameter {rule.target})")
        where = f"{checkpoint.file_of[rule.sources[0]]}: tensor {rule.sources[0]!r}"
        target = params.get(rule.target)
        if target is None:
            raise CheckpointError(f"{where}: maps to unknown parameter {rule.target} (key map out of date)")
        metas = [_meta_tensor(checkpoint, s, rule, config) for s in rule.sources]

        def misfit(message: str, have, need) -> CheckpointError:
            return CheckpointError(message + _fields_behind(config, need, have))

        value = converted(rule, metas, target.shape, checkpoint.where, config.model_type, misfit)
        if not value.dtype.is_floating_point:
            raise CheckpointError(f"{where}: converts to {value.dtype}; {config.model_type} parameter "
                                  f"{rule.target} needs floating-point values")
        used.update(rule.sources)
        filled.add(rule.target)
    unexpected = sorted(n for n in names - used if not ignored(n))
    if unexpected:
        first = unexpected[0]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{checkpoint.file_of[first]}: unexpected tensor {first!r}{more} for {config.model_type}")
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise CheckpointError(f"{checkpoint.folder}: no checkpoint tensor for parameter {unfilled[0]}")
    return rules


def _fields_behind(config: ModelConfig, need: torch.Size, have: torch.Size) -> str:
    """The config.json fields a parameter's mismatched sizes come from, for the error to name
    (``hidden_size: 10**9`` shows up as an embedding table that needs 10^9 columns)."""
    sizes = {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
             "intermediate_size": config.intermediate_size, "head_dim": config.head_dim,
             "max_position_embeddings": config.max_position_embeddings}
    if config.moe is not None:
        sizes.update(num_experts=config.moe.num_experts, moe_intermediate_size=config.moe.expert_intermediate_size)
    heads = {"num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads}
    wrong = set(need) - set(have)
    named = [f"{field} {size}" for field, size in sizes.items() if size in wrong]
    named += [f"{field} {n}" for field, n in heads.items() if n * config.head_dim in wrong]  # q, k, v rows
    return f" (from config.json's {', '.join(named)})" if named else ""


def _check_head_dim(config: ModelConfig, checkpoint: SafetensorsFolder) -> None:
    """The meta model's rotary tables are real (model/rope.py: head_dim / 2 frequencies on the CPU),
    so a head wider than any tensor is refused before it is built; the plan checks the exact shape."""
    largest = max((checkpoint.numel(n) for n in checkpoint.names()), default=0)
    if config.head_dim > largest:
        raise CheckpointError(f"{checkpoint.folder / 'config.json'}: head_dim {config.head_dim} is larger than any tensor in the "
                              f"checkpoint (the largest holds {largest} values)")


def _meta_tensor(checkpoint: SafetensorsFolder, name: str, rule: Rule, config: ModelConfig) -> torch.Tensor:
    """A shape-and-dtype stand-in for a stored tensor, once its dtype is one the rule can read."""
    stored = checkpoint.entries[name]["dtype"]
    dtype = torch_dtype(stored)
    wanted = rule.source_dtype
    if wanted is None and not dtype.is_floating_point or wanted is not None and dtype != wanted:
        kind = "floating-point values" if wanted is None else str(wanted).removeprefix("torch.")
        raise CheckpointError(f"{checkpoint.file_of[name]}: tensor {name!r} is stored as {stored}; "
                              f"{config.model_type} parameter {rule.target} reads {kind}")
    return torch.empty(checkpoint.shape(name), dtype=dtype, device="meta")


def fill_parameters(model: Decoder, rules: list[Rule], checkpoint: SafetensorsFolder, progress=None,
                    shard=None) -> None:
    """Copy each planned rule's tensors into its parameter (``plan`` has checked them all); with a
    ShardPlan, only this rank's slice of each."""
    params = dict(model.named_parameters())
    shapes = _full_shapes(model, shard)
    family = model.config.model_type
    for done, rule in enumerate(rules, 1):
        tensors = [checkpoint.read(s) for s in rule.sources]
        target = params[rule.target]
        value = converted(rule, tensors, shapes[rule.target], checkpoint.where, family,
                          lambda msg, *_: CheckpointError(msg))
        if shard is not None:
            value = shard.slice(rule.target, value)
        with torch.no_grad():
            target.copy_(value)
        if progress:
            progress(done, len(rules))


# ---- GGUF files ---------------------------------------------------------------------------------


def _check_plan(model: Decoder, gf: GGUFFile, rules: list[Rule], consumed: set[str]) -> None:
    """Every parameter filled once, every tensor used, every shape right: checked on the meta
    device (the conversions run on shapes only) before any memory is allocated."""
    arch = gf.architecture
    params = dict(model.named_parameters())
    used, filled = set(consumed), set()
    for rule in rules:
        for source in rule.sources:
            if source not in gf.tensors:
                raise GGUFError(f"{gf.path}: tensor {source!r} is missing "
                                f"(needed for {arch} parameter {rule.target})")
        target = params.get(rule.target)
        where = f"{gf.path}: tensor {rule.sources[0]!r}"
        if target is None:
            raise GGUFError(f"{where} maps to unknown parameter {rule.target} (key map out of date)")
        metas = [torch.empty(gf.tensors[s][0], device="meta") for s in rule.sources]
        # shapes checked before any read
        converted(rule, metas, target.shape, lambda s: f"{gf.path}: tensor {s!r}", arch, lambda msg, *_: GGUFError(msg))
        used.update(rule.sources)
        filled.add(rule.target)
    unexpected = sorted(set(gf.tensors) - used)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise GGUFError(f"{gf.path}: unexpected tensor {unexpected[0]!r}{more} for {arch}")
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise GGUFError(f"{gf.path}: no tensor for parameter {unfilled[0]}")


GGUF_KEPT = {"Q4_0": "q4", "Q4_1": "q4", "Q8_0": "q8"}  # GGUF block types rung's formats hold exactly


def _kept(gf: GGUFFile, rule: Rule, fmt: str, group: int | None, shape: torch.Size):
    """The packed weight of ``rule`` straight from its GGUF blocks, when every source is already
    in ``fmt`` (Q4_0/Q4_1 → q4, Q8_0 → q8, groups of 32) and the rule only stacks and reorders
    rows (q|k|v and gate|up fused, llama.cpp's Q/K permutation); else None (the caller quantizes
    the converted float values: a fused projection whose parts differ in type is re-quantized as a
    whole, one format for all of its rows, as the separate parts' packed layers were before)."""
    from rung.quant.formats import cat_rows, from_gguf_blocks

    if group not in (None, 32):
        return None
    parts = []
    for source in rule.sources:
        kind, raw = gf.raw(source)
        source_shape = tuple(gf.tensors[source][0])
        if GGUF_KEPT.get(kind) != fmt or len(source_shape) != 2 or source_shape[1] != shape[1]:
            return None
        parts.append(from_gguf_blocks(kind, raw, source_shape))
    packed = cat_rows(parts)
    if packed.shape != tuple(shape):
        return None
    if rule.convert is None:
        return packed
    # the rows' order is found by running the conversion on the (stacked) row numbers
    starts = [sum(p.shape[0] for p in parts[:i]) for i in range(len(parts))]
    order = rule.convert(*(torch.arange(a, a + p.shape[0], dtype=torch.float32)[:, None] for a, p in zip(starts, parts)))
    if order.shape != (shape[0], 1):
        return None
    return packed.permute_rows(order[:, 0].long())


def load_gguf_model(path: str | Path, dtype: str | torch.dtype = "float32",
                    device: str | torch.device = "cpu", progress=None,
                    packed_formats: dict[str, tuple[str, int | None]] | None = None,
                    tensor_parallel: tuple[int, int] | None = None, _collectives: bool = True):
    """A GGUF file → a rung Decoder in eval mode, dequantized tensor by tensor into ``dtype``.
    ``progress(done, total)`` is called after each parameter (for a progress bar).

    ``packed_formats`` (rung parameter → (format, group), from rung.quant's packed_targets):
    those weights come back packed instead, in a dict beside the model, GGUF blocks kept as they
    are where rung's format holds them exactly; their float parameters are never written (and
    never take memory). Returns (model, packed) then.

    ``tensor_parallel``: (rank, world): build and fill only this rank's shard (see load_model)."""
    torch_dtype = resolve_dtype(dtype)
    with read_gguf(path) as gf:
        config = config_from_gguf(gf)
        rules = gguf_rules(config, gf)
        # already folded into config.rope (llama3's divisors; Phi-3's LongRoPE factors)
        consumed = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"} & set(gf.tensors)
        _check_plan(meta_decoder(config), gf, rules, consumed)
        shard = _plan_for(config, tensor_parallel)
        model = _empty(config, torch_dtype, device, shard)
        params = dict(model.named_parameters())
        shapes = _full_shapes(model, shard)
        packed, gains = {}, None
        if packed_formats:  # the packed weights last: their quantizer reads the norms' gains (input_gains)
            rules = sorted(rules, key=lambda r: r.target in packed_formats)
        last_name, last = None, None  # gpt2's attn_qkv and fused experts feed several parameters in a row
        for done, rule in enumerate(rules, 1):
            if packed_formats and rule.target in packed_formats:
                from rung.quant.formats import quantize
                from rung.quant.rewrite import input_gains

                fmt, group = packed_formats[rule.target]
                kept = _kept(gf, rule, fmt, group, shapes[rule.target])
                if kept is None:
                    gains = input_gains(model) if gains is None else gains
                    tensors = [gf.read(s) for s in rule.sources]
                    value = rule.convert(*tensors) if rule.convert else tensors[0]
                    kept = quantize(value if shard is None else shard.slice(rule.target, value), fmt, group,
                                    gains.get(rule.target))
                elif shard is not None:
                    kept = shard.slice_packed(rule.target, kept)
                packed[rule.target] = kept
                if progress:
                    progress(done, len(rules))
                continue
            tensors = []
            for source in rule.sources:
                if source != last_name:
                    last_name, last = source, None  # drop the previous tensor before reading the next
                    last = gf.read(source)
                tensors.append(last)
            value = rule.convert(*tensors) if rule.convert else tensors[0]
            if shard is not None:
                value = shard.slice(rule.target, value)
            with torch.no_grad():
                params[rule.target].copy_(value)
            if progress:
                progress(done, len(rules))
    model = model.requires_grad_(False).eval()
    if packed_formats is not None:
        return model, packed  # load_model packs it, then attaches the kernels and collectives
    model = attach_kernels(model)
    return _parallel(model, shard) if _collectives else model


def _full_shapes(model: Decoder, shard) -> dict[str, torch.Size]:
    """The full model's parameter shapes (a shard's parameters hold slices of them)."""
    source = model if shard is None else meta_decoder(shard.config)
    return {name: p.shape for name, p in source.named_parameters()}
