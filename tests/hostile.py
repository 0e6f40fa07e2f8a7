"""Run rung on hostile input in a child process, under a time and memory bound.

A hostile file or request must be refused with a one-line error, quickly and without a large
allocation. A test here cannot trust the parent process to survive a crash (SIGSEGV in a native
kernel), a hang (a template that renders for hours) or a huge allocation (a config that asks for a
terabyte), so the code under test runs in a fresh interpreter with an address-space limit and a
wall-clock timeout, and the test asserts on how that child ended.

    res = run_bounded("from rung.weights.loader import load_model; load_model(%r)" % str(folder))
    res.assert_refused("hidden_size")          # exit 1, no traceback, one line naming the field
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# torch alone maps ~1-2 GB of address space (CUDA-less build, its shared libraries and thread
# stacks); 4 GB leaves room for real work on tiny models and still refuses a 1 TB allocation.
DEFAULT_MEMORY_BYTES = 4 << 30
DEFAULT_SECONDS = 60.0

_PRELUDE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
import torch
torch.set_num_threads(1)
"""

_WRAP = """
try:
{body}
except Exception as e:  # what a user sees: the error's own one-line message
    print(f"{{type(e).__name__}}: {{e}}", file=sys.stderr)
    sys.exit(1)
"""


@dataclass
class Bounded:
    returncode: int | None      # None: killed by the timeout
    stdout: str
    stderr: str
    timed_out: bool

    def assert_refused(self, *needles: str) -> str:
        """The child ended on its own, with exit 1 (run_bounded) or 2 (the CLI's usage exit), no traceback,
        and a last stderr line containing every needle (case-insensitive)."""
        assert not self.timed_out, "did not finish within the time bound"
        assert self.returncode in (1, 2), f"exit {self.returncode} (negative: killed by a signal)\n{self.stderr[-2000:]}"
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        assert lines, "no error message"
        assert "Traceback" not in self.stderr, self.stderr[-2000:]
        last = lines[-1]
        for needle in needles:
            assert needle.lower() in last.lower(), f"{needle!r} not in {last!r}"
        return last

    def assert_ok(self) -> str:
        assert not self.timed_out, "did not finish within the time bound"
        assert self.returncode == 0, f"exit {self.returncode}\n{self.stderr[-2000:]}"
        return self.stdout


def run_bounded(code: str, *, seconds: float = DEFAULT_SECONDS, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                catch: bool = True, env: dict | None = None) -> Bounded:
    """Run `code` in a fresh Python with RLIMIT_AS = memory_bytes, killed after `seconds`.

    With catch=True an exception becomes one line on stderr and exit 1 (as rung's CLI reports it);
    catch=False lets a traceback through, for code that is expected to succeed.
    """
    body = textwrap.dedent(code)
    if catch:
        body = _WRAP.format(body=textwrap.indent(body, "    "))
    script = _PRELUDE.format(mem=int(memory_bytes)) + body
    child_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child_env.update(env or {})
    try:
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=seconds,
                           env=child_env, cwd=str(ROOT))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return Bounded(None, out, err, True)
    return Bounded(p.returncode, p.stdout, p.stderr, False)


def run_cli_bounded(*args: str, seconds: float = DEFAULT_SECONDS, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> Bounded:
    """`rung ARGS...` in a bounded child (the CLI prints its own one-line errors and exits 2)."""
    code = f"import sys; sys.argv = ['rung', *{list(args)!r}]\nfrom rung.cli import main\nsys.exit(main())"
    return run_bounded(code, seconds=seconds, memory_bytes=memory_bytes, catch=False)
