"""ModelConfig: every family of the lineage described as data.

A family quirk is a named field here, read in exactly one place of the model code. ``from_hf``
turns a Hugging Face ``config.json`` (either the transformers v4 dialect with ``rope_theta`` /
``rope_scaling`` or the v5 one with ``rope_parameters``) into a ModelConfig; presets are such
``config.json`` dicts of real models, shipped in ``rung/presets``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("gpt2", "bloom", "llama", "qwen3", "qwen3_moe", "gpt_oss", "gemma3_text")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config.json that rung cannot describe; the message names the file and the field."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding and its long-context scaling (transformers' modeling_rope_utils)."""

    theta: float = 10_000.0
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    original_max_position: int | None = None  # yarn, llama3: the pre-extension context
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: 0.1 * ln(factor) + 1 (or from mscale)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True  # round the yarn correction range to whole dims (gpt-oss: False)
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class MoEConfig:
    """A sparse feed-forward: a router picks ``top_k`` of ``num_experts`` gated MLPs per token."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    # "softmax_topk": softmax over all experts, then top-k (Qwen3-MoE), optionally renormalised.
    # "topk_softmax": top-k of the raw logits, then softmax over the k chosen (gpt-oss).
    router: str = "softmax_topk"
    norm_topk_prob: bool = False
    router_bias: bool = False
    expert_bias: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """One decoder-only transformer. Field names say what they change in the maths."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (the MoE expert width lives in ``moe``)
    max_position_embeddings: int | None = None

    # norms
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-6
    norm_weight_offset: float = 0.0  # Gemma scales by (1 + w)
    norm_weight_in_float32: bool = False  # gpt-oss, Gemma: gain applied before the cast back
    embedding_norm: bool = False  # BLOOM: LayerNorm right after the word embeddings
    sandwich_norms: bool = False  # Gemma: extra norms on the attention / MLP outputs
    residual_from_norm: bool = False  # BLOOM apply_residual_connection_post_layernorm

    # embeddings and head
    embedding_scale: float | None = None  # Gemma: sqrt(hidden_size), applied in the model dtype
    tie_word_embeddings: bool = False
    final_logit_softcap: float | None = None

    # positions: "rope" | "learned" | "alibi"
    positions: str = "rope"
    rope: RopeConfig | None = field(default_factory=RopeConfig)
    local_rope: RopeConfig | None = None  # rotary table of the sliding layers, when it differs

    # attention
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_scale_by_inverse_layer: bool = False  # GPT-2 scale_attn_by_inverse_layer_idx
    attn_sinks: bool = False  # gpt-oss: a learned per-head logit joins each softmax
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer: "full" | "sliding"

    # feed-forward
    mlp: str = "gated"  # "gated" (down(act(gate) * up)) | "plain" (down(act(up)))
    activation: str = "silu"  # "silu" | "gelu" | "gelu_tanh" | "relu" | "swiglu_clamped"
    mlp_bias: bool = False
    swiglu_limit: float = 7.0  # gpt-oss clamped SwiGLU
    swiglu_alpha: float = 1.702
    moe: MoEConfig | None = None
    moe_layers: tuple[bool, ...] = ()  # per layer: sparse or dense

    # metadata
    dtype: str = "float32"  # dtype the checkpoint was saved in
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (self.moe is not None,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding layers need a sliding_window")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json (a folder, the file itself, or its parsed dict)."""
        source = "config dict"
        if isinstance(path_or_dict, dict):
            raw = path_or_dict
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "config.json"
            source = str(path)
            try:
                raw = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{path}: no config.json") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        if "text_config" in raw and raw.get("model_type") in ("gemma3",):
            raw = {**raw["text_config"], "model_type": "gemma3_text"}
        model_type = raw.get("model_type")
        parser = _PARSERS.get(model_type)
        if parser is None:
            raise ConfigError(
                f"{source}: unknown model_type {model_type!r}; rung supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            return parser(_Fields(raw, source))
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        return cls.from_hf(preset_dict(name))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- derived ------------------------------------------------------------------------------

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """Keys a query of this layer may see (itself included), or None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

    def layer_rope(self, layer: int) -> RopeConfig | None:
        if self.layer_types[layer] == "sliding" and self.local_rope is not None:
            return self.local_rope
        return self.rope


# ---- presets ----------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_dict(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name.lower()}.json"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    return json.loads(path.read_text())


# ---- parsing Hugging Face config.json ---------------------------------------------------------


class _Fields:
    """Typed access to a config dict; errors name the source file and the field."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def get(self, *names: str, default: Any = None) -> Any:
        for n in names:
            if self.raw.get(n) is not None:
                return self.raw[n]
        return default

    def int(self, *names: str, default: Any = ...) -> int:
        v = self.get(*names, default=default)
        if v is ...:
            raise ConfigError(f"{self.source}: missing field {names[0]!r}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{self.source}: field {names[0]!r} must be a non-negative integer, got {v!r}")
        return v

    def float(self, *names: str, default: Any = ...) -> float:
        v = self.get(*names, default=default)
        if v is ...:
            raise ConfigError(f"{self.source}: missing field {names[0]!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{self.source}: field {names[0]!r} must be a number, got {v!r}")
        return float(v)

    def error(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {msg}")


def _eos(f: _Fields):
    eos = f.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else eos


def _dtype(f: _Fields) -> str:
    return str(f.get("dtype", "torch_dtype", default="float32"))


def _rope(f: _Fields, params: dict[str, Any] | None, max_pos: int | None) -> RopeConfig:
    """One rotary table from a v5 ``rope_parameters`` dict or v4 ``rope_theta`` + ``rope_scaling``."""
    p = dict(params or {})
    theta = p.get("rope_theta", f.get("rope_theta", default=10_000.0))
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise f.error(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    original = p.get("original_max_position_embeddings", f.get("original_max_position_embeddings"))
    if kind in ("yarn", "llama3") and original is None:
        original = max_pos
    factor = p.get("factor")
    if kind == "yarn" and factor is None and max_pos and original:
        factor = max_pos / original
    if kind != "default" and factor is None:
        raise f.error(f"rope type {kind!r} needs a 'factor'")
    return RopeConfig(
        theta=float(theta),
        type=kind,
        factor=float(factor if factor is not None else 1.0),
        original_max_position=original,
        beta_fast=float(p.get("beta_fast") or 32.0),
        beta_slow=float(p.get("beta_slow") or 1.0),
        attention_factor=p.get("attention_factor"),
        mscale=p.get("mscale"),
        mscale_all_dim=p.get("mscale_all_dim"),
        truncate=bool(p.get("truncate", True)),
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
        partial_rotary_factor=float(p.get("partial_rotary_factor", f.get("partial_rotary_factor", default=1.0))),
    )


def _rope_params(f: _Fields) -> dict[str, Any] | None:
    return f.get("rope_parameters", "rope_scaling")


def _layer_types(f: _Fields, n: int, default: list[str]) -> tuple[str, ...]:
    names = f.get("layer_types", default=default)
    if len(names) != n:
        raise f.error(f"layer_types has {len(names)} entries for {n} layers")
    out = []
    for name in names:
        if name not in ("full_attention", "sliding_attention"):
            raise f.error(f"layer_types entry {name!r} is not supported")
        out.append("sliding" if name == "sliding_attention" else "full")
    return tuple(out)


def _activation(f: _Fields, name: str) -> str:
    table = {
        "silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu",
        "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    }
    if name not in table:
        raise f.error(f"activation {name!r} is not supported")
    return table[name]


def _gpt2(f: _Fields) -> ModelConfig:
    hidden = f.int("n_embd", "hidden_size")
    heads = f.int("n_head", "num_attention_heads")
    return ModelConfig(
        model_type="gpt2",
        vocab_size=f.int("vocab_size"),
        hidden_size=hidden,
        num_layers=f.int("n_layer", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=f.int("n_inner", default=4 * hidden),
        max_position_embeddings=f.int("n_positions", "max_position_embeddings", default=1024),
        norm="layernorm",
        norm_eps=f.float("layer_norm_epsilon", default=1e-5),
        tie_word_embeddings=bool(f.get("tie_word_embeddings", default=True)),
        positions="learned",
        rope=None,
        qkv_bias=True,
        o_bias=True,
        attn_scale=None if f.get("scale_attn_weights", default=True) else 1.0,
        attn_scale_by_inverse_layer=bool(f.get("scale_attn_by_inverse_layer_idx", default=False)),
        mlp="plain",
        activation=_activation(f, f.get("activation_function", default="gelu_new")),
        mlp_bias=True,
        dtype=_dtype(f),
        bos_token_id=f.get("bos_token_id"),
        eos_token_id=_eos(f),
    )


def _bloom(f: _Fields) -> ModelConfig:
    hidden = f.int("hidden_size", "n_embed")
    heads = f.int("n_head", "num_attention_heads")
    if f.get("pretraining_tp", default=1) > 1 and f.get("slow_but_exact"):
        raise f.error("slow_but_exact with pretraining_tp > 1 is not supported")
    return ModelConfig(
        model_type="bloom",
        vocab_size=f.int("vocab_size"),
        hidden_size=hidden,
        num_layers=f.int("n_layer", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=f.int("seq_length", default=2048),
        norm="layernorm",
        norm_eps=f.float("layer_norm_epsilon", default=1e-5),
        embedding_norm=True,
        residual_from_norm=bool(f.get("apply_residual_connection_post_layernorm", default=False)),
        tie_word_embeddings=bool(f.get("tie_word_embeddings", default=True)),
        positions="alibi",
        rope=None,
        qkv_bias=True,
        o_bias=True,
        mlp="plain",
        activation="gelu_tanh",
        mlp_bias=True,
        dtype=_dtype(f),
        bos_token_id=f.get("bos_token_id"),
        eos_token_id=_eos(f),
    )


def _llama_like(f: _Fields, model_type: str, **extra) -> ModelConfig:
    heads = f.int("num_attention_heads")
    hidden = f.int("hidden_size")
    max_pos = f.int("max_position_embeddings", default=2048)
    bias = bool(f.get("attention_bias", default=False))
    fields = dict(
        model_type=model_type,
        vocab_size=f.int("vocab_size"),
        hidden_size=hidden,
        num_layers=f.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=f.int("num_key_value_heads", default=heads),
        head_dim=f.int("head_dim", default=hidden // heads),
        intermediate_size=f.int("intermediate_size"),
        max_position_embeddings=max_pos,
        norm="rmsnorm",
        norm_eps=f.float("rms_norm_eps", default=1e-6),
        tie_word_embeddings=bool(f.get("tie_word_embeddings", default=False)),
        positions="rope",
        rope=_rope(f, _rope_params(f), max_pos),
        qkv_bias=bias,
        o_bias=bias,
        mlp="gated",
        activation=_activation(f, f.get("hidden_act", "hidden_activation", default="silu")),
        mlp_bias=bool(f.get("mlp_bias", default=False)),
        dtype=_dtype(f),
        bos_token_id=f.get("bos_token_id"),
        eos_token_id=_eos(f),
    )
    fields.update(extra)
    return ModelConfig(**fields)


def _llama(f: _Fields) -> ModelConfig:
    return _llama_like(f, "llama")


def _qwen3_window(f: _Fields) -> int | None:
    return f.int("sliding_window", default=4096) if f.get("use_sliding_window", default=False) else None


def _qwen3(f: _Fields) -> ModelConfig:
    n = f.int("num_hidden_layers")
    window = _qwen3_window(f)
    first_sliding = f.int("max_window_layers", default=28)
    default = ["sliding_attention" if window and i >= first_sliding else "full_attention" for i in range(n)]
    types = _layer_types(f, n, default)
    return _llama_like(f, "qwen3", qk_norm=True, layer_types=types,
                       sliding_window=window if "sliding" in types else None)


def _qwen3_moe(f: _Fields) -> ModelConfig:
    n = f.int("num_hidden_layers")
    window = _qwen3_window(f)  # Qwen3-MoE applies the window to every layer when it is on
    experts = f.int("num_experts", "num_local_experts")
    dense = set(f.get("mlp_only_layers", default=[]))
    step = f.int("decoder_sparse_step", default=1)
    sparse = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n))
    moe = MoEConfig(
        num_experts=experts,
        top_k=f.int("num_experts_per_tok"),
        expert_intermediate_size=f.int("moe_intermediate_size"),
        router="softmax_topk",
        norm_topk_prob=bool(f.get("norm_topk_prob", default=False)),
    )
    return _llama_like(f, "qwen3_moe", qk_norm=True, moe=moe if any(sparse) else None, moe_layers=sparse,
                       layer_types=(("sliding" if window else "full"),) * n, sliding_window=window)


def _gpt_oss(f: _Fields) -> ModelConfig:
    n = f.int("num_hidden_layers")
    default = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    moe = MoEConfig(
        num_experts=f.int("num_local_experts", "num_experts"),
        top_k=f.int("num_experts_per_tok", "experts_per_token"),
        expert_intermediate_size=f.int("intermediate_size"),
        router="topk_softmax",
        router_bias=True,
        expert_bias=True,
    )
    return _llama_like(
        f, "gpt_oss",
        norm_eps=f.float("rms_norm_eps", default=1e-5),
        norm_weight_in_float32=True,
        qkv_bias=True, o_bias=True, attn_sinks=True,
        layer_types=_layer_types(f, n, default),
        sliding_window=f.int("sliding_window", default=128),
        activation="swiglu_clamped",
        swiglu_limit=f.float("swiglu_limit", default=7.0),
        swiglu_alpha=f.float("swiglu_alpha", default=1.702),
        moe=moe, moe_layers=(True,) * n,
    )


def _gemma3(f: _Fields) -> ModelConfig:
    n = f.int("num_hidden_layers")
    hidden = f.int("hidden_size")
    max_pos = f.int("max_position_embeddings", default=131_072)
    pattern = f.int("sliding_window_pattern", default=6)
    default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    params = f.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # v5: one table per layer type
        global_rope = _rope(f, params["full_attention"], max_pos)
        local_rope = _rope(f, params.get("sliding_attention") or {"rope_theta": 10_000.0}, max_pos)
    else:  # v4: rope_theta + rope_scaling for global layers, rope_local_base_freq for local ones
        global_rope = _rope(f, f.get("rope_scaling"), max_pos)
        local_rope = RopeConfig(theta=f.float("rope_local_base_freq", default=10_000.0))
    return _llama_like(
        f, "gemma3_text",
        norm_weight_offset=1.0,
        norm_weight_in_float32=True,
        sandwich_norms=True,
        embedding_scale=hidden**0.5,
        tie_word_embeddings=bool(f.get("tie_word_embeddings", default=True)),
        final_logit_softcap=f.get("final_logit_softcapping"),
        rope=global_rope,
        local_rope=local_rope,
        qk_norm=True,
        attn_scale=f.float("query_pre_attn_scalar", default=256) ** -0.5,
        layer_types=_layer_types(f, n, default),
        sliding_window=f.int("sliding_window", default=4096),
        activation=_activation(f, f.get("hidden_activation", "hidden_act", default="gelu_pytorch_tanh")),
    )


_PARSERS = {
    "gpt2": _gpt2,
    "bloom": _bloom,
    "llama": _llama,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "gpt_oss": _gpt_oss,
    "gemma3_text": _gemma3,
}
