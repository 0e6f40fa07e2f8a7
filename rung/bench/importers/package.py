"""Data files read out of an installed Python package, without importing the package.

Public benchmarks ship their data inside wheels whose code pulls in heavy dependencies (bfcl-eval
pins pandas, sentence-transformers, faiss, five vendor SDKs). rung installs them with ``--no-deps``
and finds the files through the wheel's RECORD (``importlib.metadata``), so none of that code runs
and nothing is read from the network.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from rung.bench.suite import json_lines


class SuiteImportError(ValueError):
    """An import rung cannot do; the message says what is missing and how to get it, in one line."""


MAX_DATA_BYTES = 64 << 20  # the largest data file rung reads from a package (BFCL's largest is 4 MB)


@dataclass(frozen=True)
class Package:
    name: str  # the distribution's name, as pip spells it
    version: str
    files: dict[str, Path]  # path inside the wheel -> where it is installed
    license: str | None = None  # the metadata's License-Expression or License field

    def path(self, inside: str) -> Path:
        if inside not in self.files:
            raise SuiteImportError(f"{self.name} {self.version}: no {inside} in the installed package "
                                   f"(rung reads the data layout of the version it was written for)")
        return self.files[inside]

    def read_text(self, inside: str) -> str:
        path = self.path(inside)
        size = path.stat().st_size
        if size > MAX_DATA_BYTES:
            raise SuiteImportError(f"{path}: {size} bytes, larger than the {MAX_DATA_BYTES >> 20} MB rung reads")
        return path.read_text(encoding="utf-8")

    def read_jsonl(self, inside: str) -> list[dict]:
        """One JSON object per line (BFCL's .json files are JSON Lines too)."""
        return [row for _, row in json_lines(self.path(inside), self.read_text(inside), SuiteImportError)]


def installed(name: str) -> Package:
    """The installed distribution ``name`` and its files; refuses in one line when it is not installed."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise SuiteImportError(f"the {name} package is not installed; install it with: "
                               f"pip install --no-deps '{name}'") from None
    files = {str(f).replace("\\", "/"): Path(str(f.locate())) for f in dist.files or []}
    license = dist.metadata.get("License-Expression") or dist.metadata.get("License")
    return Package(name=name, version=dist.version, files=files, license=license)
