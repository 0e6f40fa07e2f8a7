"""load_model: a built-in model name, a .gguf file or a Hugging Face folder → a rung Decoder.

Names and paths are resolved by weights/resolve.py; GGUF files are read by weights/gguf.py. The
model of a Hugging Face folder (config.json + safetensors) is built on the meta device (no random
init, no double allocation), materialised once on the target device, and every parameter is filled
by exactly one key-map rule. Any tensor the checkpoint lacks, has in the wrong shape, or has in
excess is an error naming file and tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rung.config import ModelConfig
from rung.model import Decoder
from rung.model.decoder import meta_decoder
from rung.weights.keymaps import converted, keymap
from rung.weights.resolve import resolve_model
from rung.weights.safetensors_io import CheckpointError, SafetensorsFolder

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
               progress=None, fast: bool = False) -> Decoder:
    """Load a model: a built-in name (``smollm2-135m``, ``gemma3-270m``), a .gguf file or a Hugging
    Face folder, optionally with a format (``smollm2-135m@int4``: rung/quant/spec.py). Returns a
    Decoder in eval mode: model(ids [b, t]) → logits [b, t, vocab].

    ``fast``: a float32 model on the CPU gets fused projections and rung's native kernels
    (rung/quant/rewrite.py; the same logits up to float rounding), as ``LLM`` asks for; by default
    the model keeps the plain layout, one parameter per checkpoint tensor."""
    from rung.quant.rewrite import pack_model, packed_targets
    from rung.quant.spec import parse_spec

    spec = parse_spec(str(path)) if not isinstance(path, Path) else None
    if spec is not None:
        path, dtype = spec.model, spec.dtype or dtype
    path = resolve_model(path)
    from rung.quant.checkpoint import is_packed_checkpoint, load_packed

    if path.is_dir() and is_packed_checkpoint(path):  # written by rung quantize: loads as it was saved
        if spec is not None and spec.weights:
            raise ValueError(f"{path}: already a packed checkpoint; load it without @{spec.format_name}")
        return load_packed(path, device)
    if spec is not None and spec.weights and path.is_file():
        # a GGUF keeps its blocks where rung's format holds them; nothing is expanded to float first
        from rung.weights.gguf import load_gguf_model, read_gguf, config_from_gguf

        with read_gguf(path) as gf:
            targets = packed_targets(meta_decoder(config_from_gguf(gf)), spec.weights, spec.group)
        model, packed = load_gguf_model(path, dtype, device, progress, packed_formats=targets)
        return pack_model(model, spec.weights, spec.group, packed=packed)
    model = _load(path, dtype, device, progress)
    if spec is not None and spec.weights:
        pack_model(model, spec.weights, spec.group)
    elif fast and resolve_dtype(dtype) == torch.float32 and torch.device(device).type == "cpu":
        pack_model(model, "f32")
    return model


def _load(path: Path, dtype, device, progress) -> Decoder:
    if path.is_file():
        from rung.weights.gguf import load_gguf_model

        return load_gguf_model(path, dtype, device, progress)
    config = ModelConfig.from_hf(path)
    checkpoint = SafetensorsFolder(path)
    model = empty_model(config, resolve_dtype(dtype), device)
    fill_parameters(model, config, checkpoint, progress)
    checkpoint.close()
    return model.requires_grad_(False).eval()


def fill_parameters(model: Decoder, config: ModelConfig, checkpoint: SafetensorsFolder, progress=None) -> None:
    names = set(checkpoint.names())
    rules, ignored = keymap(config, names)
    params = dict(model.named_parameters())
    used: set[str] = set()
    filled: set[str] = set()
    for done, rule in enumerate(rules, 1):
        for source in rule.sources:
            if source not in checkpoint:
                raise CheckpointError(
                    f"{checkpoint.folder}: tensor {source!r} is missing (needed for {config.model_type} parameter {rule.target})"
                )
        tensors = [checkpoint.read(s) for s in rule.sources]
        where = f"{checkpoint.file_of[rule.sources[0]]}: tensor {rule.sources[0]!r}"
        target = params.get(rule.target)
        if target is None:
            raise CheckpointError(f"{where}: maps to unknown parameter {rule.target} (key map out of date)")
        value = converted(rule, tensors, target.shape, where, config.model_type, CheckpointError)
        with torch.no_grad():
            target.copy_(value)
        used.update(rule.sources)
        filled.add(rule.target)
        if progress:
            progress(done, len(rules))
    unexpected = sorted(n for n in names - used if not ignored(n))
    if unexpected:
        first = unexpected[0]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{checkpoint.file_of[first]}: unexpected tensor {first!r}{more} for {config.model_type}")
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise CheckpointError(f"{checkpoint.folder}: no checkpoint tensor for parameter {unfilled[0]}")
