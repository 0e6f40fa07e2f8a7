"""Mixture-of-experts layers with packed experts (rung/quant/experts.py, issue 19): @int8, @int4 and
@fp8 pack Qwen3-MoE's experts (weight-only; the router stays float), the CPU runs the dequantizing
reference, and a packed-expert model is exactly the float model holding the dequantized experts.
The CUDA kernels' checks run under Triton's interpreter (tests/triton_dp4a_checks.py)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import rung
from oracle import hf_model, save
from rung.model.moe import MoE
from rung.quant.experts import PackedMoE, can_pack, pack_experts
from rung.quant.rewrite import packed_bytes

IDS = torch.tensor([[3, 17, 42, 8, 99, 5, 61, 23]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = tf.Qwen3MoeConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=64,
                               moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True)
    return save(hf_model(config), tmp_path_factory.mktemp("qwen3-moe") / "model")


def unpacked(model):
    """The same model with every PackedMoE turned back into a float MoE of its dequantized experts."""
    for block in model.layers:
        moe = block.mlp
        if not isinstance(moe, PackedMoE):
            continue
        w = moe.expert_weights()
        e = moe.shape[0]
        stacks = {name: torch.stack([w.expert(name, x, torch.float32) for x in range(e)]) for name in ("gate", "up", "down")}
        moe.__class__ = MoE
        for name in ("gate_up_data", "gate_up_scale", "gate_up_offset", "down_data", "down_scale", "down_offset"):
            delattr(moe, name)
        for name, stack in stacks.items():
            setattr(moe, f"{name}_proj", torch.nn.Parameter(stack, requires_grad=False))
    return model


@pytest.mark.parametrize("spec", ["int8", "int4", "fp8"])
def test_experts_are_packed_and_equal_the_float_model_of_their_dequantized_weights(folder, spec):
    fmt = {"int8": "q8", "int4": "q4", "fp8": "f8"}[spec]
    model = rung.load_model(f"{folder}@{spec}")
    moes = [b.mlp for b in model.layers]
    assert all(isinstance(m, PackedMoE) and m.fmt == fmt for m in moes)
    assert all(type(m.router) is torch.nn.Linear and m.router.weight.dtype == torch.float32 for m in moes)
    assert moes[0].gate_up_data.shape[:2] == (6, 64)  # [experts, gate|up rows interleaved]
    with torch.inference_mode():
        got = model(IDS)
        want = unpacked(rung.load_model(f"{folder}@{spec}"))(IDS)
        plain = rung.load_model(folder)(IDS)
    assert (got - want).abs().max() < 1e-5
    # not the float model's logits (the experts really are rounded), but near them; a random tiny
    # model with every layer packed and top-2 routing that rounding can flip is far from a real one
    err = float((got - plain).norm() / plain.norm())
    assert 0 < err < {"q8": 0.05, "q4": 0.5, "f8": 0.25}[fmt]


def test_packed_experts_hold_fewer_bytes_than_float_ones(folder):
    float_bytes = packed_bytes(rung.load_model(folder))
    expert_floats = 2 * 6 * 3 * 64 * 32 * 4  # 2 layers × 6 experts × 3 matrices, float32
    int4 = packed_bytes(rung.load_model(f"{folder}@int4"))
    assert float_bytes - int4 > 0.8 * expert_floats


def test_engine_greedy_decode_from_packed_experts_equals_argmax_of_full_passes(folder):
    from rung.engine.engine import Engine, EngineConfig
    from rung.engine.sampling_params import SamplingParams

    class NoText:
        eos_token_ids = ()

        def decode(self, ids, skip_special_tokens=False):
            return ""

    model = rung.load_model(f"{folder}@int4")
    engine = Engine(model, NoText(), EngineConfig(block_size=4, num_blocks=32, max_batch_tokens=64, max_seqs=2))
    [[seq]] = engine.run([(IDS[0].tolist(), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))]).values()
    ids = IDS[0].tolist()
    with torch.inference_mode():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert seq.output_ids == ids[IDS.shape[1]:]


def test_what_is_not_packed():
    from rung.config import ModelConfig, MoEConfig

    def moe(**kw):
        c = dict(num_experts=4, top_k=2, expert_intermediate_size=32)
        extra = {k: kw.pop(k) for k in list(kw) if k in ("activation",)}
        return MoE(ModelConfig("qwen3_moe", vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                               head_dim=16, intermediate_size=64, moe=MoEConfig(**{**c, **kw}), **extra))

    assert can_pack(moe(), "q4", 32) and can_pack(moe(), "f8", None)
    assert not can_pack(moe(expert_bias=True), "q8", None)  # gpt-oss-style expert biases
    assert not can_pack(moe(expert_intermediate_size=36), "q8", None)  # not whole blocks of 8 gate rows
    assert not can_pack(moe(), "q4", 48)  # a group that does not divide the widths
    assert not can_pack(moe(), "f32", None)
    with pytest.raises(ValueError, match="cannot pack"):
        pack_experts(moe(expert_bias=True), "q8")


@pytest.mark.parametrize("spec", ["int4", "fp8"])
def test_packed_checkpoint_keeps_the_packed_experts(folder, spec, tmp_path):
    from rung.quant.checkpoint import save_packed

    model = rung.load_model(f"{folder}@{spec}")
    save_packed(model, tmp_path / "packed")
    again = rung.load_model(tmp_path / "packed")
    assert all(isinstance(b.mlp, PackedMoE) for b in again.layers)
    with torch.inference_mode():
        assert torch.equal(again(IDS), model(IDS))


@pytest.mark.parametrize("entry,needle", [
    ('[{"path": "layers.0.mlp", "fmt": "q4", "groups": [32, 32], "shape": [6, 32, 99]}]', "no MoE layer of shape"),
    ('[{"path": "layers.0.attn", "fmt": "q4", "groups": [32, 32], "shape": [6, 32, 64]}]', "no MoE layer of shape"),
    ('[{"path": "layers.0.mlp", "fmt": "q3", "groups": [32, 32], "shape": [6, 32, 64]}]', "rung_experts[0] is malformed"),
    ('{"path": 1}', "rung_experts is not a JSON list"),
])
def test_malformed_rung_experts_is_refused_in_one_line(folder, tmp_path, entry, needle):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from rung.quant.checkpoint import save_packed
    from rung.weights.safetensors_io import CheckpointError

    out = save_packed(rung.load_model(f"{folder}@int4"), tmp_path / "packed")
    file = out / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(file), metadata={**meta, "rung_experts": entry})
    with pytest.raises(CheckpointError, match=needle.replace("[", r"\[")) as e:
        rung.load_model(out)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_prefill_stack_equals_each_expert_dequantized(folder, dtype, monkeypatch):
    """The prefill path's whole-layer dequantization of f8 experts (several experts a pass) gives
    each expert exactly formats.dequantize's values."""
    from rung.quant import experts
    from rung.quant.formats import dequantize

    monkeypatch.setattr(experts, "F8_EXPERTS", 4)  # 6 experts: a full pass and a partial one
    moe = rung.load_model(f"{folder}@fp8").layers[0].mlp
    for prefix in ("gate_up", "down"):
        stack = moe._dense(prefix, dtype)
        each = torch.stack([dequantize(moe.packed_expert(prefix, e), dtype) for e in range(moe.shape[0])])
        assert stack.dtype == dtype and torch.equal(stack, each)
