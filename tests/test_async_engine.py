"""The asyncio front: concurrent streams batch together; a dropped stream frees its blocks."""

from __future__ import annotations

import asyncio

import pytest

from rung.engine.async_engine import AsyncEngine
from rung.engine.engine import Engine, EngineConfig, RequestError
from rung.engine.sampling_params import SamplingParams

from test_engine import GREEDY, alone, prompts


@pytest.fixture
def front(llama):
    front = AsyncEngine(Engine(*llama, EngineConfig(block_size=4, num_blocks=64)))
    yield front
    front.shutdown()


def test_concurrent_streams_give_each_request_its_own_tokens(llama, front):
    ps = prompts(8, llama[0].config.vocab_size)

    async def one(p):
        return [t for d in [d async for d in front.generate(p, GREEDY)] for t in d.token_ids]

    async def all_of_them():
        return await asyncio.gather(*(one(p) for p in ps))

    results = asyncio.run(all_of_them())
    for p, tokens in zip(ps, results):
        assert tokens == alone(llama, p)
    assert front.stats()["free_blocks"] == 64


def test_cancelled_stream_aborts_the_request_and_frees_its_blocks(llama, front):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def run():
        seen = []

        async def consume():
            async for d in front.generate(prompts(1, llama[0].config.vocab_size)[0], long, request_id="r1"):
                seen.append(d)

        task = asyncio.create_task(consume())
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        task.cancel()  # what a client disconnect does to its handler
        with pytest.raises(asyncio.CancelledError):
            await task
        return len(seen)

    produced = asyncio.run(run())
    assert 3 <= produced < 200
    stats = front.stats()
    assert stats["free_blocks"] == 64 and stats["running"] == 0 and stats["waiting"] == 0


def test_bad_request_raises_before_streaming(front):
    async def run():
        async for _ in front.generate([]):
            pass

    with pytest.raises(RequestError, match="empty"):
        asyncio.run(run())


# ---- one bad request fails alone; the engine's health is its present state -------------------------


async def tokens_of(front, prompt, params, request_id=None):
    return [t for d in [d async for d in front.generate(prompt, params, request_id)] for t in d.token_ids]


def test_a_request_that_fails_in_the_engine_fails_alone_and_health_stays_ok(llama, front):
    from rung.engine.engine import GenerationError
    from test_engine import Grammar

    ps = prompts(3, llama[0].config.vocab_size)
    broken = SamplingParams(temperature=1.0, max_tokens=10, constraint=Grammar(llama[0].config.vocab_size, True))

    async def run():
        return await asyncio.gather(tokens_of(front, ps[0], GREEDY), tokens_of(front, ps[1], broken),
                                    tokens_of(front, ps[2], GREEDY), return_exceptions=True)

    first, failed, third = asyncio.run(run())
    assert isinstance(failed, GenerationError) and "the grammar broke" in str(failed)
    assert first == alone(llama, ps[0]) and third == alone(llama, ps[2])
    assert front.error is None and front.stats()["free_blocks"] == 64
    assert asyncio.run(tokens_of(front, ps[1], GREEDY)) == alone(llama, ps[1])


def test_health_is_broken_only_while_every_step_fails(llama, front):
    from rung.engine.async_engine import BROKEN_AFTER
    from rung.engine.engine import GenerationError

    model = front.engine.model
    forward = model.hidden_states
    p = prompts(1, llama[0].config.vocab_size)[0]
    front.engine.cpu_decode = None  # every step through hidden_states

    def fail(*args):
        raise RuntimeError("device lost (simulated)")

    model.hidden_states = fail
    try:
        for i in range(BROKEN_AFTER):
            assert front.error is None  # a failed request or two is not a broken engine
            with pytest.raises(GenerationError, match="device lost"):
                asyncio.run(tokens_of(front, p, GREEDY))
        assert "device lost" in str(front.error)  # every step fails: /health says so
    finally:
        model.hidden_states = forward
    assert asyncio.run(tokens_of(front, p, GREEDY)) == alone(llama, p)
    assert front.error is None and front.stats()["free_blocks"] == 64


def test_a_dead_engine_loop_is_reported_and_its_streams_end(llama, front):
    def dies():
        raise SystemExit("the loop ended")  # not an Exception: nothing in the loop may swallow it

    front.engine.step = dies

    async def run():
        async for _ in front.generate(prompts(1, llama[0].config.vocab_size)[0], GREEDY):
            pass

    with pytest.raises(RuntimeError, match="the loop ended"):
        asyncio.run(run())
    assert "the loop ended" in str(front.error)
