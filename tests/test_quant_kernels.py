"""rung's packed formats and native kernels against their dequantizing references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rung import native
from rung.quant.formats import (Packed, dequantize, from_gguf_blocks, int8_activations, pack_nibbles, quantize,
                                unpack_nibbles)
from rung.quant.linear import PackedLinear, interleave_gate_up, native_prompts

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels not built (no compiler or AVX2)")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("fmt,group,bound", [("q8", None, 0.5 / 127), ("q8", 32, 0.5 / 127),
                                             ("q4", 32, 1.5 / 15), ("q4", 64, 1.5 / 15), ("q4", 128, 1.5 / 15)])
def test_round_trip_error_within_the_formats_bound(fmt, group, bound):
    w = torch.randn(64, 256) * torch.rand(64, 1) * 3  # rows of different ranges
    w[0, :5] *= 20  # a few outliers
    p = quantize(w, fmt, group)
    err = (dequantize(p) - w).abs()
    g = p.group
    # the bound per group, in steps of max|w| / 127 (q8: half a step) or of the min-max grid's
    # (max - min) / 15 (q4: its search may clip a group's outliers, by at most a step and a half)
    groups = w.view(64, -1, g)
    span = groups.abs().amax(-1) if fmt == "q8" else groups.amax(-1) - groups.amin(-1)
    limit = (span * bound).repeat_interleave(g, dim=1) * (1 + 2e-3) + 1e-6  # fp16 scale rounding
    assert (err <= limit).all()
    assert p.bits_per_weight == pytest.approx({"q8": 8, "q4": 4}[fmt] + (16 if fmt == "q8" else 32) / g)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_q4_grid_search_never_loses_to_the_min_max_grid(group):
    """Per group, the squared error of the searched grid is at most the min-max grid's (which is
    one of its candidates), and over a Gaussian weight it is clearly lower."""
    w = torch.randn(96, 512) * torch.rand(96, 1) * 2
    groups = w.view(96, -1, group)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale, offset = ((hi - lo) / 15).half().float(), lo.half().float()
    minmax = ((torch.round((groups - offset) / scale).clamp(0, 15) * scale + offset - groups) ** 2).sum(-1)
    searched = ((dequantize(quantize(w, "q4", group)).view_as(groups) - groups) ** 2).sum(-1)
    assert (searched <= minmax * (1 + 1e-5) + 1e-9).all()
    assert searched.sum() < 0.9 * minmax.sum()


def test_nibble_packing_is_ggufs_block_order():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert torch.equal(packed[:, 0] & 0x0F, q[:, 0]) and torch.equal(packed[:, 0] >> 4, q[:, 16])
    assert torch.equal(packed[:, 16] & 0x0F, q[:, 32]) and torch.equal(packed[:, 16] >> 4, q[:, 48])
    assert torch.equal(unpack_nibbles(packed), q)


def _gguf_bytes(kind: str, w: np.ndarray) -> np.ndarray:
    from gguf import GGMLQuantizationType, quantize as gguf_quantize

    return gguf_quantize(w, GGMLQuantizationType[kind])


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_map_exactly_to_rungs_formats(kind):
    from gguf import GGMLQuantizationType, dequantize as gguf_dequantize

    w = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    raw = _gguf_bytes(kind, w)
    p = from_gguf_blocks(kind, raw, (8, 128))
    reference = torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType[kind]).reshape(8, 128).astype(np.float32))
    assert torch.equal(dequantize(p), reference)  # bit for bit: no value changed
    assert p.fmt == ("q8" if kind == "Q8_0" else "q4") and p.group == 32


@needs_native
@pytest.mark.parametrize("fmt", ["f32", "q8", "q4"])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("shape,group", [((96, 576), None), ((200, 256), 64), ((48, 1536), 128),
                                         ((40, 224), 32), ((24, 160), None), ((16, 96), None),
                                         # groups of 32 (q8 and q4 scales read in the loop): 1, 4, 16, 25 runs;
                                         # groups of 64 and 96 with a last chunk of 2 and 1 runs
                                         ((8, 32), 32), ((32, 128), 32), ((16, 512), 32), ((24, 800), 32),
                                         ((24, 192), 64), ((24, 288), 96)])  # every tail
def test_native_gemv_equals_the_dequantizing_reference(fmt, rows, shape, group):
    if fmt == "q4" and group is None:
        group = 32
    layer = PackedLinear(quantize(torch.randn(*shape), fmt, group), bias=torch.randn(shape[0]))
    x = torch.randn(rows, shape[1])
    with native_prompts():  # native: float32 on the CPU (f32 layers: at most MAX_M rows, else PyTorch's matmul)
        out = layer(x)
    # the q8 and q4 kernels round x to int8 in runs of 32 first; the reference sees the same x
    ref = layer.reference(int8_activations(x) if fmt != "f32" else x)
    assert (out - ref).abs().max() <= 2e-6 * ref.abs().max()


@needs_native
def test_q4_kernel_error_against_float_activations_is_small():
    layer = PackedLinear(quantize(torch.randn(256, 576), "q4", 32))
    x = torch.randn(1, 576)
    ref = layer.reference(x)
    assert 0 < (layer(x) - ref).abs().max() <= 0.02 * ref.abs().max()


@needs_native
@pytest.mark.parametrize("fmt", ["f32", "q8", "q4"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_layer_is_act_gate_times_up(fmt, act):
    from rung.model.mlp import ACTIVATIONS

    gate, up = torch.randn(64, 128), torch.randn(64, 128)
    layer = PackedLinear(quantize(interleave_gate_up(gate, up), fmt, 32 if fmt != "f32" else None), gated=act)
    x = torch.randn(2, 128)
    xs = int8_activations(x) if fmt != "f32" else x
    w = dequantize(layer.packed)
    g, u = interleave_back(w)
    expected = ACTIVATIONS[act](xs @ g.T) * (xs @ u.T)
    assert (layer(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (layer.reference(xs) - expected).abs().max() <= 1e-5 * expected.abs().max()


def interleave_back(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = w.view(-1, 2, 8, w.shape[-1])
    return blocks[:, 0].reshape(-1, w.shape[-1]), blocks[:, 1].reshape(-1, w.shape[-1])


@needs_native
@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("gated", [None, "silu"])
def test_a_prompt_gets_each_rows_decode_arithmetic_whatever_its_batch(fmt, gated):
    """A prompt's rows (more than a decode batch) go through the native kernel too, each row with
    exactly the arithmetic it gets alone: a prompt's K/V cannot depend on how it was chunked or
    batched, or on a prefix-cache hit that leaves a few rows to compute."""
    layer = PackedLinear(quantize(torch.randn(64, 96), fmt, 32), bias=torch.randn(64), gated=gated)
    x = torch.randn(45, 96)
    with native_prompts():  # the engine's steps
        whole = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(45)])
        part = layer(x[5:37])
    assert torch.equal(whole, alone) and torch.equal(part, whole[5:37])
    ref = layer.reference(int8_activations(x))
    assert (whole - ref).abs().max() <= 2e-6 * ref.abs().max()


@needs_native
@pytest.mark.parametrize("fmt,group,width", [("q8", 32, 800), ("q8", 64, 832), ("q4", 32, 800), ("q4", 32, 576),
                                             ("q4", 64, 832), ("q4", 128, 896), ("q4", 96, 288)])
@pytest.mark.parametrize("gated", [None, "silu"])
def test_rows_taken_several_at_a_time_each_get_their_single_row_result(fmt, group, width, gated):
    """The kernels meet each weight row with up to 4 rows of x at once (the weights unpacked once
    for all of them); every row count, with its remainder of 1-3 rows, gives each row exactly
    what it gets alone. The widths leave a tail after every kernel's main loop."""
    layer = PackedLinear(quantize(torch.randn(32, width), fmt, group), bias=torch.randn(32), gated=gated)
    x = torch.randn(33, width)
    with native_prompts():
        alone = torch.cat([layer(x[i:i + 1]) for i in range(33)])
        for rows in (2, 3, 4, 5, 7, 16, 17, 33):
            assert torch.equal(layer(x[:rows]), alone[:rows]), rows
    ref = layer.reference(int8_activations(x))
    assert (alone - ref).abs().max() <= 2e-6 * ref.abs().max()


def test_reference_path_serves_plain_prompts_float_layers_and_other_dtypes():
    w = torch.randn(32, 64)
    x = torch.randn(40, 64)  # more rows than a decode batch: an f32 layer's prompt is PyTorch's matmul
    assert torch.allclose(PackedLinear(quantize(w, "f32"))(x), x @ w.T, atol=1e-4)
    layer = PackedLinear(quantize(w, "q8"))
    # a plain call (outside the engine's native_prompts): the dequantized weight's own logits
    assert torch.allclose(layer(x), x @ dequantize(layer.packed).T, atol=1e-4)
    assert torch.allclose(layer(x.double()), x.double() @ dequantize(layer.packed, torch.float64).T, atol=1e-9)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_bad_group_is_refused_with_the_width():
    with pytest.raises(ValueError, match="group size 48 must be a multiple of 32 dividing the input width 96"):
        quantize(torch.randn(4, 96), "q4", 48)


def test_packed_rows_select_an_embedding_lookup():
    p = quantize(torch.randn(10, 64), "q4", 32)
    idx = torch.tensor([3, 7])
    assert torch.equal(dequantize(p.rows(idx)), dequantize(p)[idx])
    assert isinstance(p.rows(idx), Packed)
