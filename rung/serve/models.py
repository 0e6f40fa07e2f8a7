"""The models one server serves, routed by the request's ``model``: ``Models.get(name)``.

Each model is a ``Server`` (server.py) with its own engine, template and metrics view; they share
one ``Gate`` (--max-concurrent and the prepare threads) and one metrics registry. A model loads
at start (in the background: /health answers 503 until every such model is ready) or, with
--lazy, on its first request, which waits for it.

With a memory budget, a model about to load first makes room: the least recently used *idle*
model (no request in flight: none being prepared, running, waiting or streaming) is unloaded, then
the next, until the new one fits. A model with work in flight is never unloaded; when nothing can
be, the request gets a 503 that says so. A model's size is measured once it has loaded (weights,
buffers and KV cache); before its first load it is estimated (``estimate_bytes``).

Claims and evictions are decided under one short lock, so a model cannot be unloaded between a
request finding it and the request counting in its ``in_flight``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from rung.serve import logs
from rung.serve.errors import APIError
from rung.serve.responses_store import ResponseStore
from rung.serve.server import Gate, ServeConfig, Server

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "T": 10**12,
          "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KI": 2**10, "MI": 2**20, "GI": 2**30,
          "TI": 2**40}


def parse_size(text: str) -> int:
    """``2GB`` → 2·10⁹ bytes, ``512MiB`` → 512·2²⁰, ``1500000`` → bytes (KB/MB/GB/TB are powers of
    ten, KiB/MiB/GiB/TiB powers of two). Raises ValueError naming the text."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").upper() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: write bytes, or a number with KB, MB, GB, TB (or KiB, MiB, GiB)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"{text!r}: a size must be at least one byte")
    return size


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def estimate_bytes(config: ServeConfig) -> int:
    """What a model will hold before it has loaded once: its weights as they will be served (from
    its config where rung can read one, else its files' size on disk) and its KV cache."""
    from rung.quant.spec import parse_spec
    from rung.weights.resolve import resolve_model

    spec = parse_spec(config.model)
    engine = config.engine
    kv = engine.get("kv_cache_bytes", 512 * 2**20)
    try:
        from rung.describe import resolve, weight_bytes

        _, model_config = resolve(spec.model)
        fmt = {"q8": "int8", "q4": "int4"}.get(spec.weights or "", "bf16")
        weights = weight_bytes(model_config, fmt)
        if fmt == "bf16" and (spec.dtype or config.dtype) == "float32":
            weights *= 2
        return weights + kv
    except Exception:  # a GGUF file, a folder describe cannot read: its size on disk
        path = resolve_model(spec.model)
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        return sum(p.stat().st_size for p in files[:10_000]) + kv


@dataclass
class Slot:
    """One model of the server and where it stands."""

    name: str
    config: ServeConfig
    server: Server | None = None  # loaded and ready
    pending: Future | None = None  # its load, running or queued
    error: BaseException | None = None  # why its last load failed
    at_start: bool = True  # loaded at start (else on its first request)
    starting: bool = False  # its load at start has not succeeded yet: requests get 503, as one model's do
    bytes: int | None = None  # measured after its first load
    last_used: float = 0.0


class Models:
    """The server's models by served name. ``get(name)`` is what a route uses."""

    def __init__(self, configs: list[ServeConfig], lazy: bool = False, memory_budget: int | None = None,
                 metrics=None, gate: Gate | None = None):
        from rung.serve.metrics import Metrics

        if not configs:
            raise ValueError("no model to serve")
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"two models are served as {next(n for n in names if names.count(n) > 1)!r}; "
                             "give each its own --served-model-name")
        self.config = configs[0]  # the server-wide settings (api key, policy, limits) are the same in each
        self.gate = gate or Gate(self.config.max_concurrent, self.config.prepare_threads)
        self.metrics = metrics or Metrics(names[0])
        self.memory_budget = memory_budget
        self.slots = {c.name: Slot(c.name, c, at_start=not lazy, starting=not lazy) for c in configs}
        self.started = int(time.time())
        self._state = threading.Lock()  # claims, evictions and attaching a loaded model
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="rung-load")  # one load at a time
        # stored Responses (previous_response_id) are the server's, whichever model wrote them
        self.responses = ResponseStore(self.config.responses_store_size, self.config.responses_store_ttl,
                                       self.config.responses_store_bytes)

    @classmethod
    def of(cls, server: Server) -> "Models":
        """A registry of one model already built (loaded, loading or failed), as tests make them."""
        models = cls([server.config], metrics=server.metrics, gate=server.gate)
        models.responses = server.responses
        models.slots[server.config.name].server = server  # "starting" until its own load() has ended
        return models

    # ---- loading ----------------------------------------------------------------------------------

    def load_at_start(self) -> tuple[str, BaseException] | None:
        """Load the models that load at start, in order (blocking; run it on a thread). With a budget,
        those that do not fit beside the ones before them wait for their first request. The first
        failure, if any, is returned as (model name, error): the command stops the server on it."""
        used = 0
        for slot in self.slots.values():
            if not slot.at_start:
                continue
            if self.memory_budget is not None and used + estimate_bytes(slot.config) > self.memory_budget:
                slot.at_start = slot.starting = False  # loads on its first request, making room then
                continue
            slot.pending = self._loader.submit(self._load, slot)
            try:
                slot.pending.result()
            except BaseException as e:
                slot.error = slot.error or e
                return slot.name, e
            slot.starting = False
            used += slot.bytes or 0
        return None

    def _load(self, slot: Slot) -> None:
        """Make room, load ``slot``'s model and attach it (on the loader thread)."""
        need = slot.bytes or estimate_bytes(slot.config)
        with self._state:
            victims = self._make_room(slot, need)
        for victim in victims:
            self._unload(victim)
        server = Server(slot.config, metrics=self.metrics.labelled(slot.name), gate=self.gate)
        server.responses = self.responses
        server.load()
        if server.load_error is not None:
            slot.error = server.load_error
            server.unload()
            raise server.load_error
        with self._state:
            slot.server, slot.error, slot.last_used = server, None, time.monotonic()
            slot.bytes = server.memory_bytes()
        logs.event_line("model_loaded", model=slot.name, bytes=slot.bytes)

    def _make_room(self, slot: Slot, need: int) -> list[Server]:
        """Detach the least recently used idle models until ``need`` bytes fit (under ``_state``);
        none unless the new model then fits."""
        budget = self.memory_budget
        if budget is None:
            return []
        if need > budget:
            raise APIError(503, f"the model '{slot.name}' needs about {mb(need)}, more than the memory budget of "
                                f"{mb(budget)}", code="model_over_budget")
        loaded = sorted((s for s in self.slots.values() if s.server is not None and s is not slot),
                        key=lambda s: s.last_used)
        free = budget - sum(s.bytes or 0 for s in loaded)
        victims = []
        for s in loaded:
            if free >= need:
                break
            if s.server.in_flight == 0:  # idle: nothing being prepared, running, waiting or streaming
                victims.append(s)
                free += s.bytes or 0
        if free < need:
            busy = [s.name for s in loaded if s.server.in_flight]
            raise APIError(503, f"cannot load '{slot.name}' (about {mb(need)}) within the memory budget of "
                                f"{mb(budget)}: the loaded models ({', '.join(repr(n) for n in busy)}) have requests in flight; "
                                "retry later", code="model_memory_budget", headers={"Retry-After": "5"})
        servers = []
        for s in victims:
            servers.append(s.server)
            s.server = None
            logs.event_line("model_unloaded", model=s.name, bytes=s.bytes, reason="memory_budget", to_load=slot.name)
        return servers

    def _unload(self, server: Server) -> None:
        server.unload()
        gc.collect()  # the weights and the KV cache go back now, before the next model takes their place

    # ---- routing ----------------------------------------------------------------------------------

    def slot(self, name: str) -> Slot:
        """The model served as ``name``, or the 404 every route gives for an unknown model."""
        slot = self.slots.get(name) if isinstance(name, str) else None
        if slot is None:
            shown = name if len(str(name)) <= 200 else str(name)[:200] + "..."
            served = ", ".join(f"'{n}'" for n in self.slots)
            raise APIError(404, f"The model '{shown}' does not exist; this server serves {served}", "model",
                           "model_not_found")
        return slot

    @contextlib.asynccontextmanager
    async def get(self, name: str):
        """The ready ``Server`` of the model served as ``name``, counted in its ``in_flight`` while
        the block runs (a stream takes its own count, run.py): it is not unloaded meanwhile. Use it
        inside ``admit()``. 404 for an unknown model; 503 while a model that loads at start is
        loading, or after it failed; a lazy (or unloaded) model loads now, making room under the
        budget, and the request waits for it."""
        slot = self.slot(name)
        for _ in range(3):  # a model unloaded again between its load and this claim is loaded again
            server = self._claim(slot)
            if server is not None:
                break
            if slot.starting:
                self._not_ready(slot)
            if slot.pending is None or slot.pending.done():
                slot.pending = self._loader.submit(self._load, slot)
            try:
                await asyncio.wrap_future(slot.pending)
            except APIError:
                raise
            except Exception as e:
                raise APIError(503, f"the model '{slot.name}' failed to load: {e}", code="model_load_failed") from None
        else:
            raise APIError(503, f"the model '{slot.name}' is being swapped in and out; retry shortly",
                           code="model_loading", headers={"Retry-After": "5"})
        try:
            yield server
        finally:
            server.unclaim()

    def _claim(self, slot: Slot) -> Server | None:
        with self._state:
            server = slot.server
            if server is None or not server.ready:
                return None
            server.claim()
            slot.last_used = time.monotonic()
            return server

    def _not_ready(self, slot: Slot) -> None:
        error = self._error(slot)
        if error is not None:
            raise APIError(503, f"the model failed to load: {error}", code="model_load_failed")
        raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                       headers={"Retry-After": "5"})

    @staticmethod
    def _error(slot: Slot) -> BaseException | None:
        return slot.error or (slot.server.load_error if slot.server is not None else None)

    # ---- state ------------------------------------------------------------------------------------

    def loaded(self) -> list[Server]:
        with self._state:
            return [s.server for s in self.slots.values() if s.server is not None]

    def health(self) -> tuple[str, str | None]:
        """("ok", None), ("loading", None), ("failed", why) or ("engine failed", why)."""
        for slot in self.slots.values():
            if not slot.starting or (slot.server is not None and slot.server.ready):
                continue
            error = self._error(slot)
            return ("failed", str(error)) if error is not None else ("loading", None)
        for server in self.loaded():
            if server.engine is not None and server.engine.error is not None:
                return "engine failed", str(server.engine.error)
        return "ok", None

    async def off_loop(self, work, *args):
        return await self.gate.off_loop(work, *args)

    def admit(self):
        return self.gate.admit()

    def tracing(self, name: str | None):
        """The tracer of model ``name``, or of any loaded model (a request refused before its model
        was known); None without --otlp-traces-endpoint."""
        servers = self.loaded()
        named = [s for s in servers if s.config.name == name]
        return next((s.tracing for s in named + servers if s.tracing is not None), None)

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        for server in self.loaded():
            server.shutdown()  # engine, tensor-parallel workers, the last spans
        self.gate.shutdown()


def model_configs(base: ServeConfig, models: list[str], names: list[str] | None) -> list[ServeConfig]:
    """One ServeConfig per ``-m``, named by the ``--served-model-name`` at the same position."""
    names = names or []
    if len(names) > len(models):
        raise ValueError(f"{len(names)} --served-model-name for {len(models)} --model")
    return [dataclasses.replace(base, model=m, served_model_name=names[i] if i < len(names) else None)
            for i, m in enumerate(models)]
