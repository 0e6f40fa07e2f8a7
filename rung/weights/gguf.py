"""GGUF files (llama.cpp's format): a bounded header check, metadata, dequantized tensors, models.

Reading goes in three steps:

1. ``read_gguf`` walks the header with a small parser of its own that checks every count, length,
   dimension and offset against the file size before anything is allocated, so a hostile or broken
   file is refused with one line naming the file and the fault. The metadata comes out of that walk
   as plain Python values (the contract with ``rung.text``: ``GGUFFile.metadata``).
2. ``gguf.GGUFReader`` (the ``gguf`` package, llama.cpp's own reader) then maps the tensor table,
   and ``GGUFFile.read`` dequantizes one tensor at a time with ``gguf.quants.dequantize``: F32, F16,
   BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K, MXFP4 and whatever else gguf can decode.
3. ``config_from_gguf`` maps ``{arch}.*`` metadata to a ModelConfig and ``gguf_rules`` maps
   llama.cpp's tensor names to rung parameters, undoing what llama.cpp's converter
   (``convert_hf_to_gguf.py``) changed: the Q/K row permutation of the ``llama`` architecture,
   Gemma's ``+ 1`` on norm weights, gpt-oss's split of the interleaved gate/up experts.
   transformers' ``modeling_gguf_pytorch_utils.py`` undoes the same things (the oracle in tests).

Shapes: GGUF lists dimensions fastest-first (ggml's ne[0] is the row length); here every shape is in
torch order, so ``token_embd.weight`` is [vocab, hidden] and ``ffn_gate_exps.weight`` [E, I, H].
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from rung.config import ConfigError, ModelConfig, MoEConfig, RopeConfig
from rung.model import Decoder
from rung.model.decoder import meta_decoder
from rung.model.rope import inv_freq_for
from rung.weights.keymaps import Rule, converted, copy
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


# ---- metadata → ModelConfig --------------------------------------------------------------------

# GGUF architecture → rung model_type
ARCHITECTURES = {
    "llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "gpt2": "gpt2",
    "gemma3": "gemma3_text",
}
# The llama.cpp converter permutes Q/K rows for its interleaved rotation only in LlamaModel
# (undo_permute); Qwen3, Qwen3-MoE, gpt-oss and Gemma 3 use NeoX rotation and are stored as is.
PERMUTED_QK = ("llama",)
# End-of-turn tokens that llama.cpp also stops at when they are control tokens (llama-vocab.cpp)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|return|>", "<|call|>",
               "<|endoftext|>")
_CONTROL_OR_USER = (3, 4)  # token_type CONTROL, USER_DEFINED


class _Meta:
    """Typed access to the ``{arch}.*`` keys; errors name the file and the key."""

    def __init__(self, gf: GGUFFile):
        self.gf, self.arch, self.md = gf, gf.architecture, gf.metadata

    def error(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.gf.path}: {msg}")

    def get(self, key: str, default: Any = ...) -> Any:
        """The value of ``{arch}.key``; a per-layer list must hold one value throughout."""
        name = f"{self.arch}.{key}"
        v = self.md.get(name)
        if v is None:
            if default is ...:
                raise self.error(f"missing metadata key {name!r}")
            return default
        if isinstance(v, list) and v and not isinstance(v[0], (list, str)):  # one value per layer
            if any(x != v[0] for x in v):
                raise self.error(f"{name!r} differs between layers ({v[:8]}...); rung needs one value")
            v = v[0]
        return v

    def has(self, key: str) -> bool:
        return self.md.get(f"{self.arch}.{key}") is not None

    def int(self, key: str, default: Any = ..., low: int = 1) -> int:
        if default is not ... and not self.has(key):
            return default
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v < 2**31:
            raise self.error(f"{self.arch}.{key} must be an integer from {low} to 2^31, got {v!r}")
        return v

    def float(self, key: str, default: Any = ...) -> float:
        if default is not ... and not self.has(key):
            return default
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.error(f"{self.arch}.{key} must be a finite number, got {v!r}")
        return float(v)

    def str(self, key: str, default: Any = ...) -> str:
        if default is not ... and not self.has(key):
            return default
        v = self.get(key)
        if not isinstance(v, str):
            raise self.error(f"{self.arch}.{key} must be a string, got {v!r}")
        return v


def _shape(gf: GGUFFile, name: str) -> tuple[int, ...] | None:
    entry = gf.tensors.get(name)
    return entry[0] if entry else None


def _check_blocks(gf: GGUFFile, layers: int) -> None:
    """block_count must match the blk.N tensors: a huge count must not build a huge model."""
    found = {int(n.split(".")[1]) for n in gf.tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if len(found) != layers or max(found) != layers - 1:  # distinct and >= 0: exactly 0..layers-1
        have = f"blocks 0..{max(found)} ({len(found)} distinct)" if found else "no blk.* tensors"
        raise GGUFError(f"{gf.path}: {gf.architecture}.block_count is {layers} but the file holds {have}")


def _eos_ids(gf: GGUFFile) -> int | tuple[int, ...] | None:
    md = gf.metadata
    ids = [md.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                               "tokenizer.ggml.eom_token_id")]
    tokens, types = md.get("tokenizer.ggml.tokens"), md.get("tokenizer.ggml.token_type")
    if isinstance(tokens, list) and isinstance(types, list) and len(types) == len(tokens):
        ids += [i for i, t in enumerate(tokens) if t in END_OF_TURN and types[i] in _CONTROL_OR_USER]
    out = tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and not isinstance(i, bool)))
    return None if not out else out[0] if len(out) == 1 else out


def _snap(x: float) -> float:
    r = round(x)
    return float(r) if abs(x - r) < 1e-3 * max(1.0, abs(x)) else x


def _llama3_from_freq_factors(gf: GGUFFile, theta: float, head_dim: int) -> RopeConfig:
    """llama3 rope scaling, recovered from the ``rope_freqs.weight`` tensor the converter writes
    instead of metadata (one divisor per frequency: 1 kept, ``factor`` scaled, a blend between).
    The blend is linear in 1 / wavelength, so two blended frequencies fix it; the result is then
    checked against every stored divisor."""
    factors = gf.read("rope_freqs.weight").double().flatten()
    if factors.numel() != head_dim // 2:
        raise GGUFError(f"{gf.path}: rope_freqs.weight has {factors.numel()} values for a head of {head_dim}")
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return RopeConfig(theta=theta)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).double() / head_dim))
    blended = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    rope = None
    if int(blended.sum()) >= 2:
        # smooth = (1/f - 1/factor) / (1 - 1/factor) = a / wavelength - b, with low_freq_factor = 1:
        # a = original_context / (high - 1), b = 1 / (high - 1)
        smooth = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)
        x = (inv_freq / (2 * math.pi))[blended]
        design = torch.stack((x, -torch.ones_like(x)), dim=1)
        a, b = torch.linalg.lstsq(design, smooth[:, None]).solution.flatten().tolist()
        if b > 0 and a > 0:
            rope = RopeConfig(theta=theta, type="llama3", factor=_snap(factor), original_max_position=round(a / b),
                              low_freq_factor=1.0, high_freq_factor=_snap(1 + 1 / b))
    if rope is not None:
        implied = inv_freq.float() / inv_freq_for(rope, head_dim, None)[0]
        if torch.allclose(implied.double(), factors, rtol=1e-3):
            return rope
    raise GGUFError(f"{gf.path}: rope_freqs.weight does not follow llama3 rope scaling; rung cannot use it")


def _rope(m: _Meta, head_dim: int, truncate: bool = True) -> RopeConfig:
    """The rotary table of the (global) layers."""
    theta = m.float("rope.freq_base", 10_000.0)
    kind = m.str("rope.scaling.type", "none")
    factor = m.float("rope.scaling.factor", None)
    legacy = m.float("rope.scale_linear", None)  # before rope.scaling.*
    if kind == "none" and legacy not in (None, 1.0):
        kind, factor = "linear", legacy
    if "rope_freqs.weight" in m.gf.tensors:
        if kind != "none":
            raise m.error(f"both rope_freqs.weight and {m.arch}.rope.scaling.type {kind!r}; rung cannot combine them")
        return _llama3_from_freq_factors(m.gf, theta, head_dim)
    if m.float("rope.scaling.attn_factor", 1.0) != 1.0:
        raise m.error(f"{m.arch}.rope.scaling.attn_factor is not supported")
    if kind == "none":
        return RopeConfig(theta=theta)
    if factor is None:
        raise m.error(f"{m.arch}.rope.scaling.type is {kind!r} but {m.arch}.rope.scaling.factor is missing")
    if kind == "linear":
        return RopeConfig(theta=theta, type="linear", factor=factor)
    if kind == "yarn":
        return RopeConfig(
            theta=theta, type="yarn", factor=factor,
            original_max_position=m.int("rope.scaling.original_context_length"),
            beta_fast=m.float("rope.scaling.yarn_beta_fast", 32.0),
            beta_slow=m.float("rope.scaling.yarn_beta_slow", 1.0),
            # the converter writes the config's attention_factor here; absent: 0.1 ln(factor) + 1
            attention_factor=m.float("rope.scaling.yarn_attn_factor", None),
            truncate=truncate,
        )
    raise m.error(f"{m.arch}.rope.scaling.type {kind!r} is not supported (none, linear, yarn)")


def _window_layers(m: _Meta, layers: int, default_pattern: int) -> tuple[str, ...]:
    """llama.cpp's set_swa_pattern(n): layer i slides when i % n < n - 1 (n = 0: every layer);
    ``attention.sliding_window_pattern`` may instead list one bool per layer."""
    pattern = m.md.get(f"{m.arch}.attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise m.error(f"{m.arch}.attention.sliding_window_pattern has {len(pattern)} entries for {layers} layers")
        return tuple("sliding" if p else "full" for p in pattern)
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 0:
        raise m.error(f"{m.arch}.attention.sliding_window_pattern must be a count or a list, got {pattern!r}")
    return tuple("sliding" if pattern == 0 or i % pattern < pattern - 1 else "full" for i in range(layers))


def _dense_width(m: _Meta) -> int:
    """The dense MLP width; an all-expert model may omit it (then only the expert width matters)."""
    if m.has("feed_forward_length"):
        return m.int("feed_forward_length")
    up = _shape(m.gf, "blk.0.ffn_up.weight")
    return up[0] if up else m.int("expert_feed_forward_length")


def config_from_gguf(gf: GGUFFile) -> ModelConfig:
    """The ModelConfig a GGUF file describes (architectures: see ARCHITECTURES)."""
    try:
        return _config(gf)
    except ConfigError as e:  # ModelConfig's own consistency checks
        raise GGUFError(f"{gf.path}: {e}") from None


def _config(gf: GGUFFile) -> ModelConfig:
    arch = gf.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{gf.path}: architecture {arch!r} is not supported; rung reads "
                        f"{', '.join(ARCHITECTURES)}")
    m = _Meta(gf)
    layers = m.int("block_count")
    _check_blocks(gf, layers)
    embed = _shape(gf, "token_embd.weight")
    if embed is None or len(embed) != 2:
        raise m.error("no 2-D token_embd.weight tensor")
    vocab, hidden = embed
    if m.int("embedding_length") != hidden:
        raise m.error(f"{arch}.embedding_length is {m.int('embedding_length')}, token_embd.weight is {list(embed)}")
    heads = m.int("attention.head_count")
    kv_heads = m.int("attention.head_count_kv", heads)
    md = gf.metadata
    common = dict(
        model_type=ARCHITECTURES[arch], vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, tie_word_embeddings="output.weight" not in gf.tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"), eos_token_id=_eos_ids(gf),
    )
    if arch == "gpt2":
        if hidden % heads:
            raise m.error(f"embedding_length {hidden} is not a multiple of head_count {heads}")
        up, pos = _shape(gf, "blk.0.ffn_up.weight"), _shape(gf, "position_embd.weight")
        return ModelConfig(
            **common, head_dim=hidden // heads,
            # the converter writes feed_forward_length = 4 * n_embd whatever n_inner is: trust the tensor
            intermediate_size=up[0] if up else m.int("feed_forward_length"),
            max_position_embeddings=pos[0] if pos else m.int("context_length"),
            norm="layernorm", norm_eps=m.float("attention.layer_norm_epsilon", 1e-5),
            positions="learned", rope=None, qkv_bias=True, o_bias=True,
            mlp="plain", activation="gelu_tanh", mlp_bias=True,
        )

    q = _shape(gf, "blk.0.attn_q.weight")
    head_dim = m.int("attention.key_length", None) or (q[0] // heads if q else hidden // heads)
    if q is None or q[0] != heads * head_dim:
        raise m.error(f"blk.0.attn_q.weight is {list(q) if q else 'missing'}; head_count {heads} x key_length "
                      f"{head_dim} needs {heads * head_dim} rows")
    rot = m.int("rope.dimension_count", head_dim)
    if rot != head_dim:
        raise m.error(f"{arch}.rope.dimension_count {rot} differs from the head size {head_dim} (partial rotary)")
    max_pos = m.int("context_length", 2048)
    rope = _rope(m, head_dim, truncate=arch != "gpt-oss")  # gpt-oss's config: "truncate": false
    fields = dict(
        common, head_dim=head_dim, max_position_embeddings=max_pos,
        intermediate_size=_dense_width(m),
        norm="rmsnorm", norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-6),
        positions="rope", rope=rope,
        qkv_bias="blk.0.attn_q.bias" in gf.tensors, o_bias="blk.0.attn_output.bias" in gf.tensors,
        mlp="gated", activation="silu", mlp_bias="blk.0.ffn_up.bias" in gf.tensors,
    )
    if arch == "qwen3":
        fields.update(qk_norm=True)
    elif arch == "qwen3moe":
        sparse = tuple(f"blk.{i}.ffn_gate_inp.weight" in gf.tensors for i in range(layers))
        experts = m.int("expert_count")
        moe = MoEConfig(
            num_experts=experts, top_k=m.int("expert_used_count"),
            expert_intermediate_size=m.int("expert_feed_forward_length"), router="softmax_topk",
            # llama.cpp always renormalises Qwen3-MoE's top-k weights (transformers' GGUF default too)
            norm_topk_prob=bool(m.get("expert_weights_norm", True)),
        )
        if moe.top_k > experts:
            raise m.error(f"expert_used_count {moe.top_k} exceeds expert_count {experts}")
        fields.update(qk_norm=True, moe=moe if any(sparse) else None, moe_layers=sparse)
    elif arch == "gpt-oss":
        experts = m.int("expert_count")
        moe = MoEConfig(
            num_experts=experts, top_k=m.int("expert_used_count"),
            expert_intermediate_size=m.int("expert_feed_forward_length"), router="topk_softmax",
            router_bias=True, expert_bias=True,
        )
        if moe.top_k > experts:
            raise m.error(f"expert_used_count {moe.top_k} exceeds expert_count {experts}")
        fields.update(
            intermediate_size=moe.expert_intermediate_size,
            norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-5), norm_weight_in_float32=True,
            attn_sinks=True, sliding_window=m.int("attention.sliding_window"),
            layer_types=_window_layers(m, layers, 2),
            activation="swiglu_clamped",  # llama.cpp hard-codes limit 7.0 and alpha 1.702 as well
            moe=moe, moe_layers=(True,) * layers,
        )
    elif arch == "gemma3":
        window = m.int("attention.sliding_window", 0, low=0)
        types = _window_layers(m, layers, 6) if window else ("full",) * layers
        if m.get("attn_logit_softcapping", None) is not None:
            raise m.error("gemma3.attn_logit_softcapping is set; Gemma 3 has none and rung does not support it")
        # llama.cpp scales queries by head_dim^-0.5, except Gemma 3 27B (62 layers): (hidden/heads)^-0.5,
        # i.e. transformers' query_pre_attn_scalar of each released size
        scalar = hidden // heads if layers == 62 else head_dim
        fields.update(
            norm_weight_offset=1.0, norm_weight_in_float32=True, sandwich_norms=True,
            embedding_scale=hidden**0.5, final_logit_softcap=m.float("final_logit_softcapping", None),
            local_rope=RopeConfig(theta=m.float("rope.freq_base_swa", 10_000.0)),
            qk_norm=True, attn_scale=scalar**-0.5,
            layer_types=types, sliding_window=window or None, activation="gelu_tanh",
        )
    return ModelConfig(**fields)


# ---- tensor names → rung parameters ------------------------------------------------------------


def _unpermute(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inverse of llama.cpp's LlamaModel.permute, which reorders each head's rows from the half-split
    rotary layout to adjacent pairs: [heads * d, ...] → the same rows, (j, j + d/2) pairs restored."""
    def undo(w: torch.Tensor) -> torch.Tensor:
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return undo


def _rows(start: int, stop: int, dim: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: w.narrow(dim, start, stop - start)


def _llama_family_rules(c: ModelConfig, gf: GGUFFile) -> list[Rule]:
    arch, names = gf.architecture, set(gf.tensors)
    offset = c.norm_weight_offset  # Gemma: the converter stored 1 + w, rung keeps w

    def norm(source: str, target: str) -> Rule:
        return Rule(target, (source,), (lambda w: w - offset) if offset else None)

    permute = arch in PERMUTED_QK
    rules = [copy("token_embd.weight", "embed.weight"), norm("output_norm.weight", "final_norm.weight")]
    for i in range(c.num_layers):
        s, t = f"blk.{i}.", f"layers.{i}."
        rules.append(norm(s + "attn_norm.weight", t + "attn_norm.weight"))
        if arch == "gpt-oss":  # HF's post_attention_layernorm (the pre-MLP norm) keeps its name here
            rules.append(norm(s + "post_attention_norm.weight", t + "mlp_norm.weight"))
        elif c.sandwich_norms:
            rules += [norm(s + "post_attention_norm.weight", t + "post_attn_norm.weight"),
                      norm(s + "ffn_norm.weight", t + "mlp_norm.weight"),
                      norm(s + "post_ffw_norm.weight", t + "post_mlp_norm.weight")]
        else:
            rules.append(norm(s + "ffn_norm.weight", t + "mlp_norm.weight"))
        attention = (("attn_q", "q", c.num_heads, c.qkv_bias), ("attn_k", "k", c.num_kv_heads, c.qkv_bias),
                     ("attn_v", "v", None, c.qkv_bias), ("attn_output", "o", None, c.o_bias))
        for src, proj, heads, bias in attention:
            undo = _unpermute(heads) if permute and heads else None
            for kind in ("weight", "bias") if bias else ("weight",):
                rules.append(Rule(f"{t}attn.{proj}_proj.{kind}", (f"{s}{src}.{kind}",), undo))
        if c.qk_norm:
            rules += [norm(s + "attn_q_norm.weight", t + "attn.q_norm.weight"),
                      norm(s + "attn_k_norm.weight", t + "attn.k_norm.weight")]
        if c.attn_sinks:
            rules.append(copy(s + "attn_sinks.weight", t + "attn.sinks"))
        if c.moe_layers[i]:
            rules.append(copy(s + "ffn_gate_inp.weight", t + "mlp.router.weight"))
            if c.moe.router_bias:
                rules.append(copy(s + "ffn_gate_inp.bias", t + "mlp.router.bias"))
            n = c.moe.expert_intermediate_size
            targets = {"weight": ("gate_proj", "up_proj", "down_proj"), "bias": ("gate_bias", "up_bias", "down_bias")}
            for kind in ("weight", "bias") if c.moe.expert_bias else ("weight",):
                gate, up, down = (f"{t}mlp.{p}" for p in targets[kind])
                fused = f"{s}ffn_gate_up_exps.{kind}"
                if fused in names:  # --fuse-gate-up-exps: each expert's gate rows, then its up rows
                    rules += [Rule(gate, (fused,), _rows(0, n, 1)), Rule(up, (fused,), _rows(n, 2 * n, 1))]
                else:
                    rules += [copy(f"{s}ffn_gate_exps.{kind}", gate), copy(f"{s}ffn_up_exps.{kind}", up)]
                rules.append(copy(f"{s}ffn_down_exps.{kind}", down))
        else:
            for src, proj in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
                for kind in ("weight", "bias") if c.mlp_bias else ("weight",):
                    rules.append(copy(f"{s}{src}.{kind}", f"{t}mlp.{proj}.{kind}"))
    return rules


def _gpt2_rules(c: ModelConfig, gf: GGUFFile) -> list[Rule]:
    h = c.hidden_size
    rules = [copy("token_embd.weight", "embed.weight"), copy("position_embd.weight", "pos_embed.weight")]
    for kind in ("weight", "bias"):
        rules.append(copy(f"output_norm.{kind}", f"final_norm.{kind}"))
        for i in range(c.num_layers):
            s, t = f"blk.{i}.", f"layers.{i}."
            rules += [copy(f"{s}attn_norm.{kind}", f"{t}attn_norm.{kind}"),
                      copy(f"{s}ffn_norm.{kind}", f"{t}mlp_norm.{kind}")]
            # attn_qkv holds q | k | v along its rows; the converter already transposed GPT-2's Conv1D
            rules += [Rule(f"{t}attn.{p}_proj.{kind}", (f"{s}attn_qkv.{kind}",), _rows(j * h, (j + 1) * h))
                      for j, p in enumerate("qkv")]
            rules += [copy(f"{s}attn_output.{kind}", f"{t}attn.o_proj.{kind}"),
                      copy(f"{s}ffn_up.{kind}", f"{t}mlp.up_proj.{kind}"),
                      copy(f"{s}ffn_down.{kind}", f"{t}mlp.down_proj.{kind}")]
    return rules


def gguf_rules(config: ModelConfig, gf: GGUFFile) -> list[Rule]:
    """One rule per rung parameter: which GGUF tensor fills it, and how."""
    rules = (_gpt2_rules if gf.architecture == "gpt2" else _llama_family_rules)(config, gf)
    if not config.tie_word_embeddings:
        rules.append(copy("output.weight", "lm_head.weight"))
    return rules


# ---- loading -----------------------------------------------------------------------------------


def _check_plan(model: Decoder, gf: GGUFFile, rules: list[Rule], consumed: set[str]) -> None:
    """Every parameter filled once, every tensor used, every shape right: checked on the meta
    device (the conversions run on shapes only) before any memory is allocated."""
    arch = gf.architecture
    params = dict(model.named_parameters())
    used, filled = set(consumed), set()
    for rule in rules:
        for source in rule.sources:
            if source not in gf.tensors:
                raise GGUFError(f"{gf.path}: tensor {source!r} is missing "
                                f"(needed for {arch} parameter {rule.target})")
        target = params.get(rule.target)
        where = f"{gf.path}: tensor {rule.sources[0]!r}"
        if target is None:
            raise GGUFError(f"{where} maps to unknown parameter {rule.target} (key map out of date)")
        metas = [torch.empty(gf.tensors[s][0], device="meta") for s in rule.sources]
        converted(rule, metas, target.shape, where, arch, GGUFError)  # shapes checked before any read
        used.update(rule.sources)
        filled.add(rule.target)
    unexpected = sorted(set(gf.tensors) - used)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise GGUFError(f"{gf.path}: unexpected tensor {unexpected[0]!r}{more} for {arch}")
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise GGUFError(f"{gf.path}: no tensor for parameter {unfilled[0]}")


def _kept(gf: GGUFFile, rule: Rule, fmt: str, group: int | None, shape: torch.Size):
    """The packed weight of ``rule`` straight from its GGUF blocks, when they are already in
    ``fmt`` (Q4_0/Q4_1 → q4, Q8_0 → q8, groups of 32) and the rule only reorders rows (llama.cpp's
    Q/K permutation); else None."""
    from rung.quant.formats import from_gguf_blocks

    kind, raw = gf.raw(rule.sources[0])
    if len(rule.sources) != 1 or {"Q4_0": "q4", "Q4_1": "q4", "Q8_0": "q8"}.get(kind) != fmt or group not in (None, 32):
        return None
    source_shape = gf.tensors[rule.sources[0]][0]
    if len(source_shape) != 2 or tuple(source_shape) != tuple(shape):
        return None
    packed = from_gguf_blocks(kind, raw, tuple(source_shape))
    if rule.convert is None:
        return packed
    # a row permutation is found by running the conversion on the row numbers
    order = rule.convert(torch.arange(shape[0], dtype=torch.float32)[:, None])
    if order.shape != (shape[0], 1):
        return None
    return packed.permute_rows(order[:, 0].long())


def load_gguf_model(path: str | Path, dtype: str | torch.dtype = "float32",
                    device: str | torch.device = "cpu", progress=None,
                    packed_formats: dict[str, tuple[str, int | None]] | None = None):
    """A GGUF file → a rung Decoder in eval mode, dequantized tensor by tensor into ``dtype``.
    ``progress(done, total)`` is called after each parameter (for a progress bar).

    ``packed_formats`` (rung parameter → (format, group), from rung.quant's packed_targets):
    those weights come back packed instead, in a dict beside the model, GGUF blocks kept as they
    are where rung's format holds them exactly; their float parameters are never written (and
    never take memory). Returns (model, packed) then."""
    from rung.weights.loader import empty_model, resolve_dtype  # loader dispatches here: import late

    torch_dtype = resolve_dtype(dtype)
    with read_gguf(path) as gf:
        config = config_from_gguf(gf)
        rules = gguf_rules(config, gf)
        consumed = {"rope_freqs.weight"} & set(gf.tensors)  # already folded into config.rope
        _check_plan(meta_decoder(config), gf, rules, consumed)
        model = empty_model(config, torch_dtype, device)
        params = dict(model.named_parameters())
        packed = {}
        last_name, last = None, None  # gpt2's attn_qkv and fused experts feed several parameters in a row
        for done, rule in enumerate(rules, 1):
            if packed_formats and rule.target in packed_formats:
                from rung.quant.formats import quantize

                fmt, group = packed_formats[rule.target]
                kept = _kept(gf, rule, fmt, group, params[rule.target].shape)
                if kept is None:
                    tensors = [gf.read(s) for s in rule.sources]
                    kept = quantize(rule.convert(*tensors) if rule.convert else tensors[0], fmt, group)
                packed[rule.target] = kept
                if progress:
                    progress(done, len(rules))
                continue
            tensors = []
            for source in rule.sources:
                if source != last_name:
                    last_name, last = source, None  # drop the previous tensor before reading the next
                    last = gf.read(source)
                tensors.append(last)
            value = rule.convert(*tensors) if rule.convert else tensors[0]
            with torch.no_grad():
                params[rule.target].copy_(value)
            if progress:
                progress(done, len(rules))
    model = model.requires_grad_(False).eval()
    return (model, packed) if packed_formats is not None else model
