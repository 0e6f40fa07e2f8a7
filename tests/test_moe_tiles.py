"""The fused MoE GEMM's tile choice (kernels/moe_tiles.py) against a device's shared memory, on the
CPU: what Triton's pipeliner would allocate must fit the limit, whatever the dtype and shape."""

from __future__ import annotations

import pytest

from rung.kernels.moe_tiles import DEFAULT_SMEM_BYTES, MoETile, choose_tile, preferred_tile, smem_bytes

H200 = 232_448  # the issue's "Hardware limit": shared_memory_per_block_optin of an H100 / H200 (227 KB)

def _layer(hidden: int, inter: int) -> list[tuple[int, int, int]]:
    return [(inter, hidden, 2), (hidden, inter, 1)]  # gate+up (two weight tiles), down


def test_the_estimate_is_what_triton_asked_for_on_the_h200():
    # the issue's OutOfResources: "Required: 245760" for the decode tile (16, 32, 256), three stages, float32
    assert smem_bytes(MoETile(16, 32, 256, 4, 3), 4, 4, 2, packed=False) == 245_760 > H200


@pytest.mark.parametrize("slots", [3, 150])  # decode (slot layout) and prefill (sorted GEMM)
def test_the_issues_float32_qwen3_moe_gets_a_tile_that_fits_the_h200(slots):
    # tiny Qwen3-MoE: hidden 48, moe_intermediate 20, 6 experts, top-3, float32
    tile = choose_tile(slots, _layer(48, 20), 4, 4, packed=False, smem_limit=H200)
    assert all(smem_bytes(tile, 4, 4, t, False) <= H200 for _, _, t in _layer(48, 20))
    assert tile.block_k <= 64 and tile.block_n <= 64  # no wider than the problem needs (K 48, N 20 and 48)


@pytest.mark.parametrize("limit", [H200, 166_912, 101_376, DEFAULT_SMEM_BYTES])  # H200, A100, Ada, any device
@pytest.mark.parametrize("x_bytes, w_bytes, packed", [(4, 4, False), (2, 2, False), (2, 1, True)])
@pytest.mark.parametrize("hidden, inter", [(48, 20), (2048, 768), (2880, 2880), (4096, 14336)])
@pytest.mark.parametrize("slots", [1, 64, 129, 4096])
def test_every_chosen_tile_fits_the_limit(limit, x_bytes, w_bytes, packed, hidden, inter, slots):
    tile = choose_tile(slots, _layer(hidden, inter), x_bytes, w_bytes, packed, limit)
    for _, _, tiles in _layer(hidden, inter):
        assert smem_bytes(tile, x_bytes, w_bytes, tiles, packed) <= limit
    assert min(tile.block_m, tile.block_n) >= 16 and tile.block_k >= 32 and tile.stages >= 1
    assert all(b & (b - 1) == 0 for b in (tile.block_m, tile.block_n, tile.block_k))  # powers of two


def test_bf16_on_the_h200_keeps_the_tuned_tiles():
    # what benchmarks/gpu.py measured: real shapes in bf16 already fit, so nothing shrinks
    for slots in (4, 4096):
        assert choose_tile(slots, _layer(2048, 768), 2, 2, False, H200) == preferred_tile(slots)
        assert choose_tile(slots, _layer(2880, 2880), 2, 1, True, H200) == preferred_tile(slots)


def test_float32_at_real_widths_drops_a_stage_rather_than_fail():
    tile = choose_tile(4, _layer(2048, 768), 4, 4, False, H200)
    assert (tile.block_m, tile.block_n, tile.block_k, tile.stages) == (16, 32, 256, 2)


# The quantized layers' dequantizing matmul (kernels/triton_quant.py ``skinny``): its configs are
# checked against the device's shared memory the same way before any launch.

@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("limit", [232_448, 166_912, 101_376, 49_152, 20_000])
@pytest.mark.parametrize("x_bytes", [2, 4])
def test_every_skinny_config_offered_fits_the_limit(fmt, limit, x_bytes):
    tq = pytest.importorskip("rung.kernels.triton_quant")
    for bm in (16, 32, 64):
        configs = tq.fitting_skinny_configs(tq.skinny_configs(bm), fmt, x_bytes, limit)
        assert configs and all(tq.skinny_smem_bytes(c, fmt, x_bytes) <= limit for c in configs)


def test_skinny_keeps_every_config_on_the_h200_and_drops_the_widest_on_a_99_kb_gpu():
    tq = pytest.importorskip("rung.kernels.triton_quant")
    if tq.INTERPRET:
        pytest.skip("the interpreter offers one config")
    h200 = tq.fitting_skinny_configs(tq.skinny_configs(64), "q8", 2, 232_448)
    assert h200 == tq.skinny_configs(64)
    small = tq.fitting_skinny_configs(tq.skinny_configs(64), "q8", 2, 101_376)
    assert (64, 64, 256, 8, 3) not in small and (64, 32, 128, 4, 3) in small
