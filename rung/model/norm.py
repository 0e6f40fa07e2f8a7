"""LayerNorm and RMSNorm, computed in float32 and cast back (as transformers does)."""

from __future__ import annotations

import torch
from torch import nn

from rung import native
from rung.config import ModelConfig
from rung.kernels import use_triton
from rung.kernels.elementwise import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
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
        if dtype == torch.float32 and x.device.type == "cpu" and x.shape[-1] % 8 == 0 and native.available():
            # a decode step's few rows: one native call (torch's CPU rms_norm is about ten ops)
            if x.numel() <= 16 * x.shape[-1] and x.is_contiguous() and not torch.is_grad_enabled():
                return native.rmsnorm(x, self.weight, self.eps, self.offset)
        if dtype == torch.float32:  # no casts to order: torch's fused kernel, one op instead of seven
            weight = self.weight + self.offset if self.offset else self.weight
            return nn.functional.rms_norm(x, self.weight.shape, weight, self.eps)
        if x.is_cuda:  # the same chain as one kernel (kernels/elementwise.py): a decode step is mostly tiny kernels
            return rms_norm(x, self.weight, self.eps, self.offset, self.weight_in_float32)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_float32:
            return (x32 * (self.offset + self.weight.float())).to(dtype)
        return (self.offset + self.weight) * x32.to(dtype)


def add_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, norm(x + residual)): a block's residual add and the norm after it. On CUDA in
    16 bits an RMSNorm takes both in one kernel (kernels/elementwise.py); elsewhere the two ops."""
    if isinstance(norm, RMSNorm) and x.dtype != torch.float32 and use_triton(x):
        return add_rms_norm(x, residual, norm.weight, norm.eps, norm.offset, norm.weight_in_float32)
    total = x + residual
    return total, norm(total)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm with the statistics in float32 for low-precision inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return nn.functional.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm == "layernorm":
        return LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, eps=config.norm_eps, offset=config.norm_weight_offset,
                   weight_in_float32=config.norm_weight_in_float32)
