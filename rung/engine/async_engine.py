"""An asyncio front for the engine: many concurrent streams, one model loop.

A background thread runs ``Engine.step`` while any request is unfinished and routes each delta to
its request's asyncio queue. ``generate`` is an async iterator of deltas; when its consumer goes
away (a client disconnect cancels the task), the request is aborted and its KV blocks freed
before the iterator closes. The engine itself is not thread-safe: every call into it holds
``self._lock``.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import AsyncIterator

from rung.engine.engine import Delta, Engine
from rung.engine.sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="rung-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[Delta]:
        """Stream the deltas of one request (all its n samples) until every sample finished."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._stopped:
                raise RuntimeError("the engine is shut down")
            self.engine.add_request(prompt_ids, params, request_id)  # raises RequestError on bad input
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self._wake.notify()
        pending = params.n
        try:
            while pending:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine failed: {item}") from item
                if item.finish_reason == "abort":
                    pending = 0
                    return
                pending -= item.finish_reason is not None
                yield item
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
                if pending:  # cancelled or abandoned: free its blocks now
                    self.engine.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
            entry = self._queues.pop(request_id, None)
        if entry:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, Delta(request_id, 0, "", [], "abort"))

    def stats(self) -> dict:
        with self._lock:
            return {**self.engine.stats, "running": len(self.engine.scheduler.running),
                    "waiting": len(self.engine.scheduler.waiting), "swapped": len(self.engine.scheduler.swapped),
                    "free_blocks": sum(self.engine.free_blocks())}

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stopped:
                    return
                try:
                    deltas = self.engine.step()
                except BaseException as e:  # a failed step fails every open stream, never hangs it
                    self.error = e
                    deltas = []
                    for rid, (loop, queue) in list(self._queues.items()):
                        self.engine.abort(rid)
                        loop.call_soon_threadsafe(queue.put_nowait, e)
                targets = [(self._queues.get(d.request_id), d) for d in deltas]
            for entry, d in targets:
                if entry:
                    loop, queue = entry
                    loop.call_soon_threadsafe(queue.put_nowait, d)
