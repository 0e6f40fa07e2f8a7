"""Mixture of experts: a router picks top-k gated experts per token.

Experts are stored stacked and output-major, like nn.Linear: gate/up [E, I, H], down [E, H, I].
gpt-oss's fused, interleaved gate_up is split at load time (weights/keymaps.py), so one module
serves both routers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rung.config import ModelConfig
from rung.model.mlp import ACTIVATIONS


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

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens x [n, H] → [n, H]."""
        gate = F.linear(x, self.gate_proj[e], None if self.gate_bias is None else self.gate_bias[e])
        up = F.linear(x, self.up_proj[e], None if self.up_bias is None else self.up_bias[e])
        if self.clamped:
            # gpt-oss: gate clamped from above only, up both ways; x·σ(αx) and the +1 are the model's
            gate = gate.clamp(max=self.limit)
            up = up.clamp(-self.limit, self.limit)
            hidden = gate * torch.sigmoid(gate * self.alpha) * (up + 1)
        else:
            hidden = self.act(gate) * up
        return F.linear(hidden, self.down_proj[e], None if self.down_bias is None else self.down_bias[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [n, H]
        weights, experts = route(self.router(flat), self.top_k, self.router_kind, self.norm_topk_prob)
        out = torch.zeros_like(flat)
        # visit only the experts some token chose; the expert bias sits inside the weighted sum
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            y = self.expert(e, flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(shape)
