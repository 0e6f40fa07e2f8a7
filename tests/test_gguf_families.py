"""Issue 21's families as llama.cpp's converter writes them (qwen2; Mistral and Mixtral as llama, Q/K
rows permuted, Mixtral with stacked experts; gemma2 with + 1 on its norms and soft-capping keys;
olmo2 with post-sublayer norms only; smollm3, a permuted llama with every fourth layer NoPE): each
tiny GGUF loads in rung with the logits of the transformers model it was written from (1e-4)."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import transformers as tf

import rung
from oracle import TOL, cached_decode_diff, hf_model, max_logit_diff
from test_gguf_convert import permute

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=101, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCH = {"phi3": "phi3", "qwen2": "qwen2", "mistral": "llama", "mixtral": "llama", "gemma2": "gemma2", "olmo2": "olmo2",
        "smollm3": "smollm3"}


def _tensors(cfg, sd: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """The HF state dict under llama.cpp's names, with the converter's changes."""
    arch = ARCH[cfg.model_type]
    offset = 1.0 if arch == "gemma2" else 0.0
    out = [("token_embd.weight", sd["model.embed_tokens.weight"]), ("output_norm.weight", sd["model.norm.weight"] + offset)]
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        out.append(("output.weight", sd["lm_head.weight"]))
    norms = {"input_layernorm": "attn_norm", "pre_feedforward_layernorm": "ffn_norm",
             "post_feedforward_layernorm": "post_ffw_norm",
             # Gemma 2 and OLMo 2: the attention-output norm; elsewhere the pre-MLP one
             "post_attention_layernorm": "post_attention_norm" if arch in ("gemma2", "olmo2") else "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out += [(b + g + ".weight", sd[p + h + ".weight"] + offset) for h, g in norms.items() if p + h + ".weight" in sd]
        for h, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            for kind in ("weight", "bias"):
                w = sd.get(f"{p}self_attn.{h}.{kind}")
                if w is not None and arch in ("llama", "smollm3") and h in ("q_proj", "k_proj"):
                    w = permute(w, cfg.num_attention_heads if h == "q_proj" else cfg.num_key_value_heads)
                if w is not None:
                    out.append((f"{b}{g}.{kind}", w))
        if p + "self_attn.qkv_proj.weight" in sd:  # Phi-3: fused as in the checkpoint
            out.append((b + "attn_qkv.weight", sd[p + "self_attn.qkv_proj.weight"]))
        for h, g in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            if f"{p}self_attn.{h}.weight" in sd:
                out.append((f"{b}{g}.weight", sd[f"{p}self_attn.{h}.weight"]))
        if p + "mlp.gate.weight" in sd:  # Mixtral: transformers' fused experts [E, 2I, H], gate rows first
            gate_up, n = sd[p + "mlp.experts.gate_up_proj"], cfg.intermediate_size
            out += [(b + "ffn_gate_inp.weight", sd[p + "mlp.gate.weight"]), (b + "ffn_gate_exps.weight", gate_up[:, :n]),
                    (b + "ffn_up_exps.weight", gate_up[:, n:]), (b + "ffn_down_exps.weight", sd[p + "mlp.experts.down_proj"])]
        elif p + "mlp.gate_up_proj.weight" in sd:  # Phi-3: gate|up stored as ffn_up
            out += [(b + "ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"]), (b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])]
        else:
            out += [(f"{b}ffn_{h}.weight", sd[f"{p}mlp.{h}_proj.weight"]) for h in ("gate", "up", "down")]
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "longrope":  # Phi3MiniModel.generate_extra_tensors
        out += [("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32)),
                ("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))]
    return out


def write(path, model) -> None:
    cfg = model.config
    arch = ARCH[cfg.model_type]
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    vocab = cfg.vocab_size
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_feed_forward_length(cfg.intermediate_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "phi3":  # Phi3MiniModel.set_gguf_parameters
        rope = cfg.rope_parameters
        w.add_rope_dimension_count(int(rope["partial_rotary_factor"] * head_dim))
        original = rope["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(original)
        scale = cfg.max_position_embeddings / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        w.add_sliding_window(cfg.sliding_window or 0)
    if cfg.model_type == "mixtral":
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "gemma2":
        w.add_sliding_window(cfg.sliding_window)
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    for name, array in _tensors(cfg, sd):
        w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CASES = {
    # LongRoPE past a 16-token original context, partial rotary, a window of 6 on every layer
    "phi3": (tf.Phi3Config, dict(sliding_window=6, original_max_position_embeddings=16, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 16, "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0],
        "long_factor": [2.0, 3.0, 4.0, 5.0, 7.0, 9.0]})),
    "qwen2": (tf.Qwen2Config, {}),
    "mistral": (tf.MistralConfig, {}),  # llama.cpp writes no window for the llama architecture
    "mixtral": (tf.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    # head_dim = query_pre_attn_scalar: the scale llama.cpp uses for the released 2B and 9B
    "gemma2": (tf.Gemma2Config, dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                                     attn_logit_softcapping=2.0, final_logit_softcapping=5.0)),
    "olmo2": (tf.Olmo2Config, {}),
    "smollm3": (tf.SmolLM3Config, dict(num_hidden_layers=4)),
}


@pytest.mark.parametrize("family", CASES)
def test_family_gguf_matches_the_transformers_model_it_was_written_from(family, tmp_path):
    cls, extra = CASES[family]
    reference = hf_model(cls(**{**BASE, **extra}))
    path = tmp_path / "model.gguf"
    write(path, reference)
    model = rung.load_model(path)
    assert model.config.model_type == ("llama" if family == "mistral" else family)
    diff = max_logit_diff(reference, model, ((1, 1), (2, 9), (1, 23)))
    assert diff < TOL, f"logits differ from transformers by {diff}"
    assert cached_decode_diff(model) < TOL
