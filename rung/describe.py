"""What a ModelConfig costs: parameters, active parameters, KV cache bytes, weight bytes per format.

Everything is arithmetic on the config (no torch), so ``rung arch`` starts fast. One inventory of
weight tensors (``weights``) feeds every figure: the total, the active count, and the bytes of each
storage format differ only in which tensors they count and at what width.

Conventions
-----------
Active parameters are every weight one token's forward pass reads, except the input embedding table
and the learned position table (a token reads one row of each). A tied LM head is counted whole: the
same matrix is read in full as the head. MoE layers count the router and ``top_k`` experts. This is
the gpt-oss model card's convention (3.61 B for gpt-oss-20b); Qwen's published "A3B" / "A22B"
figures also count the input table.

KV cache: K and V of ``num_kv_heads * head_dim`` values per layer per token; a sliding layer keeps at
most ``window`` tokens. Multi-head latent attention (DeepSeek) caches its latent and RoPE key part
instead, ``kv_lora_rank + qk_rope_head_dim`` values per layer per token, what rung's paged pool
holds. Default 2 bytes per value (bf16).

Weight formats (``FORMATS``), with their scope. int8 and int4 are what loading ``MODEL@int8`` /
``MODEL@int4`` holds (rung/quant/rewrite.py's ``pack_model``), the tensors it leaves unpacked at
bf16 (``load_model(spec, dtype="bfloat16")``); tests/test_describe.py measures it on tiny models.
  bf16   every parameter at 2 bytes.
  int8   per output channel: the matrices of the dense Linear layers (attention q/k/v/o, a dense
         MLP, the LM head, or the embedding table it is tied to) at 1 byte plus one fp16 scale per
         output row, their biases fp32. MoE experts are packed the same way (rung/quant/experts.py)
         unless they carry biases or gpt-oss's clamped SwiGLU; routers, DeepSeek's shared experts,
         an untied embedding table, norms and sinks stay bf16. A matrix whose input width is not a
         multiple of 32 is not packed.
  int4   the same matrices at 4 bits with an fp16 scale and offset per group of 32 inputs (5 bits
         per weight), except the LM head (or tied table), which stays int8; the rest as int8.
  mxfp4  as gpt-oss ships: the feed-forward weight matrices (MoE experts; the dense MLP for dense
         models) as 4-bit E2M1 with one 8-bit E8M0 scale per block of 32 inputs (4.25 bits per
         weight); attention, router, embeddings, LM head, norms and biases stay bf16.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rung.config import ConfigError, ModelConfig, preset_names

ACTIVE_CONVENTION = (
    "active = weights one token's forward pass reads: attention, norms, the router and top-k experts "
    "of MoE layers, and the LM head (whole, even when tied to the embeddings); the input embedding "
    "table and learned position table are left out, since a token reads one row of each "
    "(gpt-oss model-card convention; Qwen's published A3B/A22B figures also count the input table)"
)

FORMATS = ("bf16", "int8", "int4", "mxfp4")
FORMAT_SCOPE = {
    "bf16": "every parameter at 2 bytes",
    "int8": "as @int8 loads: dense Linear matrices (attention, dense MLP, LM head or tied table) at 1 byte "
            "+ an fp16 scale per row, MoE experts too (not gpt-oss's); routers, embeddings, norms bf16",
    "int4": "as @int4 loads: the same matrices at 4 bits + fp16 scale and offset per 32 inputs (5 bits), "
            "LM head int8; MoE experts too (not gpt-oss's); routers, embeddings, norms bf16",
    "mxfp4": "feed-forward matrices (MoE experts, or the dense MLP) at 4 bits + an 8-bit scale per "
             "32 inputs (4.25 bits/weight), as gpt-oss ships; rest bf16",
}
GROUP = 32  # inputs per scale block of int4 and mxfp4; int8 and int4 pack a matrix only if 32 divides its rows
BF16 = FP16 = 2
FP32 = 4

CONTEXT_4K = 4096
CONTEXT_128K = 131_072


@dataclass(frozen=True)
class Weight:
    """One weight tensor kind of the model, ``count`` times over (e.g. 24 layers × 32 experts' down_proj)."""

    name: str  # "dense_layers.mlp.down", for reading the inventory
    part: str  # "embeddings" | "attention" | "feed_forward" | "norms" | "head"
    shape: tuple[int, ...]  # (out, in) for matrices, (n,) for vectors and per-head values
    count: int = 1
    active: int = 1  # how many of the ``count`` copies one token reads in full
    bias: bool = False  # a matrix with a bias vector of ``out`` values beside it
    packs: bool = False  # a dense Linear matrix that @int8 / @int4 pack (pack_model)
    head: bool = False  # the LM head, or the embedding table tied to it: @int4 packs it int8
    ffn: bool = False  # a feed-forward weight matrix: quantised by mxfp4

    @property
    def size(self) -> int:
        return math.prod(self.shape) + (self.shape[0] if self.bias else 0)


def weights(config: ModelConfig) -> list[Weight]:
    """Every weight tensor of ``config``. A layer's tensors are listed once per kind of layer (dense,
    sparse), ``count`` times over: the inventory's length does not grow with the layer count."""
    c = config
    H, V = c.hidden_size, c.vocab_size

    def norm(name: str, part: str = "norms") -> list[Weight]:
        out = [Weight(f"{name}.weight", part, (H,))]
        # LayerNorm (GPT-2, BLOOM) carries a bias beside its weight; RMSNorm does not.
        return out + [Weight(f"{name}.bias", part, (H,))] if c.norm == "layernorm" else out

    # The input table is read one row per token; tied, it is also the head and read whole.
    tied = c.tie_word_embeddings
    out = [Weight("embed_tokens", "embeddings", (V, H), active=int(tied), packs=tied, head=tied)]
    if c.positions == "learned":
        out.append(Weight("embed_positions", "embeddings", (c.max_position_embeddings or 0, H), active=0))
    if c.embedding_norm:  # BLOOM word_embeddings_layernorm
        out += norm("embed_norm", "embeddings")

    sparse = sum(c.moe_layers)
    for p, n, mlp in (("dense_layers", c.num_layers - sparse, _mlp), ("sparse_layers", sparse, _moe)):
        if n == 0:
            continue
        layer = (norm(f"{p}.input_norm") if c.pre_norms else []) + _attention(c, f"{p}.attn")
        if c.sandwich_norms and not c.pre_norms:  # OLMo 2: post-attention and post-feed-forward only
            layer += norm(f"{p}.post_attn_norm") + norm(f"{p}.post_ffn_norm")
        elif c.sandwich_norms:  # Gemma: post-attention, pre- and post-feed-forward
            layer += norm(f"{p}.post_attn_norm") + norm(f"{p}.pre_ffn_norm") + norm(f"{p}.post_ffn_norm")
        else:
            layer += norm(f"{p}.post_attn_norm")  # the pre-MLP norm (GPT-2 ln_2)
        layer += mlp(c, f"{p}.mlp")
        out += [dataclasses.replace(w, count=w.count * n, active=w.active * n) for w in layer]

    out += norm("final_norm")
    if not tied:
        out += _linear("lm_head", "head", V, H, bias=False, head=True)
    return out


def _linear(name: str, part: str, out_f: int, in_f: int, bias: bool, count: int = 1, active: int = 1,
            packs: bool = True, head: bool = False, ffn: bool = False) -> list[Weight]:
    return [Weight(name, part, (out_f, in_f), count, active, bias, packs, head, ffn)]


def _latent_attention(c: ModelConfig, p: str) -> list[Weight]:
    """DeepSeek's MLA (model/mla.py): q (directly or through its low-rank bottleneck), kv_a to the
    latent and RoPE key, kv_b from the latent to every head's nope key and value, o."""
    m, H, h = c.mla, c.hidden_size, c.num_heads
    if m.q_lora_rank is None:
        q = _linear(f"{p}.q", "attention", h * m.qk_head_dim, H, False)
    else:
        q = (_linear(f"{p}.q_a", "attention", m.q_lora_rank, H, c.qkv_bias)
             + [Weight(f"{p}.q_a_norm", "attention", (m.q_lora_rank,))]
             + _linear(f"{p}.q_b", "attention", h * m.qk_head_dim, m.q_lora_rank, False))
    return (q + _linear(f"{p}.kv_a", "attention", m.cache_width, H, c.qkv_bias)
            + [Weight(f"{p}.kv_a_norm", "attention", (m.kv_lora_rank,))]
            # kv_b stays unpacked under @int8 / @int4: the absorbed decode reads its two halves
            + _linear(f"{p}.kv_b", "attention", h * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank, False,
                      packs=False)
            + _linear(f"{p}.o", "attention", H, h * m.v_head_dim, c.o_bias))


def _attention(c: ModelConfig, p: str) -> list[Weight]:
    if c.mla is not None:
        return _latent_attention(c, p)
    H = c.hidden_size
    out = (
        _linear(f"{p}.q", "attention", c.q_width, H, c.qkv_bias)
        + _linear(f"{p}.k", "attention", c.kv_width, H, c.qkv_bias)
        + _linear(f"{p}.v", "attention", c.kv_width, H, c.qkv_bias)
        + _linear(f"{p}.o", "attention", H, c.q_width, c.o_bias)
    )
    if c.qk_norm_whole:  # OLMo 2: one RMSNorm over the whole q (and k) projection
        out += [Weight(f"{p}.q_norm", "attention", (c.q_width,)), Weight(f"{p}.k_norm", "attention", (c.kv_width,))]
    elif c.qk_norm:  # one RMSNorm over head_dim each for q and k, shared by all heads
        out += [Weight(f"{p}.q_norm", "attention", (c.head_dim,)), Weight(f"{p}.k_norm", "attention", (c.head_dim,))]
    if c.attn_sinks:  # gpt-oss: one learned logit per query head
        out.append(Weight(f"{p}.sinks", "attention", (c.num_heads,)))
    return out


def _mlp(c: ModelConfig, p: str) -> list[Weight]:
    H, I, bias = c.hidden_size, c.intermediate_size, c.mlp_bias
    gate = _linear(f"{p}.gate", "feed_forward", I, H, bias, ffn=True) if c.mlp == "gated" else []
    return (
        gate
        + _linear(f"{p}.up", "feed_forward", I, H, bias, ffn=True)
        + _linear(f"{p}.down", "feed_forward", H, I, bias, ffn=True)
    )


def _moe(c: ModelConfig, p: str) -> list[Weight]:
    """Router plus E gated experts, of which one token reads top_k. @int8 / @int4 pack the experts
    where rung/quant/experts.py's ``can_pack`` does (no biases, not gpt-oss's clamped SwiGLU,
    whole blocks of 8 gate rows, widths that 32 divides)."""
    m, H = c.moe, c.hidden_size
    I, E, k, bias = m.expert_intermediate_size, m.num_experts, m.top_k, m.expert_bias
    packs = not bias and c.activation != "swiglu_clamped" and I % 8 == 0 and H % GROUP == 0 and I % GROUP == 0
    out = (
        _linear(f"{p}.router", "feed_forward", E, H, m.router_bias, packs=False)
        + _linear(f"{p}.experts.gate", "feed_forward", I, H, bias, E, k, packs=packs, ffn=True)
        + _linear(f"{p}.experts.up", "feed_forward", I, H, bias, E, k, packs=packs, ffn=True)
        + _linear(f"{p}.experts.down", "feed_forward", H, I, bias, E, k, packs=packs, ffn=True)
    )
    # DeepSeek-V3's e_score_correction_bias (E values) is a buffer in transformers, not counted
    if m.shared_experts:  # DeepSeek: one always-on gated MLP, shared_experts expert widths wide
        S = m.shared_experts * I
        out += [Weight(f"{p}.shared.{n}", "feed_forward", shape, packs=False, ffn=True)
                for n, shape in (("gate", (S, H)), ("up", (S, H)), ("down", (H, S)))]
    return out


# ---- reductions of the inventory ---------------------------------------------------------------


def total_params(config: ModelConfig) -> int:
    return sum(w.size * w.count for w in weights(config))


def active_params(config: ModelConfig) -> int:
    """Parameters one token reads; see ``ACTIVE_CONVENTION``."""
    return sum(w.size * w.active for w in weights(config))


def params_by_part(config: ModelConfig) -> dict[str, int]:
    return _by_part(weights(config))


def _by_part(inventory: list[Weight]) -> dict[str, int]:
    parts = {"embeddings": 0, "attention": 0, "feed_forward": 0, "norms": 0, "head": 0}
    for w in inventory:
        parts[w.part] += w.size * w.count
    return parts


def _stored_bytes(w: Weight, fmt: str) -> int:
    """Bytes of one copy of ``w`` stored in ``fmt`` (scope per the module docstring)."""
    if fmt in ("int8", "int4") and w.packs and w.shape[1] % GROUP == 0:
        # pack_model (rung/quant/rewrite.py): q8 per output row; q4 in groups of 32; the head q8 (default_head_format)
        out_f, in_f = w.shape
        if fmt == "int8" or w.head:
            matrix = out_f * in_f + out_f * FP16  # int8 values + an fp16 scale per row
        else:
            matrix = out_f * (in_f // 2 + in_f // GROUP * 2 * FP16)  # nibbles + fp16 scale and offset per group
        return matrix + (out_f * FP32 if w.bias else 0)  # PackedLinear keeps its bias in float32
    if fmt == "mxfp4" and w.ffn:
        out_f, in_f = w.shape
        blocks = math.ceil(in_f / GROUP)
        bias = out_f * BF16 if w.bias else 0
        return out_f * blocks * (GROUP // 2 + 1) + bias  # 16 bytes of nibbles + 1 byte E8M0 scale
    return w.size * BF16


def weight_bytes(config: ModelConfig, fmt: str = "bf16") -> int:
    if fmt not in FORMATS:
        raise ValueError(f"weight format {fmt!r} is not one of {', '.join(FORMATS)}")
    return sum(_stored_bytes(w, fmt) * w.count for w in weights(config))


def kv_cache_bytes(config: ModelConfig, context: int, bytes_per_value: int = BF16) -> int:
    """K and V of every layer at ``context`` tokens; a sliding layer holds at most its window."""
    per_token = config.kv_cache_width * bytes_per_value  # K and V, or MLA's latent and RoPE key
    sliding = config.layer_types.count("sliding")
    full = config.num_layers - sliding
    return per_token * (full * context + sliding * min(context, config.sliding_window or context))


# ---- the architecture in words -----------------------------------------------------------------


def _norm_kind(c: ModelConfig) -> str:
    kind = "LayerNorm" if c.norm == "layernorm" else "RMSNorm"
    if c.norm_weight_offset:
        kind += " (1+w)"
    if c.sandwich_norms:
        kind += ", pre+post" if c.pre_norms else ", post only"
    if c.embedding_norm:
        kind += ", + embedding norm"
    return kind


def _si(x: float) -> str:
    """150000 -> "150K", 1e6 -> "1M": rope thetas are round numbers."""
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if x >= scale and x % scale == 0:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


def _position_kind(c: ModelConfig) -> str:
    if c.positions == "learned":
        return "learned"
    if c.positions == "alibi":
        return "ALiBi"
    r = c.rope
    kind = f"RoPE θ={_si(r.theta)}"
    if r.type != "default":
        kind += f", {r.type} ×{r.factor:g}"
    if c.local_rope is not None and "sliding" in c.layer_types and c.local_rope != r:
        kind += f"; local θ={_si(c.local_rope.theta)}"
    if not all(c.rope_layers):  # SmolLM3
        kind += f"; NoPE on {c.rope_layers.count(False)}/{c.num_layers} layers"
    return kind


def _attention_kind(c: ModelConfig) -> str:
    if c.mla is not None:  # e.g. "MLA 128×(128+64), latent 512+64": heads × (nope + rope), what is cached
        m = c.mla
        return f"MLA {c.num_heads}×({m.qk_nope_head_dim}+{m.qk_rope_head_dim}), latent {m.kv_lora_rank}+{m.qk_rope_head_dim}"
    if c.num_kv_heads == c.num_heads:
        kind = "MHA"
    elif c.num_kv_heads == 1:
        kind = "MQA"
    else:
        kind = "GQA"
    kind = f"{kind} {c.num_heads}/{c.num_kv_heads}×{c.head_dim}"
    if c.attn_logit_softcap:  # Gemma 2
        kind += f", scores capped at {c.attn_logit_softcap:g}"
    return kind


def _sliding_kind(c: ModelConfig) -> str | None:
    """E.g. "128 on 12/24 layers (1 of every 2)" for gpt-oss, "(5 of every 6)" for Gemma 3."""
    types, n = c.layer_types, c.num_layers
    sliding = types.count("sliding")
    if not sliding:
        return None
    if sliding == n:
        return f"{c.sliding_window} on all {n} layers"
    # the shortest period (up to 64 layers) that repeats the pattern: gpt-oss 2 (S F), Gemma 3 6 (S S S S S F);
    # each try is one tuple comparison, so a million layers cost milliseconds
    period = next((p for p in range(1, min(n - 1, 64) + 1) if types[p:] == types[:n - p]), n)
    first, last = types.index("sliding"), n - 1 - types[::-1].index("sliding")
    if period < n:
        pattern = f"{types[:period].count('sliding')} of every {period}"
    elif last - first + 1 == sliding:  # Qwen3 max_window_layers
        pattern = f"layers {first}-{last}"
    else:
        shown = [i for i, t in zip(range(n), types) if t == "sliding"][:16]
        pattern = "layers " + ",".join(map(str, shown)) + (",…" if sliding > len(shown) else "")
    return f"{c.sliding_window} on {sliding}/{n} layers ({pattern})"


def _ffn_kind(c: ModelConfig) -> str:
    if c.activation == "swiglu_clamped":
        return "clamped SwiGLU"
    act = {"silu": "Swi", "gelu": "Ge", "gelu_tanh": "Ge", "relu": "Re"}[c.activation]
    if c.mlp == "gated":
        return f"{act}GLU"
    return {"Swi": "SiLU", "Ge": "GELU", "Re": "ReLU"}[act] + " MLP"


# ---- the description ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Description(Mapping):
    """The figures ``rung arch`` prints for one model. Byte counts are exact integers.

    Read as attributes (``d.total_params``) or as a mapping (``d["total_params"]``, ``dict(d)``): the
    keys are those of ``to_dict``. ``kv_cache_bytes_per_token`` is ``kv_bytes_per_token`` by the name
    the decoder issue gave it."""

    name: str
    config: ModelConfig = field(repr=False)
    context: int
    # parameters
    total_params: int
    active_params: int
    embedding_params: int  # input table + learned positions: not active (one row read per token)
    params_by_part: dict[str, int]
    # KV cache (bf16)
    kv_bytes: int  # at ``context`` tokens
    kv_bytes_per_token: float  # kv_bytes / context
    kv_bytes_per_token_4k: float
    kv_bytes_per_token_128k: float
    # weights
    weight_bytes: dict[str, int]  # format -> bytes, see FORMATS / FORMAT_SCOPE
    # lineage
    family: str
    norm: str
    positions: str
    attention: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: str | None
    sinks: bool
    qk_norm: bool
    ffn: str
    num_experts: int | None
    active_experts: int | None
    max_context: int | None
    tied_embeddings: bool
    active_convention: str = ACTIVE_CONVENTION

    @property
    def kv_cache_bytes_per_token(self) -> float:
        return self.kv_bytes_per_token

    def to_dict(self) -> dict[str, Any]:
        """The figures as plain JSON types (the config itself is left out)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        d["params_by_part"], d["weight_bytes"] = dict(self.params_by_part), dict(self.weight_bytes)
        d["kv_cache_bytes_per_token"] = self.kv_bytes_per_token
        return d

    # the Mapping view: every figure by name
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def resolve(name_or_path: str | Path) -> tuple[str, ModelConfig]:
    """A preset name or a path to a Hugging Face folder / config.json, as (label, config).

    A preset name wins over a same-named folder in the working directory; write ``./gpt2`` for the folder.
    """
    text = str(name_or_path)
    if text.lower() in preset_names():
        return text.lower(), ModelConfig.from_preset(text)
    path = Path(text)
    if path.exists():
        return text, ModelConfig.from_hf(path)
    if path.suffix == ".json" or "/" in text or "\\" in text:
        raise ConfigError(f"{text}: no such file or folder")
    raise ConfigError(f"unknown preset {text!r} (and no such path); presets: {', '.join(preset_names())}")


def describe(config_or_name: ModelConfig | str | Path, context: int = CONTEXT_4K) -> Description:
    """Parameters, active parameters, KV cache and weight bytes of a config, preset or config path."""
    if isinstance(config_or_name, ModelConfig):
        name, c = config_or_name.model_type, config_or_name
    else:
        name, c = resolve(config_or_name)
    if context < 1:
        raise ConfigError(f"context must be at least 1 token, got {context}")
    inventory = weights(c)
    kv = kv_cache_bytes(c, context)
    return Description(
        name=name,
        config=c,
        context=context,
        total_params=sum(w.size * w.count for w in inventory),
        active_params=sum(w.size * w.active for w in inventory),
        embedding_params=sum(w.size for w in inventory if w.name in ("embed_tokens", "embed_positions")),
        params_by_part=_by_part(inventory),
        kv_bytes=kv,
        kv_bytes_per_token=kv / context,
        kv_bytes_per_token_4k=kv_cache_bytes(c, CONTEXT_4K) / CONTEXT_4K,
        kv_bytes_per_token_128k=kv_cache_bytes(c, CONTEXT_128K) / CONTEXT_128K,
        weight_bytes={fmt: sum(_stored_bytes(w, fmt) * w.count for w in inventory) for fmt in FORMATS},
        family=c.model_type,
        norm=_norm_kind(c),
        positions=_position_kind(c),
        attention=_attention_kind(c),
        num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        sliding_window=_sliding_kind(c),
        sinks=c.attn_sinks,
        qk_norm=c.qk_norm,
        ffn=_ffn_kind(c),
        num_experts=c.moe.num_experts if c.moe else None,
        active_experts=c.moe.top_k if c.moe else None,
        max_context=c.max_position_embeddings,
        tied_embeddings=c.tie_word_embeddings,
    )


class _CallableModule(types.ModuleType):
    """``rung.describe`` is this module's name and its function's: importing the module (``rung arch``
    does) binds the package attribute ``rung.describe`` to the module, so the module answers a call
    as the function does and ``rung.describe("gpt2")`` works however often it is called."""

    def __call__(self, config_or_name: ModelConfig | str | Path, context: int = CONTEXT_4K) -> Description:
        return describe(config_or_name, context)


sys.modules[__name__].__class__ = _CallableModule


__all__ = [
    "ACTIVE_CONVENTION", "FORMATS", "FORMAT_SCOPE", "Description", "Weight", "active_params", "describe",
    "kv_cache_bytes", "params_by_part", "resolve", "total_params", "weight_bytes", "weights",
]
