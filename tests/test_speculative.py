"""Speculative decoding: greedy output identical to plain greedy, sampled output distributed as the
target's, acceptance reported, and no block lost to a rejected guess."""

from __future__ import annotations

import copy
import itertools
from collections import Counter

import pytest
import torch

from rung.engine.engine import Engine, EngineConfig
from rung.engine.sampling_params import SamplingParams
from rung.engine.sequence import Sequence
from rung.engine.speculative import DraftModelProposer, NgramProposer, accept
from rung.text import load_tokenizer
from rung.weights.loader import load_model

from oracle import tiny_chat_model
from test_engine import GREEDY, all_blocks_free, prompts


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """Another random model with the same tokenizer and a single layer: a draft that rarely agrees."""
    folder = tiny_chat_model(tmp_path_factory.mktemp("small"), num_hidden_layers=1, hidden_size=32,
                             max_position_embeddings=256)
    return load_model(folder), load_tokenizer(folder)


def spec_engine(pair, speculative=None, draft=None, k=4, **config):
    model, tokenizer = pair
    config = EngineConfig(**{"block_size": 4, "num_blocks": 96, "speculative": speculative,
                             "num_speculative_tokens": k, **config})
    return Engine(model, tokenizer, config, draft_model=draft)


def mixed_requests(vocab):
    """Random prompts and a repetitive one, with greedy parameters that touch every per-token rule
    (penalties, min_tokens, logprobs). The last request copies: a repetition penalty below 1 makes
    a random model loop over what it has seen, which prompt lookup then finds."""
    ps = prompts(6, vocab) + [[5, 6, 7, 8, 9, 10] * 5]
    params = [GREEDY,
              SamplingParams(temperature=0, max_tokens=17, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, frequency_penalty=0.8, presence_penalty=0.3,
                             ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=14, min_tokens=6),
              SamplingParams(temperature=0, max_tokens=9, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, repetition_penalty=0.5, ignore_eos=True)]
    return list(zip(ps, params))


def outputs(engine, requests):
    out = engine.run(requests)
    return [(s[0].output_ids, s[0].finish_reason, s[0].detok.tokenizer.decode(s[0].output_ids)) for s in out.values()]


def draft_for(name, request):
    return {"none": None, "self": request.getfixturevalue("llama")[0],
            "other": request.getfixturevalue("small_llama")[0]}[name]


# ---- greedy: identical to plain decoding ----------------------------------------------------------


@pytest.mark.parametrize("which", ["llama", "gpt_oss"])
def test_ngram_speculative_greedy_equals_plain_greedy(which, request):
    pair = request.getfixturevalue(which)
    requests = mixed_requests(pair[0].config.vocab_size)
    plain = outputs(spec_engine(pair), requests)
    engine = spec_engine(pair, "ngram", max_batch_tokens=48)  # guesses share the budget with chunked prefills
    assert outputs(engine, requests) == plain
    assert engine.stats["draft_tokens"] > 0 and engine.acceptance_rate > 0
    assert engine.stats["acceptance_rate"] == engine.acceptance_rate
    assert all_blocks_free(engine)
    print(f"\nn-gram acceptance ({which}): {engine.acceptance_rate:.2f} "
          f"of {engine.stats['draft_tokens']} guesses, {engine.stats['steps']} steps")


@pytest.mark.parametrize("draft", ["self", "other"])
def test_draft_model_speculative_greedy_equals_plain_greedy(draft, llama, request):
    requests = mixed_requests(llama[0].config.vocab_size)
    plain_engine = spec_engine(llama)
    plain = outputs(plain_engine, requests)
    engine = spec_engine(llama, "draft", draft_for(draft, request))
    assert outputs(engine, requests) == plain
    if draft == "self":  # the target guessing for itself: every guess is its own argmax
        assert engine.acceptance_rate > 0.95 and engine.stats["steps"] < plain_engine.stats["steps"] / 2
    else:
        assert engine.acceptance_rate < 0.5
    assert all_blocks_free(engine) and not engine.proposer._states
    print(f"\ndraft model ({draft}) acceptance: {engine.acceptance_rate:.2f} of {engine.stats['draft_tokens']} "
          f"guesses, {engine.stats['steps']} steps (plain: {plain_engine.stats['steps']})")


def test_a_gpt_oss_target_with_a_llama_draft_gives_plain_greedy(gpt_oss, llama):
    requests = mixed_requests(gpt_oss[0].config.vocab_size)
    engine = spec_engine(gpt_oss, "draft", llama[0])  # sliding-window target, full-attention draft
    assert outputs(engine, requests) == outputs(spec_engine(gpt_oss), requests)
    assert all_blocks_free(engine)


def stream(engine, prompt, params):
    """One request step by step: its text, tokens, finish and stop reasons, and the most tokens
    one step gave."""
    engine.add_request(prompt, params)
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    tokens = list(itertools.chain(*(d.token_ids for d in deltas)))
    text = "".join(d.text for d in deltas)
    return (text, tokens, deltas[-1].finish_reason, deltas[-1].stop_reason), max(len(d.token_ids) for d in deltas)


@pytest.mark.parametrize("stop", ["token", "string", "length"])
def test_a_stop_inside_accepted_guesses_drops_the_rest(stop, llama):
    prompt = prompts(1, llama[0].config.vocab_size, 12, 13)[0]
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    (text, ids, _, _), _ = stream(spec_engine(llama), prompt, plain)
    # a stop in the middle of what a self-draft accepts in one step (k = 4: five tokens a step)
    i = next(i for i in range(6, 20) if ids[i] not in ids[:i])
    params = {"token": SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[ids[i]]),
              "string": SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=text[len(text) // 2:][:3]),
              "length": SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)}[stop]
    want, _ = stream(spec_engine(llama), prompt, params)
    engine = spec_engine(llama, "draft", llama[0])
    got, most = stream(engine, prompt, params)
    assert got == want and len(got[1]) < 20 and most > 1
    assert all_blocks_free(engine) and not engine.proposer._states


# ---- sampling: the target's distribution, exactly -------------------------------------------------


def p_value(counts: torch.Tensor, probs: torch.Tensor, pool_below: float = 5.0) -> float:
    """Pearson's chi-square test of counts [V] against probs [V]; cells expecting fewer than
    ``pool_below`` draws are pooled. Nothing may fall outside the support."""
    n = counts.sum()
    expected = probs.double() * n
    assert counts[expected == 0].sum() == 0, "a token outside the target's support was emitted"
    small = (expected > 0) & (expected < pool_below)
    big = expected >= pool_below
    e = torch.cat([expected[big], expected[small].sum()[None]])
    o = torch.cat([counts.double()[big], counts.double()[small].sum()[None]])
    if e[-1] == 0:
        e, o = e[:-1], o[:-1]
    stat = ((o - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor((len(e) - 1) / 2, dtype=torch.float64), stat / 2))


P = torch.tensor([[0.10, 0.40, 0.20, 0.25, 0.05],
                  [0.30, 0.05, 0.05, 0.30, 0.30],
                  [0.15, 0.15, 0.40, 0.15, 0.15]])  # target rows: after 0, 1 and 2 accepted guesses
Q = torch.tensor([[0.30, 0.10, 0.40, 0.10, 0.10],
                  [0.05, 0.50, 0.05, 0.20, 0.20]])  # the draft's


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_accept_emits_every_token_with_the_target_distribution(draft):
    g = torch.Generator().manual_seed(0)
    draws, emitted = 20_000, [torch.zeros(5) for _ in range(3)]
    accepted_first = 0
    if draft == "model":  # guesses drawn from q; else a deterministic guess (q one-hot)
        all_guesses = torch.multinomial(Q, draws, replacement=True, generator=g).T.tolist()  # [draws, 2]
    for i in range(draws):
        guesses = all_guesses[i] if draft == "model" else [1, 3]
        out = accept(P, guesses, Q if draft == "model" else None, g)
        assert 1 <= len(out) <= 3 and out[:-1] == guesses[: len(out) - 1]
        accepted_first += len(out) > 1
        for j, token in enumerate(out):
            emitted[j][token] += 1
    for j in range(3):  # the token at place j, given the ones before it, is distributed as P[j]
        assert p_value(emitted[j], P[j]) > 1e-3
        assert 0.5 * (emitted[j] / emitted[j].sum() - P[j]).abs().sum() < 0.03
    # the chance that the first guess is kept: sum(min(p, q)) (Leviathan et al., section 3.1)
    expected = torch.minimum(P[0], Q[0]).sum() if draft == "model" else P[0, 1]
    assert abs(accepted_first / draws - float(expected)) < 0.015


def test_greedy_accept_keeps_guesses_while_they_are_the_argmax():
    target = torch.eye(5)[[2, 4, 1, 0]]  # one-hot rows: the target's greedy tokens 2, 4, 1, 0
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert accept(target, [2, 4, 3], None, g, greedy=True) == [2, 4, 1]
    assert accept(target, [2, 4, 1], torch.full((3, 5), 0.2), g, greedy=True) == [2, 4, 1, 0]
    assert accept(target, [0, 4, 1], None, g, greedy=True) == [2]
    assert torch.equal(g.get_state(), state)  # greedy draws nothing


def test_speculative_sampling_through_the_engine_matches_the_model_distribution(llama):
    """Temperature 1, top-k 5; a draft that is the target with perturbed weights, so guesses are
    often but not always kept. Three tokens: the first sampled plainly, then a step verifying one
    guess gives the second (the kept guess, or the correction) and the third (the bonus token, or
    a plain sample after a correction). Their joint frequencies must follow the target's exact
    distribution, computed from its logits."""
    model = llama[0]
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    prompt, top_k = [5, 6, 7, 8, 9] * 3, 5

    def probs_after(context):  # softmax over the model's 5 best logits
        with torch.no_grad():
            logits = model(torch.tensor([context]))[0, -1]
        return torch.softmax(logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf")), -1)

    exact: dict[tuple[int, ...], float] = {}
    p1 = probs_after(prompt)
    for a in p1.nonzero().flatten().tolist():
        p2 = probs_after(prompt + [a])
        for b in p2.nonzero().flatten().tolist():
            p3 = probs_after(prompt + [a, b])
            for c in p3.nonzero().flatten().tolist():
                exact[(a, b, c)] = float(p1[a] * p2[b] * p3[c])

    engine = spec_engine(llama, "draft", draft, k=1, num_blocks=4096, max_seqs=256, max_batch_tokens=2048)
    params = SamplingParams(temperature=1.0, top_k=top_k, max_tokens=3, ignore_eos=True, n=50)
    out = engine.run([(prompt, params)] * 40)
    counts = Counter(tuple(s.output_ids) for seqs in out.values() for s in seqs)
    assert sum(counts.values()) == 2000 and set(counts) <= set(exact)
    cells = sorted(exact)
    assert p_value(torch.tensor([float(counts[c]) for c in cells]), torch.tensor([exact[c] for c in cells])) > 1e-3
    assert 0.1 < engine.acceptance_rate < 0.9  # both kept guesses and corrections were exercised
    assert all_blocks_free(engine) and not engine.proposer._states
    print(f"\nperturbed draft at temperature 1: acceptance {engine.acceptance_rate:.2f}")


# ---- proposers -----------------------------------------------------------------------------------


def sequence(prompt, output=(), params=GREEDY, seed=0, request_id="r"):
    return Sequence(request_id, 0, list(prompt), params, torch.Generator().manual_seed(seed), 0, None, None,
                    output_ids=list(output))


def test_ngram_proposes_what_followed_the_latest_earlier_occurrence():
    ngram = NgramProposer(k=3)
    assert ngram.propose(sequence([1, 2, 3, 4, 9, 1, 2, 3])).tokens == [4, 9, 1]  # 3-gram [1, 2, 3]
    assert ngram.propose(sequence([7, 1, 5, 7, 1, 6, 0], [7, 1])).tokens == [6, 0, 7]  # the latest [7, 1]
    assert ngram.propose(sequence([4, 5, 6, 7])).tokens == []  # nothing repeats
    assert ngram.propose(sequence([1, 2, 1, 2]), limit=1).tokens == [1]
    assert NgramProposer(k=3, min_ngram=2).propose(sequence([1, 2, 3, 1])).tokens == []


@pytest.mark.parametrize("kept", [0, 2, 4])
def test_draft_cache_rolls_back_to_what_a_fresh_draft_proposes(kept, llama):
    model = llama[0]
    params = SamplingParams(temperature=1.0, max_tokens=40)
    prompt = prompts(1, model.config.vocab_size, 10, 11)[0]
    proposer = DraftModelProposer(model, k=4)
    seq = sequence(prompt, [3], params)
    first = proposer.propose(seq)
    # the target kept `kept` guesses, then gave a token of its own
    seq.output_ids += first.tokens[:kept] + [(first.tokens[kept] + 1) % 300 if kept < 4 else 17]
    seq.generator.manual_seed(1)
    again = proposer.propose(seq)
    fresh = DraftModelProposer(model, k=4).propose(sequence(prompt, seq.output_ids, params, seed=1))
    assert again.tokens == fresh.tokens
    assert (again.probs - fresh.probs).abs().max() < 1e-5
    proposer.drop(seq)
    assert not proposer._states


# ---- blocks: nothing leaks ----------------------------------------------------------------------


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_with_speculation_loses_nothing(speculative, mode, llama):
    ps = prompts(8, llama[0].config.vocab_size, 10, 20)
    ps[0] = [5, 6, 7, 8] * 4  # something for prompt lookup to find
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = outputs(spec_engine(llama), [(p, params) for p in ps])
    engine = spec_engine(llama, speculative, llama[0] if speculative == "draft" else None, num_blocks=24,
                         preempt=mode, prefix_caching=False)  # far too few for 8 at once
    assert outputs(engine, [(p, params) for p in ps]) == want
    assert engine.scheduler.preemptions > 0 and engine.stats["accepted_tokens"] > 0
    assert all_blocks_free(engine)


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_the_prefix_cache_after_speculation_holds_only_accepted_tokens(speculative, llama, small_llama):
    """Blocks filled by a speculative run (guesses rejected at almost every step) are found by a
    later request that continues its output, and give the tokens a fresh engine gives."""
    prompt = [5, 6, 7, 8, 9, 10] * 2
    params = SamplingParams(temperature=0, max_tokens=30, repetition_penalty=0.5, ignore_eos=True)
    engine = spec_engine(llama, speculative, small_llama[0] if speculative == "draft" else None)
    [first] = engine.run([(prompt, params)]).values()
    assert engine.stats["draft_tokens"] > engine.stats["accepted_tokens"]  # some guesses were rejected
    follow = prompt + first[0].output_ids[:21]  # 33 tokens: 8 full blocks of 4 can come from the cache
    [second] = engine.run([(follow, GREEDY)]).values()
    assert second[0].cached_tokens == 32
    assert second[0].output_ids == outputs(spec_engine(llama), [(follow, GREEDY)])[0][0]
    assert all_blocks_free(engine)


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_cancelled_and_finished_speculative_requests_free_every_block(speculative, llama, small_llama):
    engine = spec_engine(llama, speculative, small_llama[0] if speculative == "draft" else None)
    ps = prompts(5, llama[0].config.vocab_size)
    ps[1] = [9, 8, 7] * 6
    ids = [engine.add_request(p, SamplingParams(temperature=0.7, seed=i, max_tokens=20, n=2)) for i, p in enumerate(ps)]
    held = engine.add_request(ps[2], SamplingParams(n=3))
    engine.abort(held)  # samples 2 and 3 were still held back, never queued
    for _ in range(3):
        engine.step()
    engine.abort(ids[0])
    engine.abort(ids[3])
    while engine.has_unfinished():
        engine.step()
    assert engine.stats["draft_tokens"] > 0
    assert all_blocks_free(engine)
    if speculative == "draft":
        assert not engine.proposer._states


def test_speculation_settings_are_checked(llama, small_llama):
    with pytest.raises(ValueError, match="needs Engine"):
        spec_engine(llama, "draft")
    with pytest.raises(ValueError, match="speculative must be"):
        spec_engine(llama, "medusa")
    with pytest.raises(ValueError, match="is not 'draft'"):
        spec_engine(llama, None, small_llama[0])
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        spec_engine(llama, "ngram", k=0)
