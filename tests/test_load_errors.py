"""Broken checkpoints are refused with an error that names the file and the tensor or field."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import rung
from rung import ConfigError, ModelConfig
from rung.weights.safetensors_io import CheckpointError

from hostile import run_bounded
from oracle import hf_model


@pytest.fixture
def folder(tmp_path):
    config = tf.Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
                            num_key_value_heads=2, vocab_size=50)
    hf_model(config).save_pretrained(tmp_path)
    return tmp_path


def rewrite(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_truncated_safetensors_names_file_and_tensor(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file: tensor '.+'"):
        rung.load_model(folder)


def test_file_shorter_than_its_header_is_refused(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        rung.load_model(folder)


def test_absurd_header_length_is_refused_before_reading(folder):
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        rung.load_model(folder)


def test_header_with_offsets_that_disagree_with_shape(folder):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match=r"tensor 'w' holds 16 bytes"):
        rung.load_model(folder)


def test_wrong_shape_names_tensor_and_expected_shape(folder):
    rewrite(folder, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \[8, 32\].*\[16, 32\]"):
        rung.load_model(folder)


def test_missing_tensor_is_named(folder):
    rewrite(folder, lambda t: t.pop("model.layers.0.self_attn.q_norm.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.q_norm\.weight' is missing"):
        rung.load_model(folder)


def test_unexpected_tensor_is_named(folder):
    rewrite(folder, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        rung.load_model(folder)


def test_unknown_model_type_is_named(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ConfigError, match=r"config\.json: unknown model_type 'mamba'"):
        rung.load_model(folder)


def test_missing_config_field_is_named(tmp_path):
    with pytest.raises(ConfigError, match="missing field 'num_hidden_layers'"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2,
                             "intermediate_size": 16})


def test_unsupported_rope_type_is_named():
    # (longrope was the example until issue 21 made it a supported type)
    with pytest.raises(ConfigError, match="rope type 'mrope' is not supported"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2,
                             "num_hidden_layers": 1, "intermediate_size": 16,
                             "rope_scaling": {"rope_type": "mrope", "factor": 2.0}})


def test_missing_shard_listed_in_index(folder, tmp_path):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors, which is missing"):
        rung.load_model(folder)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_embd": 8,
                                                      "n_layer": 1, "n_head": 2}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        rung.load_model(tmp_path)


# ---- config.json against the tensors: planned on the meta device before anything is allocated ----


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.pop("layer_types", None)  # one entry per layer: would refuse a new layer count on its own
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def load_bounded(folder, seconds: float = 30):
    """load_model in a child under 4 GB of address space: a plan that allocated what the config
    claims, or built its layers, would run out of memory or time."""
    return run_bounded(f"import rung; rung.load_model({str(folder)!r})", seconds=seconds)


def test_hidden_size_of_a_billion_is_refused_before_allocating(folder):
    """It used to ask for 1 TB (200 GB for the first parameter) before reading a tensor."""
    edit_config(folder, hidden_size=10**9)
    load_bounded(folder).assert_refused("model.safetensors", "model.embed_tokens.weight", "[50, 32]",
                                        "hidden_size 1000000000")


def test_million_layers_over_two_layers_of_tensors_is_refused_at_once(folder):
    """It used to build 10^6 blocks (minutes) before the first tensor was compared."""
    edit_config(folder, num_hidden_layers=10**6)
    load_bounded(folder).assert_refused("config.json", "num_hidden_layers is 1000000",
                                        "the checkpoint holds layers 0..1 (2 distinct)")


def test_billion_layers_are_refused_before_the_config_is_built(folder):
    """ModelConfig holds one entry per layer: 10^9 of them would not fit in 4 GB."""
    edit_config(folder, num_hidden_layers=10**9)
    load_bounded(folder).assert_refused("num_hidden_layers", "1,000,000,000")


def test_fewer_layers_than_the_tensors_hold_is_refused(folder):
    edit_config(folder, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"config\.json: num_hidden_layers is 1 but the checkpoint holds "
                                              r"layers 0\.\.1 \(2 distinct\)"):
        rung.load_model(folder)


def test_gpt2_layer_count_is_named_by_its_own_field(tmp_path):
    hf_model(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=64)).save_pretrained(tmp_path)
    edit_config(tmp_path, n_layer=10**6)
    load_bounded(tmp_path).assert_refused("n_layer is 1000000 but the checkpoint holds layers 0..1")


def test_wide_head_is_refused_before_the_model_is_built(folder):
    """The meta model's rotary frequencies are real: head_dim / 2 of them, on the CPU."""
    edit_config(folder, head_dim=10**9)
    load_bounded(folder).assert_refused("head_dim 1000000000 is larger than any tensor")


def test_wide_mlp_names_the_tensor_and_the_field(folder):
    edit_config(folder, intermediate_size=10**9)
    load_bounded(folder).assert_refused("tensor 'model.layers.0.mlp.gate_proj.weight' has shape [48, 32]",
                                        "needs [1000000000, 32] (from config.json's intermediate_size 1000000000)")


def test_million_experts_over_four_are_refused_at_once(tmp_path):
    """Qwen3-MoE's hub layout has one tensor per expert: the key map would list 6 million of them."""
    config = tf.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                               num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
                               num_key_value_heads=2, vocab_size=50)
    hf_model(config).save_pretrained(tmp_path)
    edit_config(tmp_path, num_experts=10**6)
    load_bounded(tmp_path).assert_refused("config.json", "num_experts is 1000000",
                                          "the checkpoint holds experts 0..3 (4 distinct)")


def test_integer_tensor_for_a_float_parameter_is_named(folder):
    rewrite(folder, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' is stored as I32; "
                                              r"qwen3 parameter final_norm\.weight reads floating-point values"):
        rung.load_model(folder)


def test_plan_reads_no_tensor_data(folder, monkeypatch):
    """Every fault the headers show is found before the first tensor is read."""
    from rung.weights.safetensors_io import SafetensorsFolder

    monkeypatch.setattr(SafetensorsFolder, "read", lambda self, name: pytest.fail(f"read {name} before the plan"))
    rewrite(folder, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": torch.zeros(32, 47)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' has shape \[32, 47\]"):
        rung.load_model(folder)


# ---- which files a folder may open ---------------------------------------------------------------


def shard(folder, name: str) -> None:
    """Point the whole checkpoint at one file name, through an index."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: name for n in tensors}}))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors",
                                  "..\\outside.safetensors"])
def test_index_naming_a_file_outside_the_folder_is_refused(folder, name):
    model = folder / "model"
    model.mkdir()
    for f in ("config.json", "model.safetensors"):
        (folder / f).rename(model / f)
    (folder / "outside.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    shard(model, name)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: weight file .* is not a path inside"):
        rung.load_model(model)


def test_shard_that_is_a_symlink_out_of_the_folder_is_refused(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "weights.safetensors"
    (folder / "model.safetensors").rename(elsewhere)
    (folder / "model-00001-of-00001.safetensors").symlink_to(elsewhere)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-00001.safetensors" for n in load_file(elsewhere)}}))
    with pytest.raises(CheckpointError, match=r"index\.json: weight file 'model-00001-of-00001\.safetensors' leads "
                                              r"outside"):
        rung.load_model(folder)
    (folder / "model.safetensors.index.json").unlink()  # a lone model file is held to the same rule
    (folder / "model-00001-of-00001.safetensors").rename(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weight file 'model\.safetensors' leads outside"):
        rung.load_model(folder)


def test_index_naming_a_subfolder_and_the_hugging_face_cache_layout_load(folder, tmp_path):
    """What real folders do: shards in a subfolder, and the hub cache's snapshot links into blobs/."""
    reference = rung.load_model(folder)
    (folder / "weights").mkdir()
    shard(folder, "weights/model.safetensors")
    (folder / "model.safetensors").rename(folder / "weights" / "model.safetensors")
    assert torch.equal(rung.load_model(folder).embed.weight, reference.embed.weight)

    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (folder / "weights" / "model.safetensors").rename(repo / "blobs" / "5f2e")
    (folder / "config.json").rename(repo / "blobs" / "c0f1")
    (snapshot / "model.safetensors").symlink_to("../../blobs/5f2e")
    (snapshot / "config.json").symlink_to("../../blobs/c0f1")
    (folder / "model.safetensors.index.json").unlink()
    assert torch.equal(rung.load_model(snapshot).embed.weight, reference.embed.weight)


@pytest.mark.parametrize("index", [{"weight_map": ["model.safetensors"]}, {"weight_map": {"w": 3}}, []])
def test_malformed_index_is_refused(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        rung.load_model(folder)


def test_header_nested_too_deeply_is_refused(folder):
    header = b"[" * 100_000 + b"]" * 100_000
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    load_bounded(folder).assert_refused("model.safetensors", "nests JSON too deeply")


def test_header_that_is_not_json_is_refused(folder):
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"hello" + bytes(64))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: safetensors header is not valid JSON"):
        rung.load_model(folder)


def test_empty_tensor_with_an_absurd_dimension_is_refused(folder):
    """Zero bytes pass the size check whatever the other dimensions claim; torch cannot hold 2^70."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'w' has a malformed header entry"):
        rung.load_model(folder)


def test_too_many_heads_names_the_field(folder):
    edit_config(folder, num_attention_heads=10**9)
    load_bounded(folder).assert_refused("'model.layers.0.self_attn.q_proj.weight' has shape [32, 32]",
                                        "num_attention_heads 1000000000")
