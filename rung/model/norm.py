"""LayerNorm and RMSNorm, computed in float32 and cast back (as transformers does).

Both offer ``add_norm(x, residual)``: a block's residual add and the norm after it, the seam
where a kernel module fuses the two (rung/kernels/modules.py); here it is the two plain ops.
"""

from __future__ import annotations

import torch
from torch import nn

from rung.config import ModelConfig


class AddNorm:
    """The residual-add seam shared by the norms (a mixin: ``self`` is the norm module)."""

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, norm(x + residual))."""
        total = x + residual
        return total, self(total)


class RMSNorm(AddNorm, nn.Module):
    """y = x / rms(x) * (offset + w). Llama-style: the weight is applied after the cast back.

    Gemma stores w around zero and scales by (1 + w) (``offset``); Gemma and gpt-oss apply the
    gain in float32 before the cast back (``weight_in_float32``), Llama and Qwen after it.
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0, weight_in_float32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset, self.weight_in_float32 = eps, offset, weight_in_float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # no casts to order: torch's fused kernel, one op instead of seven
            weight = self.weight + self.offset if self.offset else self.weight
            return nn.functional.rms_norm(x, self.weight.shape, weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_float32:
            return (x32 * (self.offset + self.weight.float())).to(dtype)
        return (self.offset + self.weight) * x32.to(dtype)


class LayerNorm(AddNorm, nn.LayerNorm):
    """torch's LayerNorm with the statistics in float32 for low-precision inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return nn.functional.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


class NoNorm(AddNorm, nn.Identity):
    """The identity where a family has no norm (OLMo 2 before its sublayers), keeping add_norm."""


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm == "layernorm":
        return LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, eps=config.norm_eps, offset=config.norm_weight_offset,
                   weight_in_float32=config.norm_weight_in_float32)
