"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, over the paged cache.

A decode step is the same few hundred kernels every time; launched one by one from Python they
cost more than they compute at small batches. ``DecodeGraphs`` runs a decode-only batch (one
token per sequence) through a static-shape path: token ids, positions, write slots and block
tables live in preallocated device tensors that are updated in place before each replay, the
attention is the paged kernel (kernels/paged_attention.py, which reads everything it needs from
device memory), and the MoE is the fused one (no host synchronisation). A batch of n sequences
runs in the graph of the smallest bucket ≥ n; the padding rows write their keys to the pool's
scratch slot and their logits are dropped.

Graphs are captured lazily, the first time a bucket is needed, after two eager warm-up runs (which
also compile the Triton kernels). Anything that cannot be captured turns the graphs off and the
engine falls back to eager steps. ``capture=False`` runs the same static path eagerly: that is how
the CPU tests check it against ``PagedStep``.
"""

from __future__ import annotations

import logging

import torch

from rung.engine.paged import Chunk, KVPool
from rung.kernels.paged_attention import decode_tiles, paged_attention, write_kv

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def unsupported(model) -> str | None:
    """Why the model's decode step cannot be a graph (host work inside the forward), or None."""
    c = model.config
    if c.positions != "rope":
        return f"{c.positions} positions"  # learned: a bounds check on the host; ALiBi: not in the kernel
    if any(r.rope.type in ("dynamic", "longrope") for r in model.rotaries.values()):
        return f"{c.rope.type} RoPE picks its table from the longest position"
    if c.mla is not None:
        return "multi-head latent attention (its decode step runs the PyTorch absorbed form)"
    if c.attn_logit_softcap is not None:
        return "soft-capped attention scores (the paged kernel does not cap them)"
    return None


class StaticDecode:
    """The cache seam over preallocated tensors for a batch of ``size`` rows (the first rows of
    ``DecodeGraphs``' buffers)."""

    def __init__(self, owner: "DecodeGraphs", size: int):
        self.owner, self.size = owner, size
        self.tiles = decode_tiles(size, owner.device)

    def positions(self, t: int, device) -> torch.Tensor:
        return self.owner.pos[: self.size]

    def advance(self, t: int) -> None:
        pass

    def kv_destination(self, layer: int):
        """(k_pool, v_pool, slots [B]) of this layer: the one-kernel q/k attention (kernels/modules.py's
        FusedQKAttention) writes the step's keys and values there itself and hands ``attend`` None."""
        o = self.owner
        pool = o.pool
        return pool.keys[layer], pool.values[layer], o.slots[pool.group_of[layer], : self.size]

    def attend(self, layer, q, k, v, window, scale, sinks, slopes) -> torch.Tensor:
        """q [1, hq, B, d], k/v [1, hkv, B, d] (None: already in the pool) → [1, hq, B, d]."""
        o, b = self.owner, self.size
        pool = o.pool
        g = pool.group_of[layer]
        pool_k, pool_v = pool.keys[layer], pool.values[layer]
        if k is not None:
            write_kv(pool_k, pool_v, o.slots[g, :b], k[0].transpose(0, 1), v[0].transpose(0, 1))
        out = paged_attention(q[0].transpose(0, 1), pool_k, pool_v, o.tables[g, :b], o.pos[:b], self.tiles,
                              pool.block_size, window, sinks, scale, decode=True)
        return out.transpose(0, 1)[None]


class DecodeGraphs:
    def __init__(self, model, pool: KVPool, max_model_len: int, max_seqs: int, capture: bool = True):
        self.model, self.pool, self.capture = model, pool, capture
        self.device = pool.keys[0].device
        self.buckets = [b for b in BUCKETS if b < max_seqs] + [max_seqs]
        top, groups = self.buckets[-1], len(pool.groups)
        self.max_blocks = -(-max_model_len // pool.block_size)
        # the graphs' inputs, one device buffer: ids, positions and each group's write slots as rows
        self._inputs = torch.zeros(2 + groups, top, dtype=torch.long, device=self.device)
        self.ids, self.pos, self.slots = self._inputs[0], self._inputs[1], self._inputs[2:]
        self.slots.fill_(pool.scratch_slot)
        self.tables = torch.zeros(groups, top, self.max_blocks, dtype=torch.int32, device=self.device)
        # Host staging in pinned memory (so the copies are truly asynchronous: from pageable memory
        # the driver may wait for the stream), written in place through numpy views. The inputs
        # are copied whole each step (a few KB); there are two, used in turn, so that one is never
        # rewritten while its copy may still be queued behind the step before (an event says when
        # it ran). The tables are copied only for the rows that changed: a sequence's table grows
        # by one block every block_size steps, so most steps copy none.
        pinned = self.device.type == "cuda"
        self._staged = [torch.zeros(2 + groups, top, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._staged_np = [t.numpy() for t in self._staged]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._tables = torch.zeros(groups, top, self.max_blocks, dtype=torch.int32, pin_memory=pinned)
        self._tables_np = self._tables.numpy()
        self._tables_copied: torch.cuda.Event | None = None
        self._rows: list[list[tuple[list, int] | None]] = [[None] * top for _ in range(groups)]  # on the device now
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self.mempool = torch.cuda.graph_pool_handle() if capture else None
        self.enabled = True
        self.steps = 0  # decode steps run here (replayed, or eager with capture=False)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def run(self, ids: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor | None:
        """ids [n] of a decode-only batch → logits [n, vocab] float32, or None when this batch
        cannot run here (too many rows, a position past the tables, graphs turned off)."""
        n = len(chunks)
        size = self.bucket(n)
        if not self.enabled or size is None or any(c.count != 1 for c in chunks):
            return None
        if any(c.start >= self.max_blocks * self.pool.block_size for c in chunks):
            return None
        self._fill(ids, chunks, size)
        if not self.capture:
            self.steps += 1
            return self._forward(size)[:n]
        if size not in self.graphs and not self._capture(size):
            return None
        graph, logits = self.graphs[size]
        graph.replay()
        self.steps += 1
        return logits[:n]

    def _fill(self, ids, chunks: list[Chunk], size: int) -> None:
        """Copy this step's inputs into the static buffers (host → device, no sync); rows n..size
        become padding: position 0, writes to the scratch slot. ``ids`` [n]: a device tensor (the
        previous step's tokens: a device copy) or host ids."""
        pool, n, bs = self.pool, len(chunks), self.pool.block_size
        turn, self._turn = self._turn, self._turn ^ 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # its copy was queued two steps ago: long done
        staged = self._staged_np[turn]  # [2 + groups, top]
        on_device = isinstance(ids, torch.Tensor) and ids.device.type == self.device.type
        if not on_device:
            staged[0, :n] = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        staged[1, :n] = [c.start for c in chunks]
        staged[1, n:size] = 0
        for g in range(len(pool.groups)):
            staged[2 + g, :n] = [c.tables[g][c.start // bs] * bs + c.start % bs for c in chunks]
            staged[2 + g, n:size] = pool.scratch_slot
        self._inputs.copy_(self._staged[turn], non_blocking=True)
        self._copied[turn] = self._event()
        if on_device:
            self.ids[:n].copy_(ids)
        if self._tables_copied is not None:
            self._tables_copied.synchronize()  # queued right behind the step the engine last waited for
        if any([self._fill_tables(g, chunks) for g in range(len(pool.groups))]):
            self._tables_copied = self._event()

    def _event(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None  # CPU copies are done when they return
        event = torch.cuda.Event()
        event.record()
        return event

    def _fill_tables(self, g: int, chunks: list[Chunk]) -> bool:
        """Group g's block tables of rows 0..n: only rows whose table is not what the device holds
        (another sequence in the row, or blocks appended) are written, and the whole rows from the
        first to the last of them copied (contiguous). Returns whether anything was copied."""
        seen, rows, changed = self._rows[g], self._tables_np[g], []
        for i, c in enumerate(chunks):
            table = c.tables[g]
            held = seen[i]
            if held is not None and held[0] is table and held[1] == len(table):
                continue  # the same list, as long: the same blocks (a window only turns old ones to None)
            start = held[1] if held is not None and held[0] is table and held[1] < len(table) else 0
            rows[i, start: len(table)] = [b or 0 for b in table[start:]]
            seen[i] = (table, len(table))  # the list itself, not its id: a freed list's id is reused
            changed.append(i)
        if changed:
            lo, hi = changed[0], changed[-1] + 1
            self.tables[g, lo:hi].copy_(self._tables[g, lo:hi], non_blocking=True)
        return bool(changed)

    def _forward(self, size: int) -> torch.Tensor:
        context = StaticDecode(self, size)
        hidden = self.model.hidden_states(self.ids[:size][None], context)[0]  # [size, hidden]
        return self.model.logits(hidden)

    def _capture(self, size: int) -> bool:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: compiles the kernels, settles the allocator
                    self._forward(size)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                logits = self._forward(size)
        except Exception as exc:  # anything uncapturable: eager steps from now on
            log.warning("CUDA graph capture of a %d-row decode step failed (%s); decoding eagerly", size, exc)
            self.enabled = False
            torch.cuda.synchronize()
            return False
        self.graphs[size] = graph, logits
        return True
