"""The evidence a bench report keeps, so an incident can be traced to the exact model and suite that
were approved: each local candidate's weight files by sha256 (the report also names rung's
version, the suite's hash and the settings).

A file is hashed once: its digest is cached by (absolute path, size, modification time) in a JSON
file beside the result cache, and read in 8 MiB pieces (a 16 GB checkpoint costs a minute the
first time, nothing after). A Hugging Face folder's evidence lists its weight files, config and
tokenizer files; ``sha256`` is then the digest of their sorted "name digest" lines. An endpoint's
weights cannot be hashed: its evidence says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 8 << 20
FOLDER_FILES = (".safetensors", ".gguf")  # weights; plus the files below, which change what a model does
FOLDER_EXTRA = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "special_tokens_map.json")
MAX_FILES = 4096  # a folder of more files is not a model folder: refuse to walk it


def file_sha256(path: Path, cache: dict) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while piece := f.read(CHUNK):
                digest.update(piece)
        cache[key] = digest.hexdigest()
    return cache[key]


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = []
    for i, p in enumerate(sorted(path.iterdir())):
        if i >= MAX_FILES:
            raise ValueError(f"{path}: more than {MAX_FILES} entries; not a model folder")
        if p.is_file() and (p.suffix in FOLDER_FILES or p.name in FOLDER_EXTRA):
            files.append(p)
    return files


def weights_evidence(fingerprint: dict, cache_file: Path | None = None) -> dict:
    """{"path", "sha256", "files": [{"name", "bytes", "sha256"}]} for a local candidate (its
    fingerprint names the resolved path); {"sha256": None, "note": ...} for an endpoint."""
    path = fingerprint.get("path")
    if path is None:
        spec = str(fingerprint.get("spec", ""))
        return {"sha256": None, "note": "remote endpoint: its weights cannot be hashed" if spec.startswith(("openai:", "http"))
                else "the model path could not be resolved"}
    cache = _read(cache_file)
    files = [{"name": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p, cache)} for p in _files(Path(path))]
    _write(cache_file, cache)
    if len(files) == 1 and Path(path).is_file():
        combined = files[0]["sha256"]
    else:
        combined = hashlib.sha256("".join(f"{f['name']} {f['sha256']}\n" for f in files).encode()).hexdigest()
    return {"path": str(path), "sha256": combined, "files": files}


def _read(cache_file: Path | None) -> dict:
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is rebuilt, never trusted
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str) and len(v) == 64} if isinstance(data, dict) else {}


def _write(cache_file: Path | None, cache: dict) -> None:
    if cache_file is None:
        return
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache directory costs a re-hash next time, nothing else
