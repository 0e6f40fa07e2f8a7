"""Causal self-attention for every family: MHA, GQA and MQA; optional q/k/v/o biases; per-head
QK RMSNorm; RoPE or ALiBi; sliding windows; learned attention sinks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rung import native
from rung.config import ModelConfig
from rung.kernels import use_triton
from rung.kernels.elementwise import qk_norm_rope
from rung.model.norm import RMSNorm, make_norm
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias, scale: float, sinks: torch.Tensor | None
) -> torch.Tensor:
    """q [b, hq, t, d], k/v [b, hkv, s, d] → [b, hq, t, d]. ``bias``: an additive [1|hq, t, s]
    tensor, None (every key visible) or CAUSAL (lets SDPA use its fused causal kernel).

    Query head h reads key/value head h // (hq / hkv). A sink is a per-head logit that joins the
    softmax denominator and is then dropped, so a head may attend to nothing (gpt-oss).
    """
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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.q_width, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.kv_width, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.kv_width, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.q_width, c.hidden_size, bias=c.o_bias)
        self.qkv_proj = None  # q, k and v as one projection, set by rung.quant's rewrite (one GEMV instead of three)
        self.split = (c.q_width, c.kv_width, c.kv_width)
        self.q_norm = make_norm(c, c.head_dim) if c.qk_norm else None
        self.k_norm = make_norm(c, c.head_dim) if c.qk_norm else None
        self.sinks = nn.Parameter(torch.zeros(c.num_heads)) if c.attn_sinks else None
        scale = c.head_dim**-0.5 if c.attn_scale is None else c.attn_scale
        self.scale = scale / (layer + 1) if c.attn_scale_by_inverse_layer else scale
        self.window = c.layer_window(layer)
        with torch.device("cpu"):  # float32, like the rotary tables; not a buffer, so never rounded
            self.slopes = alibi_slopes(c.num_heads) if c.positions == "alibi" else None

    def _native_rope(self, qkv: torch.Tensor, rotary) -> bool:
        return (rotary is not None and self.q_norm is None and qkv.shape[0] == 1 and qkv.shape[1] <= 16
                and qkv.dtype == torch.float32 and qkv.device.type == "cpu" and qkv.is_contiguous()
                and rotary[0].shape[-1] == self.head_dim and rotary[0].dtype == torch.float32
                and rotary[0][0].is_contiguous() and rotary[1][0].is_contiguous() and native.available())

    def _one_kernel_qk(self, qkv: torch.Tensor, rotary) -> bool:
        if qkv.dtype == torch.float32 or not use_triton(qkv) or (self.q_norm is None and rotary is None):
            return False
        return (self.q_norm is None or isinstance(self.q_norm, RMSNorm)) and (rotary is None or rotary[0].dtype == qkv.dtype)

    def forward(self, x, rotary, context) -> torch.Tensor:
        """x [b, t, hidden]; rotary (cos, signed sin) [b, t, rot] or None; ``context`` stores this
        step's keys and values and runs the attention over everything the queries may see (the
        seam between the model and a KV cache, contiguous or paged: see model/cache.py)."""
        b, t, _ = x.shape
        shape = b, t, -1, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
            if self._one_kernel_qk(qkv, rotary):  # CUDA, 16-bit: both norms and both rotations in one kernel
                norms = [None if n is None else (n.weight, n.eps, n.offset, n.weight_in_float32)
                         for n in (self.q_norm, self.k_norm)]
                # a context that lets the kernel store this step's keys and values itself (the CUDA
                # graphs' decode step: engine/cuda_graphs.py) says where; attend then gets None for them
                store = getattr(context, "kv_destination", None)
                dest = store(self.layer) if store is not None else None
                q, k = qk_norm_rope(qkv, self.num_heads, self.num_kv_heads, self.head_dim, *norms,
                                    *(rotary if rotary is not None else (None, None)), kv_dest=dest)
                if dest is not None:
                    return self._attend(q.transpose(1, 2), None, None, context, x)
                v = qkv[..., self.split[0] + self.split[1]:].view(shape)
                return self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), context, x)
            if self._native_rope(qkv, rotary):  # a decode step: RoPE in place, one call for q and k
                native.rope_(qkv.view(t, -1), self.num_heads + self.num_kv_heads, self.head_dim,
                             rotary[0][0], rotary[1][0])
                rotary = None
            q, k, v = qkv.split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(shape).transpose(1, 2)  # [b, hq, t, d]
        k = k.view(shape).transpose(1, 2)  # [b, hkv, t, d]
        v = v.view(shape).transpose(1, 2)
        if self.q_norm is not None:  # Qwen3 / Gemma 3: RMSNorm over head_dim, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = (r[:, None] for r in rotary)  # broadcast over heads
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self._attend(q, k, v, context, x)

    def _attend(self, q, k, v, context, x) -> torch.Tensor:
        b, t = q.shape[0], q.shape[2]
        if self.slopes is not None and self.slopes.device != x.device:
            self.slopes = self.slopes.to(x.device)
        out = context.attend(self.layer, q, k, v, self.window, self.scale, self.sinks, self.slopes)  # [b, hq, t, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
