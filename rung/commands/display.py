"""How `rung arch` and `rung fit` write sizes, and the console they print to (no torch import).

Units: parameters in B / M (10^9, 10^6); weight and memory bytes in GB / MB (10^9, 10^6), beside
GiB (2^30) where both are shown; KV cache in GiB / MiB / KiB (2^30, 2^20, 2^10), the unit the
gpt-oss doc and most serving tools use.
"""

from __future__ import annotations

import sys


def params(n: float, m: str = ".1f") -> str:
    """A parameter count: "1.24 B", or below a billion in M written as ``m`` ("134.5 M")."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:{m}} M"


def gb(n: float, mb: str = ",.0f") -> str:
    """Bytes: "1.24 GB", or below 10^9 in MB written as ``mb`` ("269 MB"); a negative amount (a
    headroom) keeps its sign."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    return f"{sign}{n / 1e9:.2f} GB" if n >= 1e9 else f"{sign}{n / 1e6:{mb}} MB"


def gib(n: float) -> str:
    """Bytes in binary units, as KV caches are counted: "1.50 GiB", "36.0 MiB", "9.00 KiB"."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.2f} KiB"


def console(width: int = 140):
    """A rich Console on stdout. A pipe or a test capture gets a fixed width, so wide tables do not
    fold into 80 columns."""
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else width)
