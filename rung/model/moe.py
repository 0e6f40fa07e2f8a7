"""Mixture of experts: a router picks top-k gated experts per token.

Experts are stored stacked and output-major, like nn.Linear: gate/up [E, I, H], down [E, H, I].
gpt-oss's fused, interleaved gate_up is split at load time (weights/keymaps.py), so one module
serves both routers. gpt-oss's MXFP4 experts may stay packed (``keep_packed``): uint8 bytes
[E, rows, cols / 2] and scales [E, rows, cols / 32] in place of the dense matrices.

The forward is the reference: a loop over the experts some token chose, which dequantizes a packed
expert when it is visited. On CUDA, rung/kernels/modules.py's MoE overrides its two steps
(``choose``, ``mix``) with the fused kernels: routing and grouping on the device, no host
synchronisation, only the chosen experts read, packed weights decoded in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rung.config import ModelConfig
from rung.model.mlp import ACTIVATIONS, MLP
from rung.model.mxfp4 import dequantize_mxfp4


@dataclass
class ExpertWeights:
    """Stacked, output-major experts: gate/up [E, I, H], down [E, H, I] (dense); packed MXFP4 keeps
    bytes [E, rows, cols / 2] and scales [E, rows, cols / 32] instead, as uint8."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_scales: torch.Tensor | None = None
    up_scales: torch.Tensor | None = None
    down_scales: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.gate_scales is not None

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    def expert(self, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        """One expert's matrix [rows, cols] in ``dtype`` (dequantized on the fly when packed)."""
        w = getattr(self, name)[e]
        if not self.packed:
            return w.to(dtype)
        scales = getattr(self, name + "_scales")[e]
        return dequantize_mxfp4(w.view(w.shape[0], -1, 16), scales, dtype)


def route(logits: torch.Tensor, top_k: int, router: str, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, E] → weights [n, k] (logits' dtype), expert ids [n, k]."""
    if router == "topk_softmax":  # gpt-oss: top-k of the raw logits, softmax over those k
        top, idx = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(top, dim=-1), idx
    # Qwen3-MoE: softmax over all experts in float32, top-k, optional renormalisation
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top, idx = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), idx


# ---- DeepSeek's routers (V2 group_limited_greedy, V3 noaux_tc) --------------------------------

GROUPED_ROUTERS = ("softmax_group_topk", "sigmoid_group_topk")


def route_grouped(logits: torch.Tensor, top_k: int, router: str, groups: int, topk_groups: int,
                  norm_topk_prob: bool, correction: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's group-limited top-k (transformers' DeepseekV2TopkRouter / DeepseekV3TopkRouter):
    logits [n, E] (float32) → weights [n, k] (float32), expert ids [n, k].

    The experts form ``groups`` equal groups; a token keeps the ``topk_groups`` best groups and
    draws its k experts from them. V2 (softmax) ranks a group by its best expert; V3 (sigmoid)
    by the sum of its two best, after adding the per-expert ``correction`` (a load-balancing bias
    that steers the choice but never the weights)."""
    n, e = logits.shape
    if router == "sigmoid_group_topk":
        scores = logits.sigmoid()
        choice = scores + correction.float() if correction is not None else scores
        group_scores = choice.view(n, groups, e // groups).topk(2, dim=-1)[0].sum(dim=-1)  # [n, G]
        fill = float("-inf")
    else:
        scores = choice = torch.softmax(logits, dim=-1, dtype=torch.float32)
        group_scores = choice.view(n, groups, e // groups).amax(dim=-1)
        fill = 0.0
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_scores.topk(topk_groups, dim=-1)[1], True)
    choice = choice.masked_fill(~kept.repeat_interleave(e // groups, dim=1), fill)  # [n, E]
    idx = choice.topk(top_k, dim=-1)[1]
    weights = scores.gather(1, idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, idx


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        m = config.moe
        e, h, i = m.num_experts, config.hidden_size, m.expert_intermediate_size
        self.top_k, self.router_kind, self.norm_topk_prob = m.top_k, m.router, m.norm_topk_prob
        self.router = nn.Linear(h, e, bias=m.router_bias)
        self.gate_proj = nn.Parameter(torch.zeros(e, i, h))
        self.up_proj = nn.Parameter(torch.zeros(e, i, h))
        self.down_proj = nn.Parameter(torch.zeros(e, h, i))
        self.gate_bias = nn.Parameter(torch.zeros(e, i)) if m.expert_bias else None
        self.up_bias = nn.Parameter(torch.zeros(e, i)) if m.expert_bias else None
        self.down_bias = nn.Parameter(torch.zeros(e, h)) if m.expert_bias else None
        self.clamped = config.activation == "swiglu_clamped"
        self.limit, self.alpha = config.swiglu_limit, config.swiglu_alpha
        self.act = None if self.clamped else ACTIVATIONS[config.activation]
        self.activation_name = config.activation
        # DeepSeek: group-limited routing, a scale on the routed weights, always-on shared experts
        self.groups, self.topk_groups, self.routed_scaling_factor = m.num_groups, m.topk_groups, m.routed_scaling_factor
        self.score_correction = nn.Parameter(torch.zeros(e)) if m.score_correction_bias else None
        self.shared = MLP(config, m.shared_experts * i) if m.shared_experts else None

    packed = False

    def keep_packed(self, gate: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor],
                    down: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Hold the experts as MXFP4 (blocks [E, rows, G, 16], scales [E, rows, G]) instead of dense."""
        for name, (blocks, scales), like in (("gate_proj", gate, self.gate_proj), ("up_proj", up, self.up_proj),
                                             ("down_proj", down, self.down_proj)):
            rows, cols = like.shape[1:]
            if tuple(blocks.shape) != (like.shape[0], rows, cols // 32, 16) or tuple(scales.shape) != tuple(blocks.shape[:3]):
                raise ValueError(f"MoE {name}: MXFP4 blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)} do not "
                                 f"pack a {tuple(like.shape)} expert stack")
            delattr(self, name)
            self.register_buffer(name, blocks.view(torch.uint8).reshape(blocks.shape[0], rows, -1).contiguous())
            self.register_buffer(name + "_scales", scales.view(torch.uint8).contiguous())
        self.packed = True

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(
            self.gate_proj, self.up_proj, self.down_proj,
            *((self.gate_proj_scales, self.up_proj_scales, self.down_proj_scales) if self.packed else (None,) * 3),
            self.gate_bias, self.up_bias, self.down_bias)

    def expert(self, e: int, x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        """One expert on its tokens x [n, H] → [n, H]."""
        gate = F.linear(x, w.expert("gate", e, x.dtype), None if self.gate_bias is None else self.gate_bias[e])
        up = F.linear(x, w.expert("up", e, x.dtype), None if self.up_bias is None else self.up_bias[e])
        if self.clamped:
            # gpt-oss: gate clamped from above only, up both ways; x·σ(αx) and the +1 are the model's
            gate = gate.clamp(max=self.limit)
            up = up.clamp(-self.limit, self.limit)
            hidden = gate * torch.sigmoid(gate * self.alpha) * (up + 1)
        else:
            hidden = self.act(gate) * up
        return F.linear(hidden, w.expert("down", e, x.dtype), None if self.down_bias is None else self.down_bias[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [n, H]
        weights, experts = self.choose(self.router_logits(flat))  # [n, k] each
        out = self.mix(flat, weights, experts)
        if self.shared is not None:  # DeepSeek's shared experts see every token, unweighted
            out = out + self.shared(flat)
        return out.view(x.shape)

    def router_logits(self, flat: torch.Tensor) -> torch.Tensor:
        if self.router_kind in GROUPED_ROUTERS:  # DeepSeek routes in float32, whatever the model dtype
            return F.linear(flat.float(), self.router.weight.float())
        return self.router(flat)

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's logits [n, E] → each token's expert weights and ids [n, k]."""
        if self.router_kind in GROUPED_ROUTERS:
            weights, idx = route_grouped(logits, self.top_k, self.router_kind, self.groups, self.topk_groups,
                                         self.norm_topk_prob, self.score_correction)
        else:
            weights, idx = route(logits, self.top_k, self.router_kind, self.norm_topk_prob)
        return (weights * self.routed_scaling_factor if self.routed_scaling_factor != 1.0 else weights), idx

    def mix(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Σ_k weight · expert(x) per token: flat [n, H] → [n, H]."""
        w = self.expert_weights()
        out = torch.zeros_like(flat)
        # visit only the experts some token chose; the expert bias sits inside the weighted sum
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            y = self.expert(e, flat[token], w) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out
