"""The paged, continuously batched engine: same tokens as one request alone, no block ever lost."""

from __future__ import annotations

import pytest
import torch

from rung.engine.engine import Engine, EngineConfig, RequestError
from rung.engine.paged import Chunk, KVPool, PagedStep
from rung.engine.sampling_params import SamplingParams

from oracle import TOL, ids_for

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def engine_for(pair, **config):
    model, tokenizer = pair
    return Engine(model, tokenizer, EngineConfig(**{"block_size": 4, "num_blocks": 64, **config}))


def prompts(n, vocab, lo=3, hi=40):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [ids_for(vocab, 1, length, seed=i)[0].tolist() for i, length in enumerate(lengths)]


def alone(pair, prompt, params=GREEDY):
    engine = engine_for(pair)
    [seqs] = engine.run([(prompt, params)]).values()
    return seqs[0].output_ids


def all_blocks_free(engine):
    return engine.free_blocks() == [engine.pool.num_blocks] * len(engine.pool.groups)


@pytest.mark.parametrize("which", ["llama", "gpt_oss"])
def test_batch_of_16_mixed_lengths_equals_each_request_alone(which, request):
    pair = request.getfixturevalue(which)
    ps = prompts(16, pair[0].config.vocab_size)
    engine = engine_for(pair, max_batch_tokens=48)  # long prompts are prefilled in chunks beside decodes
    out = engine.run([(p, GREEDY) for p in ps])
    for p, seqs in zip(ps, out.values()):
        assert seqs[0].output_ids == alone(pair, p)
    assert all_blocks_free(engine)


def test_a_request_joining_a_running_batch_midway_gets_the_same_tokens(llama):
    ps = prompts(6, llama[0].config.vocab_size)
    engine = engine_for(llama)
    first = [engine.add_request(p, GREEDY) for p in ps[:3]]
    for _ in range(4):
        engine.step()
    late = [engine.add_request(p, GREEDY) for p in ps[3:]]
    seqs = {r: engine._sequences[r][0] for r in first + late}
    while engine.has_unfinished():
        engine.step()
    for p, r in zip(ps, first + late):
        assert seqs[r].output_ids == alone(llama, p)


@pytest.mark.parametrize("which", ["llama", "gpt_oss"])
def test_paged_attention_equals_the_contiguous_reference(which, request):
    model, _ = request.getfixturevalue(which)
    pool = KVPool(model.config, num_blocks=32, block_size=4, dtype=torch.float32)
    a, b = ids_for(model.config.vocab_size, 1, 13, seed=3)[0], ids_for(model.config.vocab_size, 1, 9, seed=4)[0]
    # a: 13 prompt tokens in blocks 0..3; b: 9 tokens in blocks 10..12 (non-contiguous on purpose)
    tables_a = [[0, 1, 2, 3] for _ in pool.groups]
    tables_b = [[10, 12, 11] for _ in pool.groups]
    with torch.no_grad():
        step = PagedStep(pool, [Chunk(tables_a, 0, 12), Chunk(tables_b, 0, 8)], torch.device("cpu"))
        model.hidden_states(torch.cat([a[:12], b[:8]])[None], step)
        decode = PagedStep(pool, [Chunk(tables_a, 12, 1), Chunk(tables_b, 8, 1)], torch.device("cpu"))
        got = model.logits(model.hidden_states(torch.stack([a[12], b[8]])[None], decode))[0]
        want = torch.stack([model(a[None])[0, -1], model(b[None])[0, -1]])
    assert (got - want).abs().max() < TOL


def test_prefix_cache_hit_skips_the_prefill_and_gives_the_same_tokens(llama):
    engine = engine_for(llama)
    system = prompts(1, llama[0].config.vocab_size, 30, 31)[0]  # 30 shared tokens: 7 full blocks of 4
    first = engine.run([(system + [5, 6], GREEDY)])
    assert engine.stats["cached_prompt_tokens"] == 0
    second = engine.run([(system + [7, 8, 9], GREEDY)])
    assert engine.stats["cached_prompt_tokens"] == 28
    [seqs] = second.values()
    assert seqs[0].cached_tokens == 28 and seqs[0].output_ids == alone(llama, system + [7, 8, 9])
    assert list(first.values())[0][0].output_ids == alone(llama, system + [5, 6])
    assert all_blocks_free(engine)  # cached blocks are evictable, so they count as available


def test_preemption_by_recompute_and_by_swap_loses_nothing(llama):
    ps = prompts(8, llama[0].config.vocab_size, 10, 20)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for mode in ("recompute", "swap"):
        engine = engine_for(llama, num_blocks=24, preempt=mode, prefix_caching=False)  # far too few for 8 at once
        out = engine.run([(p, params) for p in ps])
        assert engine.scheduler.preemptions > 0
        for p, seqs in zip(ps, out.values()):
            assert seqs[0].output_ids == alone(llama, p, params)
        assert all_blocks_free(engine)


def test_cancelled_and_finished_requests_free_every_block(gpt_oss):
    engine = engine_for(gpt_oss)
    ps = prompts(5, gpt_oss[0].config.vocab_size)
    ids = [engine.add_request(p, SamplingParams(temperature=0.7, seed=i, max_tokens=20, n=2)) for i, p in enumerate(ps)]
    for _ in range(3):
        engine.step()
    engine.abort(ids[0])
    engine.abort(ids[3])
    while engine.has_unfinished():
        engine.step()
    assert all_blocks_free(engine)


def test_paused_request_is_offloaded_to_cpu_and_resumes_identically(llama):
    prompt = prompts(1, llama[0].config.vocab_size, 20, 21)[0]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engine = engine_for(llama, prefix_caching=False)
    rid = engine.add_request(prompt, params)
    seq = engine._sequences[rid][0]
    for _ in range(5):
        engine.step()
    engine.pause(rid)
    assert all_blocks_free(engine) and seq.swapped is not None
    engine.resume(rid)
    while engine.has_unfinished():
        engine.step()
    assert seq.output_ids == alone(llama, prompt, params)


def test_seeded_sampled_request_is_reproducible_in_any_batch(llama):
    ps = prompts(4, llama[0].config.vocab_size)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=12, ignore_eos=True)
    alone_tokens = alone(llama, ps[0], params)
    engine = engine_for(llama)
    out = engine.run([(ps[0], params)] + [(p, SamplingParams(temperature=1.0, max_tokens=12)) for p in ps[1:]])
    assert list(out.values())[0][0].output_ids == alone_tokens


def test_sliding_window_blocks_are_recycled(gpt_oss):
    engine = engine_for(gpt_oss, prefix_caching=False)
    prompt = prompts(1, gpt_oss[0].config.vocab_size, 40, 41)[0]
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    seq = engine._sequences[rid][0]
    while not seq.output_ids or len(seq.output_ids) < 25:
        engine.step()
    full, sliding = [engine.pool.groups.index(g) for g in sorted(engine.pool.groups, key=lambda g: g.window or 0)]
    live = lambda g: sum(b is not None for b in seq.tables[g])
    assert live(full) == -(-seq.num_computed // 4)  # every computed position keeps its block
    assert live(sliding) <= 3  # a 5-token window spans at most 3 blocks of 4


def test_requests_that_cannot_fit_are_refused_with_a_reason(llama):
    engine = engine_for(llama, num_blocks=8)
    with pytest.raises(RequestError, match="needs 10 KV blocks; the cache holds 8"):
        engine.add_request([1] * 30, SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="does not fit the model's context of 256 tokens"):
        engine.add_request([1] * 300)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([])


# ---- a failure is as small as its cause -----------------------------------------------------------


class Grammar:
    """A constraint factory whose grammar allows nothing (``broken=False``) or raises (``broken=True``)."""

    def __init__(self, vocab: int, broken: bool):
        self.vocab, self.broken = vocab, broken

    def __call__(self):
        return self

    def allowed(self, output_ids):
        if self.broken:
            raise ValueError("the grammar broke")
        return torch.zeros(self.vocab, dtype=torch.bool)


def test_a_sequence_with_nan_logits_fails_alone_and_the_batch_goes_on(llama):
    vocab = llama[0].config.vocab_size
    ps = prompts(3, vocab)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
    engine = engine_for(llama, cpu_decode=False)
    sample = engine._sample  # the poisoned request's rows are NaN, as from a model that overflowed
    engine._sample = lambda seq, row: sample(seq, torch.full_like(row, float("nan")) if seq.request_id == "bad" else row)
    good = engine.add_request(ps[0], GREEDY)
    other = engine.add_request(ps[1], sampled)
    engine.add_request(ps[2], SamplingParams(temperature=0.8, max_tokens=10), request_id="bad")
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    [failed] = [d for d in deltas if d.request_id == "bad"]
    assert failed.finish_reason == "error" and "every logit is -inf or NaN" in failed.error
    tokens = {rid: [t for d in deltas if d.request_id == rid for t in d.token_ids] for rid in (good, other)}
    assert tokens[good] == alone(llama, ps[0]) and tokens[other] == alone(llama, ps[1], sampled)
    assert all_blocks_free(engine) and engine.failed_steps == 0


def test_a_greedy_batch_of_nan_rows_fails_its_sequences_not_the_engine(llama):
    engine = engine_for(llama, cpu_decode=False)
    model = engine.model
    logits = model.logits
    model.logits = lambda hidden: torch.full_like(logits(hidden), float("nan"))  # the batched argmax would pick a NaN
    ps = prompts(3, llama[0].config.vocab_size)
    out = engine.run([(p, GREEDY) for p in ps[:2]])
    assert [seqs[0].finish_reason for seqs in out.values()] == ["error", "error"]
    assert all(not seqs[0].output_ids for seqs in out.values()) and all_blocks_free(engine)
    del model.logits  # the model recovers: the same engine serves the next request as a fresh one would
    [seqs] = engine.run([(ps[2], GREEDY)]).values()
    assert seqs[0].output_ids == alone(llama, ps[2]) and all_blocks_free(engine)


@pytest.mark.parametrize("broken", [False, True], ids=["allows-nothing", "raises"])
def test_a_grammar_that_fails_ends_its_sequence_only(llama, broken):
    vocab = llama[0].config.vocab_size
    ps = prompts(2, vocab)
    engine = engine_for(llama)
    for params in (SamplingParams(temperature=0, max_tokens=10), SamplingParams(temperature=1.0, max_tokens=10)):
        out = engine.run([(ps[0], GREEDY), (ps[1], SamplingParams(**{**vars(params), "constraint": Grammar(vocab, broken)}))])
        good, bad = (seqs[0] for seqs in out.values())
        assert good.output_ids == alone(llama, ps[0]) and good.finish_reason == "length"
        assert bad.finish_reason == "error" and not bad.output_ids
        assert all_blocks_free(engine)


def test_a_failed_forward_pass_fails_its_step_and_the_engine_serves_on(llama):
    engine = engine_for(llama, cpu_decode=False)
    ps = prompts(3, llama[0].config.vocab_size)
    model, calls = engine.model, []
    forward = model.hidden_states

    def fails_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return forward(*args)

    model.hidden_states = fails_third
    a, b = engine.add_request(ps[0], GREEDY), engine.add_request(ps[1], GREEDY)
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
        assert engine.failed_steps <= 1
    ends = {d.request_id: d for d in deltas if d.finish_reason}
    assert ends[a].finish_reason == ends[b].finish_reason == "error" and "illegal memory access" in ends[a].error
    assert engine.failed_steps == 1 and all_blocks_free(engine)
    [seqs] = engine.run([(ps[2], GREEDY)]).values()
    assert seqs[0].output_ids == alone(llama, ps[2]) and engine.failed_steps == 0


def test_sampling_params_changed_after_construction_are_refused_by_the_engine(llama):
    from rung.engine.sampling_params import SamplingParamsError

    engine = engine_for(llama)
    params = SamplingParams(max_tokens=4)
    params.repetition_penalty = 1e-38
    with pytest.raises(SamplingParamsError, match="repetition_penalty"):
        engine.add_request([1, 2, 3], params)
    with pytest.raises(RequestError, match="stop_token_ids must be in"):
        engine.add_request([1, 2, 3], SamplingParams(stop_token_ids=[10**6]))
    assert not engine.has_unfinished() and all_blocks_free(engine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["numpy-argmax", "torch-max"])
def test_the_batched_greedy_argmax_leaves_nan_and_inf_rows_to_the_sampler(llama, dtype):
    from types import SimpleNamespace

    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[0.0, 2.0, 1.0], [nan, 0.0, 1.0], [0.0, inf, 1.0], [-inf, -inf, -inf]], dtype=dtype)
    seq = SimpleNamespace(params=GREEDY, output_ids=[], constraint=None)
    engine = engine_for(llama)
    assert engine._batched_greedy([(seq, row, 1) for row in range(4)], logits) == [1, -1, -1, -1]
