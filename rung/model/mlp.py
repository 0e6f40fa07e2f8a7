"""Dense feed-forward blocks: GPT-2's GELU MLP and the gated (SwiGLU / GeGLU) MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rung.config import ModelConfig

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    # GPT-2's gelu_new, BLOOM's bloom_gelu and gelu_pytorch_tanh are all the tanh approximation
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    """plain: down(act(up(x))); gated: down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias) if config.mlp == "gated" else None
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = ACTIVATIONS[config.activation]
        self.gate_up = None  # act(gate) * up as one gated projection, set by rung.quant's rewrite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            return self.down_proj(self.gate_up(x))
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
