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

Such a folder is input like any other: the packed layers' raw buffers go to the native kernels by
pointer, so a layer stored without its scales or declared larger than its data would have them
read past the end. ``plan_packed`` therefore checks everything against config.json and the
safetensors header alone, before any tensor is read or any module is built: every size in the
config is confirmed by the file, each packed layer sits where the config has a linear layer of its
shape, and every tensor is present with exactly the dtype and shape its layer's format implies
(formats.packed_tensors), with nothing extra. Any mismatch is one CheckpointError naming the file
and the tensor or field.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rung.config import ModelConfig, MoEConfig, RopeConfig
from rung.model.decoder import Decoder, meta_decoder
from rung.model.moe import MoE
from rung.quant.experts import FORMATS as EXPERT_FORMATS, PackedMoE
from rung.quant.formats import Packed, check_packed, packed_tensors
from rung.quant.linear import GATE_BLOCK, PackedEmbedding, PackedLinear
from rung.weights.safetensors_io import CheckpointError, read_header

METHOD = "rung"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
                      torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}
# config sizes that shape a tensor: each must be confirmed by the file before a module is built
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")


def is_packed_checkpoint(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    quantization = raw.get("quantization_config") if isinstance(raw, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == METHOD


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
            check_packed(module.packed)  # what the loader will hold the file to (formats.packed_tensors)
            layers.append(dict(path=path, fmt=module.fmt, group=module.group, gated=module.gated,
                               shape=[module.out_features, module.in_features], bias=module.bias is not None))
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # a float32 head sharing the embedding table: stored once, tied on load
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    tied_head = "lm_head.data" in model.state_dict() and "lm_head.data" not in tensors
    experts = [dict(path=path, fmt=m.fmt, groups=list(m.groups_packed), shape=list(m.shape))
               for path, m in model.named_modules() if isinstance(m, PackedMoE)]
    meta = {"format": "pt", "rung_layers": json.dumps(layers), "rung_tied_head": json.dumps(tied_head),
            "rung_experts": json.dumps(experts)}
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


# ---- loading: plan from the headers, then read ----------------------------------------------

@dataclass(frozen=True)
class PackedLayer:
    """One entry of the file's ``rung_layers``: a linear layer stored in a packed format."""
    path: str
    fmt: str
    group: int | None
    gated: str | None
    shape: tuple[int, int]  # (out, in)
    bias: bool


@dataclass(frozen=True)
class PackedExperts:
    """One entry of the file's ``rung_experts``: a MoE layer's experts, packed (rung/quant/experts.py)."""
    path: str
    fmt: str
    groups: tuple[int, int]  # gate|up's, down's
    shape: tuple[int, int, int]  # (experts, intermediate, hidden)

    def parts(self) -> dict[str, tuple[torch.dtype, tuple]]:
        """Tensor name (under ``path``) → (dtype, shape): each stack is E matrices of packed_tensors' parts."""
        e, i, h = self.shape
        out = {}
        for prefix, shape, group in (("gate_up", (2 * i, h), self.groups[0]), ("down", (h, i), self.groups[1])):
            for part, (dtype, s) in packed_tensors(self.fmt, shape, group).items():
                out[f"{prefix}_{part}"] = (dtype, (e, *s))
        return out


@dataclass
class PackedPlan:
    file: Path
    config: ModelConfig
    layers: list[PackedLayer]
    tied_head: bool  # a float32 LM head stored once, as the embedding table
    experts: list[PackedExperts] = field(default_factory=list)  # MoE layers whose experts are packed


def load_packed(folder: str | Path, device: str | torch.device = "cpu") -> Decoder:
    plan = plan_packed(folder)
    with safe_open(str(plan.file), framework="pt", device="cpu") as f:
        tensors = {name: f.get_tensor(name).to(device) for name in f.keys()}
    model = meta_decoder(plan.config)  # shapes only: every tensor below is assigned, none allocated twice
    for layer in plan.layers:
        take = lambda part: tensors.pop(f"{layer.path}.{part}", None)  # noqa: E731
        data = tensors["embed.weight"] if plan.tied_head and layer.path == "lm_head" else take("data")
        packed = Packed(layer.fmt, data, layer.shape, layer.group, take("scale"), take("offset"))
        _install(model, layer.path, PackedLinear(packed, take("bias"), gated=layer.gated))
    for x in plan.experts:
        moe = model.get_submodule(x.path)
        for name in ("gate_proj", "up_proj", "down_proj"):
            delattr(moe, name)
        moe.__class__ = PackedMoE
        stack = lambda prefix: tuple(tensors.pop(f"{x.path}.{prefix}_{part}", None)  # noqa: E731
                                     for part in ("data", "scale", "offset"))
        moe.install(x.fmt, *x.groups, stack("gate_up"), stack("down"), x.shape)
    if (model.config.tie_word_embeddings and isinstance(model.lm_head, PackedLinear)
            and "embed.weight" not in tensors):
        model.embed = PackedEmbedding(model.lm_head, torch.float32)  # the packed head's table, shared
    model.load_state_dict(tensors, strict=False, assign=True)
    left = next((n for n, t in model.state_dict().items() if t.is_meta), None)
    if left is not None:  # plan_packed expects every tensor the model holds: a gap here is rung's own bug
        raise CheckpointError(f"{plan.file}: no tensor {left!r}")
    return model.requires_grad_(False).eval()


def plan_packed(folder: str | Path) -> PackedPlan:
    """What ``load_packed`` will build, checked from config.json and the safetensors header alone
    (no tensor data read, nothing allocated but the header): the layer count and every size in the
    config against the file's tensors, then each packed layer against the place the config gives it,
    then every tensor's dtype and shape against what its layer needs. CheckpointError otherwise."""
    folder = Path(folder)
    config_file, file = folder / "config.json", folder / "model.safetensors"
    raw = _json_object(config_file)
    header = read_header(file)  # every entry's dtype, shape and byte range checked against the file
    rung_config = raw.get("rung_config")
    if not isinstance(rung_config, dict):
        raise CheckpointError(f"{config_file}: no rung_config object (not written by rung quantize)")
    _check_sizes(config_file, rung_config, file, header)
    try:
        config = config_from_dict(rung_config)
        model = meta_decoder(config)  # every module's shape, on the meta device: no data
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise CheckpointError(f"{config_file}: rung_config does not describe a model rung can build ({e})") from None
    meta = _metadata(file)
    layers = _layers(file, meta)
    tied_head = _flag(file, meta, "rung_tied_head")
    experts = _experts(file, meta)
    expected = _expected_tensors(file, model, layers, tied_head)
    _expect_experts(file, model, experts, expected)
    _check_tensors(file, header, expected)
    return PackedPlan(file, config, layers, tied_head, experts)


def _experts(file: Path, meta: dict) -> list[PackedExperts]:
    """``rung_experts`` (absent in folders written before experts were packed: none)."""
    try:
        entries = json.loads(meta.get("rung_experts", "[]"))
    except ValueError:
        entries = None
    if not isinstance(entries, list):
        raise CheckpointError(f"{file}: metadata rung_experts is not a JSON list")
    out = []
    for i, e in enumerate(entries):
        ok = (isinstance(e, dict) and isinstance(e.get("path"), str) and e.get("fmt") in EXPERT_FORMATS
              and isinstance(e.get("groups"), list) and len(e["groups"]) == 2 and all(_is_int(g) and g > 0 for g in e["groups"])
              and isinstance(e.get("shape"), list) and len(e["shape"]) == 3 and all(_is_int(d) and d > 0 for d in e["shape"]))
        if not ok:
            raise CheckpointError(f"{file}: rung_experts[{i}] is malformed (expected path, fmt ({', '.join(EXPERT_FORMATS)}), "
                                  "groups [gate_up, down], shape [experts, intermediate, hidden])")
        out.append(PackedExperts(e["path"], e["fmt"], tuple(e["groups"]), tuple(e["shape"])))
    return out


def _expect_experts(file: Path, model: Decoder, experts: list[PackedExperts], expected: dict) -> None:
    """Each packed MoE layer sits where the config has a MoE of its shape; its float stacks are
    replaced by the packed ones in ``expected``."""
    seen = set()
    for x in experts:
        what = f"packed experts {x.path}"
        try:
            moe = model.get_submodule(x.path)
        except AttributeError:
            moe = None
        if x.path in seen or not isinstance(moe, MoE) or tuple(moe.gate_proj.shape) != x.shape:
            raise CheckpointError(f"{file}: {what}: no MoE layer of shape {list(x.shape)} there in rung_config"
                                  + (" (listed twice)" if x.path in seen else ""))
        seen.add(x.path)
        try:
            parts = x.parts()
        except ValueError as e:
            raise CheckpointError(f"{file}: {what}: {e}") from None
        for name in ("gate_proj", "up_proj", "down_proj"):
            expected.pop(f"{x.path}.{name}", None)
        expected.update({f"{x.path}.{part}": (dtype, s, f"{x.fmt} {what}") for part, (dtype, s) in parts.items()})


def _json_object(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return raw


def _metadata(file: Path) -> dict:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:  # the header only (read_header checked it)
            return f.metadata() or {}
    except Exception as e:  # the library's error type varies across versions
        raise CheckpointError(f"{file}: cannot open ({e})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_sizes(config_file: Path, rung_config: dict, file: Path, header: dict) -> None:
    """The layer count is the file's, and no size in the config exceeds the file's largest tensor:
    a config asking for hidden_size 10**9 or 10**6 layers is refused before anything is built."""
    layers = {int(m.group(1)) for name in header if (m := re.match(r"layers\.(\d+)\.", name))}
    n = rung_config.get("num_layers")
    if not _is_int(n) or set(range(n)) != layers:
        held = f"layers 0..{max(layers)}" if layers and layers == set(range(max(layers) + 1)) else \
            f"{len(layers)} layers" if layers else "no layers"
        raise CheckpointError(f"{config_file}: rung_config.num_layers is {n!r}, but {file.name} holds {held}")
    largest = max((_numel(e["shape"]) for e in header.values()), default=0)
    for name in SIZE_FIELDS:
        v = rung_config.get(name)
        if not _is_int(v) or not 1 <= v <= largest:
            raise CheckpointError(f"{config_file}: rung_config.{name} is {v!r}; expected a positive integer no larger "
                                  f"than the largest tensor of {file.name} ({largest} elements)")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _flag(file: Path, meta: dict, key: str) -> bool:
    try:
        value = json.loads(meta.get(key, "false"))
    except ValueError:
        value = None
    if not isinstance(value, bool):
        raise CheckpointError(f"{file}: metadata {key} is {meta.get(key)!r}, expected true or false")
    return value


def _layers(file: Path, meta: dict) -> list[PackedLayer]:
    """``rung_layers``, each entry's fields of the right types (their values are checked against
    the config and the tensors in _expected_tensors)."""
    if "rung_layers" not in meta:
        raise CheckpointError(f"{file}: no rung_layers metadata (not written by rung quantize)")
    try:
        entries = json.loads(meta["rung_layers"])
    except ValueError:
        entries = None
    if not isinstance(entries, list):
        raise CheckpointError(f"{file}: metadata rung_layers is not a JSON list")
    layers = []
    for i, e in enumerate(entries):
        ok = (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("fmt"), str)
              and (e.get("group") is None or _is_int(e.get("group")))
              and (e.get("gated") is None or isinstance(e.get("gated"), str))
              and isinstance(e.get("shape"), list) and len(e["shape"]) == 2 and all(_is_int(d) for d in e["shape"])
              and isinstance(e.get("bias", False), bool))
        if not ok:
            raise CheckpointError(f"{file}: rung_layers[{i}] is malformed (expected path, fmt, group, gated, "
                                  f"shape [out, in], bias)")
        layers.append(PackedLayer(e["path"], e["fmt"], e.get("group"), e.get("gated"), tuple(e["shape"]),
                                  e.get("bias", False)))
    return layers


def _expected_tensors(file: Path, model: Decoder, layers: list[PackedLayer],
                      tied_head: bool) -> dict[str, tuple[torch.dtype, tuple, str]]:
    """Every tensor the file must hold: name → (dtype, shape, what it is for). The meta model's
    own parameters, except those a packed layer replaces, which hold the parts of its format."""
    expected = {name: (t.dtype, tuple(t.shape), "") for name, t in model.state_dict().items()}
    seen = set()
    for layer in layers:
        p = layer.path
        if p in seen:
            raise CheckpointError(f"{file}: rung_layers lists {p} twice")
        seen.add(p)
        shape, bias, gated, replaced = _slot(file, model, p)
        what = f"packed layer {p}"
        if layer.shape != shape:
            raise CheckpointError(f"{file}: {what} is declared {list(layer.shape)}, but rung_config makes it "
                                  f"{list(shape)} [out, in]")
        if layer.bias != bias or layer.gated not in gated:
            raise CheckpointError(f"{file}: {what} is declared with bias={layer.bias}, gated={layer.gated}; the "
                                  f"config's layer has bias={bias}, gated={' or '.join(map(str, gated))}")
        try:
            parts = packed_tensors(layer.fmt, layer.shape, layer.group)
        except ValueError as e:
            raise CheckpointError(f"{file}: {what}: {e}") from None
        for name in replaced:
            expected.pop(name, None)
        if tied_head and p == "lm_head":
            if layer.fmt != "f32" or "embed.weight" not in expected:
                raise CheckpointError(f"{file}: rung_tied_head, but {what} is {layer.fmt} or the model has no "
                                      "embedding table to share")
            parts.pop("data")  # the float32 embedding table, stored once as embed.weight
        expected.update({f"{p}.{part}": (dtype, s, f"{layer.fmt} {what}") for part, (dtype, s) in parts.items()})
        if bias:
            expected[f"{p}.bias"] = (torch.float32, (shape[0],), f"bias of {what}")
    if tied_head and "lm_head" not in seen:
        raise CheckpointError(f"{file}: rung_tied_head, but rung_layers has no lm_head")
    if model.lm_head is None and "lm_head" in seen and not tied_head:
        expected.pop("embed.weight", None)  # a tied packed head: the embedding reads its table
    return expected


# folders written before q|k|v and gate|up were fused at load named the gated layer ``mlp.gate_up``
LEGACY_NAMES = {"gate_up": "gate_up_proj"}


def _slot(file: Path, model: Decoder, path: str) -> tuple[tuple[int, int], bool, tuple[str | None, ...], list[str]]:
    """What the config puts where a packed layer says it goes: its (out, in), whether it has a
    bias, the gated activations it may have, and the float parameters it replaces."""
    c = model.config
    if path == "lm_head":
        return (c.vocab_size, c.hidden_size), False, (None,), ["lm_head.weight"]
    owner, _, attr = path.rpartition(".")
    attr = LEGACY_NAMES.get(attr, attr)
    try:
        module = model.get_submodule(f"{owner}.{attr}")
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise CheckpointError(f"{file}: rung_layers names {path!r}, which is not a linear layer of this "
                              f"{c.model_type} config")
    shape = (module.out_features, module.in_features)
    # a gated MLP's gate|up: act(gate)·up inside the layer (rows interleaved), or the plain projection
    gated = (c.activation, None) if attr == "gate_up_proj" else (None,)
    if gated[0] is not None and shape[0] % (2 * GATE_BLOCK):
        gated = (None,)
    return shape, module.bias is not None, gated, [f"{owner}.{attr}.weight", f"{owner}.{attr}.bias"]


def _check_tensors(file: Path, header: dict, expected: dict[str, tuple[torch.dtype, tuple, str]]) -> None:
    for name, (dtype, shape, what) in expected.items():
        want = f"{SAFETENSORS_DTYPES.get(dtype, dtype)} {list(shape)}" + (f" ({what})" if what else "")
        entry = header.get(name)
        if entry is None:
            raise CheckpointError(f"{file}: no tensor {name!r}; expected {want}")
        if entry["dtype"] != SAFETENSORS_DTYPES.get(dtype) or tuple(entry["shape"]) != shape:
            raise CheckpointError(f"{file}: tensor {name!r} is {entry['dtype']} {entry['shape']}; expected {want}")
    extra = sorted(set(header) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{file}: unexpected tensor {extra[0]!r}{more}")


def _install(model: nn.Module, path: str, layer: PackedLinear) -> None:
    """A packed layer in place of the float one it stands for; a gated one applies the MLP's
    activation itself."""
    owner, _, attr = path.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    setattr(parent, LEGACY_NAMES.get(attr, attr), layer)
    if layer.gated is not None:
        parent.act_and_mul = nn.Identity()
