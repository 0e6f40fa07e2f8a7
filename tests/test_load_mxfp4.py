"""gpt-oss MXFP4 expert weights: exact dequantization and a hub-layout checkpoint round trip."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import rung
from oracle import TOL, cached_decode_diff, hf_model, max_logit_diff
from rung.weights.mxfp4 import FP4_VALUES, dequantize_mxfp4, quantize_mxfp4
from test_model_parity import gpt_oss_config


def random_packed(experts=3, rows=10, groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(117, 137, (experts, rows, groups), generator=g, dtype=torch.uint8)
    return blocks, scales


def test_mxfp4_dequantizes_exactly_like_transformers():
    blocks, scales = random_packed()
    ours = dequantize_mxfp4(blocks, scales)  # [E, rows, cols] output-major
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, cols, rows]
    assert torch.equal(ours.transpose(1, 2), theirs)


def test_mxfp4_nibble_order_low_is_even_element():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x72  # low nibble 2 (+1.0), high nibble 7 (+6.0)
    scales = torch.full((1, 1), 128, dtype=torch.uint8)  # 2^(128 - 127) = 2
    w = dequantize_mxfp4(blocks, scales)
    assert w[0, 0].item() == 2.0 and w[0, 1].item() == 12.0 and w[0, 2:].abs().sum() == 0


def test_mxfp4_quantize_round_trip_is_within_half_a_step():
    w = torch.randn(4, 64) * 0.05
    blocks, scales = quantize_mxfp4(w)
    back = dequantize_mxfp4(blocks, scales)
    # E2M1 steps are at most 2 (between 4 and 6) in units of the block scale: error ≤ 1 unit
    unit = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    assert ((back - w).abs() <= unit + 1e-12).all()
    assert set(dequantize_mxfp4(blocks, torch.full_like(scales, 127)).unique().tolist()) <= set(FP4_VALUES)


def test_gpt_oss_mxfp4_checkpoint_matches_transformers(tmp_path):
    """Pack the experts into blocks/scales (hub layout, as OpenAI ships them), give transformers the
    same dequantized weights, and compare logits."""
    reference = hf_model(gpt_oss_config(hidden_size=64, intermediate_size=32))
    folder = tmp_path / "gpt-oss-mxfp4"
    reference.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        weight = tensors.pop(name)  # transformers' layout: [E, in, out]
        blocks, scales = quantize_mxfp4(weight.transpose(1, 2))  # packed output-major: [E, out, in/32, 16]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        # the reference runs on exactly the values the checkpoint now holds, decoded by transformers
        module, param = name.rsplit(".", 1)
        getattr(reference.get_submodule(module), param).data.copy_(
            convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(tensors, folder / "model.safetensors")

    model = rung.load_model(folder)
    assert max_logit_diff(reference, model, [(1, 3), (2, 17)]) < TOL
    assert cached_decode_diff(model) < TOL


def test_sharded_checkpoint_with_index_loads(tmp_path):
    reference = hf_model(gpt_oss_config())
    reference.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert max_logit_diff(reference, rung.load_model(tmp_path), [(2, 9)]) < TOL
