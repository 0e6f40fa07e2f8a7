"""Multi-head Latent Attention (DeepSeek-V2 / V3; transformers' modeling_deepseek_v3.py).

Each token writes one compressed latent c (``kv_lora_rank`` wide, RMS-normed) and one RoPE key
part k_r (``qk_rope_head_dim``) shared by every head; that pair is all a cache holds. Head h's key
is [W_uk[h] c | k_r] and its value W_uv[h] c, where kv_b_proj's rows are, per head, the nope-key
rows W_uk[h] then the value rows W_uv[h].

Two ways to attend, equal in exact arithmetic:
- expanded (``latent_attention_expanded``): build every head's keys and values from the latents,
  then ordinary attention. Cheap when many queries share the keys: a prefill.
- absorbed (``latent_attention_absorbed``): move the query into the latent space instead,
  q_lat = q_nope · W_uk[h], score = q_lat · c + q_r · k_r, attend over the latents themselves as one
  shared key/value head (MQA, head dim kv_lora_rank + rope), and map the mixed latent out through
  W_uv[h]. Per key it reads kv_lora_rank + rope values instead of heads · (2 · head_dim): a decode
  step, where reading the cache is the cost.

The rotation is rung's half-split one: DeepSeek's checkpoints rotate interleaved pairs, and the
loader reorders those rows once (weights/keymaps.py), which changes no dot product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rung.config import ModelConfig
from rung.model.attention import attend
from rung.model.norm import RMSNorm
from rung.model.rope import apply_rotary

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm and kv_a_layernorm with the default eps


def _split_kv_b(w_kv_b: torch.Tensor, heads: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj's weight [heads · (nope + v), rank] → W_uk [heads, nope, rank], W_uv [heads, v, rank]."""
    w = w_kv_b.view(heads, -1, w_kv_b.shape[-1])
    return w[:, :nope], w[:, nope:]


def latent_attention_expanded(q_nope, q_rope, latent, k_rope, w_kv_b, bias, scale) -> torch.Tensor:
    """q_nope [b, h, t, dn], q_rope [b, h, t, dr]; latent [b, 1, s, r], k_rope [b, 1, s, dr];
    w_kv_b [h · (dn + dv), r] → [b, h, t, dv]. ``bias`` as model.attention.attend takes it."""
    b, h, _, dn = q_nope.shape
    s = latent.shape[2]
    kv = F.linear(latent[:, 0], w_kv_b).view(b, s, h, -1).transpose(1, 2)  # [b, h, s, dn + dv]
    k_nope, v = kv[..., :dn], kv[..., dn:]
    k = torch.cat((k_nope, k_rope.expand(b, h, s, -1)), dim=-1)  # [b, h, s, dn + dr]
    return attend(torch.cat((q_nope, q_rope), dim=-1), k, v, bias, scale, None)


def latent_attention_absorbed(q_nope, q_rope, latent, k_rope, w_kv_b, bias, scale) -> torch.Tensor:
    """The same attention with the query absorbed into the latent space (shapes as above): the
    cached latents serve as one key/value head, never expanded per head."""
    w_uk, w_uv = _split_kv_b(w_kv_b, q_nope.shape[1], q_nope.shape[-1])
    q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # [b, h, t, r]
    q = torch.cat((q_latent, q_rope), dim=-1)  # [b, h, t, r + dr]
    k = torch.cat((latent, k_rope), dim=-1)  # [b, 1, s, r + dr]: one shared head
    mixed = attend(q, k, latent, bias, scale, None)  # [b, h, t, r]
    return torch.einsum("bhtr,hvr->bhtv", mixed, w_uv)  # [b, h, t, dv]


class LatentAttention(nn.Module):
    """DeepSeek's attention block. Talks to a cache through ``context.attend_latent`` (model/cache.py),
    which stores the latent and the rotated RoPE key and calls back ``expanded`` or ``absorbed``."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c, m = config, config.mla
        self.layer, self.num_heads = layer, c.num_heads
        self.nope, self.rope, self.rank = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
        q_out = c.num_heads * m.qk_head_dim
        if m.q_lora_rank is None:  # V2-Lite: one projection
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
            self.q_a_proj, self.q_a_norm, self.q_b_proj = None, None, None
        else:  # a low-rank bottleneck with a norm in the middle
            self.q_proj = None
            self.q_a_proj = nn.Linear(c.hidden_size, m.q_lora_rank, bias=c.qkv_bias)
            self.q_a_norm = RMSNorm(m.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, q_out, bias=False)
        self.kv_a_proj = nn.Linear(c.hidden_size, m.kv_lora_rank + m.qk_rope_head_dim, bias=c.qkv_bias)  # [c | k_r]
        self.kv_a_norm = RMSNorm(m.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, c.num_heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(c.num_heads * m.v_head_dim, c.hidden_size, bias=c.o_bias)
        self.scale = m.qk_head_dim**-0.5 if c.attn_scale is None else c.attn_scale  # YaRN's mscale² folded in

    def forward(self, x, rotary, context) -> torch.Tensor:
        """x [b, t, hidden]; rotary (cos, signed sin) [b, t, dr]."""
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(b, t, self.num_heads, -1).transpose(1, 2).split((self.nope, self.rope), dim=-1)
        latent, k_rope = self.kv_a_proj(x).split((self.rank, self.rope), dim=-1)
        latent = self.kv_a_norm(latent)[:, None]  # [b, 1, t, r]
        cos, sin = (r[:, None] for r in rotary)
        q_rope, k_rope = apply_rotary(q_rope, cos, sin), apply_rotary(k_rope[:, None], cos, sin)  # k_rope [b, 1, t, dr]
        out = context.attend_latent(self.layer, q_nope, q_rope, latent, k_rope, self)  # [b, h, t, dv]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def expanded(self, q_nope, q_rope, latent, k_rope, bias) -> torch.Tensor:
        return latent_attention_expanded(q_nope, q_rope, latent, k_rope, self.kv_b_proj.weight, bias, self.scale)

    def absorbed(self, q_nope, q_rope, latent, k_rope, bias) -> torch.Tensor:
        return latent_attention_absorbed(q_nope, q_rope, latent, k_rope, self.kv_b_proj.weight, bias, self.scale)
