"""GGUF files (llama.cpp's format): a bounded header check, metadata, dequantized tensors.

Reading goes in two steps:

1. ``read_gguf`` walks the header with a small parser of its own that checks every count, length,
   dimension and offset against the file size before anything is allocated, so a hostile or broken
   file is refused with one line naming the file and the fault. The metadata comes out of that walk
   as plain Python values (the contract with ``rung.text``: ``GGUFFile.metadata``).
2. ``gguf.GGUFReader`` (the ``gguf`` package, llama.cpp's own reader) then maps the tensor table,
   and ``GGUFFile.read`` dequantizes one tensor at a time with ``gguf.quants.dequantize``: F32, F16,
   BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K, MXFP4 and whatever else gguf can decode.

What the file describes is read elsewhere: weights/gguf_config.py maps its metadata to a
ModelConfig, weights/keymaps.py (``gguf_rules``) its tensor names to rung parameters, and
weights/loader.py (``load_gguf_model``) builds the model.

Shapes: GGUF lists dimensions fastest-first (ggml's ne[0] is the row length); here every shape is in
torch order, so ``token_embd.weight`` is [vocab, hidden] and ``ffn_gate_exps.weight`` [E, I, H].
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from rung.weights.safetensors_io import CheckpointError



class GGUFError(CheckpointError):
    """A GGUF file rung cannot read; the message names the file and what is wrong."""


# ---- bounds ------------------------------------------------------------------------------------

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 counted in 32 bits; llama.cpp has written 3 since 2023
# counts each entry of which Python walks one at a time: the largest real files hold about a thousand
# tensors (DeepSeek-V3: 1,025) and a hundred metadata keys, and a count of 2^20 takes a minute or more
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_KEY_BYTES = 65_535  # the GGUF spec's limit on key names
MAX_NAME_BYTES = 4096  # tensor names (ggml allows 64; be lenient, stay bounded)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4
# metadata array elements, all arrays together: each becomes a Python object. Gemma 3 holds 786,432
# (tokens, scores, types), gpt-oss about 850,000 (with merges); ten times that is ample
MAX_ARRAY_ELEMENTS = 1 << 23
# arrays nested in arrays, all of them together: each is its own Python call (2 µs), and a 50 MB
# file can nest millions; no file llama.cpp writes nests arrays at all
MAX_NESTED_ARRAYS = 1 << 16
MAX_ALIGNMENT = 1 << 20
DEFAULT_ALIGNMENT = 32
HEADER_BYTES = 24  # magic, version, tensor count, kv count
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (empty name, no dims)
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value

# GGUF value types: fixed-size scalars (struct format, numpy dtype), then string and array
_SCALARS = {
    0: ("<B", "u1"), 1: ("<b", "i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
    6: ("<f", "<f4"), 7: ("<B", "u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_BOOL, _STRING, _ARRAY = 7, 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the table, as checked against the file."""

    shape: tuple[int, ...]  # torch order
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class _Header:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorEntry]
    kv_end: int  # where the tensor table starts
    alignment: int


class _Cursor:
    """Reads little-endian values from the file, refusing any read past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)
        self.elements = 0  # array elements read so far
        self.nested = 0  # arrays read inside arrays so far

    def error(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def take(self, n: int, what: str) -> int:
        """Advance past n bytes; returns where they start."""
        start = self.pos
        if n > self.size - start:
            raise self.error(f"truncated or corrupt file: {what} at byte {start} needs {n} bytes, "
                             f"only {self.size - start} remain")
        self.pos = start + n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            raise self.error(f"{what} is {n} bytes long (at most {limit} allowed)")
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not valid UTF-8") from None

    def strings(self, n: int, what: str) -> list[str]:
        """n strings, read in one tight loop (Gemma 3's vocabulary has 262,144)."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        unpack = _U64.unpack_from
        for i in range(n):
            if size - pos < 8:
                self.pos = pos
                raise self.error(f"truncated or corrupt file: {what}[{i}] at byte {pos} runs past the end")
            (length,) = unpack(buf, pos)
            pos += 8
            if length > size - pos:
                self.pos = pos
                raise self.error(f"truncated or corrupt file: {what}[{i}] is {length} bytes long, "
                                 f"only {size - pos} remain")
            try:
                out.append(buf[pos:pos + length].decode("utf-8"))
            except UnicodeDecodeError:
                raise self.error(f"{what}[{i}] is not valid UTF-8") from None
            pos += length
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            fmt, _ = _SCALARS[vtype]
            v = struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        raise self.error(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> list:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.error(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        itype = self.u32(f"element type of {what}")
        n = self.u64(f"length of {what}")
        left = self.size - self.pos
        self.elements += n
        if self.elements > MAX_ARRAY_ELEMENTS:
            raise self.error(f"{what} brings the metadata to {self.elements} array elements "
                             f"(at most {MAX_ARRAY_ELEMENTS} allowed)")
        if itype in _SCALARS:
            fmt, dtype = _SCALARS[itype]
            width = struct.calcsize(fmt)
            if n > left // width:
                raise self.error(f"truncated or corrupt file: {what} declares {n} elements of {width} bytes, "
                                 f"only {left} bytes remain")
            values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.take(n * width, what))
            return (values != 0).tolist() if itype == _BOOL else values.tolist()
        if itype == _STRING:
            if n > left // 8:
                raise self.error(f"truncated or corrupt file: {what} declares {n} strings, only {left} bytes remain")
            return self.strings(n, what)
        if itype == _ARRAY:
            if n > left // 12:
                raise self.error(f"truncated or corrupt file: {what} declares {n} arrays, only {left} bytes remain")
            self.nested += n
            if self.nested > MAX_NESTED_ARRAYS:
                raise self.error(f"{what} brings the metadata to {self.nested} nested arrays "
                                 f"(at most {MAX_NESTED_ARRAYS} allowed)")
            return [self.array(what, depth + 1) for _ in range(n)]
        raise self.error(f"{what} has unknown element type {itype}")


def _parse_header(buf, path: Path) -> _Header:
    """Walk and check the whole header; nothing larger than the file's own metadata is allocated."""
    cur = _Cursor(buf, path)
    size = cur.size
    if size < HEADER_BYTES:
        raise cur.error(f"not a GGUF file (only {size} bytes)")
    if buf[0:4] != MAGIC:
        raise cur.error(f"not a GGUF file (starts with {bytes(buf[0:4])!r}, expected {MAGIC!r})")
    cur.take(4, "magic")
    version = cur.u32("version")
    if version not in VERSIONS:
        if version & 0xFFFF == 0 and (version >> 16) & 0xFFFF:
            raise cur.error("big-endian GGUF files are not supported")
        raise cur.error(f"GGUF version {version} is not supported (rung reads versions 2 and 3)")
    tensor_count, kv_count = cur.u64("tensor count"), cur.u64("metadata count")
    # checked before either table is walked: each entry takes at least its fixed-size fields
    room = size - HEADER_BYTES
    for count, what, each, limit in ((tensor_count, "tensors", MIN_TENSOR_INFO_BYTES, MAX_TENSORS),
                                     (kv_count, "metadata entries", MIN_KV_BYTES, MAX_KV)):
        if count > room // each:
            raise cur.error(f"header declares {count} {what}, impossible in a file of {size} bytes")
        if count > limit:
            raise cur.error(f"header declares {count} {what}; rung reads at most {limit}")
    if tensor_count * MIN_TENSOR_INFO_BYTES + kv_count * MIN_KV_BYTES > room:
        raise cur.error(f"header declares {tensor_count} tensors and {kv_count} metadata entries, impossible "
                        f"in a file of {size} bytes")

    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string("metadata key", MAX_KEY_BYTES)
        if key in metadata:
            raise cur.error(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.u32(f"value type of {key!r}"), f"metadata {key!r}")
    kv_end = cur.pos

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (isinstance(alignment, bool) or not isinstance(alignment, int) or not 0 < alignment <= MAX_ALIGNMENT
            or alignment & (alignment - 1)):
        raise cur.error(f"general.alignment must be a power of two up to {MAX_ALIGNMENT}, got {alignment!r}")
    splits = metadata.get("split.count", 1)
    if isinstance(splits, int) and splits > 1:
        raise cur.error(f"part {metadata.get('split.no', 0) + 1} of a GGUF split in {splits}; merge the parts "
                        "first (llama-gguf-split --merge)")

    raw: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]] = []
    seen: set[str] = set()
    for _ in range(tensor_count):
        name = cur.string("tensor name", MAX_NAME_BYTES)
        if name in seen:
            raise cur.error(f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.error(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, cur.take(8 * n_dims, f"dimensions of tensor {name!r}"))
        type_id = cur.u32(f"type of tensor {name!r}")
        offset = cur.u64(f"data offset of tensor {name!r}")
        try:
            ggml_type = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise cur.error(f"tensor {name!r} has unknown ggml type {type_id}") from None
        shape = tuple(reversed(dims))  # torch order
        if min(dims) < 1:
            raise cur.error(f"tensor {name!r} has shape {list(shape)}: every dimension must be positive")
        if dims[0] % block:
            raise cur.error(f"tensor {name!r} has rows of {dims[0]} values, not a multiple of the "
                            f"{ggml_type.name} block of {block}")
        elements = math.prod(dims)
        nbytes = elements // block * type_size
        if nbytes > size:
            raise cur.error(f"tensor {name!r} has shape {list(shape)} ({elements} elements of {ggml_type.name}, "
                            f"{nbytes} bytes), more than the whole file of {size} bytes")
        raw.append((name, shape, ggml_type, offset, nbytes))

    data_start = -(-cur.pos // alignment) * alignment
    if data_start > size:
        raise cur.error(f"truncated file: the tensor data should start at byte {data_start}, the file has {size}")
    tensors: dict[str, TensorEntry] = {}
    for name, shape, ggml_type, offset, nbytes in raw:
        if offset % alignment:
            raise cur.error(f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}")
        begin = data_start + offset
        if begin + nbytes > size:
            raise cur.error(f"truncated or corrupt file: tensor {name!r} data (bytes {begin}..{begin + nbytes}) "
                            f"lies beyond the end of the file ({size} bytes)")
        tensors[name] = TensorEntry(shape, ggml_type, begin, nbytes)
    spans = sorted((e.offset, e.offset + e.nbytes, n) for n, e in tensors.items())
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise cur.error(f"tensors {a!r} and {b!r} overlap in the file")
    return _Header(version, metadata, tensors, kv_end, alignment)


# ---- the file ----------------------------------------------------------------------------------


class _TensorTableReader(GGUFReader):
    """gguf's reader without its metadata pass.

    GGUFReader turns every element of every metadata array into its own numpy view: 6 s for
    SmolLM2's vocabulary, 25 s for Gemma 3's 262,144 tokens. ``read_gguf`` has already parsed and
    checked that section, so this reader starts at the tensor table. ``GGUFFile`` compares the
    table it maps with the checked one and falls back to the plain reader on any difference.
    """

    def __init__(self, path: Path, kv_end: int, alignment: int):
        self._kv_end = kv_end
        self.alignment = alignment  # what GGUFReader would have read from general.alignment
        super().__init__(path, "r")

    def _build_fields(self, offs: int, count: int) -> int:
        return self._kv_end


class GGUFFile:
    """An open, checked GGUF file.

    ``metadata``: every key → a plain value (str, int, float, bool, or a list of those), e.g.
    ``metadata["tokenizer.ggml.tokens"]`` is a list of str. ``tensors``: name → (shape in torch
    order, ggml type). ``read(name)`` dequantizes one tensor to float32.

    gguf's reader maps the tensors on the first ``read``/``raw``, not here: it costs about 0.1 ms a
    tensor, so a model's metadata and its plan against the checked table come first (a file that
    is not a model rung can build is refused before gguf walks it), and a caller that wants only
    the metadata (the tokenizer, the chat template) never pays for it.
    """

    def __init__(self, path: Path, header: _Header):
        self.path, self.version, self.metadata = path, header.version, header.metadata
        self.entries = header.tensors
        self.tensors = {name: (e.shape, e.ggml_type) for name, e in header.tensors.items()}
        self._header: _Header | None = header
        self._mapped: dict[str, np.ndarray] | None = None

    @property
    def _data(self) -> dict[str, np.ndarray]:
        if self._mapped is None:
            if self._header is None:
                raise GGUFError(f"{self.path}: read after close")
            self._mapped = self._map_tensors(self._header)
        return self._mapped

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: no general.architecture in the metadata")
        return arch

    def _map_tensors(self, header: _Header) -> dict[str, np.ndarray]:
        """gguf's view of each tensor's bytes, once it agrees with the checked table."""
        problem = "maps a different tensor table"
        for make in (lambda: _TensorTableReader(self.path, header.kv_end, header.alignment),
                     lambda: GGUFReader(self.path, "r")):  # the plain reader, should the quick one not fit
            try:
                reader = make()
            except Exception as e:  # gguf raises ValueError, KeyError, IndexError on bad input
                problem = f"fails ({type(e).__name__}: {e})"
                continue
            if self._agrees(reader):
                return {t.name: t.data for t in reader.tensors}
        raise GGUFError(f"{self.path}: gguf's reader {problem}")

    def _agrees(self, reader: GGUFReader) -> bool:
        if len(reader.tensors) != len(self.entries):
            return False
        for t in reader.tensors:
            e = self.entries.get(t.name)
            if (e is None or t.tensor_type != e.ggml_type or t.data_offset != e.offset
                    or tuple(reversed(t.shape.tolist())) != e.shape):
                return False
        return True

    def read(self, name: str) -> torch.Tensor:
        """One tensor, dequantized by gguf to float32, in torch order."""
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: no tensor {name!r}")
        shape, ggml_type = self.tensors[name]
        try:
            values = dequantize(_fewer_rows(self._data[name]), ggml_type)
        except NotImplementedError:
            raise GGUFError(f"{self.path}: tensor {name!r} is stored as {ggml_type.name}, "
                            "which gguf cannot dequantize") from None
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        if not values.flags.writeable:  # F32 comes back as a view of the read-only file
            values = values.copy()
        return torch.from_numpy(values)

    def raw(self, name: str) -> tuple[str, np.ndarray]:
        """One tensor's type name and its bytes as stored (uint8, blocks in order), not dequantized."""
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: no tensor {name!r}")
        return self.tensors[name][1].name, np.asarray(self._data[name]).view(np.uint8).reshape(-1)

    def close(self) -> None:
        self._header, self._mapped = None, None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fewer_rows(data: np.ndarray) -> np.ndarray:
    """The same bytes as a plain ndarray of long rows: gguf dequantizes 16 rows per numpy call, and
    slicing numpy's memmap subclass is slow, so Gemma 3's 262,144-row embedding would take 16,384
    Python round trips. Blocks never straddle rows, so merging whole rows changes nothing else."""
    data = np.asarray(data)
    if data.ndim < 2:
        return data
    rows, width = math.prod(data.shape[:-1]), data.shape[-1]
    k = 1
    while 2 * k * width <= 1 << 20 and rows % (2 * k) == 0:
        k *= 2
    return data.reshape(rows // k, k * width)


def read_gguf(path: str | Path) -> GGUFFile:
    """Open and check a GGUF file; raises GGUFError (one line, naming the file) if it is unusable."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if path.stat().st_size < HEADER_BYTES:
                raise GGUFError(f"{path}: not a GGUF file (only {path.stat().st_size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                header = _parse_header(buf, path)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read ({e.strerror or e})") from None
    return GGUFFile(path, header)
