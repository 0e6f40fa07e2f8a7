"""``@fp8``: float8 e4m3 weights with one float32 scale per output row, each row's scale searched
for the least squared error (rung/quant/formats.py), the LM head left float. On the CPU the packed
layers dequantize (the reference path); on CUDA a GEMV decodes rows and ``torch._scaled_mm`` takes
batches (rung/kernels/triton_fp8.py, checked here under Triton's interpreter)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import rung
from rung.quant.formats import FP8, Packed, check_packed, dequantize, quantize
from rung.quant.linear import PackedLinear
from rung.quant.rewrite import packed_bytes
from rung.quant.spec import ModelSpec, parse_spec

from interpret import needs_interpreter, run_checks

PPL_TEXT = Path(__file__).parents[1] / "benchmarks" / "ppl_text.txt"


def test_fp8_spec_parses_and_names_itself():
    assert parse_spec("smollm2-135m@fp8") == ModelSpec("smollm2-135m", weights="f8")
    assert parse_spec("m@FP8").format_name == "fp8"
    with pytest.raises(ValueError, match="fp8"):
        parse_spec("m@fp9")  # the error lists fp8 among the formats


def test_fp8_quantize_keeps_e4m3_precision_and_clips_no_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * torch.logspace(-3, 2, 48)[:, None]  # rows five decades apart
    p = quantize(w, "f8")
    check_packed(p)
    assert p.data.dtype == FP8 and p.scale.dtype == torch.float32 and p.scale.shape == (48, 1) and p.group == 96
    back = dequantize(p)
    # the search's scales span one octave above max|w| / 448: each row's largest weight lands in
    # [224, 448] and keeps e4m3's precision, never clipped
    top = (w.abs().amax(-1, keepdim=True) / p.scale)[:, 0]
    assert ((224 <= top) & (top <= 448 * (1 + 1e-6))).all()
    # e4m3 keeps 3 mantissa bits: at most 1/16 relative error on normal values of each row
    normal = w.abs() >= p.scale * 2.0 ** -6
    assert ((back - w).abs() <= w.abs() / 16 + 1e-12)[normal].all()
    assert (back - w).norm() / w.norm() < 0.03
    assert p.bits_per_weight == pytest.approx(8 + 32 / 96)


def _row_errors(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each row's squared error through real e4m3 bytes, at the given scales."""
    return (dequantize(Packed("f8", (w / scale).clamp(-448, 448).to(FP8), tuple(w.shape), w.shape[1], scale))
            - w).square().sum(-1)


def test_fp8_scale_search_lowers_each_rows_error_against_max_abs_scaling():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 512, generator=g)
    w[torch.arange(256), torch.randint(0, 512, (256,), generator=g)] *= 20  # an outlier in every row
    w[::7] *= torch.rand(512, generator=g) ** 4  # and rows of mostly small values
    searched = _row_errors(w, quantize(w, "f8").scale)
    max_abs = _row_errors(w, w.abs().amax(-1, keepdim=True) / 448)
    assert (searched <= max_abs).all()
    assert (searched < max_abs).float().mean() > 0.5 and searched.sum() < 0.95 * max_abs.sum()


def test_fp8_search_rounds_normal_values_as_the_e4m3_cast_does():
    from rung.quant.formats import _round_e4m3

    values = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    values = values[values.isfinite()].unique()
    mids = (values[1:] + values[:-1]) / 2  # ties: to the even code
    x = torch.cat([values, mids, torch.nextafter(mids, values[1:]), torch.nextafter(mids, values[:-1]),
                   torch.empty(100_000).uniform_(-448, 448, generator=torch.Generator().manual_seed(3))])
    x = x[x.abs() >= 2.0 ** -6]  # e4m3's normal values (below, the search keeps more bits: see _round_e4m3)
    cast = x.to(FP8).float()
    assert torch.equal(_round_e4m3(x), cast)
    assert torch.equal(torch.from_numpy(_round_e4m3(x.numpy())), cast)


def test_fp8_search_on_torch_tensors_agrees_with_numpy():
    from rung.quant.formats import SCALE_STEPS, _best_ratio

    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-2, 1, 96)
    s0 = w.abs().amax(-1, keepdim=True) / 448
    ratios = (2.0 ** (torch.arange(SCALE_STEPS, dtype=torch.float64) / SCALE_STEPS)).float()
    on_torch = _best_ratio(w, s0, ratios)  # the path a CUDA weight takes
    assert torch.equal(on_torch, torch.from_numpy(_best_ratio(w.numpy(), s0.numpy(), ratios.numpy())))
    assert torch.equal(quantize(w, "f8").scale, s0 * ratios[on_torch, None])
    assert on_torch.unique().numel() > 4  # the rows choose different alignments


def _weighted_errors(w, scale, gain):
    """Each row's output error Σ_k g_k² e_k², through real e4m3 bytes at the given scales."""
    back = dequantize(Packed("f8", (w / scale).clamp(-448, 448).to(FP8), tuple(w.shape), w.shape[1], scale))
    return ((back - w).square() * gain.square()).sum(-1)


def test_fp8_scale_search_weighs_channels_by_the_input_norms_gain():
    from rung.quant.formats import SCALE_STEPS

    g = torch.Generator().manual_seed(6)
    w = torch.randn(128, 256, generator=g)
    gain = torch.rand(256, generator=g) ** 3 * 8  # a few channels carry most of the input, as in real norms
    weighted, plain = quantize(w, "f8", gain=gain).scale, quantize(w, "f8").scale
    base = w.abs().amax(-1, keepdim=True) / 448
    candidates = [base * 2.0 ** (i / SCALE_STEPS) for i in range(SCALE_STEPS)]
    best = torch.stack([_weighted_errors(w, s, gain) for s in candidates]).amin(0)
    # each row keeps the candidate of least output error (to float32 rounding of the sums)...
    assert torch.allclose(_weighted_errors(w, weighted, gain), best, rtol=1e-5, atol=0)
    # ...which the unweighted search does not: the gain changes the choice of many rows
    assert (weighted != plain).float().mean() > 0.3
    assert _weighted_errors(w, weighted, gain).sum() < 0.95 * _weighted_errors(w, plain, gain).sum()
    assert torch.equal(quantize(w, "f8", gain=torch.ones(256)).scale, plain)  # a flat gain is no gain
    assert torch.equal(quantize(w, "q8", gain=gain).data, quantize(w, "q8").data)  # f8 only
    with pytest.raises(ValueError, match=r"f8: a gain of shape \(255,\) for a weight of 256 input channels"):
        quantize(w, "f8", gain=gain[:255])
    with pytest.raises(ValueError, match="gain holds NaN"):
        quantize(w, "f8", gain=torch.full((256,), float("nan")))


def test_fp8_model_weighs_the_projections_after_a_norm_by_its_gain():
    from rung.config import ModelConfig
    from rung.model import Decoder
    from rung.quant.formats import fp8_row_scales
    from rung.quant.rewrite import pack_model

    config = ModelConfig("llama", vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, intermediate_size=64)
    torch.manual_seed(7)
    model = Decoder(config).eval()
    with torch.no_grad():
        for block in model.layers:
            block.attn_norm.weight.uniform_(0.1, 3)
            block.mlp_norm.weight.uniform_(0.1, 3)
    floats = {n: p.detach().clone() for n, p in model.named_parameters()}
    pack_model(model, "f8")
    for i, block in enumerate(model.layers):
        t = f"layers.{i}."
        for layer, name, gain in ((block.attn.qkv_proj, "attn.qkv_proj", block.attn_norm.weight),
                                  (block.mlp.gate_up_proj, "mlp.gate_up_proj", block.mlp_norm.weight),
                                  (block.attn.o_proj, "attn.o_proj", None), (block.mlp.down_proj, "mlp.down_proj", None)):
            w = floats[t + name + ".weight"]
            expected = fp8_row_scales(w, gain=gain)
            scale = layer.packed.scale
            if name == "mlp.gate_up_proj":  # the gated layer interleaves gate and up rows: compare as sets
                scale, expected = scale.sort(0).values, expected.sort(0).values
            assert torch.equal(scale, expected), name


def test_fp8_codes_are_never_nan_or_inf():
    from rung.quant.formats import quantize_fp8

    g = torch.Generator().manual_seed(5)
    big = torch.finfo(torch.float32).max
    rows = [torch.zeros(96), torch.full((96,), big), torch.full((96,), -big), torch.full((96,), 1e-44),
            torch.randn(96, generator=g) * 1e-30, torch.randn(96, generator=g) * 1e30,
            torch.where(torch.arange(96) == 3, big, 1e-40), torch.randn(96, generator=g) ** 9]
    w = torch.stack(rows)
    for weight in (w, w[:, :77].contiguous()):  # quantize_fp8 takes any width (the kernels' checks use it)
        p = quantize_fp8(weight, weight.shape[1])
        assert p.data.float().isfinite().all() and p.scale.isfinite().all() and (p.scale > 0).all()
        assert dequantize(p).isfinite().all()
    back = dequantize(quantize(w, "f8"))
    assert torch.equal(back[0], w[0]) and ((back[1:3] - w[1:3]).abs() <= w[1:3].abs() / 16).all()
    for bad in (float("nan"), float("inf")):
        w[2, 5] = bad
        with pytest.raises(ValueError, match=r"f8 \[8, 96\]: the weight holds NaN or infinite values"):
            quantize(w, "f8")


def test_fp8_model_keeps_its_lm_head_and_embedding_in_float():
    from rung.config import ModelConfig
    from rung.model import Decoder
    from rung.quant.rewrite import default_head_format, pack_model, packed_targets

    assert default_head_format("f8") is None and default_head_format("q4") == "q8"
    model = rung.load_model("smollm2-135m@fp8")  # tied: the head reads the float embedding table
    assert model.lm_head is None and type(model.embed) is torch.nn.Embedding
    assert model.embed.weight.dtype == torch.float32 and model.layers[0].attn.qkv_proj.fmt == "f8"
    assert not any(name.startswith(("lm_head", "embed")) for name in packed_targets(model, "f8"))
    config = ModelConfig("llama", vocab_size=96, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                         head_dim=16, intermediate_size=64, tie_word_embeddings=False)
    untied = pack_model(Decoder(config).eval(), "f8")
    assert type(untied.lm_head) is torch.nn.Linear and untied.layers[0].mlp.down_proj.fmt == "f8"
    assert pack_model(Decoder(config).eval(), "f8", head_fmt="f8").lm_head.fmt == "f8"  # still on request


def test_fp8_refuses_a_group_size():
    with pytest.raises(ValueError, match="one scale per output row"):
        quantize(torch.randn(4, 64), "f8", 32)
    p = quantize(torch.randn(4, 64), "f8")
    with pytest.raises(ValueError, match="scale is float16"):
        PackedLinear(Packed("f8", p.data, (4, 64), 64, p.scale.half()))


def test_fp8_layer_on_the_cpu_is_the_dequantized_linear():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    layer = PackedLinear(quantize(w, "f8"), b)
    assert not layer._native  # rung's native kernels have no fp8: the reference path
    x = torch.randn(3, 64, generator=g)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, dequantize(layer.packed), b))


def test_fp8_checkpoint_saves_and_reloads_identically(tmp_path):
    from rung.cli import main

    assert main(["quantize", "smollm2-135m", "--to", "fp8", "--out", str(tmp_path / "q")]) == 0
    original = rung.load_model("smollm2-135m@fp8")
    reloaded = rung.load_model(str(tmp_path / "q"))
    assert reloaded.lm_head is None and reloaded.layers[0].mlp.gate_up_proj.fmt == "f8"  # the head: float
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["head_format"] == "fp32"
    assert reloaded.layers[0].mlp.gate_up_proj.gated == "silu"
    ids = torch.tensor([[1, 5, 17, 9, 42, 3, 77, 8]])
    with torch.inference_mode():
        assert torch.equal(original(ids), reloaded(ids))
    assert packed_bytes(reloaded) == packed_bytes(original)
    assert main(["quantize", "smollm2-135m", "--to", "fp8", "--group", "32", "--out", str(tmp_path / "r")]) != 0


def _perplexities_and_kl(base, other, ids: list[int], chunk: int = 256) -> tuple[float, float, float]:
    """Both models' perplexity over ids, and the mean KL(base || other) of their next-token
    distributions, in one pass of chunks through each model's cache."""
    caches, nll, kl, n = (base.new_cache(), other.new_cache()), [0.0, 0.0], 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids) - 1, chunk):
            targets = torch.tensor(ids[i + 1:i + 1 + chunk])
            x = torch.tensor([ids[i:i + len(targets)]])
            logp = [torch.log_softmax(m(x, c)[0].float(), dim=-1) for m, c in zip((base, other), caches)]
            for j in range(2):
                nll[j] -= float(logp[j][torch.arange(len(targets)), targets].sum())
            kl += float((logp[0].exp() * (logp[0] - logp[1])).sum())
            n += len(targets)
    return math.exp(nll[0] / n), math.exp(nll[1] / n), kl / n


# Measured over the first 1,024 tokens (2026-12-04), perplexity against float32 and the mean KL of
# the next-token distributions: SmolLM2-135M +0.75%, 9.3e-3; Gemma 3 270M +0.67%, 10.3e-3 (the
# scales searched with the norms' gains; without the gains +1.43%, 9.6e-3 and -0.42%, 11.3e-3;
# max-abs scales and an fp8 LM head: +2.7%, 25.6e-3 and +2.1%, 19.5e-3). Issue 19 asks for 1%.
# The KL, 2.5% RMS weight error through e4m3's 3 mantissa bits, is the steadier measure: across
# variants of equal weight error the 1,024-token perplexity moved by about ±0.8% (docs/quantization.md).
FP8_PPL_BOUND = {"smollm2-135m": 0.01, "gemma3-270m": 0.01}
FP8_KL_BOUND = 0.0105


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_fp8_perplexity_stays_near_float32(name):
    llm = rung.LLM(name)
    ids = llm.tokenizer.encode(PPL_TEXT.read_text())[:1024]
    base, fp8, kl = _perplexities_and_kl(llm.model, rung.load_model(f"{name}@fp8"), ids)
    assert abs(fp8 / base - 1) < FP8_PPL_BOUND[name] and 0 < kl < FP8_KL_BOUND, (name, base, fp8, kl)


@needs_interpreter
def test_fp8_gemv_agrees_with_the_dequantizing_reference_under_the_interpreter():
    lines = run_checks("triton_fp8_checks.py", timeout=300)
    assert lines[0] == "every e4m3 code decodes to its value"
    assert sum(line.startswith("GEMV f8 ") for line in lines) == 4
    assert sum(line.startswith("fp8_dequantize ") and line.endswith(" equal") for line in lines) == 3
    assert lines[-1] == "all fp8 kernels agree with the dequantizing reference"
