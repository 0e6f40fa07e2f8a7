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


class ActAndMul(nn.Module):
    """y [.., 2·I] = [gate | up] → act(gate) · up [.., I]: a gated MLP's activation over its one
    fused projection (rung.quant's gated layers apply it themselves and set this to Identity)."""

    def __init__(self, activation: str):
        super().__init__()
        self.activation, self.act = activation, ACTIVATIONS[activation]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        gate, up = y.chunk(2, dim=-1)
        return self.act(gate) * up


class MLP(nn.Module):
    """plain: down(act(up(x))); gated: down(act(gate) · up), gate and up as one projection whose
    rows are [gate | up] (the loaders fuse the checkpoint's two tensors)."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        h, bias = config.hidden_size, config.mlp_bias
        i = config.intermediate_size if intermediate_size is None else intermediate_size  # DeepSeek's shared experts
        gated = config.mlp == "gated"
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=bias) if gated else None
        self.up_proj = None if gated else nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = ACTIVATIONS[config.activation]
        self.act_and_mul = ActAndMul(config.activation) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))
