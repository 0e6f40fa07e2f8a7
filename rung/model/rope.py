"""Rotary position embeddings and their long-context scalings.

The frequencies follow transformers' ``modeling_rope_utils`` op for op, in float32, because angle
errors grow with the position: default, linear, dynamic NTK, YaRN (with and without truncation of
the correction range), llama3 and LongRoPE (Phi-3). Rotation is the half-split (NeoX, ``rotate_half``) layout: dim j
pairs with dim j + d/2.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rung.config import RopeConfig


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    return int(head_dim * rope.partial_rotary_factor)


def _base_inv_freq(base: float | torch.Tensor, dim: int) -> torch.Tensor:
    # [dim/2]; the int64 arange then float division matches transformers bit for bit.
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor = rope.theta, rope.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the original context
        return dim * math.log(rope.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:  # gpt-oss sets truncate=False: rounding moves the blend band (vLLM #27722)
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: divide by factor
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


def _llama3(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope.theta, dim)
    old_len, factor = rope.original_max_position, rope.factor
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by the factor, short ones kept, the band between blended
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def _longrope(rope: RopeConfig, dim: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE (transformers' _compute_longrope_parameters): each frequency divided by its own
    factor, the short set while the sequence fits the original context, the long set past it; cos and
    sin scaled by sqrt(1 + ln(factor) / ln(original context)) unless the config gives the factor."""
    original = rope.original_max_position
    attention_factor = rope.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if rope.factor <= 1 else math.sqrt(1 + math.log(rope.factor) / math.log(original))
    long = seq_len is not None and seq_len > original
    ext = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
    inv_freq = 1.0 / (ext * rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv_freq, float(attention_factor)


def inv_freq_for(rope: RopeConfig, head_dim: int, max_position: int | None, seq_len: int | None = None):
    """Inverse frequencies [rotary_dim / 2] (float32) and the factor that scales cos and sin."""
    dim = rotary_dim(rope, head_dim)
    if rope.type == "default":
        return _base_inv_freq(rope.theta, dim), 1.0
    if rope.type == "linear":
        return _base_inv_freq(rope.theta, dim) / rope.factor, 1.0
    if rope.type == "dynamic":
        # NTK-aware: the base grows once the sequence outgrows the trained context
        length = torch.tensor(max(seq_len or 0, max_position))
        base = rope.theta * ((rope.factor * length / max_position) - (rope.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope.type == "yarn":
        return _yarn(rope, dim)
    if rope.type == "llama3":
        return _llama3(rope, dim), 1.0
    if rope.type == "longrope":
        return _longrope(rope, dim, seq_len)
    raise ValueError(f"rope type {rope.type!r} is not supported")


class Rotary(nn.Module):
    """cos/sin tables for given absolute positions; one instance per distinct RopeConfig."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_position: int | None):
        super().__init__()
        self.rope, self.head_dim, self.max_position = rope, head_dim, max_position
        # A plain float32 attribute, not a buffer: model.to(bfloat16) must not round the
        # frequencies, and a model built on the meta device still gets real values.
        with torch.device("cpu"):
            self.inv_freq, self.scale = inv_freq_for(rope, head_dim, max_position)
            # LongRoPE: the long factors' table, taken by a call whose longest position is past the
            # original context (the whole call, as transformers' longrope_frequency_update does)
            self.long_inv_freq = (inv_freq_for(rope, head_dim, max_position, rope.original_max_position + 1)[0]
                                  if rope.type == "longrope" else None)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [seq] → cos, signed sin [seq, rotary_dim] for ``apply_rotary``.

        The sin table's first half is negated, so the rotation is one roll, two multiplies and an
        add: rotate_half(x) * sin == roll(x, d/2) * [-sin, sin]."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        inv_freq = self.inv_freq
        if self.rope.type == "dynamic":
            # transformers recomputes the frequencies from the longest position of the call
            seq_len = int(positions.max()) + 1
            if seq_len > self.max_position:
                inv_freq = inv_freq_for(self.rope, self.head_dim, self.max_position, seq_len)[0].to(inv_freq.device)
        if self.long_inv_freq is not None and int(positions.max()) + 1 > self.rope.original_max_position:
            inv_freq = self.long_inv_freq = self.long_inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # [seq, dim/2]
        cos, sin = freqs.cos() * self.scale, freqs.sin() * self.scale
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]; tables [.., seq, rotary_dim] from ``Rotary``.
    Rotates pairs (j, j + d/2): (a, b) → (a cos - b sin, b cos + a sin)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + x.roll(rot // 2, dims=-1) * signed_sin
    xr, rest = x[..., :rot], x[..., rot:]  # partial rotary: the tail passes through
    return torch.cat((xr * cos + xr.roll(rot // 2, dims=-1) * signed_sin, rest), dim=-1)
