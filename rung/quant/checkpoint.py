"""Packed checkpoints: a quantized model saved as a Hugging Face-style folder that loads back as is.

``rung quantize MODEL --to int4 --out DIR`` writes:
- ``model.safetensors``: the packed model's tensors under rung's own module names (``*.data``,
  ``*.scale``, ``*.offset`` of each packed layer, the float tensors of everything else); its
  metadata ``rung_layers`` lists each packed layer (path, format, group, gated, shape), so loading
  rebuilds the same modules and re-quantizes nothing;
- ``config.json``: ``model_type``, ``rung_config`` (the full ModelConfig) and
  ``quantization_config`` (``quant_method: rung``, format, group size, head format);
- the tokenizer: ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, chat template),
  ``generation_config.json`` (end-of-turn ids).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rung.config import ModelConfig, MoEConfig, RopeConfig
from rung.model.decoder import Decoder, meta_decoder
from rung.quant.formats import Packed
from rung.quant.linear import PackedEmbedding, PackedLinear

METHOD = "rung"


def is_packed_checkpoint(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and (raw.get("quantization_config") or {}).get("quant_method") == METHOD


def config_to_dict(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(raw: dict) -> ModelConfig:
    raw = dict(raw)
    for name in ("rope", "local_rope"):
        if raw.get(name) is not None:
            raw[name] = RopeConfig(**raw[name])
    if raw.get("moe") is not None:
        raw["moe"] = MoEConfig(**raw["moe"])
    for name in ("layer_types", "moe_layers"):
        raw[name] = tuple(raw.get(name) or ())
    if isinstance(raw.get("eos_token_id"), list):
        raw["eos_token_id"] = tuple(raw["eos_token_id"])
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"rung_config: unknown field {unknown[0]!r} (written by a newer rung?)")
    return ModelConfig(**raw)


def save_packed(model: Decoder, folder: str | Path, tokenizer=None, quantization: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers, tensors, seen = [], {}, {}
    for path, module in model.named_modules():
        if isinstance(module, PackedLinear):
            layers.append(dict(path=path, fmt=module.fmt, group=module.group, gated=module.gated,
                               shape=[module.out_features, module.in_features], bias=module.bias is not None))
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # a float32 head sharing the embedding table: stored once, tied on load
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    tied_head = "lm_head.data" in model.state_dict() and "lm_head.data" not in tensors
    meta = {"format": "pt", "rung_layers": json.dumps(layers), "rung_tied_head": json.dumps(tied_head)}
    save_file(tensors, str(folder / "model.safetensors"), metadata=meta)
    config = {"model_type": model.config.model_type, "rung_config": config_to_dict(model.config),
              "quantization_config": {"quant_method": METHOD, **(quantization or {})}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    return folder


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The files ``Tokenizer.from_hf_folder`` reads back to the same tokenizer."""
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    config = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
              if getattr(tokenizer, name) is not None}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(tokenizer.eos_token_ids)}))


def load_packed(folder: str | Path, device: str | torch.device = "cpu") -> Decoder:
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    config = config_from_dict(raw["rung_config"])
    file = folder / "model.safetensors"
    with safe_open(str(file), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if "rung_layers" not in meta:
            raise ValueError(f"{file}: no rung_layers metadata (not written by rung quantize)")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    model = meta_decoder(config).to_empty(device=device)  # derived tables (rotary) are plain attributes, computed at build
    for layer in json.loads(meta["rung_layers"]):
        p = layer["path"]
        take = lambda part: tensors.get(f"{p}.{part}")  # noqa: E731
        data = take("data")
        if data is None:
            raise ValueError(f"{file}: packed layer {p} has no tensor {p}.data")
        packed = Packed(layer["fmt"], data.to(device), tuple(layer["shape"]), layer["group"],
                        _to(take("scale"), device), _to(take("offset"), device))
        bias = take("bias")
        _set_module(model, p, PackedLinear(packed, _to(bias, device), gated=layer["gated"]))
        owner, _, attr = p.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        if attr == "qkv_proj":
            parent.q_proj = parent.k_proj = parent.v_proj = None
        elif attr == "gate_up":
            parent.gate_proj = parent.up_proj = None
    if json.loads(meta.get("rung_tied_head", "false")):
        model.lm_head = PackedLinear(Packed("f32", None, (config.vocab_size, config.hidden_size)))  # filled below
    elif model.lm_head is not None and config.tie_word_embeddings and "embed.weight" not in tensors:
        model.embed = PackedEmbedding(model.lm_head, torch.float32)
    missing = [n for n in model.state_dict() if n not in tensors and not n.startswith("lm_head.")]
    if missing:
        raise ValueError(f"{file}: no tensor {missing[0]!r}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if json.loads(meta.get("rung_tied_head", "false")):
        model.lm_head.data = model.embed.weight.data  # the shared float32 table
    return model.requires_grad_(False).eval()


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _set_module(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    owner, _, attr = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, module)
