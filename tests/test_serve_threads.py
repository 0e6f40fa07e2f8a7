"""`rung serve` sets libgomp's spin count (rung/serve/threads.py) before torch loads, so the
engine's idle OpenMP threads let the cores go to the event loop and the clients between steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rung.serve import threads

ROOT = Path(__file__).parent.parent

# `rung serve` up to the point where it resolves the model: there, torch is loaded and its OpenMP
# pool started, and libgomp (OMP_DISPLAY_ENV) prints what it read from the environment
SPY = """
import sys
import rung.commands.serve as serve

def resolve_spy(*args):
    print("torch loaded before the policy:", BEFORE[0], flush=True)
    import torch
    torch.set_num_threads(2)
    torch.ones(1 << 16).sum()
    raise SystemExit(0)

BEFORE = []
import rung.serve.threads as threads
real = threads.apply
threads.apply = lambda *a: BEFORE.append("torch" in sys.modules) or real(*a)
serve._serving_spec = resolve_spy
from rung.cli import main
main(["serve"])
"""


def run_serve_start(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update({"OMP_DISPLAY_ENV": "VERBOSE", "PYTHONPATH": str(ROOT), **env_extra})
    r = subprocess.run([sys.executable, "-c", SPY], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout + r.stderr


@pytest.mark.parametrize("given, want", [(None, threads.SPIN_COUNT), ("777", "777")])
def test_rung_serve_sets_the_openmp_spin_count_before_torch_loads(given, want):
    out = run_serve_start({} if given is None else {"GOMP_SPINCOUNT": given})
    assert "torch loaded before the policy: False" in out
    assert f"GOMP_SPINCOUNT = '{want}'" in out  # what libgomp read, not just what the environment says


def test_the_spin_count_is_short_and_a_users_value_is_kept():
    env = {}
    assert threads.apply(env) and env == {"GOMP_SPINCOUNT": threads.SPIN_COUNT}
    assert int(threads.SPIN_COUNT) < 300000  # libgomp's default, milliseconds of polling
    env = {"GOMP_SPINCOUNT": "0"}
    threads.apply(env)
    assert env == {"GOMP_SPINCOUNT": "0"}


def test_too_late_once_torch_is_loaded_changes_nothing(monkeypatch):
    import torch  # noqa: F401  (loaded: libgomp has read its environment)

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert threads.apply() is False
    assert "GOMP_SPINCOUNT" not in os.environ
