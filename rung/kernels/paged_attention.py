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

import contextlib
import contextvars

import torch

from rung.kernels import use_triton

_ROUND_OUTPUT = contextvars.ContextVar("rung_attention_rounds_output", default=False)


@contextlib.contextmanager
def output_rounded_for_dp4a():
    """Within it, the Triton decode attention also writes its output's int8 rounding per run of 32
    (kernels/triton_dp4a.py's hand-off), which a packed q8 / q4 o_proj's GEMV reads instead of
    launching ``quantize_runs``: set around an attention whose o_proj is one (kernels/modules.py's
    FusedQKAttentionXq), so that nothing more is written elsewhere."""
    token = _ROUND_OUTPUT.set(True)
    try:
        yield
    finally:
        _ROUND_OUTPUT.reset(token)


def paged_attention_ref(q, k_pool, v_pool, tables, rows, positions, block_size: int, window: int | None,
                        sinks: torch.Tensor | None, scale: float, softcap: float | None = None) -> torch.Tensor:
    """q [N, hq, d]; pools [slots, hkv, d]; tables [R, W] block ids; rows, positions [N] → [N, hq, d].
    ``softcap``: scores become cap · tanh(score / cap) before the mask (Gemma 2's attention softcap).

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
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
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
                    sinks: torch.Tensor | None, scale: float, decode: bool, rows=None,
                    flash: bool = False) -> torch.Tensor:
    """The fast path: q [N, hq, d] → [N, hq, d]. ``tiles`` from ``decode_tiles`` / ``chunk_tiles``
    (built with ``tokens_per_tile(..., flash=flash)``); ``flash``: prefill chunks through the
    FlashAttention-2 kernel (``prefill_kernel`` says when); ``rows`` [N] (table row per token) is
    needed only when the reference runs instead of the kernel."""
    if use_triton(q, k_pool):
        if flash and not decode:
            from rung.kernels.triton_attention import flash_prefill_attention

            return flash_prefill_attention(q, k_pool, v_pool, tables, positions, tiles, block_size, window, sinks,
                                           scale)
        from rung.kernels.triton_attention import triton_paged_attention

        return triton_paged_attention(q, k_pool, v_pool, tables, positions, tiles, block_size, window, sinks,
                                       scale, decode, runs=_ROUND_OUTPUT.get())
    if rows is None:  # decode tiles: token i on row i
        rows = torch.arange(q.shape[0], device=q.device)
    return paged_attention_ref(q, k_pool, v_pool, tables, rows, positions, block_size, window, sinks, scale)


def tokens_per_tile(num_heads: int, num_kv_heads: int, head_dim: int, decode: bool, flash: bool = False,
                    dtype: torch.dtype = torch.bfloat16) -> int:
    group = num_heads // num_kv_heads
    if decode:
        return 1
    return flash_config(head_dim, dtype)[0] if flash else tile_rows(group, False, head_dim) // group


# ---- prefill: which kernel runs a step's chunks ----------------------------------------------------------
#
# Three ways to attend a prefill step on the GPU, chosen per step by ``prefill_kernel`` from what the
# host already knows (the chunks' starts and lengths, the layer's window and sinks):
#   "sdpa"    torch's SDPA (its flash backend) on the step's own k and v, written to the pool beside
#             it: exact only for prompts that start at position 0, with no sinks and no window the
#             chunk outgrows; no copy of the keys, since they are this step's.
#   "flash"   the FlashAttention-2 Triton kernel over the pool (triton_attention.flash_prefill_kernel):
#             a chunk continuing from cached blocks, windows, sinks; tiles of BLOCK_M tokens × one head.
#   "packed"  the paged kernel that packs a tile's rows with the group's query heads: chunks shorter
#             than a flash tile (speculative chunks, the tail of a prompt), where BLOCK_M rows of one
#             head would be mostly padding.
# Measured on an H200 (benchmarks/gpu.py's attention table, 2026-12-04, one layer, bf16, TFLOP/s of
# the visible pairs, Qwen3-8B's heads): an 8K-token fresh prompt SDPA 610, flash 358, packed 193; the
# last 8K chunk of a 32K prompt flash 352, packed 203, SDPA on keys gathered from the pool 340 (so
# continuing chunks stay on the flash kernel, which needs no copy); a 64-token chunk at 32K flash 43,
# packed 26. gpt-oss's 128-key sliding layers: 8K chunks flash 61-64, packed 51; 64-token chunks
# packed 7.2, flash 2.8-7.1, so windowed layers keep packed tiles until chunks are long.

FLASH_MIN_TOKENS = 64  # the longest chunk of the step; below it the packed tiles waste less
FLASH_MIN_TOKENS_WINDOWED = 1024  # the same for a layer whose window is shorter than a flash tile's reach
SDPA_MIN_TOKENS = 1024  # fresh prompts this long go to SDPA (below it launch costs dominate either way)


def prefill_kernel(starts: list[int], counts: list[int], window: int | None, has_sinks: bool, sdpa: bool) -> str:
    """"sdpa", "flash" or "packed" for a prefill step of chunks at ``starts`` with ``counts`` tokens;
    ``sdpa``: whether the step's own k and v are at hand (the one-kernel q/k path did not store
    them in the pool already) in a dtype SDPA's flash backend takes."""
    longest = max(counts)
    fresh = all(s == 0 for s in starts)
    if (sdpa and fresh and not has_sinks and (window is None or window >= longest)
            and longest >= SDPA_MIN_TOKENS):
        return "sdpa"
    short_window = window is not None and window <= 512
    return "flash" if longest >= (FLASH_MIN_TOKENS_WINDOWED if short_window else FLASH_MIN_TOKENS) else "packed"


def flash_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the flash prefill kernel: the best of benchmarks/gpu.py's
    FLASH_CONFIGS on an H200 (head_dim 128: 128×128 tiles, 8 warps, 2 stages, 352-371 TFLOP/s
    against 287-310 for 128×64; head_dim 64: 128×64, 4 warps, 3 stages, 305-309 against 187-267),
    smaller tiles where float32 ones or wider heads would not fit in shared memory (not measured)."""
    if dtype == torch.float32:
        return 32, 32, 4, 1
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 128, 8, 2
    return 64, 32, 4, 2


def sdpa_prefill(q, k, v, scale: float) -> torch.Tensor:
    """Causal attention of fresh prompts with their own keys: q [1, hq, t, d], k/v [1, hkv, t, d]
    → [1, hq, t, d] through SDPA (flash or cuDNN backend; GQA without repeating k and v)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


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
