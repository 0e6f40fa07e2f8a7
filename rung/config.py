"""ModelConfig: every family of the lineage described as data.

A family quirk is a named field here, read in exactly one place of the model code. ``from_hf``
turns a Hugging Face ``config.json`` (either the transformers v4 dialect with ``rope_theta`` /
``rope_scaling`` or the v5 one with ``rope_parameters``) into a ModelConfig; presets are such
``config.json`` dicts of real models, shipped in ``rung/presets``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("gpt2", "bloom", "llama", "qwen3", "qwen3_moe", "gpt_oss", "gemma3_text",
                         "deepseek_v2", "deepseek_v3",
                         # issue 21 (families): the lineage, wider
                         "qwen2", "mistral", "mixtral", "phi3", "gemma2", "olmo2", "smollm3")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
PRESET_DIR = Path(__file__).parent / "presets"
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned", "alibi")
MLPS = ("gated", "plain")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_clamped")
ROUTERS = ("softmax_topk", "topk_softmax", "softmax_group_topk", "sigmoid_group_topk")

# Bounds on what a config may ask for, far past any real model: widths, counts and token ids up to
# 2^40 keep every product rung.describe forms exact and inside a float; the layer count sizes
# per-layer tuples here (a few MB at the bound; no real model has a thousand layers). Within them
# every figure of rung.describe is integer arithmetic: `rung arch` answers a config asking for a
# terabyte at once, and the loaders check the tensors before they allocate.
MAX_SIZE = 2**40
MAX_LAYERS = 1_000_000
MAX_CONFIG_BYTES = 64 << 20
MAX_FACTORS = 1 << 16  # LongRoPE factors: one per rotary frequency  # a config.json past this is no config (a real one is a few KB)


class ConfigError(ValueError):
    """A config.json that rung cannot describe; the message names the file and the field."""


# What the checks below call a field, with its config.json name where that differs, so the message
# names the field whichever of the two a reader knows (a GGUF or a packed checkpoint builds the
# dataclass directly).
_HF_NAMES = {
    "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "norm_eps": "rms_norm_eps", "top_k": "num_experts_per_tok", "expert_intermediate_size": "moe_intermediate_size",
    "theta": "rope_theta", "type": "rope_type", "original_max_position": "original_max_position_embeddings",
    "final_logit_softcap": "final_logit_softcapping", "factor": "rope_scaling.factor",
}


def _label(name: str) -> str:
    hf = _HF_NAMES.get(name)
    return f"{name} ({hf})" if hf else name


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_int(name: str, value: Any, low: int = 1, high: int = MAX_SIZE, optional: bool = False) -> None:
    problem = _int_problem(value, low, high)
    if problem and not (value is None and optional):
        raise ConfigError(f"{_label(name)} {problem}")


def _int_problem(value: Any, low: int, high: int) -> str | None:
    """What is wrong with ``value`` as a whole number in [low, high], or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be a whole number, got {_show(value)}"
    if value < low:
        return f"must be at least {low}, got {_show(value)}"
    if value > high:
        return f"must be at most {high:,}, got {_show(value)}"
    return None


def _check_float(name: str, value: Any, positive: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise ConfigError(f"{_label(name)} must be a finite number, got {_show(value)}")
    if positive and value <= 0:
        raise ConfigError(f"{_label(name)} must be positive, got {_show(value)}")


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int past float's range
        return False


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{_label(name)} must be one of {', '.join(choices)}, got {_show(value)}")


def _check_flags(obj: Any, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(obj, name), bool):
            raise ConfigError(f"{_label(name)} must be true or false, got {_show(getattr(obj, name))}")


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
    # longrope (Phi-3): per-frequency divisors, the short set up to original_max_position, the long
    # set past it (chosen per call by its longest position, as transformers does)
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    def __post_init__(self):
        _check_choice("rope type", self.type, ROPE_TYPES)
        _check_float("theta", self.theta)
        if self.theta <= 1:  # base ** (-i / d) must fall with i; yarn divides by log(theta)
            raise ConfigError(f"{_label('theta')} must be greater than 1, got {_show(self.theta)}")
        for name in ("factor", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
            _check_float(name, getattr(self, name), positive=True)
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            _check_float(name, getattr(self, name), optional=True)
        _check_int("original_max_position", self.original_max_position, optional=True)
        _check_flags(self, "truncate")
        _check_float("partial_rotary_factor", self.partial_rotary_factor, positive=True)
        if self.partial_rotary_factor > 1:
            raise ConfigError(f"partial_rotary_factor must be at most 1, got {_show(self.partial_rotary_factor)}")
        for name in ("short_factor", "long_factor"):
            if isinstance(getattr(self, name), list):  # a config written back as JSON (rung quantize)
                object.__setattr__(self, name, tuple(getattr(self, name)))
            factors = getattr(self, name)
            if not isinstance(factors, tuple) or not all(
                    not isinstance(x, bool) and isinstance(x, (int, float)) and _finite(x) and x > 0 for x in factors):
                raise ConfigError(f"rope {name} must be a list of positive numbers")
        if self.type == "longrope" and not (self.short_factor and self.long_factor):
            raise ConfigError("rope type 'longrope' needs rope_scaling.short_factor and rope_scaling.long_factor")
        if self.type in ("yarn", "llama3", "longrope") and self.original_max_position is None:
            raise ConfigError(f"rope type {self.type!r} needs {_label('original_max_position')}")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"rope high_freq_factor {self.high_freq_factor} must exceed low_freq_factor "
                              f"{self.low_freq_factor}")


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
    # ---- DeepSeek (V2, V3) ----
    # "softmax_group_topk": DeepSeek-V2's group_limited_greedy: softmax, keep the ``topk_groups``
    #   groups whose best expert scores highest, top-k within them (V2's greedy is softmax_topk).
    # "sigmoid_group_topk": DeepSeek-V3's noaux_tc: sigmoid scores; the choice (not the weights)
    #   adds ``e_score_correction_bias``; groups ranked by the sum of their two best experts.
    num_groups: int = 1  # n_group: the experts split into this many equal groups
    topk_groups: int = 1  # topk_group: groups a token may draw its experts from
    routed_scaling_factor: float = 1.0  # the routed experts' weights are multiplied by this
    score_correction_bias: bool = False  # V3's e_score_correction_bias, one per expert
    shared_experts: int = 0  # n_shared_experts: always-on experts, one MLP of this many widths

    def __post_init__(self):
        _check_int("num_experts", self.num_experts)
        _check_int("top_k", self.top_k)
        _check_int("expert_intermediate_size", self.expert_intermediate_size)
        if self.top_k > self.num_experts:
            raise ConfigError(f"{_label('top_k')} {self.top_k} exceeds num_experts {self.num_experts}")
        _check_choice("router", self.router, ROUTERS)
        _check_flags(self, "norm_topk_prob", "router_bias", "expert_bias", "score_correction_bias")
        _check_int("num_groups", self.num_groups)
        _check_int("topk_groups", self.topk_groups)
        _check_int("shared_experts", self.shared_experts, low=0)
        _check_float("routed_scaling_factor", self.routed_scaling_factor, positive=True)
        if self.num_experts % self.num_groups:
            raise ConfigError(f"num_experts {self.num_experts} is not a multiple of n_group {self.num_groups}")
        if self.topk_groups > self.num_groups:
            raise ConfigError(f"topk_group {self.topk_groups} exceeds n_group {self.num_groups}")
        if self.router == "sigmoid_group_topk" and self.num_experts // self.num_groups < 2:
            raise ConfigError("sigmoid_group_topk ranks groups by their two best experts: each group needs two")
        if self.top_k > self.topk_groups * (self.num_experts // self.num_groups):
            raise ConfigError(f"top_k {self.top_k} exceeds the experts of topk_group {self.topk_groups} groups")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2/V3; transformers' modeling_deepseek_v3.py).

    Keys and values come from one compressed latent per token (``kv_lora_rank`` wide, RMS-normed)
    through ``kv_b_proj``, plus one RoPE key part (``qk_rope_head_dim``) shared by all heads: the
    cache holds just these two per token. A head's query is [nope | rope] (qk_nope_head_dim +
    qk_rope_head_dim), its value ``v_head_dim`` wide. The query may itself go through a low-rank
    bottleneck (``q_lora_rank``; None in V2-Lite: one q_proj)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    # The checkpoint's rope rows are interleaved pairs (x0, x1), (x2, x3)... (V2's complex rotation,
    # V3's rope_interleave): the loader reorders them to rung's half-split layout once.
    rope_interleave: bool = True

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _check_int(name, getattr(self, name))
        _check_int("q_lora_rank", self.q_lora_rank, optional=True)
        _check_flags(self, "rope_interleave")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even for rotary pairs, got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token and layer: the latent and the RoPE key part."""
        return self.kv_lora_rank + self.qk_rope_head_dim


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
    mla: MLAConfig | None = None  # DeepSeek: latent attention (head_dim is then its RoPE part)
    # DeepSeek-V3's num_nextn_predict_layers: checkpoint layers after the decoder's (the multi-token
    # prediction module, numbered num_layers, num_layers + 1, ...) that the loader skips, as
    # transformers does; rung decodes one token a step and does not run them
    mtp_layers: int = 0

    # ---- issue 21 (families): Gemma 2, OLMo 2, SmolLM3 ----
    attn_logit_softcap: float | None = None  # Gemma 2: scores → tanh(scores / cap) · cap before the mask
    pre_norms: bool = True  # OLMo 2: False, no norm before a sublayer (only after it: sandwich_norms)
    qk_norm_whole: bool = False  # OLMo 2: q_norm / k_norm over the whole projection, not per head
    rope_layers: tuple[bool, ...] = ()  # per layer: RoPE applied (SmolLM3: False on its NoPE layers)
    # ---- end issue 21 (families) ----

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
        # Every ModelConfig is checked here, however it was built (config.json, GGUF metadata, a
        # packed checkpoint, replace()): a field out of range is one ConfigError naming it, before
        # any code divides by it, sizes a tensor by it or loops over it.
        _check_int("num_layers", self.num_layers, high=MAX_LAYERS)
        _check_int("mtp_layers", self.mtp_layers, low=0, high=MAX_LAYERS)
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (self.moe is not None,) * self.num_layers)
        if not self.rope_layers:
            object.__setattr__(self, "rope_layers", (True,) * self.num_layers)
        object.__setattr__(self, "rope_layers", tuple(self.rope_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self._check()

    def _check(self) -> None:
        if not isinstance(self.model_type, str):
            raise ConfigError(f"model_type must be a string, got {_show(self.model_type)}")
        for name in ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            _check_int(name, getattr(self, name))
        _check_int("intermediate_size", self.intermediate_size, low=0)
        _check_int("max_position_embeddings", self.max_position_embeddings, optional=True)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{_label('num_kv_heads')} {self.num_kv_heads} does not divide "
                              f"{_label('num_heads')} {self.num_heads}")
        _check_choice("norm", self.norm, NORMS)
        _check_choice("positions", self.positions, POSITIONS)
        _check_choice("mlp", self.mlp, MLPS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_float("norm_eps", self.norm_eps)
        if self.norm_eps < 0:
            raise ConfigError(f"{_label('norm_eps')} must not be negative, got {self.norm_eps}")
        _check_float("norm_weight_offset", self.norm_weight_offset)
        for name in ("embedding_scale", "final_logit_softcap", "attn_scale", "attn_logit_softcap"):
            _check_float(name, getattr(self, name), positive=True, optional=True)
        _check_float("swiglu_limit", self.swiglu_limit, positive=True)
        _check_float("swiglu_alpha", self.swiglu_alpha)
        _check_flags(self, "norm_weight_in_float32", "embedding_norm", "sandwich_norms", "residual_from_norm",
                     "tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm", "attn_scale_by_inverse_layer",
                     "attn_sinks", "mlp_bias", "pre_norms", "qk_norm_whole")
        if not self.pre_norms and not self.sandwich_norms:
            raise ConfigError("pre_norms=False needs sandwich_norms (the norms after each sublayer)")
        self._check_positions()
        self._check_layers()
        if self.mla is not None and not isinstance(self.mla, MLAConfig):
            raise ConfigError(f"mla must be an MLAConfig, got {_show(self.mla)}")
        if not isinstance(self.dtype, str):
            raise ConfigError(f"dtype must be a string, got {_show(self.dtype)}")
        _check_int("bos_token_id", self.bos_token_id, low=0, optional=True)
        eos = self.eos_token_id
        for token in eos if isinstance(eos, tuple) else (eos,):
            _check_int("eos_token_id", token, low=0, optional=not isinstance(eos, tuple))

    def _check_positions(self) -> None:
        if self.positions != "rope":
            return
        for name in ("rope", "local_rope"):
            rope = getattr(self, name)
            if not isinstance(rope, RopeConfig) and not (name == "local_rope" and rope is None):
                raise ConfigError(f"rotary positions need a {name} table, got {_show(rope)}")
        for rope in (self.rope, self.local_rope):
            rotary = int(self.head_dim * rope.partial_rotary_factor) if rope else 2
            if rotary < 2 or rotary % 2:  # rotation pairs dimension i with i + d/2
                raise ConfigError(f"head_dim {self.head_dim} x partial_rotary_factor {rope.partial_rotary_factor} "
                                  f"gives {rotary} rotary dimensions; rotary positions need an even number")
            if rope and rope.type == "longrope" and not len(rope.short_factor) == len(rope.long_factor) == rotary // 2:
                raise ConfigError(f"rope short_factor and long_factor need {rotary // 2} entries each (one per "
                                  f"rotary frequency), got {len(rope.short_factor)} and {len(rope.long_factor)}")

    def _check_layers(self) -> None:
        n = self.num_layers
        if len(self.layer_types) != n:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {n} layers")
        bad = next((t for t in self.layer_types if t not in ("full", "sliding")), None)
        if bad is not None:
            raise ConfigError(f"layer_types entry {_show(bad)} is not 'full' or 'sliding'")
        _check_int("sliding_window", self.sliding_window, optional=True)
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding layers need a sliding_window")
        if len(self.rope_layers) != n or not all(isinstance(r, bool) for r in self.rope_layers):
            raise ConfigError(f"rope_layers (no_rope_layers) must be {n} true/false entries, one per layer")
        if len(self.moe_layers) != n or not all(isinstance(m, bool) for m in self.moe_layers):
            raise ConfigError(f"moe_layers must be {n} true/false entries, one per layer")
        if any(self.moe_layers) and not isinstance(self.moe, MoEConfig):
            raise ConfigError(f"sparse layers need an MoE config, got moe={_show(self.moe)}")
        if not all(self.moe_layers) and self.intermediate_size < 1:
            raise ConfigError("intermediate_size must be at least 1 for dense feed-forward layers")

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
            raw = _read_json(path)
        try:
            if not isinstance(raw, dict):
                raise ConfigError("expected a JSON object")
            if raw.get("model_type") == "gemma3" and isinstance(raw.get("text_config"), dict):
                raw = {**raw["text_config"], "model_type": "gemma3_text"}
            model_type = raw.get("model_type")
            parser = _PARSERS.get(model_type) if isinstance(model_type, str) else None
            if parser is None:
                raise ConfigError(f"unknown model_type {_show(model_type)}; rung supports "
                                  f"{', '.join(SUPPORTED_MODEL_TYPES)}")
            return parser(_Fields(raw))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError, ArithmeticError, KeyError, AttributeError) as e:
            # a value of a shape no check foresaw: still one line, never a traceback
            raise ConfigError(f"{source}: malformed config ({type(e).__name__}: {e})") from None

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

    @property
    def kv_cache_width(self) -> int:
        """Values one token stores per layer in the KV cache: keys and values, or MLA's latent and
        RoPE key part."""
        return self.mla.cache_width if self.mla is not None else 2 * self.kv_width

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


def _read_json(path: Path) -> Any:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes is too large for a config.json (at most {MAX_CONFIG_BYTES:,})")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, a number of 5,000 digits, deep nesting
        raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


class _Fields:
    """Typed access to a config dict; errors name the field (``within`` a nested dict such as
    rope_scaling). ``from_hf`` adds the source file."""

    def __init__(self, raw: dict[str, Any], within: str = ""):
        self.raw, self.within = raw, within

    def name(self, *names: str) -> str:
        """The field a value came from (the first of ``names`` present), as a message names it."""
        present = next((n for n in names if self.raw.get(n) is not None), names[0])
        return f"{self.within}.{present}" if self.within else present

    def get(self, *names: str, default: Any = None) -> Any:
        for n in names:
            if self.raw.get(n) is not None:
                return self.raw[n]
        return default

    def int(self, *names: str, default: Any = ..., low: int = 0) -> int:
        v = self.get(*names, default=...)
        if v is ...:
            if default is ...:
                raise ConfigError(f"missing field {self.name(*names)!r}")
            return default  # the dataclass checks what defaults derive to
        problem = _int_problem(v, low, MAX_SIZE)
        if problem:
            raise ConfigError(f"field {self.name(*names)!r} {problem}")
        return v

    def float(self, *names: str, default: Any = ...) -> float:
        v = self.get(*names, default=default)
        if v is ...:
            raise ConfigError(f"missing field {self.name(*names)!r}")
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
            raise ConfigError(f"field {self.name(*names)!r} must be a finite number, got {_show(v)}")
        return float(v)

    def bool(self, *names: str, default: bool = False) -> bool:
        v = self.get(*names, default=default)
        if not isinstance(v, bool):
            raise ConfigError(f"field {self.name(*names)!r} must be true or false, got {_show(v)}")
        return v

    def str(self, *names: str, default: str | None = None) -> str | None:
        v = self.get(*names, default=default)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"field {self.name(*names)!r} must be a string, got {_show(v)}")
        return v

    def list(self, *names: str, default: list | None = None) -> list:
        v = self.get(*names, default=default)
        if not isinstance(v, list):
            raise ConfigError(f"field {self.name(*names)!r} must be a list, got {_show(v)}")
        return v

    def dict(self, *names: str) -> "_Fields | None":
        """A nested object (rope_scaling), read with the same checks; None when absent."""
        v = self.get(*names)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise ConfigError(f"field {self.name(*names)!r} must be an object, got {_show(v)}")
        return _Fields(v, self.name(*names))


def _token_ids(f: _Fields, name: str) -> int | tuple[int, ...] | None:
    v = f.get(name)
    if isinstance(v, list) and len(v) <= 1024:
        v = tuple(v)
    ok = lambda t: isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_SIZE  # noqa: E731
    if v is None or ok(v) or (isinstance(v, tuple) and all(ok(t) for t in v)):
        return v
    raise ConfigError(f"field {name!r} must be a token id or a list of them, got {_show(v)}")


def _dtype(f: _Fields) -> str:
    return f.str("dtype", "torch_dtype", default="float32")


def _heads(f: _Fields, hidden: int, heads: int, hidden_names: tuple[str, ...], heads_names: tuple[str, ...]) -> int:
    """hidden / heads, for families whose heads split the hidden width (no head_dim field)."""
    if hidden % heads:
        raise ConfigError(f"field {f.name(*hidden_names)!r} ({hidden}) is not a multiple of "
                          f"{f.name(*heads_names)!r} ({heads})")
    return hidden // heads


def _rope(f: _Fields, params: _Fields | None, max_pos: int | None) -> RopeConfig:
    """One rotary table from a v5 ``rope_parameters`` dict or v4 ``rope_theta`` + ``rope_scaling``."""
    p = params or _Fields({}, "rope_scaling")
    theta = p.float("rope_theta", default=f.float("rope_theta", default=10_000.0))
    kind = p.str("rope_type", "type", default="default")
    kind = {"su": "longrope"}.get(kind, kind)  # Phi-3's first checkpoints named LongRoPE "su"
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope type {_show(kind)} is not supported (supported: {', '.join(ROPE_TYPES)})")
    original = p.int("original_max_position_embeddings",
                     default=f.int("original_max_position_embeddings", default=None, low=1), low=1)
    if kind in ("yarn", "llama3", "longrope") and original is None:
        original = max_pos
    factor = p.float("factor", default=None)
    if kind in ("yarn", "longrope") and factor is None and max_pos and original:
        factor = max_pos / original
    if kind != "default" and factor is None:
        raise ConfigError(f"rope type {kind!r} needs a {p.name('factor')!r}")
    return RopeConfig(
        theta=theta,
        type=kind,
        factor=factor if factor is not None else 1.0,
        original_max_position=original,
        beta_fast=p.float("beta_fast", default=32.0),
        beta_slow=p.float("beta_slow", default=1.0),
        attention_factor=p.float("attention_factor", default=None),
        mscale=p.float("mscale", default=None),
        mscale_all_dim=p.float("mscale_all_dim", default=None),
        truncate=p.bool("truncate", default=True),
        low_freq_factor=p.float("low_freq_factor", default=1.0),
        high_freq_factor=p.float("high_freq_factor", default=4.0),
        partial_rotary_factor=p.float("partial_rotary_factor",
                                      default=f.float("partial_rotary_factor", default=1.0)),
        short_factor=_factors(p, "short_factor"),
        long_factor=_factors(p, "long_factor"),
    )


def _factors(p: _Fields, name: str) -> tuple[float, ...]:
    """LongRoPE's per-frequency list (at most MAX_FACTORS long: one per rotary frequency)."""
    values = p.list(name, default=[])
    if len(values) > MAX_FACTORS:
        raise ConfigError(f"field {p.name(name)!r} has {len(values):,} entries (at most {MAX_FACTORS:,})")
    return tuple(values)


def _rope_params(f: _Fields) -> _Fields | None:
    return f.dict("rope_parameters", "rope_scaling")


def _layer_types(f: _Fields, n: int, default: list[str]) -> tuple[str, ...]:
    names = f.list("layer_types", default=default)
    if len(names) != n:
        raise ConfigError(f"field 'layer_types' has {len(names):,} entries for {n:,} layers")
    kinds = {"full_attention": "full", "sliding_attention": "sliding"}
    bad = next((name for name in names if not isinstance(name, str) or name not in kinds), None)
    if bad is not None:
        raise ConfigError(f"field 'layer_types': entry {_show(bad)} is not supported")
    return tuple(kinds[name] for name in names)


def _activation(f: _Fields, *names: str, default: str) -> str:
    table = {
        "silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu",
        "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    }
    name = f.str(*names, default=default)
    if name not in table:
        raise ConfigError(f"field {names[0]!r}: activation {_show(name)} is not supported")
    return table[name]


def _gpt2(f: _Fields) -> ModelConfig:
    hidden_names, heads_names = ("n_embd", "hidden_size"), ("n_head", "num_attention_heads")
    hidden, heads = f.int(*hidden_names), f.int(*heads_names, low=1)
    return ModelConfig(
        model_type="gpt2",
        vocab_size=f.int("vocab_size"),
        hidden_size=hidden,
        num_layers=f.int("n_layer", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=_heads(f, hidden, heads, hidden_names, heads_names),
        intermediate_size=f.int("n_inner", default=4 * hidden),
        max_position_embeddings=f.int("n_positions", "max_position_embeddings", default=1024),
        norm="layernorm",
        norm_eps=f.float("layer_norm_epsilon", default=1e-5),
        tie_word_embeddings=f.bool("tie_word_embeddings", default=True),
        positions="learned",
        rope=None,
        qkv_bias=True,
        o_bias=True,
        attn_scale=None if f.bool("scale_attn_weights", default=True) else 1.0,
        attn_scale_by_inverse_layer=f.bool("scale_attn_by_inverse_layer_idx", default=False),
        mlp="plain",
        activation=_activation(f, "activation_function", default="gelu_new"),
        mlp_bias=True,
        dtype=_dtype(f),
        bos_token_id=_token_ids(f, "bos_token_id"),
        eos_token_id=_token_ids(f, "eos_token_id"),
    )


def _bloom(f: _Fields) -> ModelConfig:
    hidden_names, heads_names = ("hidden_size", "n_embed"), ("n_head", "num_attention_heads")
    hidden, heads = f.int(*hidden_names), f.int(*heads_names, low=1)
    if f.int("pretraining_tp", default=1) > 1 and f.bool("slow_but_exact", default=False):
        raise ConfigError("slow_but_exact with pretraining_tp > 1 is not supported")
    return ModelConfig(
        model_type="bloom",
        vocab_size=f.int("vocab_size"),
        hidden_size=hidden,
        num_layers=f.int("n_layer", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=_heads(f, hidden, heads, hidden_names, heads_names),
        intermediate_size=4 * hidden,
        max_position_embeddings=f.int("seq_length", default=2048),
        norm="layernorm",
        norm_eps=f.float("layer_norm_epsilon", default=1e-5),
        embedding_norm=True,
        residual_from_norm=f.bool("apply_residual_connection_post_layernorm", default=False),
        tie_word_embeddings=f.bool("tie_word_embeddings", default=True),
        positions="alibi",
        rope=None,
        qkv_bias=True,
        o_bias=True,
        mlp="plain",
        activation="gelu_tanh",
        mlp_bias=True,
        dtype=_dtype(f),
        bos_token_id=_token_ids(f, "bos_token_id"),
        eos_token_id=_token_ids(f, "eos_token_id"),
    )


def _llama_like(f: _Fields, model_type: str, **extra) -> ModelConfig:
    heads = f.int("num_attention_heads", low=1)
    hidden = f.int("hidden_size")
    head_dim = f.int("head_dim", default=None)
    if head_dim is None:
        head_dim = _heads(f, hidden, heads, ("hidden_size",), ("num_attention_heads",))
    max_pos = f.int("max_position_embeddings", default=2048)
    bias = f.bool("attention_bias", default=False)
    fields = dict(
        model_type=model_type,
        vocab_size=f.int("vocab_size"),
        hidden_size=hidden,
        num_layers=f.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=f.int("num_key_value_heads", default=heads, low=1),
        head_dim=head_dim,
        intermediate_size=f.int("intermediate_size"),
        max_position_embeddings=max_pos,
        norm="rmsnorm",
        norm_eps=f.float("rms_norm_eps", default=1e-6),
        tie_word_embeddings=f.bool("tie_word_embeddings", default=False),
        positions="rope",
        rope=_rope(f, _rope_params(f), max_pos),
        qkv_bias=bias,
        o_bias=bias,
        mlp="gated",
        activation=_activation(f, "hidden_act", "hidden_activation", default="silu"),
        mlp_bias=f.bool("mlp_bias", default=False),
        dtype=_dtype(f),
        bos_token_id=_token_ids(f, "bos_token_id"),
        eos_token_id=_token_ids(f, "eos_token_id"),
    )
    fields.update(extra)
    return ModelConfig(**fields)


def _llama(f: _Fields) -> ModelConfig:
    return _llama_like(f, "llama")


def _num_layers(f: _Fields) -> int:
    """The layer count, checked before a per-layer list is built from it."""
    n = f.int("num_hidden_layers", low=1)
    if n > MAX_LAYERS:
        raise ConfigError(f"field 'num_hidden_layers' ({n:,}) is more than rung supports ({MAX_LAYERS:,})")
    return n


def _qwen3_window(f: _Fields) -> int | None:
    return f.int("sliding_window", default=4096, low=1) if f.bool("use_sliding_window", default=False) else None


def _qwen3(f: _Fields) -> ModelConfig:
    n = _num_layers(f)
    window = _qwen3_window(f)
    first_sliding = f.int("max_window_layers", default=28)
    default = ["sliding_attention" if window and i >= first_sliding else "full_attention" for i in range(n)]
    types = _layer_types(f, n, default)
    return _llama_like(f, "qwen3", qk_norm=True, layer_types=types,
                       sliding_window=window if "sliding" in types else None)


def _qwen3_moe(f: _Fields) -> ModelConfig:
    n = _num_layers(f)
    window = _qwen3_window(f)  # Qwen3-MoE applies the window to every layer when it is on
    experts = f.int("num_experts", "num_local_experts")
    dense = f.list("mlp_only_layers", default=[])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise ConfigError(f"field 'mlp_only_layers' must list layer numbers, got {_show(dense)}")
    dense = set(dense)
    step = f.int("decoder_sparse_step", default=1, low=1)
    sparse = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n))
    moe = None
    if any(sparse):
        moe = MoEConfig(
            num_experts=experts,
            top_k=f.int("num_experts_per_tok", low=1),
            expert_intermediate_size=f.int("moe_intermediate_size", low=1),
            router="softmax_topk",
            norm_topk_prob=f.bool("norm_topk_prob", default=False),
        )
        _check_top_k(moe, "num_experts")
    return _llama_like(f, "qwen3_moe", qk_norm=True, moe=moe, moe_layers=sparse,
                       layer_types=(("sliding" if window else "full"),) * n, sliding_window=window)


def _check_top_k(moe: MoEConfig, experts_name: str) -> None:
    if moe.top_k > moe.num_experts:
        raise ConfigError(f"field 'num_experts_per_tok' ({moe.top_k}) exceeds {experts_name!r} ({moe.num_experts})")


def _gpt_oss(f: _Fields) -> ModelConfig:
    n = _num_layers(f)
    default = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    moe = MoEConfig(
        num_experts=f.int("num_local_experts", "num_experts", low=1),
        top_k=f.int("num_experts_per_tok", "experts_per_token", low=1),
        expert_intermediate_size=f.int("intermediate_size", low=1),
        router="topk_softmax",
        router_bias=True,
        expert_bias=True,
    )
    _check_top_k(moe, "num_local_experts")
    return _llama_like(
        f, "gpt_oss",
        norm_eps=f.float("rms_norm_eps", default=1e-5),
        norm_weight_in_float32=True,
        qkv_bias=True, o_bias=True, attn_sinks=True,
        layer_types=_layer_types(f, n, default),
        sliding_window=f.int("sliding_window", default=128, low=1),
        activation="swiglu_clamped",
        swiglu_limit=f.float("swiglu_limit", default=7.0),
        swiglu_alpha=f.float("swiglu_alpha", default=1.702),
        moe=moe, moe_layers=(True,) * n,
    )


def _gemma3(f: _Fields) -> ModelConfig:
    n = _num_layers(f)
    hidden = f.int("hidden_size")
    max_pos = f.int("max_position_embeddings", default=131_072)
    pattern = f.int("sliding_window_pattern", default=6, low=1)
    default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    params = f.dict("rope_parameters")
    if params is not None and "full_attention" in params.raw:  # v5: one table per layer type
        global_rope = _rope(f, params.dict("full_attention"), max_pos)
        local_rope = _rope(f, params.dict("sliding_attention") or _Fields({"rope_theta": 10_000.0}), max_pos)
    else:  # v4: rope_theta + rope_scaling for global layers, rope_local_base_freq for local ones
        global_rope = _rope(f, f.dict("rope_scaling"), max_pos)
        local_rope = RopeConfig(theta=f.float("rope_local_base_freq", default=10_000.0))
    scalar = f.float("query_pre_attn_scalar", default=256)
    if scalar <= 0:
        raise ConfigError(f"field 'query_pre_attn_scalar' must be positive, got {_show(scalar)}")
    return _llama_like(
        f, "gemma3_text",
        norm_weight_offset=1.0,
        norm_weight_in_float32=True,
        sandwich_norms=True,
        embedding_scale=hidden**0.5,
        tie_word_embeddings=f.bool("tie_word_embeddings", default=True),
        final_logit_softcap=f.float("final_logit_softcapping", default=None),
        rope=global_rope,
        local_rope=local_rope,
        qk_norm=True,
        attn_scale=scalar**-0.5,
        layer_types=_layer_types(f, n, default),
        sliding_window=f.int("sliding_window", default=4096, low=1),
        activation=_activation(f, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh"),
    )


# ---- DeepSeek-V2 / V3 (MLA, shared experts, group-limited routing) ------------------------------


def _deepseek(f: _Fields, model_type: str) -> ModelConfig:
    """transformers' configuration_deepseek_v2.py / _v3.py. head_dim is the RoPE part (as there),
    the softmax scale (nope + rope)^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2."""
    n = _num_layers(f)
    heads = f.int("num_attention_heads", low=1)
    v3 = model_type == "deepseek_v3"
    mla = MLAConfig(
        kv_lora_rank=f.int("kv_lora_rank", low=1),
        qk_nope_head_dim=f.int("qk_nope_head_dim", low=1),
        qk_rope_head_dim=f.int("qk_rope_head_dim", low=2),
        v_head_dim=f.int("v_head_dim", low=1),
        q_lora_rank=f.int("q_lora_rank", default=None, low=1),
        rope_interleave=f.bool("rope_interleave", default=True) if v3 else True,  # V2: complex rotation
    )
    max_pos = f.int("max_position_embeddings", default=4096 if v3 else 2048)
    rope = _rope(f, _rope_params(f), max_pos)
    scale = mla.qk_head_dim**-0.5
    mscale_all_dim = (_rope_params(f) or _Fields({})).float("mscale_all_dim", default=0.0)
    if rope.type != "default" and mscale_all_dim and rope.factor > 1:  # yarn_apply_mscale
        scale *= (0.1 * mscale_all_dim * math.log(rope.factor) + 1.0) ** 2
    experts = f.int("n_routed_experts", low=1)
    first_dense = f.int("first_k_dense_replace", default=3 if v3 else 0)
    if v3:
        router = "sigmoid_group_topk"
    else:
        method = f.str("topk_method", default="greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"field 'topk_method': {_show(method)} is not supported (greedy, group_limited_greedy)")
        router = "softmax_topk" if method == "greedy" else "softmax_group_topk"
    grouped = router != "softmax_topk"
    moe = MoEConfig(
        num_experts=experts,
        top_k=f.int("num_experts_per_tok", low=1),
        expert_intermediate_size=f.int("moe_intermediate_size", low=1),
        router=router,
        # V2's router never renormalises (its config's norm_topk_prob is not read by transformers)
        norm_topk_prob=f.bool("norm_topk_prob", default=True) if v3 else False,
        num_groups=f.int("n_group", default=1, low=1) if grouped else 1,
        topk_groups=f.int("topk_group", default=1, low=1) if grouped else 1,
        routed_scaling_factor=f.float("routed_scaling_factor", default=2.5 if v3 else 1.0),
        score_correction_bias=v3,
        shared_experts=f.int("n_shared_experts", default=1 if v3 else 2),
    )
    _check_top_k(moe, "n_routed_experts")
    return _llama_like(
        f, model_type,
        num_kv_heads=heads,
        head_dim=mla.qk_rope_head_dim,
        max_position_embeddings=max_pos,
        rope=rope,
        attn_scale=scale,
        # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj (the up-projections have none)
        qkv_bias=f.bool("attention_bias", default=False),
        o_bias=f.bool("attention_bias", default=False),
        mla=mla,
        moe=moe,
        moe_layers=tuple(i >= first_dense for i in range(n)),
        mtp_layers=f.int("num_nextn_predict_layers", default=0, low=0),
    )


# ---- issue 21 (families): Qwen2.5, Mistral, Mixtral, Phi-3, Gemma 2, OLMo 2, SmolLM3 ------------


def _window_everywhere(f: _Fields, n: int) -> dict:
    """Mistral, Mixtral, Phi-3: one ``sliding_window`` (or null) for every layer."""
    window = f.int("sliding_window", default=None, low=1)
    return dict(layer_types=(("sliding" if window else "full"),) * n, sliding_window=window)


def _qwen2(f: _Fields) -> ModelConfig:
    # Qwen2 / Qwen2.5: Llama with biases on q, k and v (not on o); windows as Qwen3's
    n = _num_layers(f)
    window = _qwen3_window(f)
    first_sliding = f.int("max_window_layers", default=28)
    default = ["sliding_attention" if window and i >= first_sliding else "full_attention" for i in range(n)]
    types = _layer_types(f, n, default)
    return _llama_like(f, "qwen2", qkv_bias=True, o_bias=False, layer_types=types,
                       sliding_window=window if "sliding" in types else None)


def _mistral(f: _Fields) -> ModelConfig:
    return _llama_like(f, "mistral", **_window_everywhere(f, _num_layers(f)))


def _mixtral(f: _Fields) -> ModelConfig:
    # Mixtral: every layer sparse; softmax over all experts in float32, top-k, renormalised
    n = _num_layers(f)
    moe = MoEConfig(
        num_experts=f.int("num_local_experts", low=1),
        top_k=f.int("num_experts_per_tok", low=1),
        expert_intermediate_size=f.int("intermediate_size", low=1),
        router="softmax_topk",
        norm_topk_prob=True,
    )
    _check_top_k(moe, "num_local_experts")
    return _llama_like(f, "mixtral", moe=moe, moe_layers=(True,) * n, **_window_everywhere(f, n))


def _phi3(f: _Fields) -> ModelConfig:
    # Phi-3 / 3.5: Llama maths; q|k|v and gate|up fused in the checkpoint (keymaps); LongRoPE
    return _llama_like(f, "phi3", norm_eps=f.float("rms_norm_eps", default=1e-5),
                       **_window_everywhere(f, _num_layers(f)))


def _gemma2(f: _Fields) -> ModelConfig:
    # Gemma 2: Gemma's (1 + w) norms and sandwich norms, no QK-norm; local/global alternate from the
    # first layer; attention scores and final logits soft-capped (transformers' modeling_gemma2)
    n = _num_layers(f)
    hidden = f.int("hidden_size")
    scalar = f.float("query_pre_attn_scalar", default=256)
    if scalar <= 0:
        raise ConfigError(f"field 'query_pre_attn_scalar' must be positive, got {_show(scalar)}")
    default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    return _llama_like(
        f, "gemma2",
        norm_weight_offset=1.0,
        norm_weight_in_float32=True,
        sandwich_norms=True,
        embedding_scale=hidden**0.5,
        tie_word_embeddings=f.bool("tie_word_embeddings", default=True),
        final_logit_softcap=f.float("final_logit_softcapping", default=None),
        attn_logit_softcap=f.float("attn_logit_softcapping", default=None),
        attn_scale=scalar**-0.5,
        layer_types=_layer_types(f, n, default),
        sliding_window=f.int("sliding_window", default=4096, low=1),
        activation=_activation(f, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh"),
    )


def _olmo2(f: _Fields) -> ModelConfig:
    # OLMo 2: a norm after each sublayer and none before; RMSNorm over all of q's and k's heads at once
    return _llama_like(f, "olmo2", norm_eps=f.float("rms_norm_eps", default=1e-5), pre_norms=False,
                       sandwich_norms=True, qk_norm=True, qk_norm_whole=True)


def _smollm3(f: _Fields) -> ModelConfig:
    # SmolLM3: Llama with RoPE left out of some layers (NoPE). ``no_rope_layers[i]`` is 1 where layer
    # i *uses* RoPE (the name says the opposite); by default every fourth layer is NoPE.
    n = _num_layers(f)
    interval = f.int("no_rope_layer_interval", default=4, low=1)
    flags = f.list("no_rope_layers", default=[int((i + 1) % interval != 0) for i in range(n)])
    if len(flags) != n or not all(x in (0, 1) and not isinstance(x, float) for x in flags):
        raise ConfigError(f"field 'no_rope_layers' must be {n} entries of 0 or 1, got {_show(flags)}")
    window = f.int("sliding_window", default=None, low=1) if f.bool("use_sliding_window", default=False) else None
    types = _layer_types(f, n, ["full_attention"] * n) if window else ("full",) * n
    return _llama_like(f, "smollm3", rope_layers=tuple(bool(x) for x in flags), layer_types=types,
                       sliding_window=window if "sliding" in types else None)

# ---- end issue 21 (families) --------------------------------------------------------------------


_PARSERS = {
    "gpt2": _gpt2,
    "bloom": _bloom,
    "llama": _llama,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "gpt_oss": _gpt_oss,
    "gemma3_text": _gemma3,
    "deepseek_v2": lambda f: _deepseek(f, "deepseek_v2"),
    "deepseek_v3": lambda f: _deepseek(f, "deepseek_v3"),
    # issue 21 (families)
    "qwen2": _qwen2, "mistral": _mistral, "mixtral": _mixtral, "phi3": _phi3,
    "gemma2": _gemma2, "olmo2": _olmo2, "smollm3": _smollm3,
}
