"""A GGUF file's metadata → the ModelConfig it describes.

llama.cpp's converter (``convert_hf_to_gguf.py``) writes a Hugging Face config as ``{arch}.*``
keys; ``config_from_gguf`` reads them back, checking each against the tensors where the two must
agree (block_count against the blk.N tensors, head sizes against attn_q), and recovers what the
converter wrote as a tensor instead of metadata (llama3 rope scaling as ``rope_freqs.weight``).
transformers' ``modeling_gguf_pytorch_utils.py`` reads the same keys (the oracle in tests).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from rung.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, RopeConfig
from rung.model.rope import inv_freq_for
from rung.weights.gguf import GGUFError, GGUFFile

# GGUF architecture → rung model_type
ARCHITECTURES = {
    "llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "gpt2": "gpt2",
    "gemma3": "gemma3_text",
    # issue 21 (families); llama.cpp writes Mistral and Mixtral as "llama" (Mixtral: with experts)
    "qwen2": "qwen2", "gemma2": "gemma2", "olmo2": "olmo2", "smollm3": "smollm3", "phi3": "phi3",
    # DeepSeek-V2, V2-Lite and V3: deepseek_v3 when the router is a sigmoid, else deepseek_v2
    "deepseek2": "deepseek_v2",
}
# End-of-turn tokens that llama.cpp also stops at when they are control tokens (llama-vocab.cpp)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|return|>", "<|call|>",
               "<|endoftext|>")
_CONTROL_OR_USER = (3, 4)  # token_type CONTROL, USER_DEFINED


class _Meta:
    """Typed access to the ``{arch}.*`` keys; errors name the file and the key."""

    def __init__(self, gf: GGUFFile):
        self.gf, self.arch, self.md = gf, gf.architecture, gf.metadata

    def error(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.gf.path}: {msg}")

    def get(self, key: str, default: Any = ...) -> Any:
        """The value of ``{arch}.key``; a per-layer list must hold one value throughout."""
        name = f"{self.arch}.{key}"
        v = self.md.get(name)
        if v is None:
            if default is ...:
                raise self.error(f"missing metadata key {name!r}")
            return default
        if isinstance(v, list) and v and not isinstance(v[0], (list, str)):  # one value per layer
            if any(x != v[0] for x in v):
                raise self.error(f"{name!r} differs between layers ({v[:8]}...); rung needs one value")
            v = v[0]
        return v

    def has(self, key: str) -> bool:
        return self.md.get(f"{self.arch}.{key}") is not None

    def int(self, key: str, default: Any = ..., low: int = 1) -> int:
        if default is not ... and not self.has(key):
            return default
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v < 2**31:
            raise self.error(f"{self.arch}.{key} must be an integer from {low} to 2^31, got {v!r}")
        return v

    def float(self, key: str, default: Any = ...) -> float:
        if default is not ... and not self.has(key):
            return default
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.error(f"{self.arch}.{key} must be a finite number, got {v!r}")
        return float(v)

    def str(self, key: str, default: Any = ...) -> str:
        if default is not ... and not self.has(key):
            return default
        v = self.get(key)
        if not isinstance(v, str):
            raise self.error(f"{self.arch}.{key} must be a string, got {v!r}")
        return v


def _shape(gf: GGUFFile, name: str) -> tuple[int, ...] | None:
    entry = gf.tensors.get(name)
    return entry[0] if entry else None


def _check_blocks(gf: GGUFFile, layers: int) -> None:
    """block_count must match the blk.N tensors: a huge count must not build a huge model."""
    found = {int(n.split(".")[1]) for n in gf.tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if len(found) != layers or max(found) != layers - 1:  # distinct and >= 0: exactly 0..layers-1
        have = f"blocks 0..{max(found)} ({len(found)} distinct)" if found else "no blk.* tensors"
        raise GGUFError(f"{gf.path}: {gf.architecture}.block_count is {layers} but the file holds {have}")


def _eos_ids(gf: GGUFFile) -> int | tuple[int, ...] | None:
    md = gf.metadata
    ids = [md.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                               "tokenizer.ggml.eom_token_id")]
    tokens, types = md.get("tokenizer.ggml.tokens"), md.get("tokenizer.ggml.token_type")
    if isinstance(tokens, list) and isinstance(types, list) and len(types) == len(tokens):
        ids += [i for i, t in enumerate(tokens) if t in END_OF_TURN and types[i] in _CONTROL_OR_USER]
    out = tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and not isinstance(i, bool)))
    return None if not out else out[0] if len(out) == 1 else out


def _snap(x: float) -> float:
    r = round(x)
    return float(r) if abs(x - r) < 1e-3 * max(1.0, abs(x)) else x


def _llama3_from_freq_factors(gf: GGUFFile, theta: float, head_dim: int) -> RopeConfig:
    """llama3 rope scaling, recovered from the ``rope_freqs.weight`` tensor the converter writes
    instead of metadata (one divisor per frequency: 1 kept, ``factor`` scaled, a blend between).
    The blend is linear in 1 / wavelength, so two blended frequencies fix it; the result is then
    checked against every stored divisor."""
    factors = gf.read("rope_freqs.weight").double().flatten()
    if factors.numel() != head_dim // 2:
        raise GGUFError(f"{gf.path}: rope_freqs.weight has {factors.numel()} values for a head of {head_dim}")
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return RopeConfig(theta=theta)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).double() / head_dim))
    blended = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    rope = None
    if int(blended.sum()) >= 2:
        # smooth = (1/f - 1/factor) / (1 - 1/factor) = a / wavelength - b, with low_freq_factor = 1:
        # a = original_context / (high - 1), b = 1 / (high - 1)
        smooth = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)
        x = (inv_freq / (2 * math.pi))[blended]
        design = torch.stack((x, -torch.ones_like(x)), dim=1)
        a, b = torch.linalg.lstsq(design, smooth[:, None]).solution.flatten().tolist()
        if b > 0 and a > 0:
            rope = RopeConfig(theta=theta, type="llama3", factor=_snap(factor), original_max_position=round(a / b),
                              low_freq_factor=1.0, high_freq_factor=_snap(1 + 1 / b))
    if rope is not None:
        implied = inv_freq.float() / inv_freq_for(rope, head_dim, None)[0]
        if torch.allclose(implied.double(), factors, rtol=1e-3):
            return rope
    raise GGUFError(f"{gf.path}: rope_freqs.weight does not follow llama3 rope scaling; rung cannot use it")


def _rope(m: _Meta, head_dim: int, truncate: bool = True) -> RopeConfig:
    """The rotary table of the (global) layers."""
    theta = m.float("rope.freq_base", 10_000.0)
    kind = m.str("rope.scaling.type", "none")
    factor = m.float("rope.scaling.factor", None)
    legacy = m.float("rope.scale_linear", None)  # before rope.scaling.*
    if kind == "none" and legacy not in (None, 1.0):
        kind, factor = "linear", legacy
    if "rope_freqs.weight" in m.gf.tensors:
        if kind != "none":
            raise m.error(f"both rope_freqs.weight and {m.arch}.rope.scaling.type {kind!r}; rung cannot combine them")
        return _llama3_from_freq_factors(m.gf, theta, head_dim)
    if m.float("rope.scaling.attn_factor", 1.0) != 1.0:
        raise m.error(f"{m.arch}.rope.scaling.attn_factor is not supported")
    if kind == "none":
        return RopeConfig(theta=theta)
    if factor is None:
        raise m.error(f"{m.arch}.rope.scaling.type is {kind!r} but {m.arch}.rope.scaling.factor is missing")
    if kind == "linear":
        return RopeConfig(theta=theta, type="linear", factor=factor)
    if kind == "yarn":
        return RopeConfig(
            theta=theta, type="yarn", factor=factor,
            original_max_position=m.int("rope.scaling.original_context_length"),
            beta_fast=m.float("rope.scaling.yarn_beta_fast", 32.0),
            beta_slow=m.float("rope.scaling.yarn_beta_slow", 1.0),
            # the converter writes the config's attention_factor here; absent: 0.1 ln(factor) + 1
            attention_factor=m.float("rope.scaling.yarn_attn_factor", None),
            truncate=truncate,
        )
    raise m.error(f"{m.arch}.rope.scaling.type {kind!r} is not supported (none, linear, yarn)")


def _window_layers(m: _Meta, layers: int, default_pattern: int) -> tuple[str, ...]:
    """llama.cpp's set_swa_pattern(n): layer i slides when i % n < n - 1 (n = 0: every layer);
    ``attention.sliding_window_pattern`` may instead list one bool per layer."""
    pattern = m.md.get(f"{m.arch}.attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise m.error(f"{m.arch}.attention.sliding_window_pattern has {len(pattern)} entries for {layers} layers")
        return tuple("sliding" if p else "full" for p in pattern)
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 0:
        raise m.error(f"{m.arch}.attention.sliding_window_pattern must be a count or a list, got {pattern!r}")
    return tuple("sliding" if pattern == 0 or i % pattern < pattern - 1 else "full" for i in range(layers))


def _dense_width(m: _Meta) -> int:
    """The dense MLP width; an all-expert model may omit it (then only the expert width matters)."""
    if m.has("feed_forward_length"):
        return m.int("feed_forward_length")
    up = _shape(m.gf, "blk.0.ffn_up.weight")
    return up[0] if up else m.int("expert_feed_forward_length")


def config_from_gguf(gf: GGUFFile) -> ModelConfig:
    """The ModelConfig a GGUF file describes (architectures: see ARCHITECTURES)."""
    try:
        return _config(gf)
    except ConfigError as e:  # ModelConfig's own consistency checks
        raise GGUFError(f"{gf.path}: {e}") from None


def _config(gf: GGUFFile) -> ModelConfig:
    arch = gf.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{gf.path}: architecture {arch!r} is not supported; rung reads "
                        f"{', '.join(ARCHITECTURES)}")
    m = _Meta(gf)
    layers = m.int("block_count")
    _check_blocks(gf, layers)
    embed = _shape(gf, "token_embd.weight")
    if embed is None or len(embed) != 2:
        raise m.error("no 2-D token_embd.weight tensor")
    vocab, hidden = embed
    if m.int("embedding_length") != hidden:
        raise m.error(f"{arch}.embedding_length is {m.int('embedding_length')}, token_embd.weight is {list(embed)}")
    heads = m.int("attention.head_count")
    kv_heads = m.int("attention.head_count_kv", heads)
    md = gf.metadata
    common = dict(
        model_type=ARCHITECTURES[arch], vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, tie_word_embeddings="output.weight" not in gf.tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"), eos_token_id=_eos_ids(gf),
    )
    if arch == "gpt2":
        if hidden % heads:
            raise m.error(f"embedding_length {hidden} is not a multiple of head_count {heads}")
        up, pos = _shape(gf, "blk.0.ffn_up.weight"), _shape(gf, "position_embd.weight")
        return ModelConfig(
            **common, head_dim=hidden // heads,
            # the converter writes feed_forward_length = 4 * n_embd whatever n_inner is: trust the tensor
            intermediate_size=up[0] if up else m.int("feed_forward_length"),
            max_position_embeddings=pos[0] if pos else m.int("context_length"),
            norm="layernorm", norm_eps=m.float("attention.layer_norm_epsilon", 1e-5),
            positions="learned", rope=None, qkv_bias=True, o_bias=True,
            mlp="plain", activation="gelu_tanh", mlp_bias=True,
        )

    if arch == "phi3":
        return ModelConfig(**_phi3_fields(m, common, layers, hidden, heads, kv_heads))
    if arch == "deepseek2":
        return ModelConfig(**_deepseek2_fields(m, common, layers, hidden, heads))
    q = _shape(gf, "blk.0.attn_q.weight")
    head_dim = m.int("attention.key_length", None) or (q[0] // heads if q else hidden // heads)
    if q is None or q[0] != heads * head_dim:
        raise m.error(f"blk.0.attn_q.weight is {list(q) if q else 'missing'}; head_count {heads} x key_length "
                      f"{head_dim} needs {heads * head_dim} rows")
    rot = m.int("rope.dimension_count", head_dim)
    if rot != head_dim:
        raise m.error(f"{arch}.rope.dimension_count {rot} differs from the head size {head_dim} (partial rotary)")
    max_pos = m.int("context_length", 2048)
    rope = _rope(m, head_dim, truncate=arch != "gpt-oss")  # gpt-oss's config: "truncate": false
    fields = dict(
        common, head_dim=head_dim, max_position_embeddings=max_pos,
        intermediate_size=_dense_width(m),
        norm="rmsnorm", norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-6),
        positions="rope", rope=rope,
        qkv_bias="blk.0.attn_q.bias" in gf.tensors, o_bias="blk.0.attn_output.bias" in gf.tensors,
        mlp="gated", activation="silu", mlp_bias="blk.0.ffn_up.bias" in gf.tensors,
    )
    if arch == "qwen3":
        fields.update(qk_norm=True)
    elif arch == "qwen3moe":
        sparse = tuple(f"blk.{i}.ffn_gate_inp.weight" in gf.tensors for i in range(layers))
        experts = m.int("expert_count")
        moe = MoEConfig(
            num_experts=experts, top_k=m.int("expert_used_count"),
            expert_intermediate_size=m.int("expert_feed_forward_length"), router="softmax_topk",
            # llama.cpp always renormalises Qwen3-MoE's top-k weights (transformers' GGUF default too)
            norm_topk_prob=bool(m.get("expert_weights_norm", True)),
        )
        if moe.top_k > experts:
            raise m.error(f"expert_used_count {moe.top_k} exceeds expert_count {experts}")
        fields.update(qk_norm=True, moe=moe if any(sparse) else None, moe_layers=sparse)
    elif arch == "gpt-oss":
        experts = m.int("expert_count")
        moe = MoEConfig(
            num_experts=experts, top_k=m.int("expert_used_count"),
            expert_intermediate_size=m.int("expert_feed_forward_length"), router="topk_softmax",
            router_bias=True, expert_bias=True,
        )
        if moe.top_k > experts:
            raise m.error(f"expert_used_count {moe.top_k} exceeds expert_count {experts}")
        fields.update(
            intermediate_size=moe.expert_intermediate_size,
            norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-5), norm_weight_in_float32=True,
            attn_sinks=True, sliding_window=m.int("attention.sliding_window"),
            layer_types=_window_layers(m, layers, 2),
            activation="swiglu_clamped",  # llama.cpp hard-codes limit 7.0 and alpha 1.702 as well
            moe=moe, moe_layers=(True,) * layers,
        )
    elif arch == "gemma3":
        window = m.int("attention.sliding_window", 0, low=0)
        types = _window_layers(m, layers, 6) if window else ("full",) * layers
        if m.get("attn_logit_softcapping", None) is not None:
            raise m.error("gemma3.attn_logit_softcapping is set; Gemma 3 has none and rung does not support it")
        # llama.cpp scales queries by head_dim^-0.5, except Gemma 3 27B (62 layers): (hidden/heads)^-0.5,
        # i.e. transformers' query_pre_attn_scalar of each released size
        scalar = hidden // heads if layers == 62 else head_dim
        fields.update(
            norm_weight_offset=1.0, norm_weight_in_float32=True, sandwich_norms=True,
            embedding_scale=hidden**0.5, final_logit_softcap=m.float("final_logit_softcapping", None),
            local_rope=RopeConfig(theta=m.float("rope.freq_base_swa", 10_000.0)),
            qk_norm=True, attn_scale=scalar**-0.5,
            layer_types=types, sliding_window=window or None, activation="gelu_tanh",
        )
    _issue21_fields(m, fields, layers, hidden, heads, head_dim)
    return ModelConfig(**fields)


# ---- issue 21 (families) -------------------------------------------------------------------------


def _issue21_fields(m: _Meta, fields: dict, layers: int, hidden: int, heads: int, head_dim: int) -> None:
    """What llama.cpp's qwen2, gemma2, olmo2 and smollm3 architectures (and a llama with experts,
    Mixtral) add to the Llama-shaped fields, in place."""
    arch = m.arch
    if arch == "llama" and m.has("expert_count"):  # Mixtral: softmax over all experts, top-k renormalised
        experts = m.int("expert_count")
        moe = MoEConfig(num_experts=experts, top_k=m.int("expert_used_count"),
                        expert_intermediate_size=m.int("expert_feed_forward_length", None) or fields["intermediate_size"],
                        router="softmax_topk", norm_topk_prob=True)
        if moe.top_k > experts:
            raise m.error(f"expert_used_count {moe.top_k} exceeds expert_count {experts}")
        fields.update(model_type="mixtral", moe=moe, moe_layers=(True,) * layers)
    elif arch == "gemma2":
        window = m.int("attention.sliding_window", 0, low=0)
        # llama.cpp scales queries by head_dim^-0.5, except Gemma 2 27B (46 layers): (hidden/heads)^-0.5,
        # transformers' query_pre_attn_scalar of each released size
        scalar = hidden // heads if layers == 46 else head_dim
        fields.update(
            norm_weight_offset=1.0, norm_weight_in_float32=True, sandwich_norms=True,
            embedding_scale=hidden**0.5, final_logit_softcap=m.float("final_logit_softcapping", None),
            attn_logit_softcap=m.float("attn_logit_softcapping", None), attn_scale=scalar**-0.5,
            layer_types=_window_layers(m, layers, 2) if window else ("full",) * layers, sliding_window=window or None,
            activation="gelu_tanh",
        )
    elif arch == "olmo2":
        fields.update(pre_norms=False, sandwich_norms=True, qk_norm=True, qk_norm_whole=True)
    elif arch == "smollm3":  # llama.cpp hard-codes its NoPE step: every fourth layer
        fields.update(rope_layers=tuple((i + 1) % 4 != 0 for i in range(layers)))



def _phi3_fields(m: _Meta, common: dict, layers: int, hidden: int, heads: int, kv_heads: int) -> dict:
    """llama.cpp's phi3 (Phi3MiniModel): q|k|v in attn_qkv, gate|up in ffn_up, LongRoPE's factors as
    the rope_factors_long / rope_factors_short tensors, its cos/sin scale as rope.scaling.attn_factor."""
    gf = m.gf
    head_dim = hidden // heads
    qkv = _shape(gf, "blk.0.attn_qkv.weight")
    if qkv is None or qkv[0] != (heads + 2 * kv_heads) * head_dim:
        raise m.error(f"blk.0.attn_qkv.weight is {list(qkv) if qkv else 'missing'}; {heads} + 2 x {kv_heads} heads "
                      f"of {head_dim} need {(heads + 2 * kv_heads) * head_dim} rows")
    rot = m.int("rope.dimension_count", head_dim)
    if rot > head_dim or rot % 2:
        raise m.error(f"phi3.rope.dimension_count {rot} must be even and at most the head size {head_dim}")
    theta, max_pos = m.float("rope.freq_base", 10_000.0), m.int("context_length", 4096)
    rope = RopeConfig(theta=theta, partial_rotary_factor=rot / head_dim)
    if "rope_factors_long.weight" in gf.tensors:
        factors = {}
        for kind in ("long", "short"):
            name = f"rope_factors_{kind}.weight"
            shape = _shape(gf, name)
            if shape is None or math.prod(shape) != rot // 2:
                raise m.error(f"{name} has shape {list(shape) if shape else 'missing'}; {rot // 2} factors needed")
            factors[kind] = tuple(gf.read(name).double().flatten().tolist())
        original = m.int("rope.scaling.original_context_length", max_pos)
        rope = RopeConfig(theta=theta, type="longrope", factor=max_pos / original, original_max_position=original,
                          attention_factor=m.float("rope.scaling.attn_factor", None), short_factor=factors["short"],
                          long_factor=factors["long"], partial_rotary_factor=rot / head_dim)
    window = m.int("attention.sliding_window", 0, low=0)
    up = _shape(gf, "blk.0.ffn_up.weight")
    return dict(
        common, head_dim=head_dim, max_position_embeddings=max_pos,
        intermediate_size=m.int("feed_forward_length", up[0] // 2 if up else None),
        norm="rmsnorm", norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-5), positions="rope", rope=rope,
        layer_types=(("sliding" if window else "full"),) * layers, sliding_window=window or None,
        mlp="gated", activation="silu",
    )


# ---- DeepSeek-V2 / V2-Lite / V3: llama.cpp's deepseek2 -------------------------------------------

# llama.cpp's expert_gating_func (LLAMA_EXPERT_GATING_FUNC_TYPE); files from before the key are V2's softmax
GATING_FUNCS = {1: "softmax", 2: "sigmoid"}


def _deepseek2_fields(m: _Meta, common: dict, layers: int, hidden: int, heads: int) -> dict:
    """llama.cpp's deepseek2 (DeepseekV2Model in the converter): latent attention, shared experts,
    dense first layers, a softmax (V2) or sigmoid (V3) router. The model type follows the router."""
    mla = _deepseek2_mla(m, hidden, heads)
    moe, dense, sigmoid = _deepseek2_moe(m, layers)
    rope, scale = _deepseek2_rope(m, mla)
    return dict(
        common, model_type="deepseek_v3" if sigmoid else "deepseek_v2",
        num_kv_heads=heads,  # every head has its own keys once expanded; the cache holds one latent (mla)
        head_dim=mla.qk_rope_head_dim, intermediate_size=_dense_width(m),
        max_position_embeddings=m.int("context_length", 4096),
        norm="rmsnorm", norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-6),
        positions="rope", rope=rope, attn_scale=scale, mlp="gated", activation="silu",
        mla=mla, moe=moe, moe_layers=tuple(i >= dense for i in range(layers)),
    )


def _deepseek2_mla(m: _Meta, hidden: int, heads: int) -> MLAConfig:
    """Latent attention's sizes, in either layout llama.cpp has written:
    - since its MLA rework (attn_k_b / attn_v_b): head_count_kv 1, key_length kv_lora_rank + rope and
      value_length kv_lora_rank (the absorbed form's one shared head), the per-head sizes in
      key_length_mla / value_length_mla;
    - before (attn_kv_b): head_count_kv = head_count, and key_length / value_length per head.
    The RoPE rows stay as DeepSeek wrote them, interleaved pairs (llama.cpp rotates deepseek2 with its
    adjacent-pair "norm" rope and the converter permutes nothing): the key map reorders them."""
    rank, rope = m.int("attention.kv_lora_rank"), m.int("rope.dimension_count")
    kv_a = _shape(m.gf, "blk.0.attn_kv_a_mqa.weight")
    if kv_a != (rank + rope, hidden):  # checked before the rotary table (rope / 2 frequencies) is built
        raise m.error(f"blk.0.attn_kv_a_mqa.weight is {list(kv_a) if kv_a else 'missing'}; kv_lora_rank {rank} + "
                      f"rope.dimension_count {rope} by embedding_length {hidden} needs {[rank + rope, hidden]}")
    kv_heads = m.int("attention.head_count_kv", heads)
    if m.has("attention.key_length_mla"):
        qk, v = m.int("attention.key_length_mla"), m.int("attention.value_length_mla")
        shared = (m.int("attention.key_length", rank + rope), m.int("attention.value_length", rank))
        if shared != (rank + rope, rank) or kv_heads != 1:
            raise m.error(f"deepseek2.attention.key_length / value_length / head_count_kv are {shared[0]} / {shared[1]} / "
                          f"{kv_heads}; with key_length_mla they must be kv_lora_rank + rope ({rank + rope}) / "
                          f"kv_lora_rank ({rank}) / 1")
    else:
        qk, v = m.int("attention.key_length"), m.int("attention.value_length")
        if kv_heads != heads:
            raise m.error(f"deepseek2.attention.head_count_kv is {kv_heads}; without key_length_mla it must be "
                          f"head_count ({heads})")
    if qk <= rope:
        raise m.error(f"deepseek2 key length {qk} must exceed rope.dimension_count {rope} (the heads' non-rotary part)")
    return MLAConfig(kv_lora_rank=rank, qk_nope_head_dim=qk - rope, qk_rope_head_dim=rope, v_head_dim=v,
                     q_lora_rank=m.int("attention.q_lora_rank", None))  # V2-Lite: none (one attn_q)


def _deepseek2_moe(m: _Meta, layers: int) -> tuple[MoEConfig | None, int, bool]:
    """(the experts, how many dense layers lead, whether the router is V3's sigmoid)."""
    dense = m.int("leading_dense_block_count", 0, low=0)
    if dense > layers:
        raise m.error(f"deepseek2.leading_dense_block_count {dense} exceeds block_count {layers}")
    gating = m.int("expert_gating_func", 1)
    if gating not in GATING_FUNCS:
        raise m.error(f"deepseek2.expert_gating_func {gating} is not supported (1 softmax, 2 sigmoid)")
    sigmoid = GATING_FUNCS[gating] == "sigmoid"
    if dense == layers:
        return None, dense, sigmoid
    normalise = m.get("expert_weights_norm", False)
    if not isinstance(normalise, bool):
        raise m.error(f"deepseek2.expert_weights_norm must be true or false, got {normalise!r}")
    groups = m.int("expert_group_count", 1)
    correction = f"blk.{dense}.exp_probs_b.bias" in m.gf.tensors  # V3's e_score_correction_bias
    if correction and not sigmoid:
        raise m.error(f"blk.{dense}.exp_probs_b.bias steers a sigmoid router; this file's expert_gating_func is softmax")
    # A softmax router over groups is DeepSeek-V2's group_limited_greedy, which ranks a group by its
    # best expert (transformers, DeepSeek's code); llama.cpp ranks every grouped router by the sum of
    # the two best, V3's rule. rung follows the model's own definition.
    router = "sigmoid_group_topk" if sigmoid else "softmax_group_topk" if groups > 1 else "softmax_topk"
    moe = MoEConfig(
        num_experts=m.int("expert_count"), top_k=m.int("expert_used_count"),
        expert_intermediate_size=m.int("expert_feed_forward_length"), router=router, norm_topk_prob=normalise,
        num_groups=groups, topk_groups=m.int("expert_group_used_count", 1),
        routed_scaling_factor=m.float("expert_weights_scale", 1.0), score_correction_bias=correction,
        shared_experts=m.int("expert_shared_count", 0, low=0),
    )
    return moe, dense, sigmoid


def _deepseek2_rope(m: _Meta, mla: MLAConfig) -> tuple[RopeConfig, float]:
    """The rotary table and the softmax scale. llama.cpp puts YaRN's magnitude in the scale alone,
    (1 + yarn_log_multiplier · ln factor)² / sqrt(qk_head_dim), the converter having written
    0.1 × mscale_all_dim as the multiplier (transformers' yarn_get_mscale(factor, mscale_all_dim)²), and
    leaves cos and sin unscaled (as transformers does when mscale equals mscale_all_dim, as in every
    DeepSeek config)."""
    rope = _rope(m, mla.qk_rope_head_dim)
    scale = mla.qk_head_dim**-0.5
    if rope.type == "yarn":
        if m.float("rope.scaling.yarn_attn_factor", 1.0) != 1.0:
            raise m.error("deepseek2.rope.scaling.yarn_attn_factor other than 1 is not supported")
        rope = replace(rope, attention_factor=1.0)
    if rope.factor > 1:
        scale *= (1 + m.float("rope.scaling.yarn_log_multiplier", 0.0) * math.log(rope.factor)) ** 2
    return rope, scale
