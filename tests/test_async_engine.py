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


# ---- the event loop never waits for a step ----------------------------------------------------------


def slow_steps(front, seconds: float):
    """Make every engine step take at least ``seconds`` (holding the engine's lock, as a real one does)."""
    import time

    step = front.engine.step

    def slow():
        time.sleep(seconds)
        return step()

    front.engine.step = slow


async def longest_stall(work, tick: float = 0.005) -> tuple[float, object]:
    """Run ``work`` beside a ticker; (the longest the event loop went without running the ticker, work's result)."""
    import time

    gaps, done = [], asyncio.Event()

    async def ticker():
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(tick)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    t = asyncio.create_task(ticker())
    try:
        result = await work
    finally:
        done.set()
        await t
    return max(gaps), result


def test_requests_joining_and_leaving_never_block_the_event_loop_on_a_step(llama, front):
    """Each step takes 0.25 s; requests start and end while others stream. The event loop must keep
    running (the engine's lock is held for a whole step: waiting for it froze every stream)."""
    ps = prompts(6, llama[0].config.vocab_size)
    slow_steps(front, 0.25)
    long = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    async def run():
        async def staggered(i, p):
            await asyncio.sleep(0.05 + 0.1 * i)  # arrive mid-step, at different points
            return await tokens_of(front, p, short)

        return await asyncio.gather(tokens_of(front, ps[0], long), *(staggered(i, p) for i, p in enumerate(ps[1:])))

    stall, results = asyncio.run(longest_stall(run()))
    assert [len(r) for r in results] == [12, 2, 2, 2, 2, 2]
    assert stall < 0.15, f"the event loop stalled {stall:.3f} s"
    assert front.stats()["free_blocks"] == 64


def test_a_request_cancelled_before_the_engine_took_it_never_runs(llama, front):
    p = prompts(1, llama[0].config.vocab_size)[0]
    slow_steps(front, 0.3)
    added = []
    add = front.engine.add_request
    front.engine.add_request = lambda prompt, params, request_id: added.append(request_id) or add(prompt, params,
                                                                                                   request_id)

    async def run():
        busy = asyncio.create_task(tokens_of(front, p, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                                             "busy"))
        await asyncio.sleep(0.1)  # the engine is mid-step
        task = asyncio.create_task(tokens_of(front, p, GREEDY, "gone"))
        await asyncio.sleep(0.05)  # in the inbox
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await busy

    assert len(asyncio.run(run())) == 2
    assert added == ["busy"]
    stats = front.stats()
    assert stats["free_blocks"] == 64 and stats["running"] == 0 and stats["waiting"] == 0


def test_a_request_id_in_use_is_refused(llama, front):
    p = prompts(1, llama[0].config.vocab_size)[0]
    slow_steps(front, 0.1)

    async def run():
        first = asyncio.create_task(tokens_of(front, p, GREEDY, "same"))
        await asyncio.sleep(0.02)
        with pytest.raises(RequestError, match="already in use"):
            await tokens_of(front, p, GREEDY, "same")
        return await first

    assert asyncio.run(run()) == alone(llama, p)


def test_a_steps_deltas_reach_the_event_loop_in_one_hand_off(llama, front):
    """One call_soon_threadsafe (one write to the loop's self-pipe, one wake-up) per step, not one
    per request."""
    ps = prompts(6, llama[0].config.vocab_size)
    steps = []
    step = front.engine.step
    front.engine.step = lambda: steps.append(1) or step()

    async def run():
        loop = asyncio.get_running_loop()
        calls = []
        threadsafe = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: calls.append(1) or threadsafe(*a, **k)
        results = await asyncio.gather(*(tokens_of(front, p, GREEDY) for p in ps))
        return results, len(calls)

    results, handoffs = asyncio.run(run())
    assert [len(r) for r in results] == [10] * 6
    assert handoffs <= len(steps) < 6 * 10  # one per step at most, where the deltas were 60


def test_build_makes_the_engine_on_the_loop_thread_and_raises_its_error(llama):
    import threading

    from rung.engine.async_engine import AsyncEngine
    from rung.engine.engine import Engine, EngineConfig

    where = []

    def build():
        where.append(threading.current_thread().name)
        return Engine(*llama, EngineConfig(block_size=4, num_blocks=64))

    front = AsyncEngine(build=build)
    try:
        assert where == ["rung-engine"] and front.engine is not None
    finally:
        front.shutdown()

    def broken():
        raise RuntimeError("no such model")

    with pytest.raises(RuntimeError, match="no such model"):
        AsyncEngine(build=broken)
    with pytest.raises(ValueError, match="not both or neither"):
        AsyncEngine()
