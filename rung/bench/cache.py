"""Results cached by (candidate, suite hash, settings), so a re-run only does new work.

The candidate part is its fingerprint: the spec plus, for local weights, the resolved file's path,
size and modification time (a new checkpoint under the same name is new work). Settings are what
changes the numbers: concurrency, seed, device, dtype, the judge, rung's version. One JSON file per
key under ``$XDG_CACHE_HOME/rung/bench`` (``~/.cache/rung/bench``) or ``--cache-dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from rung.bench.records import CandidateRun
from rung.bench.suite import canonical_json


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rung" / "bench"


class ResultCache:
    def __init__(self, directory: str | Path | None = None, enabled: bool = True):
        self.directory = Path(directory) if directory else default_cache_dir()
        self.enabled = enabled

    @staticmethod
    def key(fingerprint: dict, suite_hash: str, settings: dict) -> str:
        blob = canonical_json({"candidate": fingerprint, "suite": suite_hash, "settings": settings})
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> CandidateRun | None:
        if not self.enabled:
            return None
        path = self.path(key)
        try:
            run = CandidateRun.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a damaged entry is recomputed and overwritten
        run.cached = True
        return run

    def put(self, key: str, run: CandidateRun) -> None:
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # write-then-rename: a run killed mid-write leaves no half file behind
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(run.to_dict(), f, ensure_ascii=False)
        os.replace(tmp, self.path(key))
