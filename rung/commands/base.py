"""What a `rung` subcommand is: a ``Command``, and the ``CommandError`` it raises for a user error.

Here rather than in rung/cli.py, so that a command module never imports the entry point: cli.py
imports the commands and dispatches to them, and nothing imports cli.py but ``python -m rung``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


class CommandError(Exception):
    """A user error a command reports as one line (the message names what was wrong)."""


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, a help line, a function that adds its arguments, and a function that
    runs it and returns the exit status."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
