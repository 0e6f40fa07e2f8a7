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
