"""Decoding one step ahead of the host (engine/overlap.py) on the static decode path, run eagerly
on the CPU: the synchronous engine's tokens, one wasted step when a sequence stops, no block lost
when sequences stop, are aborted, paused or joined mid-flight."""

from __future__ import annotations

import dataclasses

import pytest

from rung.engine.cuda_graphs import DecodeGraphs
from rung.engine.engine import Engine, EngineConfig
from rung.engine.paged import Chunk
from rung.engine.sampling_params import SamplingParams

from test_engine import GREEDY, all_blocks_free, prompts


def static_engine(pair, overlap: bool, **config) -> Engine:
    model, tokenizer = pair
    engine = Engine(model, tokenizer, EngineConfig(**{"block_size": 4, "num_blocks": 96, "max_seqs": 6,
                                                      "max_batch_tokens": 32, "overlap": overlap, **config}))
    engine.graphs = DecodeGraphs(model, engine.pool, engine.max_model_len, engine.config.max_seqs, capture=False)
    return engine


def outputs(engine: Engine, requests) -> list[list[int]]:
    out = engine.run(requests)
    return [seqs[0].output_ids for seqs in out.values()]


@pytest.mark.parametrize("which", ["llama", "gpt_oss"])
def test_decoding_ahead_gives_the_synchronous_tokens(which, request):
    pair = request.getfixturevalue(which)
    ps = prompts(5, pair[0].config.vocab_size)
    # different lengths: sequences leave the batch at different steps
    reqs = [(p, dataclasses.replace(GREEDY, max_tokens=3 + 2 * i)) for i, p in enumerate(ps)]
    sync, ahead = static_engine(pair, overlap=False), static_engine(pair, overlap=True)
    want, got = outputs(sync, reqs), outputs(ahead, reqs)
    assert got == want
    assert [len(o) for o in got] == [3, 5, 7, 9, 11]
    assert sync.stats["steps_ahead"] == 0 and ahead.stats["steps_ahead"] >= 6
    assert ahead.stats["generated_tokens"] == sync.stats["generated_tokens"]
    assert all_blocks_free(ahead) and ahead.runner.ahead is None


def test_a_sequence_stopped_by_a_token_costs_one_wasted_step_and_no_block(llama):
    p = prompts(1, llama[0].config.vocab_size)[0]
    free_run = outputs(static_engine(llama, overlap=False), [(p, GREEDY)])[0]
    stop = free_run[5]  # unknown to the host when the step after it is enqueued
    params = dataclasses.replace(GREEDY, stop_token_ids=[stop])
    sync, ahead = static_engine(llama, overlap=False), static_engine(llama, overlap=True)
    [want], [got] = outputs(sync, [(p, params)]), outputs(ahead, [(p, params)])
    assert got == want == free_run[: free_run.index(stop) + 1]
    assert ahead.graphs.steps == sync.graphs.steps + 1  # the step after the stop ran and was dropped
    assert all_blocks_free(ahead)


def test_abort_and_pause_while_a_step_is_in_flight(llama):
    ps = prompts(4, llama[0].config.vocab_size)
    want = outputs(static_engine(llama, overlap=False), [(p, GREEDY) for p in ps])
    engine = static_engine(llama, overlap=True)
    ids = [engine.add_request(p, GREEDY) for p in ps]
    seqs = [engine._sequences[r][0] for r in ids]
    while engine.runner.ahead is None:
        engine.step()
    engine.step()
    assert engine.runner.ahead is not None  # still ahead: the abort lands between two enqueued steps
    engine.abort(ids[1])
    engine.pause(ids[2])
    for _ in range(3):
        engine.step()
    engine.resume(ids[2])
    while engine.has_unfinished():
        engine.step()
    assert seqs[1].finish_reason == "abort" and len(seqs[1].output_ids) < GREEDY.max_tokens
    assert [seqs[i].output_ids for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]
    assert all_blocks_free(engine)


def test_a_request_joining_mid_flight_gets_its_tokens(llama):
    ps = prompts(5, llama[0].config.vocab_size)
    want = outputs(static_engine(llama, overlap=False), [(p, GREEDY) for p in ps])
    engine = static_engine(llama, overlap=True)
    first = [engine.add_request(p, GREEDY) for p in ps[:2]]
    while engine.runner.ahead is None:
        engine.step()
    late = [engine.add_request(p, GREEDY) for p in ps[2:]]
    seqs = [engine._sequences[r][0] for r in first + late]
    while engine.has_unfinished():
        engine.step()
    assert [s.output_ids for s in seqs] == want
    assert all_blocks_free(engine)


def test_sampled_and_logprob_requests_decode_synchronously(llama):
    ps = prompts(2, llama[0].config.vocab_size)
    for params in (SamplingParams(temperature=0.8, max_tokens=6, seed=3, ignore_eos=True),
                   dataclasses.replace(GREEDY, logprobs=2)):
        engine = static_engine(llama, overlap=True)
        got = outputs(engine, [(p, params) for p in ps])
        assert got == outputs(static_engine(llama, overlap=False), [(p, params) for p in ps])
        assert engine.stats["steps_ahead"] == 0


def test_static_inputs_follow_rows_that_change_sequence_or_grow(llama):
    engine = static_engine(llama, overlap=True)
    graphs, scratch = engine.graphs, engine.pool.scratch_slot

    def step(tables, starts):
        chunks = [Chunk(t, s, 1) for t, s in zip(tables, starts)]
        ids = [11 + i for i in range(len(chunks))]
        graphs.run(ids, chunks)
        for i, (t, s) in enumerate(zip(tables, starts)):
            assert graphs.tables[0, i, : len(t[0])].tolist() == t[0]
            assert int(graphs.slots[0, i]) == t[0][s // 4] * 4 + s % 4
        assert graphs.pos[: len(chunks)].tolist() == starts and graphs.ids[: len(chunks)].tolist() == ids
        size = graphs.bucket(len(chunks))
        assert graphs.slots[0, len(chunks): size].tolist() == [scratch] * (size - len(chunks))  # padding rows

    a, b, c = [[3, 7]], [[1, 2, 9, 4]], [[5]]  # one KV group: a sequence's tables is [[blocks]]
    step([a, b], [5, 13])
    step([a, b], [6, 14])
    a[0].append(8)  # a's table grows in place: only the new block is written
    step([a, b], [8, 15])
    step([c, a], [2, 9])  # both rows change sequence
    step([b, c, a], [15, 3, 10])  # three rows in the 4-row bucket


def test_a_prompt_chunk_of_one_token_is_not_run_ahead_as_a_decode(llama):
    """A token budget of 2 schedules a decode beside a prompt's one-token chunk: a batch of one
    token per sequence, but the prompt is not caught up, and its chunk samples nothing."""
    ps = prompts(3, llama[0].config.vocab_size)
    reqs = [(p, GREEDY) for p in ps]
    want = outputs(static_engine(llama, overlap=False, max_batch_tokens=2), reqs)
    assert outputs(static_engine(llama, overlap=True, max_batch_tokens=2), reqs) == want
    assert want == outputs(static_engine(llama, overlap=False), reqs)  # the budget changes no token
