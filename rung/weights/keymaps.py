"""One readable key map per family: checkpoint tensor names → rung parameter names.

A ``Rule`` fills one rung parameter from one or more checkpoint tensors, with the conversion
spelled out where the layouts differ (GPT-2's Conv1D transposes, BLOOM's per-head q/k/v
interleave, gpt-oss's interleaved gate/up and MXFP4 blocks, Qwen3-MoE's per-expert tensors).

Two sets of names: Hugging Face's (``keymap``, for safetensors folders) and llama.cpp's
(``gguf_rules``, for GGUF files), the second undoing what llama.cpp's converter changed.

rung's attention holds q, k and v as one projection (rows [q | k | v]) and a gated MLP its gate
and up as one (rows [gate | up]), as gpt-fast's wqkv and nano-vllm's packed modules do: a
checkpoint's separate tensors are stacked here, once, at load (``fused``), and a checkpoint that
stores them fused already (GPT-2's c_attn, llama.cpp's attn_qkv) is taken as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from rung.config import ModelConfig
from rung.weights.gguf import GGUFFile
from rung.weights.mxfp4 import dequantize_mxfp4


@dataclass(frozen=True)
class Rule:
    target: str  # rung parameter
    sources: tuple[str, ...]  # checkpoint tensors
    convert: Callable[..., torch.Tensor] | None = None  # (*tensors) -> tensor; None: the one source as is
    source_dtype: torch.dtype | None = None  # what the conversion decodes (MXFP4: uint8); None: any float
    parts: tuple[tuple[str, int], ...] = ()  # a fused parameter: (name, rows) of each source, stacked in order


def fused(target: str, sources: tuple[str, ...], parts: tuple[tuple[str, int], ...],
          each: tuple[Callable[[torch.Tensor], torch.Tensor] | None, ...] = ()) -> Rule:
    """One parameter from several tensors stacked along the rows (q|k|v, gate|up), source i first
    converted by ``each[i]`` where that is given (llama.cpp's Q/K row permutation)."""
    def stack(*tensors: torch.Tensor) -> torch.Tensor:
        converted = [f(t) if f else t for t, f in zip(tensors, each or (None,) * len(tensors))]
        if converted[0].is_meta:  # a plan's shapes only: torch.cat on meta tensors would import torch._dynamo
            rows = sum(t.shape[0] for t in converted)
            return torch.empty((rows, *converted[0].shape[1:]), dtype=converted[0].dtype, device="meta")
        return torch.cat(converted)
    return Rule(target, sources, stack, parts=parts)


def part_misfit(rule: Rule, shapes: list, target_shape: torch.Size) -> tuple[int, tuple[int, ...]] | None:
    """For a fused rule: the first source whose shape is not its rows of the parameter, and the
    shape it should have; None when all fit (or the rule is not fused)."""
    for i, ((_, rows), shape) in enumerate(zip(rule.parts, shapes)):
        need = (rows, *target_shape[1:])
        if tuple(shape) != need:
            return i, need
    return None


def converted(rule: Rule, tensors: list, target_shape: torch.Size, where: Callable[[str], str], family: str,
              error: Callable[..., Exception]) -> torch.Tensor:
    """Apply a rule to its source tensors (real or meta) and check the result fits the parameter.
    ``where(source)`` names the file and tensor; ``error(message, have, need)`` makes the loader's
    exception (``have`` and ``need``: the misfit shapes)."""
    bad = part_misfit(rule, [t.shape for t in tensors], target_shape)
    if bad is not None:  # name the one tensor that is wrong, not the stack
        i, need = bad
        raise error(f"{where(rule.sources[i])} has shape {list(tensors[i].shape)}; {family} parameter {rule.target} "
                    f"({rule.parts[i][0]} rows) needs {list(need)}", tensors[i].shape, need)
    first = where(rule.sources[0])
    try:
        value = rule.convert(*tensors) if rule.convert else tensors[0]
    except (RuntimeError, ValueError, IndexError) as e:
        raise error(f"{first} has shape {list(tensors[0].shape)}, which does not fit "
                    f"{rule.target} {list(target_shape)} ({e})", tensors[0].shape, target_shape) from None
    if value.shape != target_shape:
        raise error(f"{first} has shape {list(tensors[0].shape)}; {family} parameter {rule.target} "
                    f"needs {list(target_shape)}", tensors[0].shape, target_shape)
    return value


# Where a layer's or an expert's index sits in a Hugging Face tensor name, for every prefix the key
# maps below accept (GPT-2 and BLOOM: [transformer.]h.N.; the Llama family: model.[language_model.]layers.N.)
_LAYER = re.compile(r"(?:model\.(?:language_model\.)?layers|(?:transformer\.)?h)\.(\d{1,9})\.")
_EXPERT = re.compile(r"\.(?:mlp|block_sparse_moe)\.experts\.(\d{1,9})\.")  # Qwen3-MoE's, Mixtral's hub layouts


def layer_indices(names) -> set[int]:
    """The layer numbers the checkpoint's tensors hold."""
    return {int(m.group(1)) for n in names if (m := _LAYER.match(n))}


def expert_indices(names) -> set[int]:
    """The expert numbers of per-expert tensors (none for a fused layout)."""
    return {int(m.group(1)) for n in names if (m := _EXPERT.search(n))}


def copy(source: str, target: str) -> Rule:
    return Rule(target, (source,))


def transposed(source: str, target: str) -> Rule:
    """GPT-2's Conv1D stores [in, out], the transpose of nn.Linear."""
    return Rule(target, (source,), lambda w: w.t())


def _prefix(names: set[str], *candidates: str) -> str:
    """The prefix a checkpoint puts before its tensor names (e.g. GPT-2's 'transformer.' or none)."""
    for p in candidates:
        if any(n.startswith(p) for n in names):
            return p
    return candidates[-1]


# ---- GPT-2 ----------------------------------------------------------------------------------


def gpt2_rules(c: ModelConfig, names: set[str]) -> list[Rule]:
    p = _prefix(names, "transformer.", "")
    rules = [copy(p + "wte.weight", "embed.weight"), copy(p + "wpe.weight", "pos_embed.weight")]
    rules += [copy(p + f"ln_f.{w}", f"final_norm.{w}") for w in ("weight", "bias")]
    for i in range(c.num_layers):
        s, t = f"{p}h.{i}.", f"layers.{i}."
        for w in ("weight", "bias"):
            rules += [copy(s + f"ln_1.{w}", t + f"attn_norm.{w}"), copy(s + f"ln_2.{w}", t + f"mlp_norm.{w}")]
        rules += [  # c_attn is q | k | v already, along the output (Conv1D: last) axis
            transposed(s + "attn.c_attn.weight", t + "attn.qkv_proj.weight"), copy(s + "attn.c_attn.bias", t + "attn.qkv_proj.bias"),
            transposed(s + "attn.c_proj.weight", t + "attn.o_proj.weight"), copy(s + "attn.c_proj.bias", t + "attn.o_proj.bias"),
            transposed(s + "mlp.c_fc.weight", t + "mlp.up_proj.weight"), copy(s + "mlp.c_fc.bias", t + "mlp.up_proj.bias"),
            transposed(s + "mlp.c_proj.weight", t + "mlp.down_proj.weight"), copy(s + "mlp.c_proj.bias", t + "mlp.down_proj.bias"),
        ]
    return rules


def gpt2_ignored(name: str) -> bool:
    # causal-mask buffers that old checkpoints saved
    return name.endswith((".attn.bias", ".attn.masked_bias"))


# ---- BLOOM ----------------------------------------------------------------------------------


def bloom_rules(c: ModelConfig, names: set[str]) -> list[Rule]:
    p = _prefix(names, "transformer.", "")
    heads, d = c.num_heads, c.head_dim

    def q_k_v(t: torch.Tensor) -> torch.Tensor:  # query_key_value rows are (head, {q,k,v}, head_dim): → q | k | v
        return t.reshape(heads, 3, d, *t.shape[1:]).transpose(0, 1).reshape(3 * heads * d, *t.shape[1:])

    rules = [copy(p + "word_embeddings.weight", "embed.weight")]
    for w in ("weight", "bias"):
        rules += [copy(p + f"word_embeddings_layernorm.{w}", f"embed_norm.{w}"), copy(p + f"ln_f.{w}", f"final_norm.{w}")]
        for i in range(c.num_layers):
            s, t = f"{p}h.{i}.", f"layers.{i}."
            rules += [
                copy(s + f"input_layernorm.{w}", t + f"attn_norm.{w}"),
                copy(s + f"post_attention_layernorm.{w}", t + f"mlp_norm.{w}"),
                copy(s + f"self_attention.dense.{w}", t + f"attn.o_proj.{w}"),
                copy(s + f"mlp.dense_h_to_4h.{w}", t + f"mlp.up_proj.{w}"),
                copy(s + f"mlp.dense_4h_to_h.{w}", t + f"mlp.down_proj.{w}"),
                Rule(t + f"attn.qkv_proj.{w}", (s + f"self_attention.query_key_value.{w}",), q_k_v),
            ]
    return rules


# ---- Llama, Qwen3, Qwen3-MoE, gpt-oss, Gemma 3 ----------------------------------------------


def _stack(*experts: torch.Tensor) -> torch.Tensor:
    return torch.stack(experts)


def _qwen3_moe_expert_rules(c: ModelConfig, s: str, t: str, names: set[str]) -> list[Rule]:
    rules = [copy(s + "mlp.gate.weight", t + "mlp.router.weight")]
    if s + "mlp.experts.gate_up_proj" in names:  # transformers' fused in-memory layout [E, 2I, H]
        i = c.moe.expert_intermediate_size
        rules += [
            Rule(t + "mlp.gate_proj", (s + "mlp.experts.gate_up_proj",), lambda w: w[:, :i]),
            Rule(t + "mlp.up_proj", (s + "mlp.experts.gate_up_proj",), lambda w: w[:, i:]),
            copy(s + "mlp.experts.down_proj", t + "mlp.down_proj"),
        ]
        return rules
    for proj in ("gate_proj", "up_proj", "down_proj"):  # hub layout: one tensor per expert
        sources = tuple(f"{s}mlp.experts.{e}.{proj}.weight" for e in range(c.moe.num_experts))
        rules.append(Rule(t + f"mlp.{proj}", sources, _stack))
    return rules


def _gpt_oss_expert_rules(c: ModelConfig, s: str, t: str, names: set[str]) -> list[Rule]:
    e = s + "mlp.experts."
    rules = [copy(s + "mlp.router.weight", t + "mlp.router.weight"), copy(s + "mlp.router.bias", t + "mlp.router.bias")]
    # gate and up are interleaved along the output axis: gate at even rows, up at odd ones
    rules += [
        Rule(t + "mlp.gate_bias", (e + "gate_up_proj_bias",), lambda b: b[:, 0::2]),
        Rule(t + "mlp.up_bias", (e + "gate_up_proj_bias",), lambda b: b[:, 1::2]),
        copy(e + "down_proj_bias", t + "mlp.down_bias"),
    ]
    if e + "gate_up_proj_blocks" in names:  # MXFP4, output-major: [E, 2I, H/32, 16] → [E, 2I, H]
        gate_up = (e + "gate_up_proj_blocks", e + "gate_up_proj_scales")
        u8 = torch.uint8  # FP4 code pairs and E8M0 exponents, stored as bytes
        rules += [
            Rule(t + "mlp.gate_proj", gate_up, lambda b, sc: dequantize_mxfp4(b, sc)[:, 0::2], u8),
            Rule(t + "mlp.up_proj", gate_up, lambda b, sc: dequantize_mxfp4(b, sc)[:, 1::2], u8),
            Rule(t + "mlp.down_proj", (e + "down_proj_blocks", e + "down_proj_scales"), dequantize_mxfp4, u8),
        ]
    else:  # transformers' save_pretrained: input-major gate_up [E, H, 2I], down [E, I, H]
        rules += [
            Rule(t + "mlp.gate_proj", (e + "gate_up_proj",), lambda w: w[..., 0::2].transpose(1, 2)),
            Rule(t + "mlp.up_proj", (e + "gate_up_proj",), lambda w: w[..., 1::2].transpose(1, 2)),
            # square for the real models (H = I = 2880): a missing transpose would pass unseen
            Rule(t + "mlp.down_proj", (e + "down_proj",), lambda w: w.transpose(1, 2)),
        ]
    return rules


# ---- issue 21 (families): what Phi-3, OLMo 2 and Mixtral name or lay out differently -------------


def _mixtral_expert_rules(c: ModelConfig, s: str, t: str, names: set[str]) -> list[Rule]:
    """Mixtral's hub layout: block_sparse_moe.gate (the router) and per-expert w1 (gate), w3 (up),
    w2 (down); transformers' fused in-memory layout (mlp.experts.gate_up_proj) as Qwen3-MoE's."""
    if s + "block_sparse_moe.gate.weight" not in names:
        return _qwen3_moe_expert_rules(c, s, t, names)
    rules = [copy(s + "block_sparse_moe.gate.weight", t + "mlp.router.weight")]
    for proj, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        sources = tuple(f"{s}block_sparse_moe.experts.{e}.{w}.weight" for e in range(c.moe.num_experts))
        rules.append(Rule(t + f"mlp.{proj}", sources, _stack))
    return rules


def _block_norm_rules(c: ModelConfig, s: str, t: str) -> list[Rule] | None:
    """OLMo 2: no norm before a sublayer; post_attention_layernorm and post_feedforward_layernorm
    act on the branch outputs. None for the other families (the shared names below)."""
    if c.pre_norms:
        return None
    return [copy(s + "post_attention_layernorm.weight", t + "post_attn_norm.weight"),
            copy(s + "post_feedforward_layernorm.weight", t + "post_mlp_norm.weight")]


def _prefused(s: str, t: str, names: set[str], source: str, target: str, kinds: tuple[str, ...]) -> list[Rule] | None:
    """Phi-3 stores q|k|v (self_attn.qkv_proj) and gate|up (mlp.gate_up_proj) fused already, in
    rung's row order: taken as they are. None where the checkpoint has them separate."""
    if s + source + ".weight" not in names:
        return None
    return [copy(s + f"{source}.{w}", t + f"{target}.{w}") for w in kinds]

# ---- end issue 21 (families) --------------------------------------------------------------------


def llama_family_rules(c: ModelConfig, names: set[str]) -> list[Rule]:
    p = _prefix(names, "model.language_model.", "model.")
    rules = [copy(p + "embed_tokens.weight", "embed.weight"), copy(p + "norm.weight", "final_norm.weight")]
    qkv = (("q", c.q_width), ("k", c.kv_width), ("v", c.kv_width))
    gate_up = (("gate", c.intermediate_size), ("up", c.intermediate_size))
    for i in range(c.num_layers):
        s, t = f"{p}layers.{i}.", f"layers.{i}."
        post_only = _block_norm_rules(c, s, t)
        if post_only is not None:
            rules += post_only
        elif c.sandwich_norms:  # Gemma names: post_attention_layernorm is the attention-output norm
            rules.append(copy(s + "input_layernorm.weight", t + "attn_norm.weight"))
            rules += [
                copy(s + "post_attention_layernorm.weight", t + "post_attn_norm.weight"),
                copy(s + "pre_feedforward_layernorm.weight", t + "mlp_norm.weight"),
                copy(s + "post_feedforward_layernorm.weight", t + "post_mlp_norm.weight"),
            ]
        else:
            rules += [copy(s + "input_layernorm.weight", t + "attn_norm.weight"),
                      copy(s + "post_attention_layernorm.weight", t + "mlp_norm.weight")]
        bias_kinds = ("weight", "bias") if c.qkv_bias else ("weight",)
        rules += _prefused(s, t, names, "self_attn.qkv_proj", "attn.qkv_proj", bias_kinds) or [
            fused(t + f"attn.qkv_proj.{w}", tuple(s + f"self_attn.{n}_proj.{w}" for n, _ in qkv), qkv) for w in bias_kinds]
        for w in ("weight", "bias") if c.o_bias else ("weight",):
            rules.append(copy(s + f"self_attn.o_proj.{w}", t + f"attn.o_proj.{w}"))
        if c.qk_norm:
            rules += [copy(s + "self_attn.q_norm.weight", t + "attn.q_norm.weight"),
                      copy(s + "self_attn.k_norm.weight", t + "attn.k_norm.weight")]
        if c.attn_sinks:
            rules.append(copy(s + "self_attn.sinks", t + "attn.sinks"))
        if c.moe_layers[i]:
            expert_rules = _gpt_oss_expert_rules if c.moe.router == "topk_softmax" else _qwen3_moe_expert_rules
            rules += (_mixtral_expert_rules if c.model_type == "mixtral" else expert_rules)(c, s, t, names)
        else:
            mlp_kinds = ("weight", "bias") if c.mlp_bias else ("weight",)
            rules += _prefused(s, t, names, "mlp.gate_up_proj", "mlp.gate_up_proj", mlp_kinds) or [
                fused(t + f"mlp.gate_up_proj.{w}", (s + f"mlp.gate_proj.{w}", s + f"mlp.up_proj.{w}"), gate_up)
                for w in mlp_kinds]
            rules += [copy(s + f"mlp.down_proj.{w}", t + f"mlp.down_proj.{w}") for w in mlp_kinds]
    return rules


# ---- DeepSeek-V2 / V3: latent attention, shared experts, the router's correction bias -----------


def _deinterleave(rope: int) -> torch.Tensor:
    """Row order that turns DeepSeek's interleaved rotary pairs (x0, x1), (x2, x3)... into rung's
    half-split layout (x0, x2, ... | x1, x3, ...): the rows transformers' interleaved rotation
    (apply_rotary_pos_emb_interleave, V2's complex rotation) reads as pairs land j and j + d/2 apart."""
    return torch.cat((torch.arange(0, rope, 2), torch.arange(1, rope, 2)))


def _rope_rows(first: int, period: int, rope: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reorder the rope rows [first, first + rope) of every ``period`` rows (one head's query, or
    kv_a_proj's one block) with ``_deinterleave``; the other rows stay."""
    order = _deinterleave(rope)

    def reorder(w: torch.Tensor) -> torch.Tensor:
        if w.is_meta:
            return w
        blocks = w.reshape(-1, period, *w.shape[1:]).clone()
        blocks[:, first:first + rope] = blocks[:, first:first + rope][:, order]
        return blocks.reshape(w.shape)
    return reorder


def deepseek_rules(c: ModelConfig, names: set[str]) -> list[Rule]:
    m = c.mla
    p = "model."
    rules = [copy(p + "embed_tokens.weight", "embed.weight"), copy(p + "norm.weight", "final_norm.weight")]
    q_rope = _rope_rows(m.qk_nope_head_dim, m.qk_head_dim, m.qk_rope_head_dim) if m.rope_interleave else None
    kv_rope = _rope_rows(m.kv_lora_rank, m.cache_width, m.qk_rope_head_dim) if m.rope_interleave else None
    biases = ("weight", "bias") if c.qkv_bias else ("weight",)
    for i in range(c.num_layers):
        s, t = f"{p}layers.{i}.", f"layers.{i}."
        a, ta = s + "self_attn.", t + "attn."
        rules += [copy(s + "input_layernorm.weight", t + "attn_norm.weight"),
                  copy(s + "post_attention_layernorm.weight", t + "mlp_norm.weight")]
        if m.q_lora_rank is None:
            rules.append(Rule(ta + "q_proj.weight", (a + "q_proj.weight",), q_rope))
        else:
            rules += [copy(a + f"q_a_proj.{w}", ta + f"q_a_proj.{w}") for w in biases]
            rules += [copy(a + "q_a_layernorm.weight", ta + "q_a_norm.weight"),
                      Rule(ta + "q_b_proj.weight", (a + "q_b_proj.weight",), q_rope)]
        rules += [Rule(ta + f"kv_a_proj.{w}", (a + f"kv_a_proj_with_mqa.{w}",), kv_rope) for w in biases]
        rules += [copy(a + "kv_a_layernorm.weight", ta + "kv_a_norm.weight"),
                  copy(a + "kv_b_proj.weight", ta + "kv_b_proj.weight")]
        rules += [copy(a + f"o_proj.{w}", ta + f"o_proj.{w}") for w in ("weight", "bias")[: 1 + c.o_bias]]
        if not c.moe_layers[i]:  # first_k_dense_replace: dense layers first
            gate_up = (("gate", c.intermediate_size), ("up", c.intermediate_size))
            gate_and_up = (s + "mlp.gate_proj.weight", s + "mlp.up_proj.weight")
            rules += [fused(t + "mlp.gate_up_proj.weight", gate_and_up, gate_up),
                      copy(s + "mlp.down_proj.weight", t + "mlp.down_proj.weight")]
            continue
        rules += _qwen3_moe_expert_rules(c, s, t, names)  # router (mlp.gate) and per-expert tensors
        if c.moe.score_correction_bias:
            rules.append(copy(s + "mlp.gate.e_score_correction_bias", t + "mlp.score_correction"))
        width = c.moe.shared_experts * c.moe.expert_intermediate_size
        sh = s + "mlp.shared_experts."
        rules += [fused(t + "mlp.shared.gate_up_proj.weight", (sh + "gate_proj.weight", sh + "up_proj.weight"),
                        (("gate", width), ("up", width))),
                  copy(sh + "down_proj.weight", t + "mlp.shared.down_proj.weight")]
    return rules


def llama_family_ignored(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")


def nothing_ignored(name: str) -> bool:
    return False


KEYMAPS = {
    "gpt2": (gpt2_rules, gpt2_ignored),
    "bloom": (bloom_rules, nothing_ignored),
    "llama": (llama_family_rules, llama_family_ignored),
    "qwen3": (llama_family_rules, llama_family_ignored),
    "qwen3_moe": (llama_family_rules, llama_family_ignored),
    "gpt_oss": (llama_family_rules, llama_family_ignored),
    "gemma3_text": (llama_family_rules, llama_family_ignored),
    "deepseek_v2": (deepseek_rules, llama_family_ignored),
    "deepseek_v3": (deepseek_rules, llama_family_ignored),
    # issue 21 (families): all Llama-shaped; the differences are read from the config and the names
    **{t: (llama_family_rules, llama_family_ignored)
       for t in ("qwen2", "mistral", "mixtral", "phi3", "gemma2", "olmo2", "smollm3")},
}


def mtp_layer(config: ModelConfig, name: str) -> bool:
    """Whether ``name`` belongs to one of the checkpoint's multi-token-prediction layers
    (``config.mtp_layers`` of them, numbered after the decoder's): skipped at load."""
    if not config.mtp_layers:
        return False
    m = _LAYER.match(name)
    return m is not None and config.num_layers <= int(m.group(1)) < config.num_layers + config.mtp_layers


def keymap(config: ModelConfig, names: set[str]) -> tuple[list[Rule], Callable[[str], bool]]:
    rules_for, family_ignored = KEYMAPS[config.model_type]

    def ignored(name: str) -> bool:
        return family_ignored(name) or mtp_layer(config, name)

    rules = rules_for(config, names)
    if not config.tie_word_embeddings:
        return rules + [copy("lm_head.weight", "lm_head.weight")], ignored
    # a tied head that some exports still write out is the embedding table again: skip it
    return rules, lambda n: ignored(n) or n == "lm_head.weight"


# ---- GGUF: llama.cpp's tensor names, every family ------------------------------------------
# llama.cpp's converter (convert_hf_to_gguf.py) renames every tensor and changes a few: the Q/K row
# permutation of the ``llama`` architecture, Gemma's ``+ 1`` on norm weights, gpt-oss's split of
# the interleaved gate/up experts. These rules undo it, as transformers'
# modeling_gguf_pytorch_utils.py does (the oracle in tests).

# The llama.cpp converter permutes Q/K rows for its interleaved rotation only in LlamaModel
# (undo_permute); Qwen3, Qwen3-MoE, gpt-oss and Gemma 3 use NeoX rotation and are stored as is.
PERMUTED_QK = ("llama", "smollm3")  # smollm3: SmolLM3Model is a LlamaModel in the converter


def _unpermute(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inverse of llama.cpp's LlamaModel.permute, which reorders each head's rows from the half-split
    rotary layout to adjacent pairs: [heads * d, ...] → the same rows, (j, j + d/2) pairs restored."""
    def undo(w: torch.Tensor) -> torch.Tensor:
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return undo


def _rows(start: int, stop: int, dim: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: w.narrow(dim, start, stop - start)


def _gguf_llama_family_rules(c: ModelConfig, gf: GGUFFile) -> list[Rule]:
    arch, names = gf.architecture, set(gf.tensors)
    offset = c.norm_weight_offset  # Gemma: the converter stored 1 + w, rung keeps w

    def norm(source: str, target: str) -> Rule:
        return Rule(target, (source,), (lambda w: w - offset) if offset else None)

    permute = arch in PERMUTED_QK
    qkv = (("q", c.q_width), ("k", c.kv_width), ("v", c.kv_width))
    gate_up = (("gate", c.intermediate_size), ("up", c.intermediate_size))
    rules = [copy("token_embd.weight", "embed.weight"), norm("output_norm.weight", "final_norm.weight")]
    for i in range(c.num_layers):
        s, t = f"blk.{i}.", f"layers.{i}."
        if not c.pre_norms:  # OLMo 2 (issue 21): only the norms after each sublayer
            rules += [norm(s + "post_attention_norm.weight", t + "post_attn_norm.weight"),
                      norm(s + "post_ffw_norm.weight", t + "post_mlp_norm.weight")]
        elif arch == "gpt-oss":  # HF's post_attention_layernorm (the pre-MLP norm) keeps its name here
            rules += [norm(s + "attn_norm.weight", t + "attn_norm.weight"),
                      norm(s + "post_attention_norm.weight", t + "mlp_norm.weight")]
        elif c.sandwich_norms:
            rules += [norm(s + "attn_norm.weight", t + "attn_norm.weight"),
                      norm(s + "post_attention_norm.weight", t + "post_attn_norm.weight"),
                      norm(s + "ffn_norm.weight", t + "mlp_norm.weight"),
                      norm(s + "post_ffw_norm.weight", t + "post_mlp_norm.weight")]
        else:
            rules += [norm(s + "attn_norm.weight", t + "attn_norm.weight"), norm(s + "ffn_norm.weight", t + "mlp_norm.weight")]
        undo = (_unpermute(c.num_heads), _unpermute(c.num_kv_heads), None) if permute else ()
        for kind in ("weight", "bias") if c.qkv_bias else ("weight",):
            sources = tuple(f"{s}{src}.{kind}" for src in ("attn_q", "attn_k", "attn_v"))
            if arch == "phi3":  # issue 21: q|k|v fused as in the checkpoint
                rules.append(copy(f"{s}attn_qkv.{kind}", f"{t}attn.qkv_proj.{kind}"))
            else:
                rules.append(fused(f"{t}attn.qkv_proj.{kind}", sources, qkv, undo))
        for kind in ("weight", "bias") if c.o_bias else ("weight",):
            rules.append(copy(f"{s}attn_output.{kind}", f"{t}attn.o_proj.{kind}"))
        if c.qk_norm:
            rules += [norm(s + "attn_q_norm.weight", t + "attn.q_norm.weight"),
                      norm(s + "attn_k_norm.weight", t + "attn.k_norm.weight")]
        if c.attn_sinks:
            rules.append(copy(s + "attn_sinks.weight", t + "attn.sinks"))
        if c.moe_layers[i]:
            rules.append(copy(s + "ffn_gate_inp.weight", t + "mlp.router.weight"))
            if c.moe.router_bias:
                rules.append(copy(s + "ffn_gate_inp.bias", t + "mlp.router.bias"))
            n = c.moe.expert_intermediate_size
            targets = {"weight": ("gate_proj", "up_proj", "down_proj"), "bias": ("gate_bias", "up_bias", "down_bias")}
            for kind in ("weight", "bias") if c.moe.expert_bias else ("weight",):
                gate, up, down = (f"{t}mlp.{p}" for p in targets[kind])
                both = f"{s}ffn_gate_up_exps.{kind}"
                if both in names:  # --fuse-gate-up-exps: each expert's gate rows, then its up rows
                    rules += [Rule(gate, (both,), _rows(0, n, 1)), Rule(up, (both,), _rows(n, 2 * n, 1))]
                else:
                    rules += [copy(f"{s}ffn_gate_exps.{kind}", gate), copy(f"{s}ffn_up_exps.{kind}", up)]
                rules.append(copy(f"{s}ffn_down_exps.{kind}", down))
        else:
            for kind in ("weight", "bias") if c.mlp_bias else ("weight",):
                gate_up_rule = (copy(f"{s}ffn_up.{kind}", f"{t}mlp.gate_up_proj.{kind}") if arch == "phi3"  # gate|up
                                else fused(f"{t}mlp.gate_up_proj.{kind}", (f"{s}ffn_gate.{kind}", f"{s}ffn_up.{kind}"), gate_up))
                rules += [gate_up_rule, copy(f"{s}ffn_down.{kind}", f"{t}mlp.down_proj.{kind}")]
    return rules


def _gguf_gpt2_rules(c: ModelConfig, gf: GGUFFile) -> list[Rule]:
    rules = [copy("token_embd.weight", "embed.weight"), copy("position_embd.weight", "pos_embed.weight")]
    for kind in ("weight", "bias"):
        rules.append(copy(f"output_norm.{kind}", f"final_norm.{kind}"))
        for i in range(c.num_layers):
            s, t = f"blk.{i}.", f"layers.{i}."
            rules += [copy(f"{s}attn_norm.{kind}", f"{t}attn_norm.{kind}"),
                      copy(f"{s}ffn_norm.{kind}", f"{t}mlp_norm.{kind}")]
            # attn_qkv holds q | k | v along its rows; the converter already transposed GPT-2's Conv1D
            rules += [copy(f"{s}attn_qkv.{kind}", f"{t}attn.qkv_proj.{kind}"),
                      copy(f"{s}attn_output.{kind}", f"{t}attn.o_proj.{kind}"),
                      copy(f"{s}ffn_up.{kind}", f"{t}mlp.up_proj.{kind}"),
                      copy(f"{s}ffn_down.{kind}", f"{t}mlp.down_proj.{kind}")]
    return rules


# ---- GGUF: DeepSeek-V2 / V3 (llama.cpp's deepseek2) ----------------------------------------------


def _joined_kv_b(heads: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """kv_b_proj from the two halves llama.cpp's converter splits it into for the absorbed form:
    attn_k_b [heads, rank, nope] (each head's key rows, transposed) and attn_v_b [heads, v, rank]
    → [heads · (nope + v), rank], per head its key rows then its value rows (mla._split_kv_b)."""
    def join(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
        if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != heads or v_b.shape[0] != heads or k_b.shape[1] != v_b.shape[2]:
            raise ValueError(f"attn_k_b {list(k_b.shape)} and attn_v_b {list(v_b.shape)} must be [{heads}, rank, nope] "
                             f"and [{heads}, v, rank]")
        rank, rows = k_b.shape[1], heads * (k_b.shape[2] + v_b.shape[1])
        if k_b.is_meta:  # a plan's shapes only (torch.cat on meta tensors would import torch._dynamo)
            return torch.empty((rows, rank), dtype=k_b.dtype, device="meta")
        return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(rows, rank)
    return join


def _gguf_deepseek2_rules(c: ModelConfig, gf: GGUFFile) -> list[Rule]:
    """The converter renames DeepSeek's tensors, stacks the experts, splits kv_b_proj into attn_k_b
    and attn_v_b (newer files; older ones keep attn_kv_b) and leaves the interleaved RoPE rows as they
    are, which rung reorders here as it does for the Hugging Face folder (deepseek_rules)."""
    m, names = c.mla, set(gf.tensors)
    q_rope = _rope_rows(m.qk_nope_head_dim, m.qk_head_dim, m.qk_rope_head_dim)
    kv_rope = _rope_rows(m.kv_lora_rank, m.cache_width, m.qk_rope_head_dim)
    rules = [copy("token_embd.weight", "embed.weight"), copy("output_norm.weight", "final_norm.weight")]
    for i in range(c.num_layers):
        s, t = f"blk.{i}.", f"layers.{i}."
        a = t + "attn."
        rules += [copy(s + "attn_norm.weight", t + "attn_norm.weight"), copy(s + "ffn_norm.weight", t + "mlp_norm.weight")]
        if m.q_lora_rank is None:  # V2-Lite
            rules.append(Rule(a + "q_proj.weight", (s + "attn_q.weight",), q_rope))
        else:
            rules += [copy(s + "attn_q_a.weight", a + "q_a_proj.weight"), copy(s + "attn_q_a_norm.weight", a + "q_a_norm.weight"),
                      Rule(a + "q_b_proj.weight", (s + "attn_q_b.weight",), q_rope)]
        rules += [Rule(a + "kv_a_proj.weight", (s + "attn_kv_a_mqa.weight",), kv_rope),
                  copy(s + "attn_kv_a_norm.weight", a + "kv_a_norm.weight"),
                  copy(s + "attn_output.weight", a + "o_proj.weight")]
        if s + "attn_kv_b.weight" in names:
            rules.append(copy(s + "attn_kv_b.weight", a + "kv_b_proj.weight"))
        else:
            rules.append(Rule(a + "kv_b_proj.weight", (s + "attn_k_b.weight", s + "attn_v_b.weight"), _joined_kv_b(c.num_heads)))
        if not c.moe_layers[i]:  # leading_dense_block_count
            width = (("gate", c.intermediate_size), ("up", c.intermediate_size))
            rules += [fused(t + "mlp.gate_up_proj.weight", (s + "ffn_gate.weight", s + "ffn_up.weight"), width),
                      copy(s + "ffn_down.weight", t + "mlp.down_proj.weight")]
            continue
        rules.append(copy(s + "ffn_gate_inp.weight", t + "mlp.router.weight"))
        rules += [copy(f"{s}ffn_{p}_exps.weight", f"{t}mlp.{p}_proj") for p in ("gate", "up", "down")]
        if c.moe.score_correction_bias:
            rules.append(copy(s + "exp_probs_b.bias", t + "mlp.score_correction"))
        if c.moe.shared_experts:
            width = c.moe.shared_experts * c.moe.expert_intermediate_size
            rules += [fused(t + "mlp.shared.gate_up_proj.weight", (s + "ffn_gate_shexp.weight", s + "ffn_up_shexp.weight"),
                            (("gate", width), ("up", width))),
                      copy(s + "ffn_down_shexp.weight", t + "mlp.shared.down_proj.weight")]
    return rules


GGUF_RULES = {"gpt2": _gguf_gpt2_rules, "deepseek2": _gguf_deepseek2_rules}  # the rest: Llama-shaped


def gguf_rules(config: ModelConfig, gf: GGUFFile) -> list[Rule]:
    """One rule per rung parameter: which GGUF tensor fills it, and how."""
    rules = GGUF_RULES.get(gf.architecture, _gguf_llama_family_rules)(config, gf)
    if not config.tie_word_embeddings:
        rules.append(copy("output.weight", "lm_head.weight"))
    return rules

