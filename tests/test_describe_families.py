"""Issue 21's presets: totals and active parameters within 1% of the published figures, and the KV
bytes per token each family's attention implies (bf16, a 4K context)."""

from __future__ import annotations

import pytest

from rung.config import ModelConfig
from rung.describe import describe

# name -> (published total, published active or None: dense), with where the figure is published
PUBLISHED = {
    "qwen2.5-0.5b": (0.49e9, None),  # Qwen2.5-0.5B model card: "Number of Parameters: 0.49B"
    "qwen2.5-7b": (7.61e9, None),  # Qwen2.5-7B model card: 7.61B
    "qwen2.5-72b": (72.7e9, None),  # Qwen2.5-72B model card: 72.7B
    "mistral-7b-v0.1": (7.24e9, None),  # Mistral-7B-v0.1 on the Hub: 7.24B params (safetensors)
    # Mistral AI, "Mixtral of experts" (2023-12-11): "46.7B total parameters but only uses 12.9B parameters per token"
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "phi-3.5-mini": (3.82e9, None),  # Phi-3.5-mini-instruct model card: "3.8B parameters"; Hub: 3.82B
    "gemma2-2b": (2.61e9, None),  # gemma-2-2b on the Hub: 2.61B params
    "gemma2-9b": (9.24e9, None),  # gemma-2-9b on the Hub: 9.24B params
    "olmo2-7b": (7.30e9, None),  # OLMo-2-1124-7B on the Hub: 7.3B params
    "smollm3-3b": (3.08e9, None),  # SmolLM3-3B on the Hub: 3.08B params
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_family_totals_and_active_parameters_match_the_published_figures(name):
    total, active = PUBLISHED[name]
    d = describe(name)
    assert d.total_params == pytest.approx(total, rel=0.01)
    if active is not None:  # Mistral's per-token figure counts the input table too (as Qwen's do)
        assert d.active_params + d.embedding_params == pytest.approx(active, rel=0.01)
    else:  # dense: a token reads every weight but the rows of the input table it does not use
        assert d.active_params == d.total_params - (0 if ModelConfig.from_preset(name).tie_word_embeddings
                                                    else d.embedding_params)


# K and V of every layer: 2 · kv_heads · head_dim · layers · 2 bytes (bf16), every window >= 4K here
KV_BYTES_PER_TOKEN = {
    "qwen2.5-0.5b": 2 * 2 * 64 * 24 * 2,  # GQA 14/2
    "qwen2.5-7b": 2 * 4 * 128 * 28 * 2,
    "qwen2.5-72b": 2 * 8 * 128 * 80 * 2,
    "mistral-7b-v0.1": 2 * 8 * 128 * 32 * 2,  # window 4096 on every layer: full at 4K
    "mixtral-8x7b": 2 * 8 * 128 * 32 * 2,
    "phi-3.5-mini": 2 * 32 * 96 * 32 * 2,  # MHA: 3x Mistral's per token
    "gemma2-2b": 2 * 4 * 256 * 26 * 2,
    "gemma2-9b": 2 * 8 * 256 * 42 * 2,
    "olmo2-7b": 2 * 32 * 128 * 32 * 2,  # MHA
    "smollm3-3b": 2 * 4 * 128 * 36 * 2,  # NoPE layers cache keys all the same
}


@pytest.mark.parametrize("name", sorted(KV_BYTES_PER_TOKEN))
def test_family_kv_bytes_per_token(name):
    assert describe(name, context=4096).kv_bytes_per_token == KV_BYTES_PER_TOKEN[name]


def test_windows_cap_the_kv_cache_of_mistral_and_half_of_gemma2_at_long_context():
    context = 32_768
    mistral, gemma = describe("mistral-7b-v0.1", context=context), describe("gemma2-2b", context=context)
    assert mistral.kv_bytes == 2 * 8 * 128 * 32 * 2 * 4096  # every layer holds at most its 4096 window
    assert gemma.kv_bytes == 2 * 4 * 256 * 2 * (13 * context + 13 * 4096)  # 13 local layers, 13 global


def test_arch_words_name_each_family_quirk():
    assert "scores capped at 50" in describe("gemma2-2b").attention
    assert "NoPE on 9/36 layers" in describe("smollm3-3b").positions
    assert "post only" in describe("olmo2-7b").norm
    assert "longrope" in describe("phi-3.5-mini").positions
    assert "4096 on all 32 layers" in describe("mistral-7b-v0.1").sliding_window


def test_rung_arch_shows_the_new_families_side_by_side(capsys):
    from rung.cli import main

    assert main(["arch", "mixtral-8x7b", "gemma2-9b", "olmo2-7b", "smollm3-3b", "phi-3.5-mini", "qwen2.5-72b"]) == 0
    out = capsys.readouterr().out
    for expected in ("8 (2 active)", "46.70 B", "12.75 B", "scores capped at 50", "post only", "NoPE on",
                     "longrope ×32", "GQA 64/8×128", "MHA 32/32×96"):
        assert expected in out, expected
