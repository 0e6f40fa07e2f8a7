"""The decoder: embeddings → pre-norm blocks → final norm → LM head, assembled from ModelConfig."""

from __future__ import annotations

import torch
from torch import nn

from rung.config import ModelConfig
from rung.model.attention import Attention
from rung.model.cache import KVCache
from rung.model.mla import LatentAttention
from rung.model.mlp import MLP
from rung.model.moe import MoE
from rung.model.norm import NoNorm, make_norm
from rung.model.rope import Rotary


class Block(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)). Gemma's sandwich norms also normalise each
    branch's output before the add; BLOOM may take the residual from the normed input; OLMo 2 keeps
    only the norms after each branch (``pre_norms=False``: the norms before are the identity)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        pre_norm = make_norm if config.pre_norms else lambda c: NoNorm()
        self.attn_norm = pre_norm(config)
        self.attn = LatentAttention(config, layer) if config.mla is not None else Attention(config, layer)
        self.mlp_norm = pre_norm(config)
        self.mlp = MoE(config) if config.moe_layers[layer] else MLP(config)
        self.post_attn_norm = make_norm(config) if config.sandwich_norms else None
        self.post_mlp_norm = make_norm(config) if config.sandwich_norms else None
        self.residual_from_norm = config.residual_from_norm

    def forward(self, x, rotary, context, normed=None, next_norm=None):
        """``normed``: attn_norm(x) when the block before computed it with its last add (a norm's
        ``add_norm``, which a kernel module fuses); with ``next_norm`` (the next block's attn_norm,
        or the final norm) the block returns (its output, next_norm(its output)) the same way."""
        h = self.attn_norm(x) if normed is None else normed
        a = self.attn(h, rotary, context)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x, h = self.mlp_norm.add_norm(h if self.residual_from_norm else x, a)
        m = self.mlp(h)
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        x = h if self.residual_from_norm else x
        return x + m if next_norm is None else next_norm.add_norm(x, m)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.pos_embed = nn.Embedding(c.max_position_embeddings, c.hidden_size) if c.positions == "learned" else None
        self.embed_norm = make_norm(c) if c.embedding_norm else None
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_layers))
        self.final_norm = make_norm(c)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        # one rotary table per distinct RopeConfig (Gemma 3: a local and a global one)
        self.rotaries = nn.ModuleDict()
        if c.positions == "rope":
            for kind in sorted(set(c.layer_types)):
                rope = c.local_rope if kind == "sliding" and c.local_rope is not None else c.rope
                self.rotaries[kind] = Rotary(rope, c.head_dim, c.max_position_embeddings)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_layers)

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """input_ids [batch, seq] → logits [batch, seq, vocab] (float32).

        Without a cache this is a plain causal forward pass from position 0. With one (a KVCache,
        or any object with the seam of model/cache.py) the tokens continue the cached sequences
        and the cache is extended.
        """
        return self.logits(self.hidden_states(input_ids, cache))

    def hidden_states(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        c = self.config
        b, t = input_ids.shape
        context = cache if cache is not None else self.new_cache()  # no cache: a throwaway one
        q_pos = context.positions(t, input_ids.device)  # [t]
        if c.positions == "learned" and int(q_pos.max()) >= c.max_position_embeddings:
            raise ValueError(f"position {int(q_pos.max())} is past the {c.max_position_embeddings} learned positions")

        x = self.embed(input_ids)
        if c.embedding_scale is not None:  # Gemma: sqrt(hidden), rounded to the model dtype first
            x = x * torch.tensor(c.embedding_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(q_pos)[None]
        if self.embed_norm is not None:
            x = self.embed_norm(x)

        rotary = {kind: tuple(r[None].expand(b, -1, -1) for r in rot(q_pos, x.dtype))
                  for kind, rot in self.rotaries.items()}
        h = None  # each block's output comes with the next norm applied (add_norm: one kernel on CUDA)
        for i, layer in enumerate(self.layers):
            after = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.final_norm
            rot = rotary.get(c.layer_types[i]) if c.rope_layers[i] else None  # SmolLM3's NoPE layers: none
            x, h = layer(x, rot, context, h, after)
        context.advance(t)
        return self.final_norm(x) if h is None else h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # lm_head: None when tied to the embedding table (or a packed layer from rung.quant)
        logits = (nn.functional.linear(hidden, self.embed.weight) if self.lm_head is None else self.lm_head(hidden)).float()
        if self.config.final_logit_softcap:
            cap = self.config.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits


_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
          "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


def meta_decoder(config: ModelConfig) -> Decoder:
    """A Decoder whose parameters are shapes only (device "meta"), for a loader to fill. The
    modules' random initialisers are skipped (as transformers' no_init_weights does): on meta
    they run through torch's reference decompositions, which import torch._dynamo and with it
    Triton, ~70 MB resident in a CPU process for nothing."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return Decoder(config)
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
