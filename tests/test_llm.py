"""rung.LLM on a tiny random model with a real byte-level BPE tokenizer: the offline API's contract."""

from __future__ import annotations

import pytest
import torch

import rung
from rung.engine.sampling_params import SamplingParams
from rung.llm import LLM

from oracle import tiny_chat_model

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(str(folder))


def greedy_reference(model, ids, steps):
    ids = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(ids)[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_greedy_generation_equals_argmax_of_full_forward_passes(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    [out] = llm.generate("Hello world", params)
    assert out.outputs[0].token_ids == greedy_reference(llm.model, out.prompt_token_ids, 12)
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_stream_deltas_concatenate_to_the_full_text(llm):
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=20, ignore_eos=True)
    deltas = list(llm.stream("the quick", params))
    [full] = llm.generate("the quick", params)
    assert "".join(d.text for d in deltas) == full.outputs[0].text
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_seed_reproduces_and_n_samples_share_the_prompt(llm):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=10, n=3, ignore_eos=True)
    a, b = llm.generate("fox", params)[0], llm.generate("fox", params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # three draws, not one copied


def test_stop_string_ends_the_text_before_it(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    text = llm.generate("Hello", params)[0].outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.text == text[: text.index(stop)] and out.finish_reason == "stop" and out.stop_reason == stop


def test_eos_token_stops_generation(llm, folder):
    eos = llm.tokenizer.token_to_id("<|im_end|>")
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    free = llm.generate("Bonjour", params)[0].outputs[0].token_ids
    first = free[4]
    out = llm.generate("Bonjour", SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[first]))[0].outputs[0]
    assert out.token_ids == free[: free.index(first) + 1] and out.finish_reason == "stop" and out.stop_reason == first
    assert eos in llm.tokenizer.eos_token_ids


def test_chat_renders_the_template_and_answers(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    text = llm.apply_chat_template(messages)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    [out] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5))
    assert out.prompt_token_ids == llm.tokenizer.encode(text, add_special_tokens=False)
    assert 1 <= len(out.outputs[0].token_ids) <= 5


def test_logprobs_are_reported_per_token(llm):
    out = llm.generate("fox", SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 4 and all(len(lp) == 3 for lp in out.logprobs)  # greedy pick is among the top 3
    assert out.cumulative_logprob == pytest.approx(sum(lp[t] for lp, t in zip(out.logprobs, out.token_ids)))


def test_prompt_longer_than_the_context_is_refused(llm):
    with pytest.raises(ValueError, match="does not fit the model's context of 96 tokens"):
        llm.generate([5] * 120)


def test_max_tokens_is_capped_by_the_context(llm):
    out = llm.generate([5] * 90, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_load_model_and_llm_share_the_model_path(folder):
    assert isinstance(rung.load_model(str(folder)), torch.nn.Module)


def test_reset_prefix_cache_makes_a_repeated_prompt_compute_whole(llm):
    """vLLM's ``num_cached_tokens`` and ``reset_prefix_cache``: a repeated prompt comes from the
    cache (whole blocks of it), and after a reset it is computed again, with the same tokens."""
    prompt = list(range(3, 40))
    params = SamplingParams(max_tokens=4, temperature=0)
    first = llm.generate([prompt], params)[0]
    again = llm.generate([prompt], params)[0]
    block = llm.engine.config.block_size
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == (len(prompt) - 1) // block * block > 0
    llm.reset_prefix_cache()
    after = llm.generate([prompt], params)[0]
    assert after.num_cached_tokens == 0
    assert after.outputs[0].token_ids == again.outputs[0].token_ids == first.outputs[0].token_ids
