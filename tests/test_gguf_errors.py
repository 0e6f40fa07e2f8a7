"""Hostile and broken GGUF files are refused with one line naming the file and the fault, quickly
and before anything large is allocated; a well-formed file that does not fit the model is refused
naming the tensor or the metadata key."""

from __future__ import annotations

import shutil
import struct
import time
import tracemalloc

import numpy as np
import pytest
import transformers as tf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

import rung
from oracle import hf_model
from rung.weights.gguf import GGUFError, read_gguf
from rung.weights.resolve import resolve_model
from rung.weights.safetensors_io import CheckpointError
from hostile import run_bounded
from test_gguf_convert import write_gguf
from test_model_parity import LLAMA_BASE

U32, U64, STRING, ARRAY = 4, 10, 8, 9


def gstr(s: str | bytes) -> bytes:
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def head(tensors: int = 0, kvs: int = 0, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, tensors, kvs)


def kv_u32(key: str, value: int) -> bytes:
    return gstr(key) + struct.pack("<II", U32, value)


def tensor_info(name: str, dims: list[int], ggml_type: int = Q.F32, offset: int = 0) -> bytes:
    return gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def one_tensor_file(dims=(4,), ggml_type=Q.F32, offset=0, data: bytes = bytes(16), kvs: bytes = b"", n_kv=0) -> bytes:
    """A complete GGUF: one tensor, its data at the 32-byte aligned start."""
    body = head(1, n_kv) + kvs + tensor_info("w", list(dims), ggml_type, offset)
    return body + bytes(-len(body) % 32) + data


def refused(tmp_path, content: bytes, match: str, name: str = "bad.gguf") -> GGUFError:
    """read_gguf refuses the file: a GGUFError naming it, in well under a second, with little memory."""
    path = tmp_path / name
    path.write_bytes(content)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(GGUFError, match=match) as info:
            read_gguf(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert elapsed < 1.0 and peak < 1 << 20, f"{elapsed:.2f} s, {peak} bytes"
    return info.value


# ---- the container -----------------------------------------------------------------------------


def test_wrong_magic(tmp_path):
    refused(tmp_path, b"GGML" + bytes(100), r"not a GGUF file \(starts with b'GGML'")


def test_empty_and_tiny_files(tmp_path):
    refused(tmp_path, b"", r"not a GGUF file \(only 0 bytes\)")
    refused(tmp_path, b"GGUF\x03", r"not a GGUF file \(only 5 bytes\)")


def test_unsupported_versions(tmp_path):
    refused(tmp_path, head(version=1), "GGUF version 1 is not supported")
    refused(tmp_path, head(version=3 << 24), "big-endian GGUF files are not supported")


def test_huge_tensor_count(tmp_path):
    refused(tmp_path, head(tensors=2**60), r"declares 1152921504606846976 tensors, impossible in a file of 24 bytes")


def test_huge_metadata_count(tmp_path):
    refused(tmp_path, head(kvs=2**40) + bytes(64), r"declares 1099511627776 metadata entries")


def many_tensors_file(path, count: int, kvs: bytes = b"", n_kv: int = 0) -> None:
    """A GGUF whose table really holds ``count`` one-value F32 tensors (so no count exceeds what the
    file's size allows), built with numpy (a Python loop takes seconds); the data is left sparse."""
    entry = np.dtype([("name_len", "<u8"), ("name", "u1", 8), ("n_dims", "<u4"), ("dim", "<u8"),
                      ("type", "<u4"), ("offset", "<u8")])  # packed, as GGUF lays it out
    table = np.zeros(count, entry)
    index = np.arange(count, dtype=np.uint64)
    table["name_len"], table["n_dims"], table["dim"], table["type"] = 8, 1, 1, Q.F32
    table["name"] = np.frombuffer(b"0123456789abcdef", np.uint8)[(index[:, None] >> np.arange(28, -4, -4, dtype=np.uint64)) & 15]
    table["offset"] = 32 * index
    body = head(count, n_kv) + kvs + table.tobytes()
    with path.open("wb") as f:
        f.write(body)
        f.truncate(len(body) + -len(body) % 32 + 32 * count)


def test_gguf_declaring_2_20_tensors_is_refused_before_reading_them(tmp_path):
    """2^20 tensor entries, all present: rung used to walk the table and hand it to gguf's reader
    (about 85 s) before looking at the metadata. The count alone refuses it now."""
    path = tmp_path / "many.gguf"
    many_tensors_file(path, 1 << 20, kvs=gstr("general.architecture") + struct.pack("<I", STRING) + gstr("llama"),
                      n_kv=1)
    res = run_bounded(f"import rung; rung.load_model({str(path)!r})", seconds=30)
    res.assert_refused("many.gguf", "declares 1048576 tensors; rung reads at most 65536")


def test_huge_but_possible_metadata_count_is_refused_at_once(tmp_path):
    kvs = b"".join(gstr(f"k{i}") + struct.pack("<IB", 0, 1) for i in range(1 << 17))
    refused(tmp_path, head(kvs=1 << 17) + kvs, "declares 131072 metadata entries; rung reads at most 65536")


def test_counts_share_the_file(tmp_path):
    """Each count fits the file alone, both together do not."""
    refused(tmp_path, head(tensors=4, kvs=8) + bytes(4 * 24 + 4 * 13),
            "declares 4 tensors and 8 metadata entries, impossible in a file of 172 bytes")


def test_nested_arrays_are_bounded(tmp_path):
    """Millions of empty arrays inside an array, each its own Python call (4M took 9 s)."""
    n = (1 << 16) + 1
    content = head(kvs=1) + gstr("a") + struct.pack("<IIQ", ARRAY, ARRAY, n) + struct.pack("<IQ", 0, 0) * n
    refused(tmp_path, content, r"metadata 'a' brings the metadata to 65537 nested arrays \(at most 65536")


def test_tensor_table_is_mapped_only_after_the_model_checks(llama, monkeypatch):
    """gguf's reader (0.1 ms a tensor) first sees a file once its metadata and plan have passed;
    reading metadata alone never runs it."""
    import rung.weights.gguf as g

    calls = []
    monkeypatch.setattr(g, "GGUFReader", lambda *a, **k: calls.append(a) or pytest.fail("gguf's reader ran"))
    monkeypatch.setattr(g, "_TensorTableReader", g.GGUFReader)
    path = llama(metadata={"llama.block_count": (3, V.UINT32)})
    assert read_gguf(path).metadata["llama.block_count"] == 3
    with pytest.raises(GGUFError, match=r"llama\.block_count is 3 but the file holds blocks 0\.\.1"):
        rung.load_model(path)
    assert calls == []


def test_huge_key_length(tmp_path):
    refused(tmp_path, head(kvs=1) + struct.pack("<Q", 2**62) + bytes(32),
            r"metadata key is 4611686018427387904 bytes long")


def test_huge_string_value(tmp_path):
    content = head(kvs=1) + gstr("general.name") + struct.pack("<IQ", STRING, 2**62) + b"abc"
    refused(tmp_path, content,
            r"truncated or corrupt file: metadata 'general.name' at byte 56 needs 4611686018427387904 bytes")


def test_huge_arrays(tmp_path):
    numbers = head(kvs=1) + gstr("tokenizer.ggml.scores") + struct.pack("<IIQ", ARRAY, 6, 2**61) + bytes(8)
    refused(tmp_path, numbers, r"metadata 'tokenizer.ggml.scores' brings the metadata to 2305843009213693952 "
                               r"array elements")
    numbers = head(kvs=1) + gstr("tokenizer.ggml.scores") + struct.pack("<IIQ", ARRAY, 6, 1000) + bytes(8)
    refused(tmp_path, numbers, r"metadata 'tokenizer.ggml.scores' declares 1000 elements of 4 bytes, only 8 bytes")
    strings = head(kvs=1) + gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING, 1000) + bytes(8)
    refused(tmp_path, strings, r"metadata 'tokenizer.ggml.tokens' declares 1000 strings, only 8 bytes remain")


def test_too_many_array_elements(tmp_path):
    """Every element becomes a Python object: 9 MB of one-byte elements would be a 72 MB list."""
    one_array = head(kvs=1) + gstr("a") + struct.pack("<IIQ", ARRAY, 0, 9 << 20) + bytes(9 << 20)
    refused(tmp_path, one_array, r"metadata 'a' brings the metadata to 9437184 array elements \(at most 8388608")
    array = struct.pack("<IIQ", ARRAY, 0, 5 << 20) + bytes(5 << 20)  # two of them: too many in all
    (tmp_path / "two.gguf").write_bytes(head(kvs=2) + gstr("a") + array + gstr("b") + array)
    with pytest.raises(GGUFError, match=r"metadata 'b' brings the metadata to 10485760 array elements"):
        read_gguf(tmp_path / "two.gguf")


def test_string_inside_an_array_runs_past_the_end(tmp_path):
    content = head(kvs=1) + gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING, 2) + gstr("a") \
        + struct.pack("<Q", 1000) + b"xy"
    refused(tmp_path, content, r"metadata 'tokenizer.ggml.tokens'\[1\] is 1000 bytes long, only 2 remain")


def test_unknown_value_type_and_bad_utf8(tmp_path):
    refused(tmp_path, head(kvs=1) + gstr("k") + struct.pack("<I", 77) + bytes(8),
            "metadata 'k' has unknown value type 77")
    refused(tmp_path, head(kvs=1) + gstr(b"\xff\xfe") + struct.pack("<II", U32, 1), "metadata key is not valid UTF-8")


def test_duplicate_key_and_bad_alignment(tmp_path):
    refused(tmp_path, head(kvs=2) + kv_u32("a", 1) + kv_u32("a", 2), "metadata key 'a' appears twice")
    refused(tmp_path, head(kvs=1) + kv_u32("general.alignment", 3), "general.alignment must be a power of two")


# ---- the tensor table --------------------------------------------------------------------------


def test_absurd_dimensions(tmp_path):
    refused(tmp_path, one_tensor_file(dims=(2**40, 2**40)),
            r"tensor 'w' has shape \[1099511627776, 1099511627776\] \(1208925819614629174706176 elements of F32, "
            r"4835703278458516698824704 bytes\), more than the whole file of 112 bytes")
    refused(tmp_path, one_tensor_file(dims=(4, 0)),
            r"tensor 'w' has shape \[0, 4\]: every dimension must be positive")
    refused(tmp_path, head(1) + gstr("w") + struct.pack("<I", 7) + bytes(64),
            r"tensor 'w' has 7 dimensions \(1 to 4 allowed\)")


def test_tensor_data_out_of_bounds(tmp_path):
    refused(tmp_path, one_tensor_file(offset=2**40),
            r"truncated or corrupt file: tensor 'w' data \(bytes 1099511627840\.\.1099511627856\) lies beyond")
    refused(tmp_path, one_tensor_file(dims=(8,)),
            r"tensor 'w' data \(bytes 64\.\.96\) lies beyond the end of the file \(80 bytes\)")


def test_misaligned_unknown_type_partial_block_overlap_duplicate(tmp_path):
    refused(tmp_path, one_tensor_file(offset=4), "tensor 'w' data offset 4 is not a multiple of the alignment 32")
    refused(tmp_path, one_tensor_file(ggml_type=99), "tensor 'w' has unknown ggml type 99")
    refused(tmp_path, one_tensor_file(dims=(33,), ggml_type=Q.Q4_0),
            "tensor 'w' has rows of 33 values, not a multiple of the Q4_0 block of 32")
    two = head(2) + tensor_info("a", [8]) + tensor_info("b", [8])
    refused(tmp_path, two + bytes(-len(two) % 32) + bytes(32), "tensors 'a' and 'b' overlap in the file")
    dup = head(2) + tensor_info("a", [8]) + tensor_info("a", [8], offset=32)
    refused(tmp_path, dup + bytes(64), "tensor 'a' appears twice")


def test_split_files_are_refused(tmp_path):
    kvs = gstr("split.count") + struct.pack("<IH", 2, 3)
    refused(tmp_path, head(kvs=1) + kvs, r"part 1 of a GGUF split in 3; merge the parts first")


def test_truncated_real_file_is_refused(tmp_path):
    real = resolve_model("smollm2-135m")
    with real.open("rb") as f:
        half = f.read(real.stat().st_size // 2)
    path = tmp_path / "half.gguf"
    path.write_bytes(half)
    start = time.perf_counter()
    with pytest.raises(GGUFError, match=r"half\.gguf: truncated or corrupt file: tensor '.+' data "
                                        r"\(bytes \d+\.\.\d+\) lies beyond the end of the file \(49181216 bytes\)"):
        rung.load_model(path)
    assert time.perf_counter() - start < 2.0
    path.write_bytes(half[:500_000])  # inside the vocabulary
    with pytest.raises(GGUFError, match=r"truncated or corrupt file: metadata 'tokenizer\.ggml\.\w+'\[\d+\]"):
        rung.load_model(path)


def test_gguf_error_is_a_checkpoint_error(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"nope")
    with pytest.raises(CheckpointError, match=r"x\.gguf: not a GGUF file"):
        rung.load_model(tmp_path / "x.gguf")


# ---- well-formed files that do not describe a model rung can build ------------------------------


@pytest.fixture
def llama(tmp_path):
    model = hf_model(tf.LlamaConfig(**LLAMA_BASE))

    def write(**kwargs):
        path = tmp_path / "model.gguf"
        write_gguf(path, model, **kwargs)
        return path
    return write


def test_missing_tensor_is_named(llama):
    path = llama(edit=lambda ts: [(n, a) for n, a in ts if n != "blk.1.ffn_up.weight"])
    with pytest.raises(GGUFError, match=r"model\.gguf: tensor 'blk\.1\.ffn_up\.weight' is missing "
                                        r"\(needed for llama parameter layers\.1\.mlp\.gate_up_proj\.weight\)"):
        rung.load_model(path)


def test_unexpected_tensor_is_named(llama):
    path = llama(edit=lambda ts: ts + [("blk.0.ffn_extra.weight", ts[0][1])])
    with pytest.raises(GGUFError, match=r"model\.gguf: unexpected tensor 'blk\.0\.ffn_extra\.weight' for llama"):
        rung.load_model(path)


def test_misshaped_tensor_is_named(llama):
    path = llama(edit=lambda ts: [(n, a[:, :32] if n == "blk.1.attn_v.weight" else a) for n, a in ts])
    with pytest.raises(GGUFError, match=r"tensor 'blk\.1\.attn_v\.weight' has shape \[32, 32\]; llama parameter "
                                        r"layers\.1\.attn\.qkv_proj\.weight \(v rows\) needs \[32, 64\]"):
        rung.load_model(path)


def test_unsupported_architecture_is_named(llama):
    with pytest.raises(GGUFError, match=r"architecture 'mamba' is not supported; rung reads llama, qwen3"):
        rung.load_model(llama(arch="mamba"))


def test_absurd_block_count_is_refused_before_building_the_model(llama):
    path = llama(metadata={"llama.block_count": (10**9, V.UINT32)})
    start = time.perf_counter()
    with pytest.raises(GGUFError, match=r"llama\.block_count is 1000000000 but the file holds blocks 0\.\.1"):
        rung.load_model(path)
    assert time.perf_counter() - start < 2.0


def test_absurd_head_size_is_refused_before_building_the_model(llama):
    path = llama(metadata={"llama.attention.key_length": (2**30, V.UINT32)})
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_q\.weight is \[64, 64\]; head_count 4 x key_length "
                                        r"1073741824"):
        rung.load_model(path)


def test_metadata_of_the_wrong_type_is_named(llama):
    with pytest.raises(GGUFError, match=r"llama\.attention\.head_count must be an integer from 1 to 2\^31, "
                                        r"got 'four'"):
        rung.load_model(llama(metadata={"llama.attention.head_count": ("four", V.STRING)}))


def test_unsupported_rope_scaling_is_named(llama):
    with pytest.raises(GGUFError, match=r"llama\.rope\.scaling\.type 'longrope' is not supported"):
        rung.load_model(llama(metadata={"llama.rope.scaling.type": ("longrope", V.STRING),
                                        "llama.rope.scaling.factor": (2.0, V.FLOAT32)}))


def test_tensor_type_gguf_cannot_dequantize_is_named(tmp_path):
    path = tmp_path / "ints.gguf"
    path.write_bytes(one_tensor_file(ggml_type=Q.I32))
    with pytest.raises(GGUFError, match=r"tensor 'w' is stored as I32, which gguf cannot dequantize"):
        read_gguf(path).read("w")


def test_a_copy_of_a_good_file_still_loads(tmp_path, llama):
    shutil.copy(llama(), tmp_path / "copy.gguf")
    assert rung.load_model(tmp_path / "copy.gguf").config.num_layers == 2
