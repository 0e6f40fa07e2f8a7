"""Prefill attention: the rule that picks SDPA, the flash kernel or the packed kernel per step
(kernels/paged_attention.py's ``prefill_kernel``), and the flash kernel itself under Triton's
interpreter against its PyTorch reference."""

from __future__ import annotations


import pytest
import torch

from interpret import needs_interpreter, run_checks

from rung.kernels.paged_attention import (FLASH_MIN_TOKENS, SDPA_MIN_TOKENS, flash_config, paged_attention_ref,
                                          prefill_kernel, tokens_per_tile)


def test_fresh_long_prompts_take_sdpa():
    assert prefill_kernel([0], [SDPA_MIN_TOKENS], None, False, sdpa=True) == "sdpa"
    assert prefill_kernel([0, 0], [SDPA_MIN_TOKENS, 3], None, False, sdpa=True) == "sdpa"
    assert prefill_kernel([0], [8192], 8192, False, sdpa=True) == "sdpa"  # the window holds the whole chunk


def test_sdpa_is_never_chosen_where_it_would_be_wrong_or_has_no_keys():
    n = max(SDPA_MIN_TOKENS, 4096)
    assert prefill_kernel([8192], [n], None, False, sdpa=True) == "flash"  # continues from cached blocks
    assert prefill_kernel([0, 100], [n, n], None, False, sdpa=True) == "flash"  # one of them does
    assert prefill_kernel([0], [n], None, True, sdpa=True) == "flash"  # sinks
    assert prefill_kernel([0], [n], 128, False, sdpa=True) == "flash"  # a window shorter than the chunk
    assert prefill_kernel([0], [n], None, False, sdpa=False) == "flash"  # k and v already only in the pool


def test_short_chunks_take_the_packed_kernel():
    assert prefill_kernel([500], [FLASH_MIN_TOKENS - 1], None, False, sdpa=True) == "packed"
    assert prefill_kernel([0, 7], [5, 1], None, False, sdpa=True) == "packed"
    assert prefill_kernel([500, 9], [FLASH_MIN_TOKENS, 1], None, False, sdpa=True) == "flash"


def test_flash_tiles_match_the_kernel_config():
    for d in (64, 128, 256):
        for dt in (torch.bfloat16, torch.float32):
            assert tokens_per_tile(32, 8, d, False, flash=True, dtype=dt) == flash_config(d, dt)[0]
    assert tokens_per_tile(32, 8, 128, True, flash=True) == 1


def test_softcap_in_the_reference_caps_scores():
    # one query, two keys with scores 40 and 0: uncapped the first takes all the weight; capped at 5
    # the first squashes to 5·tanh(8), so the second keeps 1 / (1 + exp(5·tanh(8))) of it
    q = torch.tensor([[[1.0, 0.0]]])
    k_pool = torch.tensor([[[40.0, 0.0]], [[0.0, 0.0]]])
    v_pool = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    tables = torch.tensor([[0]])
    args = (q, k_pool, v_pool, tables, torch.tensor([0]), torch.tensor([1]), 2, None, None, 1.0)
    plain, capped = paged_attention_ref(*args), paged_attention_ref(*args, softcap=5.0)
    assert plain[0, 0, 1] < 1e-12
    assert torch.allclose(capped[0, 0, 1], 1 / (1 + torch.exp(5 * torch.tanh(torch.tensor(8.0)))), atol=1e-6)



@needs_interpreter
def test_flash_prefill_kernel_and_chunked_prefill_agree_with_references_under_the_interpreter():
    lines = run_checks("prefill_interpret_checks.py", timeout=300)
    assert lines[-1] == "prefill kernels agree with their references"
    assert sum(line.startswith("flash prefill") for line in lines) == 12
    assert any(line.startswith("chunked prefill sdpa → flash → packed") for line in lines)


def test_short_windows_keep_packed_tiles_until_chunks_are_long():
    # gpt-oss's 128-key layers: a flash tile of 128 queries reaches 255 keys, mostly masked
    assert prefill_kernel([900], [512], 128, True, sdpa=False) == "packed"
    assert prefill_kernel([900], [8192], 128, True, sdpa=False) == "flash"
    assert prefill_kernel([900], [512], 4096, False, sdpa=False) == "flash"


def _pool_and_chunks(starts_counts, window=None):
    from rung.config import ModelConfig
    from rung.engine.paged import Chunk, KVPool

    raw = dict(model_type="qwen3", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=8192,
               rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    if window:
        raw.update(use_sliding_window=True, sliding_window=window, layer_types=["sliding_attention", "full_attention"])
    config = ModelConfig.from_hf(raw)
    pool = KVPool(config, 300, 16, torch.float16)
    table = list(range(300))
    return pool, [Chunk([table] * len(pool.groups), s, n) for s, n in starts_counts]


def test_kernel_paths_store_prefill_keys_in_the_pool_and_sdpa_steps_keep_them():
    from rung.engine.paged import PagedStep

    pool, chunks = _pool_and_chunks([(0, SDPA_MIN_TOKENS)])
    assert PagedStep(pool, chunks, "cpu").kv_destination(0) is None  # SDPA reads this step's own k and v
    pool, chunks = _pool_and_chunks([(64, SDPA_MIN_TOKENS)])
    k_pool, v_pool, slots = PagedStep(pool, chunks, "cpu").kv_destination(1)
    assert k_pool is pool.keys[1] and v_pool is pool.values[1]
    assert slots.tolist() == list(range(64, 64 + SDPA_MIN_TOKENS))  # blocks 4.. of an identity table
    pool, chunks = _pool_and_chunks([(0, 3)])  # too short for SDPA: the kernel path, keys stored directly
    assert PagedStep(pool, chunks, "cpu").kv_destination(0) is not None


def test_a_window_shorter_than_the_prompt_sends_its_layers_to_the_kernel():
    from rung.engine.paged import PagedStep

    pool, chunks = _pool_and_chunks([(0, SDPA_MIN_TOKENS)], window=128)
    step = PagedStep(pool, chunks, "cpu")
    assert pool.groups[pool.group_of[0]].window == 128 and pool.groups[pool.group_of[1]].window is None
    assert step.kv_destination(0) is not None and step.kv_destination(1) is None
