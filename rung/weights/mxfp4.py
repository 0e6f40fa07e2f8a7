"""MXFP4 (OCP microscaling FP4) as gpt-oss ships its expert weights: the format itself lives in
model/mxfp4.py (the MoE decodes it on the fly); quantizing, for tests and for writing
checkpoints, lives here.
"""

from __future__ import annotations

import torch

from rung.model.mxfp4 import FP4_VALUES, dequantize_mxfp4

__all__ = ["FP4_VALUES", "dequantize_mxfp4", "quantize_mxfp4"]


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, cols] float → (blocks, scales) with round-to-nearest FP4 codes. For tests and
    for writing checkpoints; the shared exponent is chosen so the block maximum fits in ±6."""
    *lead, cols = weight.shape
    if cols % 32:
        raise ValueError(f"MXFP4 needs the last axis to be a multiple of 32, got {cols}")
    w = weight.float().reshape(*lead, cols // 32, 32)
    amax = w.abs().amax(-1).clamp(min=2.0**-126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = w / torch.exp2(exp)[..., None]
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # nearest code
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)
