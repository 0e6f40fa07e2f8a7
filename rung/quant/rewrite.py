"""Rewrite a loaded Decoder for fast inference, from outside (as gpt-fast's quantize.py does).

``pack_model(model, fmt)``: every dense linear layer, the LM head included (but for "f8", whose
head stays float: default_head_format), is stored as a ``PackedLinear`` in ``fmt`` ("f32", "q8",
"q4", "f8"): the fused q|k|v projection as it is, and a gated MLP's fused gate|up projection as one
gated layer (its rows interleaved, the activation inside: one kernel call for both projections and
act(gate)·up; the MLP's own ActAndMul becomes Identity). A tied embedding shares the LM head's
packed table. Mixture-of-experts layers get their experts packed in ``fmt`` too
(rung/quant/experts.py; not for "f32", and gpt-oss's MXFP4 experts stay as they are); routers
stay in the model dtype.

A packed model gives the same logits as the original up to the format's rounding (exactly the
dequantized weights' logits).
"""

from __future__ import annotations

import torch
from torch import nn

from rung.model.decoder import Decoder
from rung.model.mlp import MLP
from rung.quant.experts import can_pack, pack_experts
from rung.quant.formats import Packed, fits, quantize
from rung.quant.linear import GATE_BLOCK, PackedEmbedding, PackedLinear, interleave_gate_up


def _packed(weight: torch.Tensor, fmt: str, group: int | None, gain: torch.Tensor | None = None) -> Packed:
    return quantize(weight, fmt, group, gain)


def _linear(layer, fmt: str, group: int | None, gain: torch.Tensor | None = None) -> PackedLinear:
    if isinstance(layer, PackedLinear):
        return layer
    return PackedLinear(_packed(layer.weight, fmt, group, gain), layer.bias)


def norm_gain(norm: nn.Module) -> torch.Tensor | None:
    """The per-channel gain a norm multiplies its output by (RMSNorm: offset + w, Gemma's 1 + w;
    LayerNorm: w), or None where there is none (NoNorm)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    return weight.detach().float() + getattr(norm, "offset", 0.0)


def input_gains(model: Decoder) -> dict[str, torch.Tensor]:
    """The layers whose input is a block norm's output, by parameter name, with that norm's gain:
    the attention's input projections (attn_norm) and the MLP's gate|up or up (mlp_norm). The fp8
    scale search weighs channels by it (rung/quant/formats.py, SCALE_STEPS)."""
    out = {}
    for i, block in enumerate(model.layers):
        t = f"layers.{i}."
        attn, mlp = norm_gain(block.attn_norm), norm_gain(block.mlp_norm)
        if attn is not None:
            for name, _ in _attention_projections(model.config, block.attn):
                if name in ("qkv_proj", "q_proj", "q_a_proj", "kv_a_proj"):
                    out[t + f"attn.{name}.weight"] = attn
        if mlp is not None:
            for name in ("gate_up_proj", "up_proj"):
                out[t + f"mlp.{name}.weight"] = mlp
    return out


def default_head_format(fmt: str) -> str | None:
    """q4 → q8: a 4-bit LM head costs far more quality than it saves (llama.cpp's Q4 files keep
    theirs at 6-8 bits). f8 → None, the head (and a tied embedding table) left in the model's
    dtype, as vLLM and the fp8 checkpoints it reads (FBGEMM, compressed-tensors) leave them: an
    e4m3 head doubled the logits' KL to float32 on SmolLM2-135M and Gemma 3 270M (an int8 head
    was no better than float on SmolLM2, and worse on Gemma's 262K-token table). Otherwise the
    model's format."""
    if fmt == "f8":
        return None
    return "q8" if fmt == "q4" else fmt


def _attention_projections(c, attn) -> list[tuple[str, int]]:
    """The attention's packable Linear layers with their input widths. DeepSeek's kv_b_proj stays
    float: the absorbed decode (model/mla.py) reads its key and value halves as matrices."""
    if c.mla is None:
        return [("qkv_proj", c.hidden_size), ("o_proj", c.q_width)]
    m = c.mla
    out = [("q_proj", c.hidden_size)] if m.q_lora_rank is None else [("q_a_proj", c.hidden_size),
                                                                      ("q_b_proj", m.q_lora_rank)]
    return out + [("kv_a_proj", c.hidden_size), ("o_proj", c.num_heads * m.v_head_dim)]


def packed_targets(model: Decoder, fmt: str, group: int | None = None,
                   head_fmt: str | None = None) -> dict[str, tuple[str, int | None]]:
    """The parameters ``pack_model`` replaces, with the (format, group) each gets: a loader can
    produce these packed straight from the checkpoint and never fill the float parameter."""
    c = model.config
    head_fmt = head_fmt or default_head_format(fmt)  # None: the head stays as it is
    out = {}
    for i, block in enumerate(model.layers):
        t = f"layers.{i}."
        for name, width in _attention_projections(c, block.attn):
            if fits(fmt, width, group):
                out[t + f"attn.{name}.weight"] = (fmt, group)
        if isinstance(block.mlp, MLP):
            if fits(fmt, c.hidden_size, group):
                proj = "gate_up_proj" if block.mlp.gate_up_proj is not None else "up_proj"
                out[t + f"mlp.{proj}.weight"] = (fmt, group)
            if fits(fmt, c.intermediate_size, group):
                out[t + "mlp.down_proj.weight"] = (fmt, group)
    head_group = group if head_fmt == fmt else None
    if head_fmt not in (None, "f32") and fits(head_fmt, c.hidden_size, head_group):
        out["lm_head.weight" if model.lm_head is not None else "embed.weight"] = (head_fmt, head_group)
    return out


def pack_model(model: Decoder, fmt: str = "f32", group: int | None = None, head_fmt: str | None = None,
               packed: dict[str, Packed] | None = None) -> Decoder:
    """In place; returns the model. ``head_fmt``: see default_head_format (None there: the LM
    head and embedding keep the model's float layers). ``packed`` holds
    weights a loader already produced in their target format (GGUF blocks kept as they are, by
    rung parameter name); they are used instead of quantizing the float parameter."""
    device = next(model.parameters()).device
    packed = {name: _on(p, device) for name, p in (packed or {}).items()}  # GGUF blocks come in on the CPU
    head_fmt = head_fmt or default_head_format(fmt)
    c = model.config
    h, inter = c.hidden_size, c.intermediate_size
    gains = input_gains(model)

    def pack(owner: nn.Module, name: str, prefix: str, in_features: int) -> None:
        layer = getattr(owner, name)
        if layer is not None and fits(fmt, in_features, group):
            key = f"{prefix}{name}.weight"
            setattr(owner, name, _kept_or_packed(layer, packed.get(key), fmt, group, gains.get(key)))

    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}."
        for name, width in _attention_projections(c, block.attn):
            pack(block.attn, name, prefix + "attn.", width)
        mlp = block.mlp
        if not isinstance(mlp, MLP):  # MoE: the experts packed (rung/quant/experts.py), the router kept
            if can_pack(mlp, fmt, group):
                pack_experts(mlp, fmt, group, norm_gain(block.mlp_norm))
            continue
        pack(mlp, "up_proj", prefix + "mlp.", h)
        pack(mlp, "down_proj", prefix + "mlp.", inter)
        if isinstance(mlp.gate_up_proj, nn.Linear) and fits(fmt, h, group):
            kept = packed.get(prefix + "mlp.gate_up_proj.weight")
            weight = kept if kept is not None else _packed(mlp.gate_up_proj.weight, fmt, group,
                                                           gains.get(prefix + "mlp.gate_up_proj.weight"))
            bias = mlp.gate_up_proj.bias
            if inter % GATE_BLOCK == 0:  # act(gate)·up inside the layer's kernel
                order = interleave_gate_up(torch.arange(inter), torch.arange(inter, 2 * inter))
                mlp.gate_up_proj = PackedLinear(weight.permute_rows(order), None if bias is None else bias[order],
                                                gated=c.activation)
                mlp.act_and_mul = nn.Identity()  # the layer applies it
            else:
                mlp.gate_up_proj = PackedLinear(weight, bias)
    if head_fmt is not None:
        _pack_head(model, head_fmt, group if head_fmt == fmt else None, packed)
    return model


def _on(p: Packed, device: torch.device) -> Packed:
    """``p`` on ``device`` (the same tensors where they already are)."""
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Packed(p.fmt, move(p.data), p.shape, p.group, move(p.scale), move(p.offset))


def _kept_or_packed(layer, kept: Packed | None, fmt: str, group: int | None,
                    gain: torch.Tensor | None = None) -> PackedLinear:
    if kept is not None:
        return PackedLinear(kept, layer.bias)
    return _linear(layer, fmt, group, gain)


def _pack_head(model: Decoder, fmt: str, group: int | None, packed: dict[str, Packed]) -> None:
    c = model.config
    if not fits(fmt, c.hidden_size, group):
        return
    if model.lm_head is not None:  # untied
        kept = packed.get("lm_head.weight")
        model.lm_head = PackedLinear(kept) if kept is not None else _linear(model.lm_head, fmt, group)
        if "embed.weight" in packed:
            model.embed = PackedEmbedding(PackedLinear(packed["embed.weight"]), model.embed.weight.dtype)
        return
    kept = packed.get("embed.weight")
    if kept is None and fmt == "f32" and model.embed.weight.dtype == torch.float32:
        head = PackedLinear(Packed("f32", model.embed.weight.data, tuple(model.embed.weight.shape)))  # shared, no copy
        model.lm_head = head
        return
    head = PackedLinear(kept if kept is not None else _packed(model.embed.weight, fmt, group))
    dtype = model.embed.weight.dtype if isinstance(model.embed, nn.Embedding) else torch.float32
    model.lm_head = head
    model.embed = PackedEmbedding(head, dtype)


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by the model's tensors, counting each storage once (what the weights occupy)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total
