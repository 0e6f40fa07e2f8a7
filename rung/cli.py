"""rung's command line.

Each subcommand is a ``Command`` (rung/commands/base.py): a name, a help line, a function that adds
its arguments, and a function that runs it and returns the exit status. ``COMMANDS`` lists them;
``main`` only dispatches. Heavy imports (torch, the engine) belong inside a command's ``run``, so
``rung arch`` starts fast.

User errors (an unknown preset, a missing file, an unsupported model_type) print one line
``rung: error: ...`` to stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from rung.commands.arch import ARCH
from rung.commands.base import Command, CommandError
from rung.commands.bench import BENCH
from rung.commands.fit import FIT
from rung.commands.generate import CHAT, GENERATE
from rung.commands.index import INDEX
from rung.commands.policy import POLICY
from rung.commands.quantize import QUANTIZE
from rung.commands.serve import SERVE
from rung.commands.suite import SUITE
from rung.config import ConfigError
from rung.extras import MissingExtra

EXIT_USAGE = 2

COMMANDS: tuple[Command, ...] = (ARCH, GENERATE, CHAT, SERVE, BENCH, SUITE, FIT, QUANTIZE, INDEX, POLICY)


# ---- dispatch ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rung", description="rung: one readable decoder, a fast engine, a bench.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except MissingExtra as e:  # the message names the command, the extra and the pip command
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, CommandError, OSError, ValueError) as e:
        # bad names, paths, checkpoints and requests (CheckpointError, RequestError are ValueErrors)
        print(f"rung: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
