"""Triton's interpreter in the tests: the kernels run on the CPU (TRITON_INTERPRET=1), in a child
process since the interpreter must be chosen before Triton compiles anything.

The test side: ``needs_interpreter`` (a skip mark) and ``run_checks(script)`` (the script's stdout
lines, after asserting it exited 0). The check scripts' side: ``check`` (one printed line per check,
exit non-zero on the first miss) and ``rel`` (relative error)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def _triton_version():
    try:
        import triton
    except Exception:
        return None
    return tuple(int(p) for p in triton.__version__.split(".")[:2])


needs_interpreter = pytest.mark.skipif((_triton_version() or (0, 0)) < (3, 8),
                                       reason="needs Triton ≥ 3.8 (its interpreter, NumPy 2)")


def run_checks(script: str, timeout: float, drop_env: tuple[str, ...] = ()) -> list[str]:
    """Run tests/``script`` under the interpreter; its stdout lines (it must exit 0)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "RUNG_NO_TRITON": "0"}
    for name in drop_env:
        env.pop(name, None)
    done = subprocess.run([sys.executable, str(TESTS / script)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=TESTS.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.splitlines()


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check(name: str, got, want, tol: float) -> None:
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = rel(got, want)
    print(f"{name}: rel err {err:.2e}")
    if not err <= tol:
        sys.exit(f"FAIL {name}: {err:.2e} > {tol:.0e}")
