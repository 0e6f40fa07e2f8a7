"""`rung suite import NAME --out FILE`: a public benchmark, shipped as a Python package's data, as a
rung suite file (rung/bench/importers). Read offline from the installed package; nothing is downloaded.

    rung suite import bfcl --subset simple_python --limit 20 --out bfcl.yaml
    rung bench bfcl.yaml -m smollm2-135m@int4
"""

from __future__ import annotations

import argparse
import shlex

from rung.commands.base import Command, CommandError
from rung.extras import require


def _arguments(p: argparse.ArgumentParser) -> None:
    from rung.bench.importers import PUBLIC_SUITES

    sub = p.add_subparsers(dest="action", metavar="ACTION")
    imp = sub.add_parser("import", help="write a public suite (read from its installed package) as a rung suite file",
                         description="Write a public suite as a rung suite file. " + "; ".join(
                             f"{name}: {s.measures} (package {s.package})" for name, s in PUBLIC_SUITES.items()))
    imp.add_argument("name", metavar="NAME", help=f"the public suite: {', '.join(PUBLIC_SUITES)}")
    imp.add_argument("--out", "-o", required=True, metavar="FILE", help="the suite file to write (.yaml)")
    imp.add_argument("--subset", default=None, metavar="SUBSET",
                     help=f"bfcl's subset (default simple_python): {', '.join(PUBLIC_SUITES['bfcl'].subsets)}")
    imp.add_argument("--limit", type=int, default=None, metavar="N", help="keep the first N cases")
    imp.add_argument("--force", action="store_true", help="replace FILE if it exists")


def _run(args: argparse.Namespace) -> int:
    require("bench", what="rung suite")
    from rung.bench.importers import import_suite, write_suite

    if args.action != "import":
        raise CommandError("usage: rung suite import NAME --out FILE [--subset S] [--limit N] [--force]")
    suite = import_suite(args.name, subset=args.subset, limit=args.limit, command=_command_line(args))
    loaded = write_suite(suite, args.out, force=args.force)
    p = suite["provenance"]
    print(f"{args.out}: {len(loaded.cases)} cases from {p['package']} {p['version']}"
          f"{' ' + p['subset'] if 'subset' in p else ''} ({loaded.hash}); license {suite['license'].split(' (')[0]}")
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command that writes this suite again, for its provenance."""
    words = ["rung", "suite", "import", args.name]
    words += ["--subset", args.subset] if args.subset else []
    words += ["--limit", str(args.limit)] if args.limit is not None else []
    return shlex.join(words + ["--out", args.out])


SUITE = Command("suite", "import a public benchmark (BFCL, ARC, MedMCQA) from its installed package as a suite file",
                _arguments, _run)
