"""The model runner (engine/runner.py) picks the path of a step: native CPU calls or a CUDA graph
for a decode-only batch, the eager PagedStep forward otherwise, with the eager path's logits; and
it launches decode steps ahead only on the graph path. The graph path is stood in for by a stub
here (no GPU): what is checked is the runner's choice, not the graph."""

from __future__ import annotations

import pytest
import torch

from rung.engine.cpu_decode import CpuDecode
from rung.engine.engine import EngineConfig
from rung.engine.paged import Chunk, KVPool, PagedStep
from rung.engine.runner import ModelRunner
from rung.engine.scheduler import Scheduler
from rung.engine.sequence import Sequence

from oracle import ids_for


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A Llama whose projections the quantization rewrite packed for the native kernels."""
    from oracle import tiny_chat_model
    from rung.quant.rewrite import pack_model
    from rung.weights.loader import load_model

    # widths that are multiples of 32: what the native kernels take
    folder = tiny_chat_model(tmp_path_factory.mktemp("llama"), hidden_size=64, intermediate_size=64,
                             max_position_embeddings=256)
    return pack_model(load_model(folder), "f32")


def runner_for(model, **config) -> ModelRunner:
    pool = KVPool(model.config, 16, 4, torch.float32)
    return ModelRunner(model, pool, EngineConfig(block_size=4, num_blocks=16, **config), max_model_len=64)


# two sequences of 10 and 7 prompt tokens, in blocks [0, 1, 2] and [3, 4, 5]
A, B = [[0, 1, 2]], [[3, 4, 5]]
PREFILL = [Chunk(A, 0, 10), Chunk(B, 0, 7)]
DECODE = [Chunk(A, 10, 1), Chunk(B, 7, 1)]


def prefill_ids(vocab: int) -> torch.Tensor:
    return torch.cat([ids_for(vocab, 1, 10, seed=0)[0], ids_for(vocab, 1, 7, seed=1)[0]])  # [17]


def counting_forward(model, monkeypatch) -> list[int]:
    """Count the eager forward passes (the model's hidden_states) the runner makes."""
    calls, forward = [], model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda ids, cache=None: calls.append(1) or forward(ids, cache))
    return calls


@torch.inference_mode()
def test_cpu_runner_decodes_natively_and_prefills_eagerly_with_the_eager_logits(packed, monkeypatch):
    native, eager = runner_for(packed), runner_for(packed, cpu_decode=False)
    assert isinstance(native.cpu_decode, CpuDecode) and native.graphs is None and not native.runs_ahead
    assert eager.cpu_decode is None
    forwards = counting_forward(packed, monkeypatch)
    ids = prefill_ids(packed.config.vocab_size)
    # prefill: the eager forward on both runners, logits of each prompt's last row only
    got, want = native.run(ids, PREFILL, [9, 16]), eager.run(ids, PREFILL, [9, 16])
    assert len(forwards) == 2 and native.cpu_decode.steps == 0
    assert got.shape == (2, packed.config.vocab_size) and torch.equal(got, want)
    # decode-only: one native call on the CPU runner, the eager forward on the other
    tokens = got.argmax(-1)
    got, want = native.run(tokens, DECODE), eager.run(tokens, DECODE, [0, 1])  # no rows: every row
    assert len(forwards) == 3 and native.cpu_decode.steps == 1
    assert got.shape == want.shape == (2, packed.config.vocab_size)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    # rows pick the sampled sequences' logits out of the decode batch
    nxt = got.argmax(-1)
    one, both = native.run(nxt, [Chunk(A, 11, 1), Chunk(B, 8, 1)], [1]), eager.run(nxt, [Chunk(A, 11, 1), Chunk(B, 8, 1)], [0, 1])
    assert one.shape == (1, packed.config.vocab_size) and (one[0] - both[1]).abs().max() < 1e-5 * both.abs().max()


@torch.inference_mode()
def test_a_step_of_more_than_max_m_rows_takes_the_packed_heads_logits_from_the_native_kernel(tmp_path, monkeypatch):
    """17 rows of logits (a prompt's rows, or decode rows beside a new prompt's last) through an
    int4 model's int8 LM head: the native kernel, MAX_M rows at a time, not a dequantized copy of
    the whole head per step (62 ms a step on SmolLM2-135M's 49152 x 576 head, against 11)."""
    from oracle import tiny_chat_model
    from rung import native
    from rung.quant.linear import PackedLinear, native_prompts
    from rung.quant.rewrite import pack_model
    from rung.weights.loader import load_model

    folder = tiny_chat_model(tmp_path, hidden_size=64, intermediate_size=64, max_position_embeddings=256)
    model = pack_model(load_model(folder), "q4")
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.fmt == "q8"
    ids = prefill_ids(model.config.vocab_size)
    assert len(ids) > native.MAX_M
    with native_prompts():  # the runner's eager path for the layers below the head
        hidden = model.hidden_states(ids[None], PagedStep(runner_for(model).pool, PREFILL, torch.device("cpu")))[0]
    alone = torch.cat([model.lm_head(h[None]) for h in hidden])  # one row at a time: the native kernel
    monkeypatch.setattr(PackedLinear, "reference", lambda *_: pytest.fail("dequantized a packed layer"))
    got = runner_for(model).run(ids, PREFILL)  # every row's logits
    assert got.shape == (len(ids), model.config.vocab_size)
    assert torch.equal(got, alone)  # and the same numbers as each row alone (the kernel is row-wise)


@torch.inference_mode()
def test_a_model_not_packed_for_the_native_kernels_runs_eagerly(llama, monkeypatch):
    model, _ = llama
    runner = runner_for(model)
    assert runner.cpu_decode is None and runner.graphs is None
    forwards = counting_forward(model, monkeypatch)
    ids = prefill_ids(model.config.vocab_size)
    every = runner.run(ids, PREFILL)  # no rows: every row's logits
    assert every.shape == (17, model.config.vocab_size) and len(forwards) == 1
    torch.testing.assert_close(runner_for(model).run(ids, PREFILL, [9, 16]), every[[9, 16]], atol=1e-5, rtol=1e-5)
    assert runner.run(ids[:2], DECODE, [0, 1]).shape == (2, model.config.vocab_size) and len(forwards) == 3


@torch.inference_mode()
def test_a_step_of_prefill_chunks_only_returns_no_logits_and_fills_the_cache(llama):
    model, _ = llama
    runner = runner_for(model)
    ids = prefill_ids(model.config.vocab_size)
    assert runner.run(ids[:8], [Chunk(A, 0, 8)], []).shape == (0, model.config.vocab_size)
    assert runner.pool.keys[0][:8].abs().sum() > 0 and runner.pool.keys[0][8:].abs().sum() == 0


class StubGraphs:
    """DecodeGraphs' interface: logits [n, vocab] whose argmax of row i is ``10 + i``, or None
    (declined) when ``declines``."""

    def __init__(self, vocab: int, declines: bool = False):
        self.vocab, self.declines, self.batches = vocab, declines, []

    def run(self, ids, chunks):
        self.batches.append(len(chunks))
        if self.declines:
            return None
        logits = torch.zeros(len(chunks), self.vocab)
        logits[torch.arange(len(chunks)), 10 + torch.arange(len(chunks))] = 1.0
        return logits


def graph_runner(model, **config) -> ModelRunner:
    runner = runner_for(model, **config)
    runner.graphs = StubGraphs(model.config.vocab_size)
    return runner


@torch.inference_mode()
def test_decode_only_batches_replay_the_graph_and_others_run_eagerly(llama, monkeypatch):
    model, _ = llama
    ids = prefill_ids(model.config.vocab_size)
    reference = runner_for(model)  # eager, the graph runner's steps in its own pool
    reference.run(ids, PREFILL, [9, 16])
    want = reference.run(ids[:2], DECODE, [0, 1])
    runner = graph_runner(model)
    forwards = counting_forward(model, monkeypatch)
    runner.run(ids, PREFILL, [9, 16])
    assert runner.graphs.batches == [] and len(forwards) == 1  # prefill: never offered to the graph
    logits = runner.run(ids[:2], DECODE, [1])
    assert runner.graphs.batches == [2] and len(forwards) == 1  # decode-only: the graph, no eager forward
    assert logits.argmax(-1).tolist() == [11]  # the graph's row 1
    runner.graphs.declines = True  # a batch the graph cannot run (too many rows, graphs off): eager
    got = runner.run(ids[:2], DECODE, [0, 1])
    assert runner.graphs.batches == [2, 2] and len(forwards) == 2 and torch.equal(got, want)


@torch.inference_mode()
def test_run_ahead_keeps_the_greedy_tokens_on_the_graph_path_only(llama):
    model, _ = llama
    runner = graph_runner(model)
    assert runner.runs_ahead and runner.ahead is None
    seqs = ["a", "b"]  # the runner only hands them back with their tokens
    assert runner.run_ahead(torch.tensor([1, 2]), DECODE, seqs)
    ahead = runner.take_ahead()
    assert ahead.seqs == seqs and ahead.wait() == [10, 11] and runner.ahead is None
    # the next step's input ids are the previous step's tokens, on the device
    assert runner.run_ahead(ahead.tokens, DECODE, seqs) and runner.ahead.wait() == [10, 11]
    runner.graphs.declines = True  # nothing launched
    assert not runner.run_ahead(torch.tensor([1, 2]), DECODE, seqs) and runner.take_ahead() is None
    for off in (graph_runner(model, overlap=False), runner_for(model)):  # overlap off, or no graphs
        assert not off.runs_ahead and not off.run_ahead(torch.tensor([1, 2]), DECODE, seqs) and off.ahead is None
    assert off.graphs is None


def test_scheduler_reserve_takes_blocks_for_the_positions_all_or_nothing(llama):
    model, _ = llama
    pool = KVPool(model.config, 4, 4, torch.float32)  # 4 blocks of 4 slots
    scheduler = Scheduler(pool)

    def sequence(n):
        seq = Sequence("r", 0, list(range(n)), None, None, 0, None, None)
        scheduler.add(seq)
        return seq

    a, b = sequence(6), sequence(9)
    assert scheduler.reserve(a, 6) and a.tables == [[0, 1]]  # positions 0..5: two blocks
    assert scheduler.reserve(a, 6) and a.tables == [[0, 1]]  # the same positions again: nothing taken
    assert not scheduler.reserve(b, 9) and b.tables == [[]]  # needs three, two are free: none taken
    assert pool.groups[0].allocator.available == 2
    a.num_computed = 6
    assert scheduler.reserve(a, 3) and a.tables == [[0, 1, 2]]  # positions 6..8
