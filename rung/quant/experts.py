"""Mixture-of-experts layers with packed experts (q8, q4, f8): weight-only, the router stays as it is.

``pack_experts(moe, fmt, group)`` quantizes every expert with rung.quant.formats (per expert, the
same rounding as a dense layer) and turns the layer into a ``PackedMoE``. Each expert's gate and up
rows are interleaved in blocks of 8, as a gated ``PackedLinear`` holds them, so one kernel computes
act(gate) · up; the stacks are buffers [E, rows, ...] (``gate_up_*``, ``down_*``).

Three paths, by where and how many tokens:

- CUDA (or Triton's interpreter), at most ``DECODE_TOKENS`` tokens (a decode step): one GEMV launch
  for gate|up and one for down over the chosen (token, expert) rows, each reading only its expert's
  rows (rung/kernels/triton_dp4a.py for q8 / q4, rung/kernels/triton_fp8.py for f8), then the
  routed weights' sum. No host synchronisation: CUDA-graph safe.
- CUDA, more tokens (prefill): the layer's experts dequantized into a scratch stack in the
  activation dtype, then the fused bf16 MoE kernels (rung/kernels/fused_moe.py).
- anywhere else: ``MoE.mix`` over the chosen experts, each dequantized (``PackedExpertWeights``):
  the reference the kernels are tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from rung.model.moe import MoE
from rung.quant.formats import Packed, dequantize, fits, quantize
from rung.quant.linear import GATE_BLOCK, interleave_gate_up

DECODE_TOKENS = 4  # tokens a step up to which the per-row GEMVs run; above, dequantize + fused MoE
FORMATS = ("q8", "q4", "f8")
F8_EXPERTS = 16  # experts an f8 prefill dequantizes at a time (their float32 temporaries: 16 x 6 MB for 30B-A3B)


def can_pack(moe: nn.Module, fmt: str, group: int | None) -> bool:
    """Dense experts without biases (gpt-oss keeps its MXFP4 ones), gate/up rows in whole blocks,
    and widths the format's groups divide."""
    if not isinstance(moe, MoE) or isinstance(moe, PackedMoE) or moe.packed or fmt not in FORMATS:
        return False
    if moe.gate_bias is not None or moe.down_bias is not None or moe.clamped:
        return False
    e, i, h = moe.gate_proj.shape
    g = None if fmt == "f8" else group
    return i % GATE_BLOCK == 0 and all(fits(fmt, width, g) for width in (h, i))


def pack_experts(moe: MoE, fmt: str, group: int | None = None, gain: torch.Tensor | None = None) -> "PackedMoE":
    """In place: the experts of ``moe`` quantized to ``fmt``; the module becomes a PackedMoE.
    ``gain``: the gain of the norm before the layer (weighs fp8's scale search, as for a dense MLP)."""
    if not can_pack(moe, fmt, group):
        raise ValueError(f"cannot pack these experts as {fmt} (group {group})")
    e, i, h = moe.gate_proj.shape
    g = None if fmt == "f8" else group
    order = interleave_gate_up(torch.arange(i), torch.arange(i, 2 * i)).to(moe.gate_proj.device)
    with torch.no_grad():
        # every expert's rows in one call (scales are per row or per group along a row: the same
        # values as expert by expert, in a few large kernels instead of thousands of small ones)
        gate_up = quantize(torch.cat((moe.gate_proj, moe.up_proj), 1).view(e * 2 * i, h), fmt, g, gain)
        down = quantize(moe.down_proj.reshape(e * h, i), fmt, g)
    stacks = [_experts(gate_up, e, order), _experts(down, e)]
    for name in ("gate_proj", "up_proj", "down_proj"):
        delattr(moe, name)
    moe.__class__ = PackedMoE
    moe.install(fmt, gate_up.group, down.group, *stacks, (e, i, h))
    return moe


def _experts(p: Packed, e: int, order: torch.Tensor | None = None) -> tuple:
    """A Packed of E stacked experts' rows → (data, scale, offset) [E, rows, ...], rows reordered."""
    def split(t):
        if t is None:
            return None
        t = t.view(e, -1, t.shape[-1])
        return t if order is None else t[:, order]
    return split(p.data), split(p.scale), split(p.offset)


class PackedExpertWeights:
    """``ExpertWeights``' reading interface over packed stacks: one expert's matrix, dequantized."""

    def __init__(self, moe: "PackedMoE"):
        self.moe = moe
        self.gate_bias = self.up_bias = self.down_bias = None

    @property
    def num_experts(self) -> int:
        return self.moe.shape[0]

    def expert(self, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        m = self.moe
        _, i, h = m.shape
        if name == "down":
            return dequantize(m.packed_expert("down", e), dtype)
        w = dequantize(m.packed_expert("gate_up", e), dtype).view(i // GATE_BLOCK, 2, GATE_BLOCK, h)
        return w[:, 0 if name == "gate" else 1].reshape(i, h)


class PackedMoE(MoE):
    """A MoE layer (rung/model/moe.py) whose experts are packed: see the module docstring."""

    def install(self, fmt: str, group_up: int, group_down: int, gate_up, down, shape) -> None:
        self.fmt, self.groups_packed, self.shape = fmt, (group_up, group_down), tuple(shape)
        for prefix, (data, scale, offset) in (("gate_up", gate_up), ("down", down)):
            self.register_buffer(prefix + "_data", data.contiguous())
            self.register_buffer(prefix + "_scale", scale.contiguous())
            self.register_buffer(prefix + "_offset", None if offset is None else offset.contiguous())

    def extra_repr(self) -> str:
        e, i, h = self.shape
        return f"{e} experts {h} → {i} → {h}, {self.fmt}, groups {self.groups_packed}"

    def packed_expert(self, prefix: str, e: int) -> Packed:
        _, i, h = self.shape
        rows, cols = (2 * i, h) if prefix == "gate_up" else (h, i)
        offset = getattr(self, prefix + "_offset")
        return Packed(self.fmt, getattr(self, prefix + "_data")[e], (rows, cols),
                      self.groups_packed[prefix == "down"], getattr(self, prefix + "_scale")[e],
                      None if offset is None else offset[e])

    def expert_weights(self) -> PackedExpertWeights:
        return PackedExpertWeights(self)

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from rung.kernels.fused_moe import route
        from rung.kernels.modules import FusedMoE

        if FusedMoE.fits(self):  # the routing kernel where it runs; the model's routing otherwise
            return route(logits, self.top_k, self.router_kind, self.norm_topk_prob)
        return super().choose(logits)

    def mix(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        from rung.kernels import use_triton

        if not (use_triton(flat, self.down_data) and self.activation_name == "silu"
                and flat.dtype in (torch.float16, torch.bfloat16, torch.float32)):
            return super().mix(flat, weights, experts)
        if flat.shape[0] <= DECODE_TOKENS:
            return self.mix_rows(flat, weights, experts)
        return self.mix_dequantized(flat, weights, experts)

    def mix_rows(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """A decode step: act(gate)·up then down for each (token, choice) row through its expert's
        packed rows, then Σ_k weight · row per token."""
        n, k = experts.shape
        ids = experts.reshape(-1).to(torch.int32)
        hidden = self._rows("gate_up", flat, ids, k, "silu")  # [n·k, I]
        out = self._rows("down", hidden, ids, 1, None)  # [n·k, H]
        # Σ_k weight · row in float32, one kernel with PDL (a cast and a cuBLAS bmm were two launches
        # that broke a decode step's chain of programmatic dependent launches, kernels/triton_pdl.py)
        from rung.kernels.triton_moe import combine

        return combine(out.contiguous(), n, k, weights)

    def _rows(self, prefix: str, x: torch.Tensor, ids: torch.Tensor, x_div: int, act: str | None) -> torch.Tensor:
        data, scale = getattr(self, prefix + "_data"), getattr(self, prefix + "_scale")
        x = x.contiguous()
        if self.fmt == "f8":
            from rung.kernels.triton_fp8 import gemv as fp8_gemv

            return fp8_gemv(x, data, scale, None, act, experts=ids, x_div=x_div)
        from rung.kernels.triton_dp4a import gemv_dp4a

        group = self.groups_packed[prefix == "down"]
        return gemv_dp4a(x, self.fmt, data, scale, getattr(self, prefix + "_offset"), group, None, act,
                         experts=ids, x_div=x_div)

    def mix_dequantized(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Prefill: the whole layer's experts dequantized (in the activation dtype), then the fused MoE."""
        from rung.kernels.fused_moe import Activation, ExpertWeights, fused_moe

        e, i, h = self.shape
        dtype = flat.dtype
        gate_up = self._dense("gate_up", dtype).view(e, i // GATE_BLOCK, 2, GATE_BLOCK, h)
        w = ExpertWeights(gate_up[:, :, 0].reshape(e, i, h), gate_up[:, :, 1].reshape(e, i, h),
                          self._dense("down", dtype))
        return fused_moe(flat, weights, experts, w, Activation("silu"))

    def _dense(self, prefix: str, dtype: torch.dtype) -> torch.Tensor:
        data = getattr(self, prefix + "_data")
        e, rows = data.shape[:2]
        if self.fmt == "f8":  # formats.dequantize's arithmetic: one Triton pass, else F8_EXPERTS experts a pass
            scale = getattr(self, prefix + "_scale")
            from rung.kernels import use_triton

            if use_triton(data):
                from rung.kernels.triton_fp8 import fp8_dequantize

                return fp8_dequantize(data.reshape(e * rows, -1), scale.reshape(e * rows, -1), dtype).view(e, rows, -1)
            out = torch.empty(data.shape, dtype=dtype, device=data.device)
            for e0 in range(0, e, F8_EXPERTS):
                out[e0:e0 + F8_EXPERTS] = data[e0:e0 + F8_EXPERTS].float().mul_(scale[e0:e0 + F8_EXPERTS].float())
            return out
        from rung.kernels.triton_quant import dequantize as triton_dequantize

        offset = getattr(self, prefix + "_offset")
        flat = triton_dequantize(self.fmt, data.reshape(e * rows, -1), getattr(self, prefix + "_scale").reshape(e * rows, -1),
                                 None if offset is None else offset.reshape(e * rows, -1),
                                 self.groups_packed[prefix == "down"], dtype)
        return flat.view(e, rows, -1)
