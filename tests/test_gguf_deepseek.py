"""DeepSeek-V2 / V2-Lite / V3 as llama.cpp's converter writes them (architecture deepseek2): tiny
random transformers models written to GGUF with the converter's names, metadata and changes (head
count kv 1 with the *_mla lengths and kv_b_proj split into attn_k_b / attn_v_b, or the older layout
with attn_kv_b; stacked experts; the interleaved RoPE rows left as DeepSeek wrote them), loaded by
rung with the transformers model's logits (float32, 1e-4) and the logits of rung loading the
Hugging Face folder. A broken or hostile deepseek2 file is refused in one line."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import rung
from hostile import run_bounded
from oracle import TOL, cached_decode_diff, hf_model, ids_for, max_logit_diff, save
from test_deepseek import v2_config, v3_config, with_correction_bias

SHAPES = ((1, 1), (2, 7), (3, 19))


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


@torch.no_grad()
def rung_diff(a, b) -> float:
    worst = 0.0
    for batch, t in SHAPES:
        ids = ids_for(a.config.vocab_size, batch, t)
        worst = max(worst, (a(ids) - b(ids)).abs().max().item())
    return worst


def check(reference, tmp_path, split_kv_b: bool = True):
    """The GGUF loads with transformers' logits, its cache path equals its full pass, and it is the
    model rung loads from the Hugging Face folder."""
    path = tmp_path / "model.gguf"
    write(path, reference, split_kv_b)
    model = rung.load_model(path)
    diff = max_logit_diff(reference, model, SHAPES)
    assert diff < TOL, f"logits differ from transformers by {diff}"
    assert cached_decode_diff(model) < TOL
    from_folder = rung.load_model(save(reference, tmp_path / "hf"))
    assert model.config.mla == from_folder.config.mla and model.config.moe == from_folder.config.moe
    assert rung_diff(model, from_folder) < 1e-6
    return model


V3_CASES = {
    # sigmoid routing over 4 groups of 2 with the correction bias, q_lora, the split attn_k_b / attn_v_b
    "grouped_sigmoid_router": (dict(), True),
    "older_attn_kv_b_layout": (dict(), False),
    # YaRN: llama.cpp keeps mscale_all_dim as yarn_log_multiplier (0.1 x) and folds it into the softmax scale
    "yarn_mscale_all_dim": (dict(rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.8,
        "mscale_all_dim": 0.8, "original_max_position_embeddings": 16}), True),
    "not_renormalised_unscaled": (dict(norm_topk_prob=False, routed_scaling_factor=1.0), True),
}


@pytest.mark.parametrize("case", V3_CASES)
def test_deepseek_v3_gguf_matches_transformers_and_the_hf_folder(case, tmp_path):
    extra, split = V3_CASES[case]
    model = check(with_correction_bias(hf_model(v3_config(**extra))), tmp_path, split)
    c = model.config
    assert c.model_type == "deepseek_v3" and c.moe.router == "sigmoid_group_topk" and c.moe.score_correction_bias
    assert (c.moe.num_groups, c.moe.topk_groups, c.mla.q_lora_rank) == (4, 2, 24)


V2_CASES = {
    # V2-Lite: no q_lora (one attn_q), greedy top-k of the softmax, two shared experts
    "lite_greedy_softmax": (dict(), True),
    "lite_older_attn_kv_b_layout": (dict(), False),
    # DeepSeek-V2: group_limited_greedy, which ranks a group by its best expert (as transformers)
    "group_limited_greedy_q_lora": (dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                         routed_scaling_factor=1.5), True),
}


@pytest.mark.parametrize("case", V2_CASES)
def test_deepseek_v2_gguf_matches_transformers_and_the_hf_folder(case, tmp_path):
    extra, split = V2_CASES[case]
    model = check(hf_model(v2_config(**extra)), tmp_path, split)
    c = model.config
    assert c.model_type == "deepseek_v2" and not c.moe.score_correction_bias and c.moe.shared_experts == 2


def test_deepseek_gguf_rope_rows_are_reordered_as_for_the_hf_folder(tmp_path):
    """llama.cpp rotates deepseek2 by adjacent pairs and the converter leaves DeepSeek's interleaved
    rows as they are: loading them without rung's reorder gives other logits (the reorder is needed)."""
    from rung.weights import keymaps

    reference = hf_model(v2_config())
    path = tmp_path / "model.gguf"
    write(path, reference)
    rows = keymaps._rope_rows
    try:
        keymaps._rope_rows = lambda *a: None  # as if the rows were taken as stored
        unordered = rung.load_model(path)
    finally:
        keymaps._rope_rows = rows
    assert max_logit_diff(reference, unordered, SHAPES) > 100 * TOL


# ---- broken and hostile files: one line, within a time and memory bound -------------------------


@pytest.fixture(scope="module")
def tiny_v3():
    return with_correction_bias(hf_model(v3_config(num_hidden_layers=2)))


HOSTILE = {
    # a latent of 2^30 would size kv_b_proj and the cache: refused against the tensor before any of that
    "absurd_kv_lora_rank": (dict(md={"attention.kv_lora_rank": 2**30}), ("attn_kv_a_mqa", "kv_lora_rank 1073741824")),
    # the rotary table is built from rope.dimension_count: checked against attn_kv_a_mqa first
    "absurd_rope_dimension": (dict(md={"rope.dimension_count": 2**30}), ("attn_kv_a_mqa", "rope.dimension_count")),
    "missing_first_attn_kv_a_mqa": (dict(drop=("blk.0.attn_kv_a_mqa.weight",)), ("attn_kv_a_mqa.weight is missing",)),
    "missing_later_attn_kv_a_mqa": (dict(drop=("blk.1.attn_kv_a_mqa.weight",)),
                                    ("tensor 'blk.1.attn_kv_a_mqa.weight' is missing", "kv_a_proj")),
    "missing_attn_v_b": (dict(drop=("blk.1.attn_v_b.weight",)), ("'blk.1.attn_v_b.weight' is missing",)),
    "mla_lengths_disagree": (dict(md={"attention.key_length": 7}), ("key_length", "kv_lora_rank + rope")),
    "unknown_gating_func": (dict(md={"expert_gating_func": 9}), ("expert_gating_func 9",)),
    "dense_layers_past_the_end": (dict(md={"leading_dense_block_count": 5}), ("leading_dense_block_count 5",)),
    "absurd_heads": (dict(md={"attention.head_count": 2**30}), ("attn_q_b",)),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_broken_deepseek_gguf_is_refused_in_one_line(case, tiny_v3, tmp_path):
    kwargs, needles = HOSTILE[case]
    path = tmp_path / "bad.gguf"
    write(path, tiny_v3, **kwargs)
    res = run_bounded(f"import rung; rung.load_model({str(path)!r})", seconds=30)
    res.assert_refused("bad.gguf", *needles)


def test_attn_k_b_of_the_wrong_shape_names_the_tensor(tiny_v3, tmp_path):
    from rung.weights.gguf import GGUFError

    path = tmp_path / "bad.gguf"
    write(path, tiny_v3, change={"blk.1.attn_k_b.weight": lambda w: w.transpose(0, 2, 1)})  # not transposed per head
    with pytest.raises(GGUFError, match=r"bad\.gguf: tensor 'blk\.1\.attn_k_b\.weight' has shape \[4, 12, 16\]"):
        rung.load_model(path)
