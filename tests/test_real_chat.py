"""Real weights through the whole stack: chat template → tokenizer → engine → greedy tokens, equal
to transformers running the same dequantized GGUF weights; perplexity within 0.5%."""

from __future__ import annotations

import math

import pytest
import torch

from rung.engine.sampling_params import SamplingParams
from rung.llm import LLM
from test_gguf_convert import hf_from_gguf, one_thread  # noqa: F401 (fixture)
from test_gguf_real import hf_greedy

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."}],
    [{"role": "user", "content": "Translate 'good morning' into German."},
     {"role": "assistant", "content": "Guten Morgen."}, {"role": "user", "content": "And into French?"}],
    [{"role": "user", "content": "Explain in one sentence why the sky is blue."}],
]
TEXT = ("The Eiffel Tower was built for the 1889 World's Fair in Paris. At first many artists criticised its design, "
        "but it soon became the symbol of the city. It is about 330 metres tall and was the tallest structure in the "
        "world until 1930. Every year millions of visitors climb its stairs or take the lifts to the top.")


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return math.exp(nll.item())


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_chat_greedy_and_perplexity_match_transformers(name, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    llm = LLM(name)
    reference = hf_from_gguf(llm.path)
    chats = CHATS if name == "smollm2-135m" else CHATS[:3]  # Gemma's 262k-row head makes HF decoding slow
    outs = llm.chat(chats, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))  # one batch
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        expected = hf_greedy(reference, ids, 32)[0].tolist()
        assert out.outputs[0].token_ids == expected

    ids = torch.tensor([llm.tokenizer.encode(TEXT)])
    with torch.no_grad():
        ours, theirs = perplexity(llm.model(ids), ids), perplexity(reference(ids).logits, ids)
    assert abs(ours / theirs - 1) < 0.005, (ours, theirs)
