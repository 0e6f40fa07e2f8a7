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
import torch.nn.functional as F
from torch import nn

from rung.engine.paged import Chunk, KVPool
from rung.kernels.elementwise import silu_mul
from rung.kernels.paged_attention import decode_tiles, paged_attention, write_kv

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def unsupported(model) -> str | None:
    """Why the model's decode step cannot be a graph (host work inside the forward), or None."""
    c = model.config
    if c.positions != "rope":
        return f"{c.positions} positions"  # learned: a bounds check on the host; ALiBi: not in the kernel
    if any(r.rope.type == "dynamic" for r in model.rotaries.values()):
        return "dynamic RoPE recomputes its table from the longest position"
    return None


class _Projection:
    """x @ wᵀ + b over a fused matrix. A plain callable, not a module: the model's parameters (now
    views into ``weight``) keep their names, and state_dict does not grow."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act=None):
        self.weight, self.bias, self.act = weight, bias, act

    def __call__(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.act is None:
            return y
        if self.act is F.silu:  # SwiGLU: the product in one kernel on CUDA (kernels/elementwise.py)
            return silu_mul(y)
        gate, up = y.chunk(2, dim=-1)  # a gated MLP: act(gate) * up, one GEMV instead of two
        return self.act(gate) * up


def fuse_projections(model) -> int:
    """q/k/v as one projection and a gated MLP's gate/up as one, through the model's own hooks
    (Attention.qkv_proj, MLP.gate_up): small GEMVs run far below the memory bandwidth on a GPU,
    and three and two of them become one. The separate layers' weights become views into the
    fused matrices, so no memory is added and the parameters keep their names and values (the
    engine applies this once the model is on its device). Returns how many were fused."""
    fused = 0
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "qkv_proj", "absent") is None:
                module.qkv_proj = _fuse((module.q_proj, module.k_proj, module.v_proj))
                fused += 1
            if getattr(module, "gate_up", "absent") is None and module.gate_proj is not None:
                module.gate_up = _fuse((module.gate_proj, module.up_proj), module.act)
                fused += 1
    return fused


def _fuse(parts, act=None) -> _Projection:
    """Concatenate ``parts`` (nn.Linear) and make their parameters views of the result."""
    sizes = [p.out_features for p in parts]
    weight = torch.cat([p.weight for p in parts])
    bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
    for i, p in enumerate(parts):
        p.weight = nn.Parameter(weight.split(sizes)[i], requires_grad=False)
        if bias is not None:
            p.bias = nn.Parameter(bias.split(sizes)[i], requires_grad=False)
    return _Projection(weight, bias, act)


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

    def attend(self, layer, q, k, v, window, scale, sinks, slopes) -> torch.Tensor:
        """q [1, hq, B, d], k/v [1, hkv, B, d] → [1, hq, B, d]."""
        o, b = self.owner, self.size
        pool = o.pool
        g = pool.group_of[layer]
        pool_k, pool_v = pool.keys[layer], pool.values[layer]
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
        self.ids = torch.zeros(top, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(top, dtype=torch.long, device=self.device)
        self.slots = torch.full((groups, top), pool.scratch_slot, dtype=torch.long, device=self.device)
        self.tables = torch.zeros(groups, top, self.max_blocks, dtype=torch.int32, device=self.device)
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

    def _fill(self, ids: torch.Tensor, chunks: list[Chunk], size: int) -> None:
        """Copy this step's inputs into the static buffers (host → device, no sync); rows n..size
        become padding: position 0, writes to the scratch slot."""
        pool, n, bs = self.pool, len(chunks), self.pool.block_size
        groups = len(pool.groups)
        pos = [c.start for c in chunks] + [0] * (size - n)
        slots, width = [], 1
        for g in range(groups):
            row = [c.tables[g][c.start // bs] * bs + c.start % bs for c in chunks]
            slots.append(row + [pool.scratch_slot] * (size - n))
            width = max(width, max(len(c.tables[g]) for c in chunks))
        tables = torch.zeros(groups, n, width, dtype=torch.int32)
        for g in range(groups):
            for i, c in enumerate(chunks):
                t = c.tables[g]
                tables[g, i, : len(t)] = torch.tensor([b or 0 for b in t], dtype=torch.int32)
        self.ids[:n].copy_(ids, non_blocking=True)
        self.pos[:size].copy_(torch.tensor(pos), non_blocking=True)
        self.slots[:, :size].copy_(torch.tensor(slots), non_blocking=True)
        self.tables[:, :n, :width].copy_(tables, non_blocking=True)

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
