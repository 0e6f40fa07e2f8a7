"""Public suites, offline: ``rung suite import NAME`` turns a benchmark that ships its data in a
Python package into a normal rung suite file, with where it came from and under which license.

    bfcl     Berkeley Function-Calling Leaderboard (bfcl-eval): tool_call cases, several subsets
    arc      Abstraction and Reasoning Corpus grid puzzles (evals): exact cases
    medmcqa  medical entrance-exam questions (evals): choice cases

The packages (pyproject's ``suites`` extra names them) are installed with ``pip install --no-deps
bfcl-eval evals``: only their data files are read (see package.py), never their code, and never the
network.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rung.bench.importers import bfcl, openai_evals
from rung.bench.importers.package import Package, SuiteImportError, installed
from rung.extras import require

__all__ = ["PUBLIC_SUITES", "SuiteImportError", "import_suite", "write_suite"]


@dataclass(frozen=True)
class PublicSuite:
    package: str  # the distribution that ships the data
    measures: str  # one line for --help and the docs
    convert: Callable[[Package, str | None, int | None], dict]  # (package, subset, limit) -> name, description,
    #                                                             files, license, defaults, cases
    subsets: tuple[str, ...] = ()
    default_subset: str | None = None


PUBLIC_SUITES = {
    "bfcl": PublicSuite(bfcl.PACKAGE, "function calling: does the model call the right function with acceptable "
                                      "arguments (or, in the irrelevance subsets, no function)?",
                        bfcl.import_bfcl, tuple(bfcl.SUBSETS), "simple_python"),
    "arc": PublicSuite(openai_evals.PACKAGE, "abstract reasoning: from a few input/output grids, write the output grid "
                                             "for a new input (exact match)", openai_evals.import_arc),
    "medmcqa": PublicSuite(openai_evals.PACKAGE, "medical knowledge: four-option entrance-exam questions (answer letter)",
                           openai_evals.import_medmcqa),
}


def import_suite(name: str, subset: str | None = None, limit: int | None = None,
                 command: str | None = None) -> dict:
    """The suite ``name`` (a key of PUBLIC_SUITES) as a suite dict, provenance and license included.
    ``limit`` keeps the first N cases, in the order the package lists them."""
    if name not in PUBLIC_SUITES:
        raise SuiteImportError(f"unknown public suite {name!r} (one of: {', '.join(PUBLIC_SUITES)})")
    public = PUBLIC_SUITES[name]
    if subset is not None and not public.subsets:
        with_subsets = ", ".join(n for n, s in PUBLIC_SUITES.items() if s.subsets)
        raise SuiteImportError(f"{name} has no subsets (--subset applies to {with_subsets})")
    if limit is not None and limit < 1:
        raise SuiteImportError(f"--limit must be at least 1, got {limit}")
    subset = subset or public.default_subset
    if public.subsets and subset not in public.subsets:
        raise SuiteImportError(f"unknown {name} subset {subset!r} (one of: {', '.join(public.subsets)})")
    package = installed(public.package)
    suite = public.convert(package, subset, limit)
    if not suite["cases"]:
        raise SuiteImportError(f"{public.package} {package.version}: no cases in {name}")
    provenance = {"package": public.package, "version": package.version}
    if subset:
        provenance["subset"] = subset
    provenance["files"] = suite.pop("files")
    provenance["cases"] = len(suite["cases"])
    provenance["imported"] = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    if command:
        provenance["command"] = command
    return {"name": suite.pop("name"), "description": suite.pop("description"), "provenance": provenance,
            "license": suite.pop("license"), **suite}


def _dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        """SafeDumper, with multi-line strings (prompts, ARC's grids) as readable `|` blocks."""

    def string(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, string)
    return Dumper


def write_suite(suite: dict, out: str | Path, force: bool = False):
    """Write the suite as YAML, checked by rung's own loader first; refuses to replace a file unless force
    (an imported suite is often trimmed or edited by hand afterwards). Returns the loaded Suite."""
    require("bench", "yaml", what="rung.bench")
    import yaml

    from rung.bench.suite import SuiteError, load_suite

    out = Path(out)
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise SuiteImportError(f"{out}: an imported suite is written as YAML; name it .yaml or .yml")
    if out.exists() and not force:
        raise SuiteImportError(f"{out}: exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise SuiteImportError(f"{out.parent}: no such folder")
    p = suite["provenance"]
    header = (f"# {suite['name']}: imported from {p['package']} {p['version']} on {p['imported']} by "
              f"`{p.get('command', 'rung suite import')}`.\n# License: {suite['license']}\n")
    text = header + yaml.dump(suite, Dumper=_dumper(), sort_keys=False, allow_unicode=True, width=120,
                              default_flow_style=None)
    fd, tmp = tempfile.mkstemp(prefix=".import-", suffix=out.suffix, dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            loaded = load_suite(tmp)  # what rung bench will read: an import that does not load is a bug here
        except SuiteError as e:
            raise SuiteImportError(f"the imported suite does not load ({e})") from None
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return loaded
