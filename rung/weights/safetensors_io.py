"""Reading Hugging Face safetensors folders: one file or shards with an index.

Every header is checked against the file before any tensor is read (a truncated download, an
absurd header or an offset past the end is refused with the file and tensor named); tensors are
then read lazily through ``safetensors.safe_open`` (memory-mapped, never unpickled). Only files
inside the model folder are opened: an index naming ``../x`` or an absolute path, or a shard that
is a symlink leading out of the folder, is refused (the Hugging Face cache's own links into its
``blobs`` store excepted).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint rung cannot load; the message names the file and the tensor."""


DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "E8M0": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_INDEX_BYTES = MAX_HEADER_BYTES  # DeepSeek-V3's index, 91,000 tensors, is 9 MB

_TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "E8M0": getattr(torch, "float8_e8m0fnu", torch.uint8), "F8_E8M0": getattr(torch, "float8_e8m0fnu", torch.uint8),
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (one ``read_header`` has accepted)."""
    return _TORCH_DTYPES[name]


def read_header(path: Path) -> dict[str, dict]:
    """The validated tensor table of one .safetensors file: name → {dtype, shape, data_offsets}."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes, file of {size})"
                )
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: safetensors header nests JSON too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in DTYPE_BYTES or not isinstance(shape, list) or not all(
                    type(d) is int and 0 <= d < 2**63 for d in shape):  # an empty tensor may claim any other size
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data offsets {begin}..{end}")
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} ends at byte {end} of the data but only {data_bytes} are present"
            )
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: tensor {name!r} holds {end - begin} bytes, shape {shape} of {dtype} needs "
                                  f"{math.prod(shape) * DTYPE_BYTES[dtype]}")
    return header


def _shard_names(index: Path) -> list[str]:
    """The distinct file names an index's ``weight_map`` lists (tensor name → file name)."""
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{index}: {index.stat().st_size} bytes, more than an index needs "
                              f"(at most {MAX_INDEX_BYTES})")
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, RecursionError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid safetensors index (expected a 'weight_map' of tensor "
                              "name to file name)")
    return sorted(set(weight_map.values()))


class SafetensorsFolder:
    """All tensors of a Hugging Face folder, by name, with the file each lives in."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = self._weight_files()
        self.entries: dict[str, dict] = {}
        self.file_of: dict[str, Path] = {}
        for file in self.files:
            for name, entry in read_header(file).items():
                if name in self.file_of:
                    raise CheckpointError(f"{file}: tensor {name!r} also appears in {self.file_of[name]}")
                self.entries[name], self.file_of[name] = entry, file
        self._handles: dict[Path, object] = {}

    def _weight_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            return [self._inside(name, index) for name in _shard_names(index)]
        single = self.folder / "model.safetensors"
        if single.is_file():
            return [self._inside(single.name, single)]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no model.safetensors, index or *.safetensors files")
        return [self._inside(f.name, f) for f in files]

    def _inside(self, name: str, named_by: Path) -> Path:
        """The weight file ``name`` (a path relative to the folder, as an index lists it), refused
        unless it is a file inside the folder. A symlink may lead out only as the Hugging Face cache
        lays out its files (``snapshots/<rev>/x`` → ``../../blobs/<hash>``, and ``--local-dir``
        downloads that link into the cache): into a ``blobs`` folder of a ``models--*`` repository."""
        parts = PurePosixPath(name).parts
        if not name or "\\" in name or PurePosixPath(name).is_absolute() or ".." in parts:
            raise CheckpointError(f"{named_by}: weight file {name!r} is not a path inside {self.folder}")
        path = self.folder / name
        if not path.is_file():
            raise CheckpointError(f"{named_by}: lists shard {name}, which is missing from {self.folder}")
        real = path.resolve()
        if not (real.is_relative_to(self.folder.resolve())
                or real.parent.name == "blobs" and real.parent.parent.name.startswith("models--")):
            raise CheckpointError(f"{named_by}: weight file {name!r} leads outside {self.folder} (to {real})")
        return path

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def where(self, name: str) -> str:
        """A tensor as errors name it: its file and name."""
        return f"{self.file_of[name]}: tensor {name!r}"

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def numel(self, name: str) -> int:
        return math.prod(self.entries[name]["shape"])

    def read(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # the library's own error type varies across versions
                raise CheckpointError(f"{file}: cannot open ({e})") from None
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None

    def close(self) -> None:
        self._handles.clear()
