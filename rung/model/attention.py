"""Causal self-attention for every family: MHA, GQA and MQA; optional q/k/v/o biases; per-head
QK RMSNorm (per head, or over the whole projection: OLMo 2); RoPE or ALiBi; sliding windows; learned
attention sinks; soft-capped scores (Gemma 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rung.config import ModelConfig
from rung.model.norm import make_norm
from rung.model.rope import apply_rotary


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes [heads] (BLOOM): a geometric sequence from the nearest power of two
    at or below ``num_heads``, plus interleaved slopes of the next power when it is not one."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = torch.pow(torch.tensor(base, dtype=torch.float32), torch.arange(1, closest + 1, dtype=torch.int32))
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        extra = min(closest, num_heads - closest)
        powers = torch.arange(1, 1 + 2 * extra, 2, dtype=torch.int32)
        slopes = torch.cat((slopes, torch.pow(torch.tensor(extra_base, dtype=torch.float32), powers)))
    return slopes


def attention_bias(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, slopes: torch.Tensor | None, dtype: torch.dtype,
    exact: bool = False,
):
    """Additive bias [1 or heads, queries, keys]: -inf where a key is in the future or, with a
    window, at least ``window`` positions back (a query sees itself and window - 1 earlier keys,
    as transformers' sliding mask does); ALiBi adds slope * key position.

    Unless ``exact`` is asked for (the sink path needs a tensor), the common cases come back as
    None (one query that may see every key: a decode step) or CAUSAL (a prompt from position 0)."""
    if not exact and slopes is None:
        span = int(q_pos[-1] - k_pos[0]) + 1  # keys the last query could see
        if len(q_pos) == 1 and (window is None or span <= window):
            return None
        if (window is None or span <= window) and len(q_pos) == len(k_pos) and int(q_pos[0]) == int(k_pos[0]):
            return CAUSAL
    delta = q_pos[:, None] - k_pos[None, :]  # [q, k]
    allowed = delta >= 0
    if window is not None:
        allowed &= delta < window
    bias = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device).masked_fill(~allowed, float("-inf"))[None]
    if slopes is not None:
        # slope * key position differs from slope * (key - query) by a per-row constant: same softmax
        bias = bias + (slopes[:, None, None] * k_pos[None, None, :].float()).to(dtype)
    return bias


CAUSAL = "causal"  # a mask that is exactly "keys up to the query" over equal-length q and k


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias, scale: float, sinks: torch.Tensor | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [b, hq, t, d], k/v [b, hkv, s, d] → [b, hq, t, d]. ``bias``: an additive [1|hq, t, s]
    tensor, None (every key visible) or CAUSAL (lets SDPA use its fused causal kernel).

    Query head h reads key/value head h // (hq / hkv). A sink is a per-head logit that joins the
    softmax denominator and is then dropped, so a head may attend to nothing (gpt-oss).
    ``softcap`` (Gemma 2) bends the scaled scores into (-cap, cap) with tanh before the mask.
    """
    if softcap is not None:
        return _softcapped(q, k, v, bias, scale, softcap)
    if sinks is None:
        if bias is CAUSAL:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=True)
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    # group query heads under their kv head instead of copying k and v: [b, hkv, group * t, d]
    qg = q.reshape(b, hkv, group * t, d)
    scores = (qg @ k.transpose(-1, -2)).view(b, hq, t, -1) * scale + bias
    sink = sinks.to(scores.dtype).view(1, hq, 1, 1).expand(b, hq, t, 1)
    logits = torch.cat((scores, sink), dim=-1).float()
    probs = torch.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)[..., :-1].to(v.dtype)
    return (probs.reshape(b, hkv, group * t, -1) @ v).view(b, hq, t, d)


def _softcapped(q, k, v, bias, scale: float, cap: float) -> torch.Tensor:
    """Gemma 2's attention (transformers' modeling_gemma2 eager_attention_forward): scores scaled,
    then tanh(scores / cap) · cap, then the mask; the softmax in float32. A bias of None or CAUSAL
    is made explicit here: SDPA has no soft-capping."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    scores = (q.reshape(b, hkv, group * t, d) @ k.transpose(-1, -2)).view(b, hq, t, s) * scale
    scores = torch.tanh(scores / cap) * cap
    if bias is CAUSAL:
        scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool, device=q.device).triu(s - t + 1), float("-inf"))
    elif bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return (probs.reshape(b, hkv, group * t, s) @ v).view(b, hq, t, d)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, c.num_heads, c.num_kv_heads, c.head_dim
        # q, k and v as one projection, rows [q | k | v] (the loaders fuse the checkpoint's tensors)
        self.qkv_proj = nn.Linear(c.hidden_size, c.q_width + 2 * c.kv_width, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.q_width, c.hidden_size, bias=c.o_bias)
        # per head (Qwen3, Gemma 3) or over all heads at once (OLMo 2: qk_norm_whole)
        self.qk_norm_whole = c.qk_norm_whole
        self.q_norm = make_norm(c, c.q_width if c.qk_norm_whole else c.head_dim) if c.qk_norm else None
        self.k_norm = make_norm(c, c.kv_width if c.qk_norm_whole else c.head_dim) if c.qk_norm else None
        self.softcap = c.attn_logit_softcap
        self.sinks = nn.Parameter(torch.zeros(c.num_heads)) if c.attn_sinks else None
        scale = c.head_dim**-0.5 if c.attn_scale is None else c.attn_scale
        self.scale = scale / (layer + 1) if c.attn_scale_by_inverse_layer else scale
        self.window = c.layer_window(layer)
        with torch.device("cpu"):  # float32, like the rotary tables; not a buffer, so never rounded
            self.slopes = alibi_slopes(c.num_heads) if c.positions == "alibi" else None

    def forward(self, x, rotary, context) -> torch.Tensor:
        """x [b, t, hidden]; rotary (cos, signed sin) [b, t, rot] or None; ``context`` stores this
        step's keys and values and runs the attention over everything the queries may see (the
        seam between the model and a KV cache, contiguous or paged: see model/cache.py)."""
        b, t, _ = x.shape
        q, k, v = self.heads(self.qkv_proj(x), rotary, context)
        if self.slopes is not None and self.slopes.device != x.device:
            self.slopes = self.slopes.to(x.device)
        if self.softcap is None:
            out = context.attend(self.layer, q, k, v, self.window, self.scale, self.sinks, self.slopes)  # [b, hq, t, d]
        else:  # only the caches that implement soft-capping take the keyword (model/cache.py, engine/paged.py)
            out = context.attend(self.layer, q, k, v, self.window, self.scale, self.sinks, self.slopes,
                                 softcap=self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def heads(self, qkv: torch.Tensor, rotary, context):
        """qkv [b, t, (hq + 2·hkv)·d] → q [b, hq, t, d], k and v [b, hkv, t, d], q and k normed and
        rotated. The seam where a kernel module does all of this in one kernel, and may store k
        and v in the context's cache itself (they come back None then): rung/kernels/modules.py."""
        b, t, _ = qkv.shape
        if self.qk_norm_whole:  # OLMo 2: RMSNorm over each token's whole q and k, then the head split
            q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = qkv.split((q_width, kv_width, kv_width), dim=-1)  # [b, t, hq·d], [b, t, hkv·d] x 2
            qkv = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=-1)
        q, k, v = qkv.view(b, t, -1, self.head_dim).transpose(1, 2).split(
            (self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=1)
        if self.q_norm is not None and not self.qk_norm_whole:  # Qwen3 / Gemma 3: RMSNorm over head_dim, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = (r[:, None] for r in rotary)  # broadcast over heads
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v
