"""Packed models end to end: specs, GGUF blocks kept, fused layouts, save and reload, memory held."""

from __future__ import annotations

import resource

import pytest
import torch

import rung
from rung.quant.formats import dequantize
from rung.quant.linear import PackedLinear, native_prompts
from rung.quant.rewrite import pack_model, packed_bytes
from rung.quant.spec import ModelSpec, parse_spec

IDS = torch.tensor([[1, 5, 17, 9, 42, 3, 77, 8, 250, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]])


@pytest.fixture(scope="module")
def smollm2_float():
    return rung.load_model("smollm2-135m")  # the Q4_1 file dequantized by gguf to float32


def test_spec_syntax():
    assert parse_spec("smollm2-135m@int4") == ModelSpec("smollm2-135m", weights="q4")
    assert parse_spec("path/to/model@int8g32") == ModelSpec("path/to/model", weights="q8", group=32)
    assert parse_spec("m@bf16") == ModelSpec("m", dtype="bfloat16")
    assert parse_spec("smollm2-135m") == ModelSpec("smollm2-135m")
    assert parse_spec("runs/v1@2/model.gguf") == ModelSpec("runs/v1@2/model.gguf")  # '@' inside a path
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        parse_spec("smollm2-135m@int3")
    with pytest.raises(ValueError, match="group size 48"):
        parse_spec("smollm2-135m@int4g48")


def test_q4_1_gguf_blocks_are_kept_and_give_the_dequantized_models_logits(smollm2_float):
    model = rung.load_model("smollm2-135m@int4")
    qkv = model.layers[0].attn.qkv_proj
    assert isinstance(qkv, PackedLinear) and qkv.fmt == "q4" and qkv.group == 32
    # the fused q|k|v packed weight is exactly the dequantized file's (Q/K rows unpermuted)
    a = smollm2_float.layers[0].attn
    assert torch.equal(dequantize(qkv.packed), a.qkv_proj.weight)
    assert torch.equal(dequantize(model.lm_head.packed), smollm2_float.embed.weight)  # Q8_0 kept as int8
    with torch.inference_mode():  # 20 rows: the dequantizing reference path
        ref, out = smollm2_float(IDS), model(IDS)
        assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
        with native_prompts():  # the engine's: x rounded to int8 in runs of 32 (llama.cpp's Q8_1)
            fast = model(IDS)
    kl = (ref.softmax(-1) * (ref.log_softmax(-1) - fast.log_softmax(-1))).sum(-1)
    assert 0 < kl.mean() < 0.02  # measured 0.0063


def test_float32_fused_layout_matches_the_plain_model_prefill_and_decode(smollm2_float):
    model = rung.load_model("smollm2-135m", fast=True)
    assert model.layers[0].mlp.gate_up_proj.gated == "silu" and isinstance(model.layers[0].attn.qkv_proj, PackedLinear)
    with torch.inference_mode():
        ref = smollm2_float(IDS)
        cache = model.new_cache()
        steps = [model(IDS[:, :12], cache)] + [model(IDS[:, i: i + 1], cache) for i in range(12, IDS.shape[1])]
    out = torch.cat(steps, dim=1)  # native kernels for 12-row chunk and each decode row
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    assert torch.equal(out[0, -1].argmax(), ref[0, -1].argmax())


@pytest.mark.parametrize("spec,bits", [("smollm2-135m@int8", 8), ("smollm2-135m@int4", 4)])
def test_weight_memory_held_matches_the_format(spec, bits, smollm2_float):
    model = rung.load_model(spec)
    held = packed_bytes(model)  # measured: the bytes of every tensor storage the model holds
    float_bytes = packed_bytes(smollm2_float)
    n = sum(p.numel() for p in smollm2_float.parameters())
    # int4: 4.5 bits for the packed q4 layers (fp16 scale + offset per 32), 8.5 bits for the head
    assert held < float_bytes * {8: 0.27, 4: 0.19}[bits]
    assert held / n * 8 < {8: 8.6, 4: 5.8}[bits]


def test_gguf_int4_load_does_not_expand_to_float():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = rung.load_model("smollm2-135m@int4")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # MB
    # the float32 model alone would be 540 MB; the packed one is 97 MB (plus transient reads)
    assert packed_bytes(model) < 100e6
    assert grown < 350, f"peak RSS grew {grown:.0f} MB while loading an int4 model"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_checkpoint_saves_and_reloads_identically(fmt, tmp_path):
    from rung.cli import main

    assert main(["quantize", "smollm2-135m", "--to", fmt, "--out", str(tmp_path / "q")]) == 0
    original = rung.load_model(f"smollm2-135m@{fmt}")
    reloaded = rung.load_model(str(tmp_path / "q"))
    with torch.inference_mode():
        for ids in (IDS, IDS[:, :4]):  # reference path and native path
            assert torch.equal(original(ids), reloaded(ids))
    assert packed_bytes(reloaded) == packed_bytes(original)
    with pytest.raises(ValueError, match="already a packed checkpoint"):
        rung.load_model(f"{tmp_path / 'q'}@int4")


def test_quantized_checkpoint_keeps_the_tokenizer_and_chats(tmp_path):
    from rung.cli import main

    main(["quantize", "smollm2-135m", "--to", "int4", "--out", str(tmp_path / "q")])
    llm = rung.LLM(str(tmp_path / "q"))
    ref = rung.LLM("smollm2-135m@int4")
    assert llm.tokenizer.encode("Héllo, 世界 <|im_end|>") == ref.tokenizer.encode("Héllo, 世界 <|im_end|>")
    params = rung.SamplingParams(max_tokens=8)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert llm.chat(msgs, params)[0].outputs[0].token_ids == ref.chat(msgs, params)[0].outputs[0].token_ids


@pytest.mark.parametrize("fmt,group", [("q8", None), ("q4", 32), ("q4", 64)])
def test_hf_folder_packed_equals_its_dequantized_weights(fmt, group, tmp_path):
    """A random Llama folder packed gives the logits of the plain model holding the packed
    weights' dequantized values (each parameter in the format packed_targets gives it)."""
    from oracle import tiny_chat_model

    from rung.quant.formats import quantize
    from rung.quant.rewrite import packed_targets

    folder = str(tiny_chat_model(tmp_path, hidden_size=64, intermediate_size=128, head_dim=16))
    spec = f"{folder}@{'int8' if fmt == 'q8' else 'int4'}" + (f"g{group}" if group else "")
    packed = rung.load_model(spec)
    plain = rung.load_model(folder)
    targets = packed_targets(plain, fmt, group)
    assert "lm_head.weight" in targets and "layers.1.mlp.down_proj.weight" in targets
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name in targets:
                p.copy_(dequantize(quantize(p, *targets[name])))
    with torch.inference_mode():
        ref, out = plain(IDS % 100), packed(IDS % 100)  # 20 rows: the reference path
        assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
        # the engine's native prompts and any decode rows: the kernels read the same weights with
        # x rounded to int8 in runs of 32 (about 0.4% an element); each kernel equals its reference
        # on the rounded x exactly (test_quant_kernels), here the whole model stays close
        with native_prompts():
            out = packed(IDS % 100)
        assert 0 < (out - ref).abs().max() < 0.08 * ref.abs().max()


def test_pack_model_packs_moe_experts_keeps_the_router_and_refuses_unknown_formats():
    from rung.config import ModelConfig, MoEConfig
    from rung.model import Decoder

    config = ModelConfig("qwen3_moe", vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, intermediate_size=64, qk_norm=True,
                         moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=32))
    torch.manual_seed(0)
    model = Decoder(config).eval()
    with torch.inference_mode():
        ref = model(IDS % 64)
        pack_model(model, "q8", 32)
        out = model(IDS % 64)
    from rung.quant.experts import PackedMoE

    moe = model.layers[0].mlp
    assert isinstance(moe, PackedMoE) and moe.fmt == "q8" and model.layers[0].attn.qkv_proj.fmt == "q8"
    assert type(moe.router) is torch.nn.Linear  # the router stays in the model dtype
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    with pytest.raises(ValueError, match="unknown weight format"):
        pack_model(Decoder(config), "q3")


def test_rung_arch_takes_a_model_spec(capsys):
    from rung.cli import main

    assert main(["arch", "smollm2-135m@int4", "gpt2", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out[0]["name"] == "smollm2-135m@int4" and out[1]["name"] == "gpt2"
    assert out[0]["weight_bytes"]["int4"] < out[0]["weight_bytes"]["bf16"] / 2
    assert main(["arch", "smollm2-135m@int3"]) == 2  # one-line error, exit 2


def test_the_engine_prefills_packed_layers_natively_a_plain_call_on_the_reference(monkeypatch):
    """Inside the engine's steps a prompt's rows go through the native kernels (native_prompts);
    a plain model call of more rows than a decode batch keeps the dequantizing reference."""
    from rung.llm import LLM
    from rung.engine.sampling_params import SamplingParams

    calls = []
    real = PackedLinear.reference
    monkeypatch.setattr(PackedLinear, "reference", lambda self, rows: calls.append(rows.shape[0]) or real(self, rows))
    llm = LLM("smollm2-135m@int4")
    prompt = list(range(100, 140))  # 40 tokens: more than a decode batch
    llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0))
    assert calls == []
    with torch.inference_mode():
        llm.model(torch.tensor([prompt]))
    assert calls and min(calls) == 40
