"""The paged KV cache: block pools per layer, and the attention context of one engine step.

Layers are grouped by their attention window (full layers in one group, each sliding window in
its own): a group's layers share block tables, so a sliding group can drop the blocks that fell
out of its window while the full group keeps everything. Each layer owns flat pools
``[num_blocks * block_size, kv_heads, head_dim]`` for keys and values; position p of a sequence
lives at slot ``table[p // block_size] * block_size + p % block_size``.

``PagedStep`` implements the model's cache seam (model/cache.py) for a flat batch of tokens from
many sequences: it writes each layer's new keys and values to their slots and attends. On CUDA
with Triton one kernel reads the pools through the block tables for the whole batch, windows and
sinks included (kernels/paged_attention.py); elsewhere it gathers every sequence's visible keys
and runs the model's attention: decode tokens (one per sequence) as one padded batch, prefill
chunks one sequence at a time. One slot past the blocks (``scratch_slot``) takes the writes of
padding rows (CUDA-graph batches are padded to a bucket size).

Latent attention (DeepSeek's MLA, model/mla.py) keeps what DeepSeek caches: the pools of a layer
hold its compressed latent ``[slots, 1, kv_lora_rank]`` (in place of keys) and its RoPE key part
``[slots, 1, qk_rope_head_dim]`` (in place of values), so blocks, tables, swaps and offloads work
unchanged and a token costs ``kv_lora_rank + qk_rope_head_dim`` values per layer. Decode tokens
attend in the absorbed form over the gathered latents; prefill chunks expand them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rung import native
from rung.config import ModelConfig
from rung.engine.blocks import BlockAllocator
from rung.kernels import use_triton
from rung.kernels.paged_attention import (SDPA_MIN_TOKENS, chunk_tiles, decode_tiles, paged_attention, prefill_kernel,
                                          sdpa_prefill, tokens_per_tile, write_kv, write_kv_ref)
from rung.model.attention import attend, attention_bias


@dataclass
class Group:
    """Layers that share a window, their block tables' allocator."""

    window: int | None
    layers: list[int]
    allocator: BlockAllocator

    def first_needed(self, position: int) -> int:
        """The oldest position a query at ``position`` can still see."""
        return 0 if self.window is None else max(0, position - self.window + 1)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeroed memory. On the CPU it comes from calloc (NumPy's zeros), whose large blocks are fresh
    pages the OS maps on first write: a pool sized for long contexts costs the blocks a run
    writes in resident memory, not its size (torch.zeros writes every page)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class KVPool:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.block_size, self.num_blocks = block_size, num_blocks
        windows = sorted({config.layer_window(i) for i in range(config.num_layers)}, key=lambda w: (w is not None, w))
        self.groups = [Group(w, [i for i in range(config.num_layers) if config.layer_window(i) == w],
                             BlockAllocator(num_blocks, block_size)) for w in windows]
        self.group_of = {layer: g for g, group in enumerate(self.groups) for layer in group.layers}
        self.scratch_slot = num_blocks * block_size
        slots = num_blocks * block_size + 1
        if config.mla is not None:  # MLA: the latent where keys go, the RoPE key part where values go
            key_shape, value_shape = (slots, 1, config.mla.kv_lora_rank), (slots, 1, config.mla.qk_rope_head_dim)
        else:
            key_shape = value_shape = (slots, config.num_kv_heads, config.head_dim)
        self.keys = [_zeros(key_shape, dtype, device) for _ in range(config.num_layers)]
        self.values = [_zeros(value_shape, dtype, device) for _ in range(config.num_layers)]

    @staticmethod
    def blocks_for(config: ModelConfig, memory_bytes: int, block_size: int, dtype: torch.dtype) -> int:
        """How many blocks per group fit in ``memory_bytes`` of KV cache."""
        per_block = config.num_layers * block_size * config.kv_cache_width * torch.tensor([], dtype=dtype).element_size()
        return max(1, memory_bytes // per_block)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def slots(self, table: list[int | None], start: int, stop: int) -> torch.Tensor:
        """Slot indices of positions [start, stop) of a sequence whose group table is ``table``."""
        bs = self.block_size
        return torch.tensor([table[p // bs] * bs + p % bs for p in range(start, stop)], dtype=torch.long)

    def copy_blocks_out(self, group: int, blocks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The contents of ``blocks`` of one group, per layer, on the CPU (swap out / offload)."""
        idx = self._block_slots(blocks)
        return [(self.keys[l][idx].cpu(), self.values[l][idx].cpu()) for l in self.groups[group].layers]

    def copy_blocks_in(self, group: int, blocks: list[int], data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        idx = self._block_slots(blocks)
        for layer, (k, v) in zip(self.groups[group].layers, data):
            self.keys[layer][idx] = k.to(self.keys[layer].device)
            self.values[layer][idx] = v.to(self.values[layer].device)

    def _block_slots(self, blocks: list[int]) -> torch.Tensor:
        bs = self.block_size
        return (torch.tensor(blocks, dtype=torch.long)[:, None] * bs + torch.arange(bs)).reshape(-1)


@dataclass
class Chunk:
    """One sequence's part of a step: tokens at positions [start, start + count)."""

    tables: list[list[int | None]]  # per group
    start: int
    count: int


class PagedStep:
    """The cache seam for one step over a flat batch [1, N] of chunks (decodes first)."""

    def __init__(self, pool: KVPool, chunks: list[Chunk], device: torch.device):
        self.pool, self.chunks, self.device = pool, chunks, device
        self.n_decode = 0
        while self.n_decode < len(chunks) and chunks[self.n_decode].count == 1:
            self.n_decode += 1
        self._positions = torch.cat([torch.arange(c.start, c.start + c.count) for c in chunks]).to(device)
        self._slots = [torch.cat([pool.slots(c.tables[g], c.start, c.start + c.count) for c in chunks]).to(device)
                       for g in range(len(pool.groups))]
        self._reads: dict = {}  # per (group, exact, dtype): what each part of the batch reads
        self._kernel_reads: dict = {}  # per group: block tables and tiles for the kernel

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        return self._positions

    def advance(self, t: int) -> None:
        pass  # the engine moves each sequence on

    def kv_destination(self, layer: int):
        """(k_pool, v_pool, slots [N]) where the one-kernel q/k path (kernels/modules.py's
        FusedQKAttention) stores this step's keys and values itself, handing ``attend`` None for
        them: the pool write is the keys' only copy. None (k and v come back) where the step may
        attend fresh prompts through SDPA, which reads them where the projection left them."""
        window = self.pool.groups[self.pool.group_of[layer]].window
        if self._sdpa_possible(window):
            return None
        return self.pool.keys[layer], self.pool.values[layer], self._slots[self.pool.group_of[layer]]

    def _sdpa_possible(self, window: int | None) -> bool:
        """Whether ``prefill_kernel`` may answer "sdpa" for this step (sinks aside, which the
        layer knows): prompts from position 0 only, each long enough, none outgrowing the window."""
        counts = [c.count for c in self.chunks]
        return (self.n_decode == 0 and all(c.start == 0 for c in self.chunks) and max(counts) >= SDPA_MIN_TOKENS
                and (window is None or window >= max(counts)))

    def attend(self, layer, q, k, v, window, scale, sinks, slopes, softcap=None) -> torch.Tensor:
        """q [1, hq, N, d], k/v [1, hkv, N, d] (None: already in the pool, see ``kv_destination``)
        → [1, hq, N, d]. Soft-capped scores (Gemma 2) take the PyTorch path: neither the native nor
        the Triton kernel caps them."""
        g = self.pool.group_of[layer]
        pool_k, pool_v = self.pool.keys[layer], self.pool.values[layer]
        slots = self._slots[g]
        plain = slopes is None and softcap is None  # what the kernels cover
        if (self.n_decode == len(self.chunks) and plain and q.dtype == torch.float32
                and q.device.type == "cpu" and native.available() and q.stride(-1) == k.stride(-1) == 1
                and k.stride() == v.stride()):
            # a pure decode step on the CPU: one native call writes this step's keys and values and
            # attends, reading q, k, v where the projection left them
            idx, _ = self._read_plan(g, sinks is not None, slopes, q.dtype)[0]
            sink = None if sinks is None else sinks.float().contiguous()
            out = native.decode_attention(q[0].transpose(0, 1), pool_k, pool_v, idx, self._decode_lengths(g), scale,
                                          sink, k[0].transpose(0, 1), v[0].transpose(0, 1), slots)
            return out.transpose(0, 1)[None]  # [1, hq, B, d]
        if k is not None:
            write_kv(pool_k, pool_v, slots, k[0].transpose(0, 1), v[0].transpose(0, 1))  # [N, hkv, d] each
        if plain and use_triton(q, pool_k):
            decode = self.n_decode == len(self.chunks)
            starts, counts = [c.start for c in self.chunks], [c.count for c in self.chunks]
            kind = "decode" if decode else prefill_kernel(starts, counts, window, sinks is not None, sdpa=k is not None)
            if kind == "sdpa":  # fresh prompts: SDPA on their own k and v (views), the pool written above
                outs, offset = [], 0
                for c in self.chunks:
                    part = slice(offset, offset + c.count)
                    outs.append(sdpa_prefill(q[:, :, part], k[:, :, part], v[:, :, part], scale))
                    offset += c.count
                return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
            tables, tiles = self._kernel_plan(g, q.shape[1], pool_k.shape[1], q.shape[3], kind, q.dtype)
            out = paged_attention(q[0].transpose(0, 1), pool_k, pool_v, tables, self._positions, tiles,
                                  self.pool.block_size, window, sinks, scale, decode,
                                  flash=kind == "flash")  # [N, hq, d]
            return out.transpose(0, 1)[None]
        reads = self._read_plan(g, sinks is not None, slopes, q.dtype)
        outs = []
        if self.n_decode:
            idx, bias = reads[0]  # [B, L], [B, 1|H, 1, L]
            if plain and q.dtype == torch.float32 and q.device.type == "cpu" and native.available():
                # rung's CPU kernel reads the pool through idx: no gathered copies, one call
                qb = q[0, :, : self.n_decode].transpose(0, 1).contiguous()  # [B, hq, d]
                sink = None if sinks is None else sinks.float().contiguous()
                out = native.decode_attention(qb, pool_k, pool_v, idx, self._decode_lengths(g), scale, sink)
                outs.append(out.transpose(0, 1)[None])  # [1, hq, B, d]
            else:
                kb = pool_k[idx].permute(0, 2, 1, 3)  # [B, hkv, L, d]
                vb = pool_v[idx].permute(0, 2, 1, 3)
                qb = q[0, :, : self.n_decode].transpose(0, 1)[:, :, None]  # [B, hq, 1, d]
                outs.append(attend(qb, kb, vb, bias, scale, sinks, softcap)[:, :, 0].transpose(0, 1)[None])  # [1, hq, B, d]
        offset = self.n_decode
        for chunk, (idx, bias) in zip(self.chunks[self.n_decode:], reads[1 if self.n_decode else 0:]):
            qc = q[:, :, offset: offset + chunk.count]
            kc = pool_k[idx].transpose(0, 1)[None]  # [1, hkv, L, d]
            vc = pool_v[idx].transpose(0, 1)[None]
            outs.append(attend(qc, kc, vc, bias, scale, sinks, softcap))
            offset += chunk.count
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    def attend_latent(self, layer, q_nope, q_rope, latent, k_rope, mla) -> torch.Tensor:
        """MLA: q_nope/q_rope [1, h, N, dn|dr], latent [1, 1, N, r], k_rope [1, 1, N, dr] → [1, h, N, dv].
        The step's latents and RoPE keys go to the pools; decode tokens attend in the absorbed form
        over their gathered latents (one padded batch), prefill chunks expand theirs."""
        g = self.pool.group_of[layer]
        pool_c, pool_r = self.pool.keys[layer], self.pool.values[layer]
        write_kv_ref(pool_c, pool_r, self._slots[g], latent[0].transpose(0, 1), k_rope[0].transpose(0, 1))
        reads = self._read_plan(g, False, None, q_nope.dtype)
        outs = []
        if self.n_decode:
            idx, bias = reads[0]  # [B, L], [B, 1, 1, L]
            rows = slice(0, self.n_decode)
            qn, qr = (x[0, :, rows].transpose(0, 1)[:, :, None] for x in (q_nope, q_rope))  # [B, h, 1, d]
            c, r = pool_c[idx].transpose(1, 2), pool_r[idx].transpose(1, 2)  # [B, 1, L, r|dr]
            outs.append(mla.absorbed(qn, qr, c, r, bias)[:, :, 0].transpose(0, 1)[None])  # [1, h, B, dv]
        offset = self.n_decode
        for chunk, (idx, bias) in zip(self.chunks[self.n_decode:], reads[1 if self.n_decode else 0:]):
            rows = slice(offset, offset + chunk.count)
            c, r = pool_c[idx].transpose(0, 1)[None], pool_r[idx].transpose(0, 1)[None]  # [1, 1, L, r|dr]
            outs.append(mla.expanded(q_nope[:, :, rows], q_rope[:, :, rows], c, r, bias))
            offset += chunk.count
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    def decode_plan(self, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A decode-only step's reads and writes in group g: the slots each row sees [B, L] int64,
        how many of them [B], and the slot its new key and value go to [B]."""
        return self._read_plan(g, False, None, torch.float32)[0][0], self._decode_lengths(g), self._slots[g]

    def _decode_lengths(self, g: int) -> torch.Tensor:
        """How many keys each decode token sees in group g (its row of the read plan's idx)."""
        key = ("lengths", g)
        if key not in self._reads:
            group = self.pool.groups[g]
            self._reads[key] = torch.tensor([c.start + 1 - group.first_needed(c.start)
                                             for c in self.chunks[: self.n_decode]], dtype=torch.long)
        return self._reads[key]

    def _kernel_plan(self, g: int, num_heads: int, num_kv_heads: int, head_dim: int, kind: str, dtype):
        """Block tables [chunks, widest] (blocks a sliding group dropped read as 0, never visited)
        and the tiles of the ``kind`` of kernel ("decode", "flash", "packed"); once per step, group
        and kind."""
        key = (g, kind)
        if key not in self._kernel_reads:
            tables = [[b or 0 for b in c.tables[g]] for c in self.chunks]
            width = max(1, max(len(t) for t in tables))
            tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).to(self.device)
            if kind == "decode":
                tiles = decode_tiles(len(self.chunks), self.device)
            else:
                layout, offset = [], 0
                for row, c in enumerate(self.chunks):
                    layout.append((offset, c.count, row))
                    offset += c.count
                per_tile = tokens_per_tile(num_heads, num_kv_heads, head_dim, False, flash=kind == "flash", dtype=dtype)
                tiles = chunk_tiles(layout, per_tile, self.device)
            self._kernel_reads[key] = tables, tiles
        return self._kernel_reads[key]

    def _read_plan(self, g: int, exact: bool, slopes, dtype):
        """Per part of the batch (the decode batch, then each prefill chunk): the slots to gather
        and the attention bias. Computed once per step and group, shared by the group's layers."""
        key = (g, exact, dtype)
        if key in self._reads:
            return self._reads[key]
        group, pool = self.pool.groups[g], self.pool
        plan = []
        if self.n_decode:
            rows, spans = [], []
            for c in self.chunks[: self.n_decode]:
                lo = group.first_needed(c.start)
                rows.append(pool.slots(c.tables[g], lo, c.start + 1))
                spans.append((lo, c.start + 1))
            width = max(len(r) for r in rows)
            idx = torch.zeros(len(rows), width, dtype=torch.long)
            k_pos = torch.zeros(len(rows), width)
            visible = torch.zeros(len(rows), width, dtype=torch.bool)
            for i, (r, (lo, hi)) in enumerate(zip(rows, spans)):
                idx[i, : len(r)] = r
                k_pos[i, : len(r)] = torch.arange(lo, hi)
                visible[i, : len(r)] = True  # the window was applied by choosing lo
            bias = torch.zeros(len(rows), 1, 1, width, dtype=dtype).masked_fill(~visible[:, None, None], float("-inf"))
            if slopes is not None:
                bias = bias + (slopes.cpu()[None, :, None, None] * k_pos[:, None, None, :]).to(dtype)
            plan.append((idx.to(self.device), bias.to(self.device)))
        for c in self.chunks[self.n_decode:]:
            lo = group.first_needed(c.start)
            idx = pool.slots(c.tables[g], lo, c.start + c.count)
            q_pos = torch.arange(c.start, c.start + c.count)
            bias = attention_bias(q_pos, torch.arange(lo, c.start + c.count), group.window,
                                  None if slopes is None else slopes.cpu(), dtype, exact=exact)
            plan.append((idx.to(self.device), bias if bias is None or isinstance(bias, str) else bias.to(self.device)))
        self._reads[key] = plan
        return plan
