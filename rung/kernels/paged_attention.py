"""Attention over a paged KV cache in one pass: causal, sliding windows and sinks, decode and prefill.

The pool holds keys and values at flat slots ``[slots, kv_heads, head_dim]``; a sequence's key at
position p lives at slot ``tables[row, p // block_size] * block_size + p % block_size``. Every query
token i of a flat batch has its ``positions[i]`` and the ``rows[i]`` of its block table, and sees
the keys at positions ``max(0, p - window + 1) .. p`` (``window`` None: from 0). A sink is a
per-head logit that joins the softmax denominator only (gpt-oss); the kernel keeps a running
max and sum (online softmax) and folds the sink in at the end as a rescale, so no score matrix is
ever materialised and the sliding layers read only their window.

``paged_attention_ref`` is the definition (plain PyTorch, any device); ``paged_attention`` runs
the Triton kernel where it can and the reference elsewhere. Work is cut into tiles: a tile is up
to ``BLOCK_M // group`` consecutive query tokens of one sequence, times the ``group`` query heads
that share a kv head (so a decode token fills a tile's rows with its heads). Decode tiles are one
token each and need no host work (CUDA-graph safe); prefill tiles come from the chunk layout.
"""

from __future__ import annotations

import torch

from rung.kernels import use_triton


def paged_attention_ref(q, k_pool, v_pool, tables, rows, positions, block_size: int, window: int | None,
                        sinks: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [N, hq, d]; pools [slots, hkv, d]; tables [R, W] block ids; rows, positions [N] → [N, hq, d].

    Gathers each token's keys up to the longest position in the batch and masks; memory grows as
    N × max position, so this is a reference and a CPU path for short batches, not a long-prompt path."""
    n, hq, d = q.shape
    hkv = k_pool.shape[1]
    group = hq // hkv
    length = int(positions.max()) + 1
    k_pos = torch.arange(length, device=q.device)  # [L]
    # a row's table may be shorter than the batch's longest position: those keys are masked anyway
    blocks = tables.long()[rows.long()][:, (k_pos // block_size).clamp(max=tables.shape[1] - 1)]  # [N, L]
    slots = blocks * block_size + k_pos % block_size
    visible = k_pos[None] <= positions[:, None]  # [N, L]
    if window is not None:
        visible &= k_pos[None] > positions[:, None] - window
    slots = torch.where(visible, slots, 0)  # blocks out of sight may be freed (None → 0 in tables)
    k, v = (torch.where(visible[..., None, None], pool[slots].float(), 0.0) for pool in (k_pool, v_pool))  # [N, L, hkv, d]
    qg = q.float().view(n, hkv, group, d)
    scores = torch.einsum("nhgd,nlhd->nhgl", qg, k) * scale  # [N, hkv, group, L]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, hkv, group, 1).expand(n, hkv, group, 1)
        scores = torch.cat((scores, sink), dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.einsum("nhgl,nlhd->nhgd", probs, v)
    return out.reshape(n, hq, d).to(q.dtype)


def decode_tiles(n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tile per token, token i on table row i: (first token, token count, table row) [n] each."""
    first = torch.arange(n, dtype=torch.int32, device=device)
    return first, torch.ones(n, dtype=torch.int32, device=device), first


def chunk_tiles(chunks: list[tuple[int, int, int]], tokens_per_tile: int, device):
    """Tiles for chunks given as (first flat token, token count, table row), cut every
    ``tokens_per_tile`` tokens so that a tile never spans two sequences."""
    first, count, row = [], [], []
    for start, n, r in chunks:
        for off in range(0, n, tokens_per_tile):
            first.append(start + off)
            count.append(min(tokens_per_tile, n - off))
            row.append(r)
    t = torch.tensor([first, count, row], dtype=torch.int32).to(device)
    return t[0], t[1], t[2]


def tile_rows(group: int, decode: bool, head_dim: int) -> int:
    """Rows of one tile (query tokens × group): small for decode, where a tile is one token."""
    if decode:
        return max(16, 1 << (group - 1).bit_length())
    rows = 64 if head_dim > 64 else 128
    return max(rows, 1 << (group - 1).bit_length())


def paged_attention(q, k_pool, v_pool, tables, positions, tiles, block_size: int, window: int | None,
                    sinks: torch.Tensor | None, scale: float, decode: bool, rows=None) -> torch.Tensor:
    """The fast path: q [N, hq, d] → [N, hq, d]. ``tiles`` from ``decode_tiles`` / ``chunk_tiles``
    (built with ``tokens_per_tile(...)``); ``rows`` [N] (table row per token) is needed only when the
    reference runs instead of the kernel."""
    if use_triton(q, k_pool):
        from rung.kernels.triton_attention import triton_paged_attention

        return triton_paged_attention(q, k_pool, v_pool, tables, positions, tiles, block_size, window, sinks,
                                       scale, decode)
    if rows is None:  # decode tiles: token i on row i
        rows = torch.arange(q.shape[0], device=q.device)
    return paged_attention_ref(q, k_pool, v_pool, tables, rows, positions, block_size, window, sinks, scale)


def tokens_per_tile(num_heads: int, num_kv_heads: int, head_dim: int, decode: bool) -> int:
    group = num_heads // num_kv_heads
    return 1 if decode else tile_rows(group, False, head_dim) // group


def write_kv_ref(k_pool, v_pool, slots, k, v) -> None:
    """This step's keys and values k/v [N, hkv, d] into the pools at ``slots`` [N]."""
    k_pool[slots] = k
    v_pool[slots] = v


def write_kv(k_pool, v_pool, slots, k, v) -> None:
    """One kernel for both pools where Triton runs (two indexed copies are two launches of a
    general scatter kernel, each slower than the tiny copy it does), the reference elsewhere."""
    if use_triton(k, k_pool) and k_pool.stride(-1) == 1 and v_pool.stride(-1) == 1:
        from rung.kernels.triton_attention import triton_write_kv

        return triton_write_kv(k_pool, v_pool, slots, k, v)
    return write_kv_ref(k_pool, v_pool, slots, k, v)
