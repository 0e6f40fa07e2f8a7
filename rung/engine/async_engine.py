"""An asyncio front for the engine: many concurrent streams, one model loop.

A background thread runs ``Engine.step`` while any request is unfinished and routes each delta to
its request's asyncio queue. ``generate`` is an async iterator of deltas; when its consumer goes
away (a client disconnect cancels the task), the request is aborted and its KV blocks freed
before the iterator closes. The engine itself is not thread-safe: every call into it holds
``self._lock``.

The event loop never waits for that lock on a request's way in or out. The loop thread holds it
for a whole step (tens of milliseconds on a CPU), and re-takes it as soon as it lets go, so an
event loop blocked on it stalls every stream, sometimes for several steps, and new requests miss
steps they could have joined. A new request goes into an inbox instead, which the loop thread
empties into the engine between two steps (a RequestError comes back through the request's
queue); a request that ended leaves with no lock at all. Only an abort (a client gone mid-stream)
takes the lock, to free the request's blocks before its iterator closes. A step's deltas reach
each event loop in one hand-off, not one per request.

A sequence that fails in the engine (finish_reason "error") raises GenerationError in its own
request's iterator; the other requests go on. ``error`` says whether the engine can serve now:
its loop died, or its last BROKEN_AFTER steps all failed as a whole. It clears as soon as a step
runs again, so one bad request never leaves the server reporting itself broken.

``AsyncEngine(build=...)`` makes the engine on the loop thread itself. On a CPU the model's
OpenMP regions then all run on that one thread: a second thread that ever ran one (a loader, the
main thread) keeps its own OpenMP pool alive, libgomp then counts more threads than cores and
stops spinning at its barriers, and every step's hundreds of barriers sleep and wake through the
kernel (SmolLM2-135M @int4, batch 1, 2 cores: ~85 tok/s stepping on a thread other than the
loading one, ~165 on the loading thread; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable
import uuid
from typing import AsyncIterator

from rung.engine.engine import Delta, Engine, EngineDeadError, GenerationError, RequestError
from rung.engine.sampling_params import SamplingParams

BROKEN_AFTER = 3  # failed steps in a row (each failing its own requests) before the engine counts as broken


class AsyncEngine:
    def __init__(self, engine: Engine | None = None, *, build: Callable[[], Engine] | None = None):
        """``engine``, or ``build``: called on the loop thread to make it (this waits for it, and
        raises what it raised)."""
        if (engine is None) == (build is None):
            raise ValueError("AsyncEngine takes an engine or a build function, not both or neither")
        self.engine = engine
        self._lock = threading.Lock()  # the engine's: held by the loop thread for a whole step
        self._wake = threading.Condition()  # guards the inbox; the loop thread sleeps on it when idle
        self._inbox: list[tuple[str, list[int], SamplingParams]] = []  # requests to add before the next step
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._died: BaseException | None = None  # what ended the loop thread, if anything did
        built = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            if build is not None:
                try:
                    self.engine = build()
                except BaseException as e:
                    failed.append(e)
                    return
                finally:
                    built.set()
            self._loop()

        self._thread = threading.Thread(target=run, name="rung-engine", daemon=True)
        self._thread.start()
        if build is not None:
            built.wait()
            if failed:
                raise failed[0]

    async def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[Delta]:
        """Stream the deltas of one request (all its n samples) until every sample finished."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        if self._stopped:
            raise RuntimeError("the engine is shut down")
        if self._died is not None:
            raise GenerationError(f"the engine failed: {self._died}") from self._died
        if request_id in self._queues:
            raise RequestError(f"request id {request_id!r} is already in use")
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        if self._died is not None:  # the loop died between the check above and now: no one would answer
            self._queues.pop(request_id, None)
            raise GenerationError(f"the engine failed: {self._died}") from self._died
        with self._wake:  # added by the loop thread before its next step (never wait for the engine's lock here)
            self._inbox.append((request_id, prompt_ids, params))
            self._wake.notify()
        pending = params.n
        try:
            while pending:
                item = await queue.get()
                if isinstance(item, _Refused):  # add_request raised (RequestError: bad input): nothing is in the engine
                    pending = 0
                    raise item.error
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
            self._queues.pop(request_id, None)
            if pending:  # cancelled or abandoned: free its blocks now (and drop it if still in the inbox)
                self._abort(request_id)

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
        self._abort(request_id)
        entry = self._queues.pop(request_id, None)
        if entry:
            _deliver(entry, Delta(request_id, 0, "", [], "abort"))

    def _abort(self, request_id: str) -> None:
        """Take the request out of the inbox, or else out of the engine. The loop thread empties the
        inbox and adds what it held under the engine's lock: a request not in the inbox is in the
        engine (or finished) once that lock is ours."""
        with self._wake:
            kept = [add for add in self._inbox if add[0] != request_id]
            dropped, self._inbox = len(kept) < len(self._inbox), kept
        if not dropped:
            with self._lock:
                self.engine.abort(request_id)

    def stats(self) -> dict:
        with self._lock:
            return {**self.engine.stats, "running": len(self.engine.scheduler.running),
                    "waiting": len(self.engine.scheduler.waiting), "swapped": len(self.engine.scheduler.swapped),
                    "free_blocks": sum(self.engine.free_blocks())}

    def shutdown(self) -> None:
        with self._wake:
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
        busy = False  # the engine has unfinished work (read and written by this thread alone)
        while True:
            with self._wake:
                while not self._stopped and not self._inbox and not busy:
                    self._wake.wait()
                if self._stopped:
                    return
            with self._lock:
                refused = self._add_inbox()
                busy = self.engine.has_unfinished()
                deltas = []
                if busy:
                    try:
                        deltas = self.engine.step()  # a failed sequence or step comes back as "error" deltas
                    except EngineDeadError:
                        raise  # no step can run again (a tensor-parallel rank died): _loop fails every stream
                    except Exception as e:  # escaped the engine's own handling: fail every open stream, go on
                        self.engine.failed_steps += 1
                        self.engine.step_error = e
                        self.engine.abort_all()
                        for entry in self._queues.values():
                            _deliver(entry, e)
                    busy = self.engine.has_unfinished()
                targets = [(self._queues.get(request_id), item) for request_id, item in refused]
                targets += [(self._queues.get(d.request_id), d) for d in deltas]
            _deliver_all(targets)

    def _add_inbox(self) -> list[tuple[str, _Refused]]:
        """Move the inbox's requests into the engine (under the engine's lock); those it refused,
        with why (raised in the request's own iterator, as if it had called add_request itself)."""
        with self._wake:
            adds, self._inbox = self._inbox, []
        refused = []
        for request_id, prompt_ids, params in adds:
            try:
                self.engine.add_request(prompt_ids, params, request_id)
            except Exception as e:
                refused.append((request_id, _Refused(e)))
        return refused


class _Refused:
    """An add_request that raised, on its way to the request's iterator."""

    def __init__(self, error: Exception):
        self.error = error


def _deliver_all(targets: list) -> None:
    """Hand each (entry, item) to its request's queue: one wake-up per event loop for all of a step's
    deltas (each call_soon_threadsafe writes to the loop's self-pipe)."""
    by_loop: dict = {}
    for entry, item in targets:
        if entry:
            by_loop.setdefault(entry[0], []).append((entry[1], item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # a loop already closed has no reader left
            pass


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _deliver(entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item) -> None:
    """Hand ``item`` to a request's queue on its event loop; a loop already closed has no reader left."""
    loop, queue = entry
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:
        pass
