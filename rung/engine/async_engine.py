"""An asyncio front for the engine: many concurrent streams, one model loop.

A background thread runs ``Engine.step`` while any request is unfinished and routes each delta to
its request's asyncio queue. ``generate`` is an async iterator of deltas; when its consumer goes
away (a client disconnect cancels the task), the request is aborted and its KV blocks freed
before the iterator closes. The engine itself is not thread-safe: every call into it holds
``self._lock``.

A sequence that fails in the engine (finish_reason "error") raises GenerationError in its own
request's iterator; the other requests go on. ``error`` says whether the engine can serve now:
its loop died, or its last BROKEN_AFTER steps all failed as a whole. It clears as soon as a step
runs again, so one bad request never leaves the server reporting itself broken.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import AsyncIterator

from rung.engine.engine import Delta, Engine, EngineDeadError, GenerationError
from rung.engine.sampling_params import SamplingParams

BROKEN_AFTER = 3  # failed steps in a row (each failing its own requests) before the engine counts as broken


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._died: BaseException | None = None  # what ended the loop thread, if anything did
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
                    raise GenerationError(f"the engine failed: {item}") from item
                if item.finish_reason == "abort":
                    pending = 0
                    return
                if item.finish_reason == "error":  # this request alone; the finally frees its other samples
                    raise GenerationError(f"the engine failed on this request: {item.error}")
                pending -= item.finish_reason is not None
                yield item
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
                if pending:  # cancelled or abandoned: free its blocks now
                    self.engine.abort(request_id)

    @property
    def error(self) -> BaseException | None:
        """Why the engine cannot serve now, or None when it can (what /health reports)."""
        if self._died is not None:
            return self._died
        if not self._thread.is_alive() and not self._stopped:
            return RuntimeError("the engine loop is not running")
        if self.engine.failed_steps >= BROKEN_AFTER:
            return self.engine.step_error
        return None

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
            entry = self._queues.pop(request_id, None)
        if entry:
            _deliver(entry, Delta(request_id, 0, "", [], "abort"))

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
        try:
            self._run()
        except BaseException as e:  # never expected: every open stream gets the error, /health reports it
            self._died = e
            with self._lock:
                queues, self._queues = list(self._queues.values()), {}
            for entry in queues:
                _deliver(entry, e)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stopped:
                    return
                try:
                    deltas = self.engine.step()  # a failed sequence or step comes back as "error" deltas
                except EngineDeadError:
                    raise  # no step can run again (a tensor-parallel rank died): _loop fails every stream
                except Exception as e:  # escaped the engine's own handling: fail every open stream, go on
                    self.engine.failed_steps += 1
                    self.engine.step_error = e
                    self.engine.abort_all()
                    deltas = []
                    for entry in self._queues.values():
                        _deliver(entry, e)
                targets = [(self._queues.get(d.request_id), d) for d in deltas]
            for entry, d in targets:
                if entry:
                    _deliver(entry, d)


def _deliver(entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item) -> None:
    """Hand ``item`` to a request's queue on its event loop; a loop already closed has no reader left."""
    loop, queue = entry
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:
        pass
