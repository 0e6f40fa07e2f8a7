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
    with pytest.raises(ConfigError, match="rope type 'longrope' is not supported"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2,
                             "num_hidden_layers": 1, "intermediate_size": 16,
                             "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def test_missing_shard_listed_in_index(folder, tmp_path):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors, which is missing"):
        rung.load_model(folder)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_embd": 8,
                                                      "n_layer": 1, "n_head": 2}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        rung.load_model(tmp_path)
