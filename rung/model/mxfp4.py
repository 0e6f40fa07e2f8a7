"""MXFP4 (OCP microscaling FP4), the format gpt-oss ships its expert weights in.

Blocks of 32 consecutive values along the last (input) axis share one E8M0 scale 2^(s - 127);
each byte of ``*_blocks`` holds two E2M1 values, the low nibble the even element and the high
nibble the odd one. Every decoded value is m·2^k with at most two significant bits, so decoding to
bfloat16 or float32 is exact. Here, below the model, because the MoE keeps experts packed and
dequantizes them on the fly (model/moe.py's ExpertWeights); the fused MoE kernels decode the
same bytes in registers (the fused MoE kernels under rung/kernels/).
"""

from __future__ import annotations

import torch

# E2M1 by nibble: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [..., rows, G, 16] uint8, scales [..., rows, G] uint8 → [..., rows, G * 32] (output-major)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    blocks, scales = blocks.view(torch.uint8), scales.view(torch.uint8)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)  # [..., G, 16, 2]
    values = values.flatten(-2)  # [..., G, 32]: element 2b from the low nibble of byte b
    exponents = scales.to(torch.int32) - 127
    out = torch.ldexp(values, exponents[..., None].to(torch.float32))
    return out.flatten(-2).to(dtype)
