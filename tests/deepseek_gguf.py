"""DeepSeek-V2 / V3 written as llama.cpp's converter writes them (DeepseekV2Model in
convert_hf_to_gguf.py, architecture deepseek2), from a transformers model: the names, the metadata,
float32 tensors. Used by tests/test_gguf_deepseek.py and benchmarks/cuda_check.py."""

from __future__ import annotations

import gguf
import numpy as np


def metadata(cfg, split_kv_b: bool = True) -> dict:
    """The deepseek2.* keys DeepseekV2Model.set_gguf_parameters writes for ``cfg`` (``split_kv_b``: the
    layout since llama.cpp's MLA rework; else the older one, per-head key and value lengths)."""
    rope = cfg.rope_parameters
    nope, rot, rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    v3 = cfg.model_type == "deepseek_v3"
    md = {
        "block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads, "rope.freq_base": float(rope["rope_theta"]),
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps), "vocab_size": cfg.vocab_size,
        "leading_dense_block_count": cfg.first_k_dense_replace, "attention.kv_lora_rank": rank,
        "expert_count": cfg.n_routed_experts, "expert_used_count": cfg.num_experts_per_tok,
        "expert_feed_forward_length": cfg.moe_intermediate_size, "expert_shared_count": cfg.n_shared_experts,
        "expert_weights_scale": float(cfg.routed_scaling_factor), "rope.dimension_count": rot,
        # config.json's scoring_func: sigmoid for V3, softmax for V2
        "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX),
    }
    if getattr(cfg, "n_group", None) is not None:
        md.update({"expert_group_count": cfg.n_group, "expert_group_used_count": cfg.topk_group})
    if v3 and cfg.norm_topk_prob:  # the converter writes the key only when true
        md["expert_weights_norm"] = True
    if cfg.q_lora_rank is not None:
        md["attention.q_lora_rank"] = cfg.q_lora_rank
    if split_kv_b:  # MLA as MQA: one shared head of the latent and the rope key
        md.update({"attention.head_count_kv": 1, "attention.key_length": rank + rot, "attention.value_length": rank,
                   "attention.key_length_mla": nope + rot, "attention.value_length_mla": cfg.v_head_dim})
    else:
        md.update({"attention.head_count_kv": cfg.num_attention_heads, "attention.key_length": nope + rot,
                   "attention.value_length": cfg.v_head_dim})
    if rope.get("rope_type") == "yarn":
        md.update({"rope.scaling.type": "yarn", "rope.scaling.factor": float(rope["factor"]),
                   "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
                   "rope.scaling.yarn_beta_fast": float(rope["beta_fast"]),
                   "rope.scaling.yarn_beta_slow": float(rope["beta_slow"]),
                   "rope.scaling.yarn_log_multiplier": 0.1 * rope["mscale_all_dim"]})
    return md


def tensors(cfg, sd: dict[str, np.ndarray], split_kv_b: bool = True) -> dict[str, np.ndarray]:
    """The state dict under llama.cpp's names (DeepseekV2Model.modify_tensors)."""
    heads, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
             "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
             "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp"}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out.update({f"{b}{g}.weight": sd[f"{p}{h}.weight"] for h, g in names.items() if f"{p}{h}.weight" in sd})
        kv_b = sd[p + "self_attn.kv_b_proj.weight"]
        if split_kv_b:  # per head: the key rows transposed, then the value rows
            per_head = kv_b.reshape(heads, nope + v, -1)
            out[b + "attn_k_b.weight"] = per_head[:, :nope].transpose(0, 2, 1)
            out[b + "attn_v_b.weight"] = per_head[:, nope:]
        else:
            out[b + "attn_kv_b.weight"] = kv_b
        if p + "mlp.experts.gate_up_proj" in sd:  # transformers' fused experts [E, 2I, H], gate rows first
            gate_up, n = sd[p + "mlp.experts.gate_up_proj"], cfg.moe_intermediate_size
            out.update({b + "ffn_gate_exps.weight": gate_up[:, :n], b + "ffn_up_exps.weight": gate_up[:, n:],
                        b + "ffn_down_exps.weight": sd[p + "mlp.experts.down_proj"]})
        if p + "mlp.gate.e_score_correction_bias" in sd:
            out[b + "exp_probs_b.bias"] = sd[p + "mlp.gate.e_score_correction_bias"]
    return out


def write(path, model, split_kv_b: bool = True, md: dict | None = None, drop: tuple[str, ...] = (),
          change: dict | None = None) -> None:
    """``model`` as a deepseek2 GGUF, float32; ``md`` overrides metadata, ``drop`` leaves tensors out,
    ``change`` maps a tensor name to a function of its array."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "deepseek2")
    for key, value in {**metadata(cfg, split_kv_b), **(md or {})}.items():
        name = f"deepseek2.{key}"
        if isinstance(value, bool):
            w.add_bool(name, value)
        elif isinstance(value, int):
            w.add_uint32(name, value)
        elif isinstance(value, float):
            w.add_float32(name, value)
        else:
            w.add_string(name, value)
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, array in tensors(cfg, sd, split_kv_b).items():
        if name not in drop:
            array = (change or {}).get(name, lambda a: a)(array)
            w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
