"""A packed checkpoint folder (what ``rung quantize`` writes) is hostile input like any other: its
layers' raw buffers go to the native kernels by pointer. Each corruption below is refused by
load_model in one line, in a child process under a memory limit and a timeout (tests/hostile.py),
before any kernel reads a byte: never a SIGSEGV, never logits read from past a buffer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import rung
from hostile import run_bounded, run_cli_bounded

# the child loads the folder and runs one forward pass: 3 rows take the native kernels
LOAD_AND_RUN = """
import torch
from rung.weights.loader import load_model
model = load_model({folder!r})
with torch.inference_mode():
    print(float(model(torch.tensor([[1, 2, 3]])).abs().sum()))
"""


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny random Llama (hidden 64, 2 layers) through ``rung quantize --to int4``: q4 layers
    (data, scale, offset) in groups of 32 and a q8 LM head (data, scale)."""
    from oracle import tiny_chat_model

    from rung.cli import main

    root = tmp_path_factory.mktemp("packed")
    (root / "hf").mkdir()
    hf = tiny_chat_model(root / "hf", hidden_size=64, intermediate_size=128, head_dim=16)
    assert main(["quantize", str(hf), "--to", "int4", "--out", str(root / "q")]) == 0
    return root


def corrupted(packed, tmp_path, tensors=None, layers=None, config=None):
    """A copy of the packed folder with its tensors, rung_layers metadata or rung_config changed
    by the given functions (each edits its argument in place)."""
    folder = tmp_path / "bad"
    shutil.copytree(packed / "q", folder)
    file = folder / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta, table = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    entries = json.loads(meta["rung_layers"])
    if tensors:
        tensors(table)
    if layers:
        layers({e["path"]: e for e in entries})
    meta["rung_layers"] = json.dumps(entries)
    save_file(table, str(file), metadata=meta)
    if config:
        raw = json.loads((folder / "config.json").read_text())
        config(raw["rung_config"])
        (folder / "config.json").write_text(json.dumps(raw))
    return folder


def refused(folder, *needles, seconds=30, memory_bytes=3 << 30):
    res = run_bounded(LOAD_AND_RUN.format(folder=str(folder)), seconds=seconds, memory_bytes=memory_bytes)
    return res.assert_refused(*needles)


def test_the_valid_packed_folder_loads_with_the_logits_of_the_model_it_was_written_from(packed):
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]])
    original = rung.load_model(f"{packed / 'hf'}@int4")
    reloaded = rung.load_model(str(packed / "q"))
    with torch.inference_mode():
        for rows in (ids, ids[:, :3]):  # the reference path and the native kernels
            assert torch.equal(original(rows), reloaded(rows))
    run_bounded(LOAD_AND_RUN.format(folder=str(packed / "q")), seconds=30).assert_ok()


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])
def test_tied_models_packed_in_every_format_reload_with_the_same_logits(fmt, tmp_path):
    """A tied float32 head is stored once, as the embedding table (rung_tied_head): the loader
    takes its data from there (on main an fp32 folder of a tied model did not load)."""
    from oracle import tiny_chat_model

    from rung.cli import main

    (tmp_path / "hf").mkdir()
    hf = tiny_chat_model(tmp_path / "hf", hidden_size=64, intermediate_size=128, head_dim=16, tie_word_embeddings=True)
    assert main(["quantize", str(hf), "--to", fmt, "--out", str(tmp_path / "q")]) == 0
    original = rung.load_model(str(hf) + ("" if fmt == "fp32" else f"@{fmt}"), fast=True)
    reloaded = rung.load_model(str(tmp_path / "q"))
    ids = torch.arange(1, 21)[None]
    with torch.inference_mode():
        for rows in (ids, ids[:, :3]):
            assert torch.equal(original(rows), reloaded(rows))


def test_int8_layer_without_its_scale_is_refused(packed, tmp_path):
    folder = corrupted(packed, tmp_path, tensors=lambda t: t.pop("lm_head.scale"))
    refused(folder, "model.safetensors", "'lm_head.scale'", "F16 [", "q8 packed layer lm_head")


def test_int4_layer_without_its_offset_is_refused(packed, tmp_path):
    folder = corrupted(packed, tmp_path, tensors=lambda t: t.pop("layers.1.mlp.gate_up_proj.offset"))
    refused(folder, "model.safetensors", "'layers.1.mlp.gate_up_proj.offset'", "q4 packed layer")


def test_layer_declared_larger_than_its_data_is_refused(packed, tmp_path):
    def grow(layers):
        layers["layers.0.attn.o_proj"]["shape"] = [64, 4096]

    refused(corrupted(packed, tmp_path, layers=grow), "model.safetensors", "layers.0.attn.o_proj", "[64, 4096]",
            "[64, 64]")


def test_layer_declared_larger_than_its_data_with_a_config_that_agrees_is_refused(packed, tmp_path):
    """The metadata and the config both say the MLP is 4x wider; the stored tensors are not."""
    def grow(layers):
        layers["layers.0.mlp.gate_up_proj"]["shape"] = [1024, 64]
        layers["layers.1.mlp.gate_up_proj"]["shape"] = [1024, 64]
        layers["layers.0.mlp.down_proj"]["shape"] = [64, 512]
        layers["layers.1.mlp.down_proj"]["shape"] = [64, 512]

    folder = corrupted(packed, tmp_path, layers=grow, config=lambda c: c.update(intermediate_size=512))
    refused(folder, "model.safetensors", "'layers.0.mlp.", "data' is U8", "; expected U8")


@pytest.mark.parametrize("name,dtype", [("layers.0.attn.qkv_proj.scale", torch.float32),
                                        ("layers.0.attn.qkv_proj.data", torch.int8),
                                        ("final_norm.weight", torch.float16)])
def test_tensor_of_the_wrong_dtype_is_refused(packed, tmp_path, name, dtype):
    def convert(t):
        t[name] = t[name].to(dtype)

    refused(corrupted(packed, tmp_path, tensors=convert), "model.safetensors", repr(name), "expected")


def test_unknown_format_is_refused(packed, tmp_path):
    def q3(layers):
        layers["layers.0.attn.qkv_proj"]["fmt"] = "q3"

    refused(corrupted(packed, tmp_path, layers=q3), "model.safetensors", "layers.0.attn.qkv_proj",
            "unknown weight format 'q3'")


@pytest.mark.parametrize("group", [0, 48, 128, -32, None])
def test_bad_group_size_is_refused(packed, tmp_path, group):
    def regroup(layers):
        layers["layers.1.attn.o_proj"]["group"] = group

    refused(corrupted(packed, tmp_path, layers=regroup), "model.safetensors", "layers.1.attn.o_proj", "group")


def test_extra_tensor_is_refused(packed, tmp_path):
    def add(t):
        t["layers.0.attn.qkv_proj.extra"] = torch.zeros(4)

    refused(corrupted(packed, tmp_path, tensors=add), "model.safetensors",
            "unexpected tensor 'layers.0.attn.qkv_proj.extra'")


def test_a_float_projection_beside_its_packed_layer_is_refused(packed, tmp_path):
    def add(t):
        t["layers.0.attn.qkv_proj.weight"] = torch.zeros(64, 64)

    refused(corrupted(packed, tmp_path, tensors=add), "model.safetensors",
            "unexpected tensor 'layers.0.attn.qkv_proj.weight'")


@pytest.mark.parametrize("field,value,needle", [("num_heads", 8, "packed layer layers.0.attn."),
                                                ("num_kv_heads", 1, "packed layer layers.0.attn."),
                                                ("vocab_size", 200, "packed layer lm_head"),
                                                ("intermediate_size", 96, "packed layer layers.0.mlp.")])
def test_shapes_disagreeing_with_the_config_are_refused(packed, tmp_path, field, value, needle):
    folder = corrupted(packed, tmp_path, config=lambda c: c.update({field: value}))
    refused(folder, "model.safetensors", needle, "rung_config makes it")


def test_a_layer_the_config_does_not_have_is_refused(packed, tmp_path):
    def rename(layers):
        layers["layers.0.attn.o_proj"]["path"] = "layers.0.attn.rotary"

    refused(corrupted(packed, tmp_path, layers=rename), "model.safetensors", "'layers.0.attn.rotary'",
            "not a linear layer")


@pytest.mark.parametrize("field,value", [("hidden_size", 10**9), ("head_dim", 10**9), ("vocab_size", 10**12),
                                         ("num_kv_heads", 0), ("hidden_size", "64")])
def test_config_sizes_the_file_cannot_hold_are_refused_before_allocating(packed, tmp_path, field, value):
    folder = corrupted(packed, tmp_path, config=lambda c: c.update({field: value}))
    refused(folder, "config.json", f"rung_config.{field}", seconds=20, memory_bytes=2 << 30)


def test_config_with_a_million_layers_is_refused_at_once(packed, tmp_path):
    folder = corrupted(packed, tmp_path, config=lambda c: c.update(num_layers=10**6, layer_types=["full"] * 10**6))
    refused(folder, "config.json", "num_layers is 1000000", "layers 0..1", seconds=20, memory_bytes=2 << 30)


def test_malformed_layer_metadata_is_refused(packed, tmp_path):
    def break_shape(layers):
        layers["layers.0.mlp.down_proj"]["shape"] = [64, "128"]

    refused(corrupted(packed, tmp_path, layers=break_shape), "model.safetensors", "rung_layers[", "malformed")


def test_rung_generate_refuses_a_packed_folder_without_a_scale_in_one_line(packed, tmp_path):
    """What `rung generate` and `rung serve` load: the CLI's usage exit, not a crash on the first token."""
    folder = corrupted(packed, tmp_path, tensors=lambda t: t.pop("layers.0.attn.qkv_proj.scale"))
    res = run_cli_bounded("generate", "-m", str(folder), "--max-tokens", "2", "hi", seconds=30, memory_bytes=3 << 30)
    res.assert_refused("rung: error:", "'layers.0.attn.qkv_proj.scale'")


def test_quantization_config_that_is_not_an_object_is_not_a_packed_folder(packed, tmp_path):
    from rung.quant.checkpoint import is_packed_checkpoint

    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": ["rung"]}))
    assert not is_packed_checkpoint(folder)
    assert is_packed_checkpoint(packed / "q")


def test_a_folder_written_before_gate_up_was_named_gate_up_proj_still_loads(packed, tmp_path):
    """rung quantize wrote a gated MLP's packed layer as ``mlp.gate_up`` before q|k|v and gate|up
    were fused at load; such a folder loads to the same model."""
    def rename_tensors(t):
        for name in [n for n in t if ".mlp.gate_up_proj." in n]:
            t[name.replace(".gate_up_proj.", ".gate_up.")] = t.pop(name)

    def rename_layers(layers):
        for entry in layers.values():
            entry["path"] = entry["path"].replace(".mlp.gate_up_proj", ".mlp.gate_up")

    old = corrupted(packed, tmp_path, tensors=rename_tensors, layers=rename_layers)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        assert torch.equal(rung.load_model(old)(ids), rung.load_model(packed / "q")(ids))
