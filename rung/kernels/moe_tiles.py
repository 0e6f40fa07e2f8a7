"""The tile of the fused MoE GEMM (kernels/triton_moe.py ``moe_gemm``), checked against shared memory.

Triton's software pipeliner keeps ``stages`` copies of every tile the K loop loads in shared
memory, so a config needs about

    stages × (x tile [BLOCK_M, BLOCK_K] + each weight tile [BLOCK_N, BLOCK_K]) × element size

(the epilogue's layout conversion reuses that memory once the loop is done). A config that is
right for bf16 is not for float32: (16, 32, 256) with three stages and two weight tiles is 120 KB
in bf16 and 240 KB in float32, past an H200's 227 KB per block, and Triton refuses to launch it
(``OutOfResources: shared memory``). ``choose_tile`` starts from the config the workload wants,
clamps the tile to the problem (a 48-wide K needs no 256-wide step) and shrinks it (stages, then
K step, N, M) until the estimate fits the device's limit. Plain Python: tests check it on a CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

# Every CUDA device gives a block 48 KB of shared memory without opting in: the limit assumed when
# the device cannot say (the H100 / H200 allow 227 KB, the A100 163 KB, consumer Ada and Ampere 99 KB).
DEFAULT_SMEM_BYTES = 48 * 1024
HOPPER_SMEM_BYTES = 232_448  # H100 / H200: 227 KB
MIN_BLOCK = 16  # tl.dot needs every dimension of a tile to be at least 16
MIN_BLOCK_K = 32  # a packed MXFP4 step covers whole blocks of 32 weights


@dataclass(frozen=True)
class MoETile:
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int


def preferred_tile(slots: int) -> MoETile:
    """Small blocks while few slots share an expert (decode: a block holds one slot and the job is
    streaming weights, a long K step keeps more bytes in flight), GEMM-sized ones for prefill."""
    if slots <= 128:
        return MoETile(16, 32, 256, 4, 3)
    return MoETile(64, 128, 64, 8, 3)


def smem_bytes(tile: MoETile, x_bytes: int, w_bytes: int, weight_tiles: int, packed: bool) -> int:
    """Shared memory ``moe_gemm`` asks for with ``tile``: per stage the activation tile and each
    weight tile of one K step. Packed MXFP4 loads a byte of two weights and a scale byte per byte
    (BLOCK_K / 2 of each per row; tl.dot_scaled loads fewer scales, so this bounds both paths)."""
    x = tile.block_m * tile.block_k * x_bytes
    w = tile.block_n * tile.block_k * (1 if packed else w_bytes)
    pipeline = tile.stages * (x + weight_tiles * w)
    epilogue = tile.block_m * tile.block_n * 4 * 2  # the float32 accumulators' layout conversion
    return max(pipeline, epilogue)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _shrunk(t: MoETile) -> MoETile | None:
    """The next smaller tile to try, or None at the smallest."""
    if t.stages > 2:
        return replace(t, stages=t.stages - 1)
    if t.block_k > 64:
        return replace(t, block_k=t.block_k // 2)
    if t.block_n > MIN_BLOCK:
        return replace(t, block_n=t.block_n // 2)
    if t.block_m > MIN_BLOCK:
        return replace(t, block_m=t.block_m // 2, warps=max(4, t.warps // 2))
    if t.block_k > MIN_BLOCK_K:
        return replace(t, block_k=t.block_k // 2)
    if t.stages > 1:
        return replace(t, stages=t.stages - 1)
    return None


def choose_tile(slots: int, gemms: list[tuple[int, int, int]], x_bytes: int, w_bytes: int, packed: bool,
                smem_limit: int) -> MoETile:
    """One tile for a layer's GEMMs (they share the slot layout, hence BLOCK_M), each (N, K, weight
    tiles): (intermediate, hidden, 2) for gate and up, (hidden, intermediate, 1) for down. Clamped
    to the problem, then shrunk until every GEMM's shared memory fits ``smem_limit``."""
    tile = preferred_tile(slots)
    widest_n = max(n for n, _, _ in gemms)
    widest_k = max(k for _, k, _ in gemms)
    tile = replace(tile, block_n=min(tile.block_n, max(MIN_BLOCK, _next_pow2(widest_n))),
                   block_k=min(tile.block_k, max(MIN_BLOCK_K, _next_pow2(widest_k))))

    def need(t: MoETile) -> int:
        return max(smem_bytes(t, x_bytes, w_bytes, tiles, packed) for _, _, tiles in gemms)

    while need(tile) > smem_limit:  # at most ~15 steps: every step halves a block or drops a stage
        smaller = _shrunk(tile)
        if smaller is None:
            break  # 16 × 16 × 32, one stage: a few KB, under any device's limit
        tile = smaller
    return tile


@functools.cache
def device_smem_limit(device_index: int) -> int:
    """Shared memory a block of the CUDA device may opt into (what Triton checks a launch against)."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or DEFAULT_SMEM_BYTES)
