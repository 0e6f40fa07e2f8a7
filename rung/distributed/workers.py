"""A tensor-parallel group on one host: rank 0 in the caller's process, ranks 1..N-1 in worker
processes started with torch.multiprocessing (NCCL on CUDA, gloo on the CPU).

Rank 0 owns the engine: it schedules, and before each forward pass sends the step's inputs (token
ids, positions, block tables: a ``Chunk`` list) to every worker, as vLLM's driver worker does.
Every rank then runs the same step on its shard and its own KV pool (its heads' keys and values);
the model's collectives (collectives.py) meet inside the forward pass, and rank 0 samples.

Step inputs travel as raw int64 bytes over a pipe per worker (no pickling, no collective waiting
between steps, so an idle server never times out). Every collective runs under the process
group's timeout. A worker that dies (or fails) takes the group down: rank 0 raises
``EngineDeadError`` naming the rank and its last error, and the workers exit when rank 0's pipe
closes, so nothing waits for ever.
"""

from __future__ import annotations

import os
import socket
import struct
import traceback
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from rung.engine.engine import EngineDeadError
from rung.engine.paged import Chunk

RUN, POOL, FORWARD, STOP = 1, 2, 3, 4
DEFAULT_TIMEOUT_S = float(os.environ.get("RUNG_TP_TIMEOUT", "120"))  # every collective, and start-up
HEADER = struct.Struct("<8q")


# ---- step messages: int64 arrays, no pickle --------------------------------------------------------


def encode_step(ids: torch.Tensor, chunks: list[Chunk], rows: list[int] | None) -> bytes:
    """A RUN message: header, ids, (start, count) per chunk, each chunk's per-group tables
    (length-prefixed, None as -1), the sampled rows (-1 count: all)."""
    groups = len(chunks[0].tables) if chunks else 0
    tables = []
    for ch in chunks:
        for table in ch.tables:
            tables.append(len(table))
            tables.extend(-1 if b is None else b for b in table)
    arrays = [ids.reshape(-1).cpu().numpy().astype(np.int64),
              np.array([(c.start, c.count) for c in chunks], dtype=np.int64).reshape(-1),
              np.array(tables, dtype=np.int64), np.array(rows or [], dtype=np.int64)]
    header = HEADER.pack(RUN, len(arrays[0]), len(chunks), groups, len(arrays[2]), -1 if rows is None else len(rows), 0, 0)
    return header + b"".join(a.tobytes() for a in arrays)


def decode_step(message: bytes) -> tuple[torch.Tensor, list[Chunk], list[int] | None]:
    op, n_ids, n_chunks, groups, n_tables, n_rows, _, _ = HEADER.unpack_from(message)
    body = np.frombuffer(message, dtype=np.int64, offset=HEADER.size)
    if op != RUN or len(body) != n_ids + 2 * n_chunks + n_tables + max(n_rows, 0):
        raise ValueError("tensor parallel: a malformed step message")
    ids = torch.from_numpy(body[:n_ids].copy())
    spans = body[n_ids:n_ids + 2 * n_chunks].reshape(n_chunks, 2)
    flat = body[n_ids + 2 * n_chunks:n_ids + 2 * n_chunks + n_tables].tolist()
    rows = None if n_rows < 0 else body[len(body) - n_rows:].tolist()
    chunks, at = [], 0
    for start, count in spans.tolist():
        tables = []
        for _ in range(groups):
            n = flat[at]
            tables.append([None if b < 0 else b for b in flat[at + 1:at + 1 + n]])
            at += 1 + n
        chunks.append(Chunk(tables, start, count))
    return ids, chunks, rows


def control(op: int, *values: int) -> bytes:
    return HEADER.pack(op, *values, *([0] * (7 - len(values))))


# ---- rank 0 ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: str | torch.device) -> str:
    """NCCL between GPUs, gloo on the CPU. ``RUNG_TP_BACKEND=gloo`` on CUDA lets ranks share GPUs
    (rank r on GPU r mod count): slow, but it checks the GPU path of a split model on one card."""
    if torch.device(device).type != "cuda":
        return "gloo"
    return os.environ.get("RUNG_TP_BACKEND", "nccl")


class TensorParallelGroup:
    """Rank 0's handle: the workers, their pipes, and the step channel. ``start`` returns it with
    rank 0's shard of the model loaded; ``driver(runner)`` wraps rank 0's ModelRunner."""

    def __init__(self, world: int, device: str, timeout_s: float):
        self.world, self.device, self.timeout_s = world, device, timeout_s
        self.processes, self.pipes = [], []
        self.dead: str | None = None

    @classmethod
    def start(cls, model: str, world: int, dtype: str = "float32", device: str = "cpu", fast: bool = True,
              timeout_s: float = DEFAULT_TIMEOUT_S, loader: str | None = None):
        """Start ranks 1..world-1, join the group as rank 0, load rank 0's shard. → (group, model).

        ``loader``: "module:function" called as function(model, dtype, device, rank, world) in every
        rank instead of load_model (benchmarks/gpu_tp.py builds random shards at real shapes); it
        returns the shard with its collectives attached."""
        import torch.multiprocessing as mp

        if world < 2:
            raise ValueError(f"tensor_parallel_size must be at least 2 for a group, got {world}")
        if backend_for(device) == "nccl" and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel_size {world} needs {world} GPUs; {torch.cuda.device_count()} visible")
        group = cls(world, device, timeout_s)
        ctx = mp.get_context("spawn")
        port = free_port()
        for rank in range(1, world):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker_main,
                            args=(rank, world, port, str(model), dtype, device, fast, timeout_s, theirs, loader),
                            daemon=True, name=f"rung-tp-rank{rank}")
            p.start()
            theirs.close()
            group.processes.append(p)
            group.pipes.append(ours)
        try:
            _init(0, world, port, device, timeout_s)
            shard = _load_shard(model, dtype, device, fast, 0, world, loader)
            group._wait_ready()
            shard.register_forward_pre_hook(group._mirror_forward, with_kwargs=True)
        except BaseException:
            group.shutdown()
            raise
        return group, shard

    def _wait_ready(self) -> None:
        for rank, pipe in enumerate(self.pipes, 1):
            if not pipe.poll(self.timeout_s):
                raise EngineDeadError(f"tensor parallel rank {rank} did not load its shard within {self.timeout_s:.0f} s")
            reply = pipe.recv_bytes()
            if reply != b"ready":
                raise EngineDeadError(f"tensor parallel rank {rank} failed to start: {reply.decode(errors='replace')}")

    def send(self, message: bytes) -> None:
        """Send one message to every worker, first checking that they all still run."""
        self.check()
        try:
            for pipe in self.pipes:
                pipe.send_bytes(message)
        except OSError as e:
            self.check()
            raise self._die(f"tensor parallel: a worker's pipe closed ({e})") from None

    def check(self) -> None:
        if self.dead:
            raise EngineDeadError(self.dead)
        for rank, (p, pipe) in enumerate(zip(self.processes, self.pipes), 1):
            if not p.is_alive():
                why = ""
                try:
                    if pipe.poll(0):
                        why = ": " + pipe.recv_bytes().decode(errors="replace")
                except (OSError, EOFError):
                    pass
                raise self._die(f"tensor parallel rank {rank} exited with code {p.exitcode}{why}")

    def _die(self, message: str) -> EngineDeadError:
        self.dead = message
        self.shutdown()
        return EngineDeadError(message)

    def failed(self, error: BaseException) -> EngineDeadError:
        """A collective on rank 0 failed: find the rank that went, take the group down."""
        for p in self.processes:
            p.join(timeout=2)
        try:
            self.check()
        except EngineDeadError as e:
            return e
        return self._die(f"tensor parallel step failed on rank 0: {type(error).__name__}: {error}")

    def driver(self, runner, pool):
        """Rank 0's ModelRunner, wrapped: each forward pass is first sent to the workers."""
        self.send(control(POOL, pool.num_blocks, pool.block_size))
        return DriverRunner(runner, self)

    def forward(self, model, ids: torch.Tensor) -> torch.Tensor:
        """A full forward pass (no cache) on every rank; rank 0's logits [b, t, vocab]. The same as
        calling rank 0's model: its pre-hook (``_mirror_forward``) sends the pass to the workers."""
        return self._guard(lambda: model(ids.to(_rank_device(self.device, 0))))

    def _mirror_forward(self, model, args, kwargs):
        """Rank 0's ``model(ids)`` (perplexity, a test) runs on every rank: the workers are sent the
        ids first. The engine's steps do not come here (the runner calls hidden_states/logits)."""
        ids = args[0] if args else kwargs["input_ids"]
        if (args[1:] and args[1] is not None) or kwargs.get("cache") is not None:
            raise ValueError("a tensor-parallel model runs cached steps through its engine only; call it without a cache")
        b, t = ids.shape
        self.send(control(FORWARD, b, t) + ids.reshape(-1).to(torch.int64).cpu().numpy().tobytes())

    def _guard(self, fn):
        try:
            return fn()
        except EngineDeadError:
            raise
        except Exception as e:  # noqa: BLE001 - a collective broke: which rank, and why
            raise self.failed(e) from None

    def shutdown(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send_bytes(control(STOP))
            except OSError:
                pass
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for pipe in self.pipes:
            pipe.close()
        self.processes, self.pipes = [], []
        if dist.is_initialized():
            dist.destroy_process_group()


class DriverRunner:
    """Rank 0's runner: sends the step to the workers, then runs it itself."""

    def __init__(self, runner, group: TensorParallelGroup):
        self.inner, self.group = runner, group
        self.ahead = None

    runs_ahead = False  # the steps run one at a time: the workers follow rank 0's host

    def run(self, ids: torch.Tensor, chunks: list[Chunk], rows: list[int] | None = None) -> torch.Tensor:
        self.group.send(encode_step(ids, chunks, rows))
        return self.group._guard(lambda: self.inner.run(ids, chunks, rows))

    def take_ahead(self):
        return None

    def __getattr__(self, name):  # graphs, cpu_decode, pool, ...: rank 0's
        return getattr(self.inner, name)


# ---- ranks 1..N-1 ----------------------------------------------------------------------------------


def _rank_device(device: str, rank: int) -> torch.device:
    d = torch.device(device)
    return torch.device("cuda", rank % torch.cuda.device_count()) if d.type == "cuda" else d


def _init(rank: int, world: int, port: int, device: str, timeout_s: float) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(_rank_device(device, rank))
    dist.init_process_group(backend_for(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))


def _worker_main(rank, world, port, model, dtype, device, fast, timeout_s, pipe, loader=None) -> None:
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
        _init(rank, world, port, device, timeout_s)
        shard = _load_shard(model, dtype, device, fast, rank, world, loader)
        pipe.send_bytes(b"ready")
        _serve(shard, _rank_device(device, rank), pipe)
    except (EOFError, OSError):
        pass  # rank 0 went away: nothing left to do
    except BaseException as e:  # noqa: BLE001 - report, then exit non-zero
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        try:
            pipe.send_bytes(last.encode())
        except OSError:
            pass
        os._exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _load_shard(model, dtype, device, fast, rank, world, loader=None):
    if loader is not None:
        import importlib

        module, _, function = loader.partition(":")
        return getattr(importlib.import_module(module), function)(model, dtype, _rank_device(device, rank), rank, world)
    from rung.weights.loader import load_model

    return load_model(model, dtype=dtype, device=_rank_device(device, rank), fast=fast, tensor_parallel=(rank, world))


@torch.inference_mode()
def _serve(model, device: torch.device, pipe) -> None:
    from rung.engine.engine import EngineConfig
    from rung.engine.paged import KVPool
    from rung.engine.runner import ModelRunner

    runner = None
    dtype = next(model.parameters()).dtype
    while True:
        message = pipe.recv_bytes()
        op = HEADER.unpack_from(message)[0]
        if op == STOP:
            return
        if op == POOL:
            _, num_blocks, block_size, *_ = HEADER.unpack_from(message)
            pool = KVPool(model.config, num_blocks, block_size, dtype, device)
            runner = ModelRunner(model, pool, EngineConfig(cuda_graphs=False, cpu_decode=False, overlap=False),
                                 model.config.max_position_embeddings or 2048)
        elif op == RUN:
            ids, chunks, rows = decode_step(message)
            runner.run(ids.to(device), chunks, rows)
        elif op == FORWARD:
            _, b, t, *_ = HEADER.unpack_from(message)
            ids = np.frombuffer(message, dtype=np.int64, offset=HEADER.size, count=b * t)
            model(torch.from_numpy(ids.copy()).view(b, t).to(device))
        else:
            raise ValueError(f"tensor parallel: unknown message {op}")
