"""rung's command line.

Each subcommand is a ``Command``: a name, a help line, a function that adds its arguments, and a
function that runs it and returns the exit status. ``COMMANDS`` lists them; ``main`` only dispatches.
Heavy imports (torch, the engine) belong inside a command's ``run``, so ``rung arch`` starts fast.

User errors (an unknown preset, a missing file, an unsupported model_type) print one line
``rung: error: ...`` to stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

from rung.config import ConfigError
from rung.extras import MissingExtra

EXIT_USAGE = 2


class CommandError(Exception):
    """A user error a command reports as one line (the message names what was wrong)."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- the commands ------------------------------------------------------------------------------


def _commands() -> tuple[Command, ...]:
    # imported here: the command modules import Command from this one
    from rung.commands.arch import ARCH
    from rung.commands.bench import BENCH
    from rung.commands.fit import FIT
    from rung.commands.generate import CHAT, GENERATE
    from rung.commands.index import INDEX
    from rung.commands.policy import POLICY
    from rung.commands.quantize import QUANTIZE
    from rung.commands.serve import SERVE
    from rung.commands.suite import SUITE

    return (ARCH, GENERATE, CHAT, SERVE, BENCH, SUITE, FIT, QUANTIZE, INDEX, POLICY)


# ---- dispatch ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rung", description="rung: one readable decoder, a fast engine, a bench.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in _commands():
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
