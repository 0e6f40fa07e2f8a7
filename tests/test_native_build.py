"""The native kernels build once per source and degrade to the reference paths when they cannot."""

from __future__ import annotations

import subprocess
import sys

CHECK = ("import torch; from rung import native; from rung.quant.formats import quantize; "
         "from rung.quant.linear import PackedLinear; "
         "l = PackedLinear(quantize(torch.randn(64, 64), 'q4')); x = torch.randn(1, 64); "
         "print(native.available(), bool(torch.allclose(l(x), l.reference(x), atol=0.5)))")


def run(env_extra, tmp_path):
    import os

    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_kernels_build_into_the_cache_and_are_reused(tmp_path):
    cache = tmp_path / "cache"
    assert run({"RUNG_CACHE": str(cache)}, tmp_path) == ["True", "True"]
    built = list((cache / "native").glob("rung_kernels_*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert run({"RUNG_CACHE": str(cache)}, tmp_path) == ["True", "True"]
    assert built[0].stat().st_mtime_ns == mtime  # not rebuilt


def test_without_a_compiler_or_when_disabled_layers_use_the_reference(tmp_path):
    assert run({"RUNG_NATIVE": "0"}, tmp_path) == ["False", "True"]
    assert run({"RUNG_CACHE": str(tmp_path / "c2"), "CC": str(tmp_path / "no-such-cc")}, tmp_path) == ["False", "True"]


def test_an_unwritable_cache_falls_back(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run({"RUNG_CACHE": str(blocker)}, tmp_path) == ["False", "True"]


def test_the_avx2_kernels_pass_the_kernel_tests_on_an_avx512_machine(tmp_path):
    """Where the CPU has AVX-512 VNNI the default build uses it; the AVX2 kernels (what an older
    CPU runs) are then built with RUNG_NATIVE_ISA=avx2 and put through the same kernel tests."""
    import os
    from pathlib import Path

    import pytest

    from rung import native

    if native.isa() != "avx512-vnni":
        pytest.skip("this CPU builds the AVX2 kernels by default: the other tests cover them")
    here = Path(__file__).parent
    env = {**os.environ, "RUNG_NATIVE_ISA": "avx2", "RUNG_CACHE": str(tmp_path / "cache")}
    check = "from rung import native; assert native.isa() == 'avx2', native.isa()"
    assert subprocess.run([sys.executable, "-c", check], env=env, timeout=120).returncode == 0
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(here / "test_quant_kernels.py"), str(here / "test_native_attention.py")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=here.parent)
    assert proc.returncode == 0, proc.stdout[-2000:]
