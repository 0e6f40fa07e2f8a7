"""DeepSeek-V2 / V2-Lite / V3 as llama.cpp's converter writes them (architecture deepseek2): tiny
random transformers models written to GGUF with the converter's names, metadata and changes (head
count kv 1 with the *_mla lengths and kv_b_proj split into attn_k_b / attn_v_b, or the older layout
with attn_kv_b; stacked experts; the interleaved RoPE rows left as DeepSeek wrote them), loaded by
rung with the transformers model's logits (float32, 1e-4) and the logits of rung loading the
Hugging Face folder. A broken or hostile deepseek2 file is refused in one line."""

from __future__ import annotations

import pytest
import torch

import rung
from deepseek_gguf import write
from hostile import run_bounded
from oracle import TOL, cached_decode_diff, hf_model, ids_for, max_logit_diff, save
from test_deepseek import v2_config, v3_config, with_correction_bias

SHAPES = ((1, 1), (2, 7), (3, 19))


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


def test_deepseek_gguf_at_int8_is_the_hf_folder_at_int8(tiny_v3, tmp_path):
    """Packing reads the GGUF's rules (kv_b_proj joined, RoPE rows reordered) as the folder's: the
    same packed layers, the same logits."""
    write(tmp_path / "model.gguf", tiny_v3)
    folder = save(tiny_v3, tmp_path / "hf")
    a, b = rung.load_model(f"{tmp_path / 'model.gguf'}@int8"), rung.load_model(f"{folder}@int8")
    assert type(a.layers[1].attn.q_a_proj).__name__ == "PackedLinear"
    assert rung_diff(a, b) < 1e-6
