"""rung's native CPU kernels (kernels.c), compiled on first use and called through ctypes.

The C file has no dependency on torch's headers, so it builds in about a second with the system C
compiler; the shared object is cached under ``~/.cache/rung/native`` (or ``$RUNG_CACHE``) by the
hash of the source and flags. It links the OpenMP runtime that torch has already loaded, so the
kernels and torch share one thread pool.

Everything degrades: without a compiler, without AVX2/FMA/F16C, or with ``RUNG_NATIVE=0``,
``available()`` is False and callers use their PyTorch reference paths (which the tests compare
against the kernels).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno"]
MAX_M = 16  # rows of x per call (kernels.c's MAX_M): a decode batch; prefill takes the reference path
GATED = {None: 0, "silu": 1, "gelu_tanh": 2}


def _cpu_supports() -> bool:
    if sys.platform != "linux":
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags.split())


def _cache_dir() -> Path:
    root = os.environ.get("RUNG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rung")
    return Path(root) / "native"


def _build() -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"rung_kernels_{tag}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent first uses (pytest workers) never see half a file
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        pass
    proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp.name, "-lm"], capture_output=True, text=True)
    if proc.returncode:
        os.unlink(tmp.name)
        print(f"rung: native kernels did not build ({compiler}): {proc.stderr.strip()[:300]}", file=sys.stderr)
        return None
    os.replace(tmp.name, target)
    return target


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    if os.environ.get("RUNG_NATIVE", "1") == "0" or not _cpu_supports():
        return None
    try:
        path = _build()
    except OSError as e:  # an unwritable cache: run on the reference paths
        print(f"rung: native kernels not built ({e})", file=sys.stderr)
        return None
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.rung_gemv_f32.argtypes = [p, i64, i64, i64, p, p, p, i32, i32, i32]
    lib.rung_gemv_q8.argtypes = [p, i64, i64, i64, i64, p, p, p, p, i32, i32, i32]
    lib.rung_gemv_q4.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p, i32, i32, i32]
    lib.rung_decode_attention.argtypes = [p, i64, i64, p, p, p, p, i64, i64, p, p, p, i64, i64, i64, i64, i64,
                                          ctypes.c_float, p, p, i32]
    lib.rung_rmsnorm.argtypes = [p, p, p, i64, i64, ctypes.c_float, ctypes.c_float]
    lib.rung_rope.argtypes = [p, i64, i64, i64, i64, p, p]
    for f in (lib.rung_gemv_f32, lib.rung_gemv_q8, lib.rung_gemv_q4, lib.rung_decode_attention, lib.rung_rmsnorm,
              lib.rung_rope):
        f.restype = None
    if lib.rung_max_m() != MAX_M:
        raise RuntimeError(f"{path}: built with MAX_M {lib.rung_max_m()}, rung expects {MAX_M}")
    return lib


def available() -> bool:
    return library() is not None


def bind_gemv(fmt: str, weight: torch.Tensor, out_features: int, in_features: int, *, group: int | None = None,
              scale: torch.Tensor | None = None, offset: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, gated: str | None = None):
    """``gemv`` with the layer's constant arguments bound once: a decode step makes about 120 of
    these calls, and converting the same dozen arguments each time is most of their Python cost.
    The returned function takes x [M, K] float32 contiguous and returns [M, N] (or N / 2)."""
    lib = library()
    n_out = out_features // 2 if gated else out_features
    g = GATED[gated]
    if fmt == "f32":
        fn, head, tail = lib.rung_gemv_f32, (out_features, in_features, weight.data_ptr(), _ptr(bias)), ()
    elif fmt == "q8":
        fn = lib.rung_gemv_q8
        head, tail = (out_features, in_features, group, weight.data_ptr(), scale.data_ptr(), _ptr(bias)), ()
    else:
        fn = lib.rung_gemv_q4
        head = (out_features, in_features, group, weight.data_ptr(), scale.data_ptr(), offset.data_ptr(), _ptr(bias))
        tail = ()
    keep = (weight, scale, offset, bias)  # the buffers outlive the bound call

    def call(x: torch.Tensor, out: torch.Tensor | None = None, add: bool = False) -> torch.Tensor:
        """``out`` [M, N]: written (or, with ``add``, added into: a fused residual add) instead of a new tensor."""
        if out is None:
            out = torch.empty(x.shape[0], n_out)
        fn(x.data_ptr(), x.shape[0], *head, out.data_ptr(), add, g, torch.get_num_threads(), *tail)
        return out

    call.keep = keep
    return call


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def gemv(fmt: str, x: torch.Tensor, weight: torch.Tensor, out_features: int, in_features: int, *,
         group: int | None = None, scale: torch.Tensor | None = None, offset: torch.Tensor | None = None,
         bias: torch.Tensor | None = None, out: torch.Tensor | None = None, gated: str | None = None) -> torch.Tensor:
    """x [M, K] float32 contiguous (M ≤ MAX_M) → [M, N] (or [M, N / 2] when gated).

    With ``out`` given, the result is added into it (a fused residual add). The caller guarantees
    contiguous tensors of the right dtypes and shapes (rung/quant/linear.py checks them once at
    construction); this function only moves pointers.
    """
    lib = library()
    m = x.shape[0]
    accumulate = out is not None
    if out is None:
        out = torch.empty(m, out_features // 2 if gated else out_features, dtype=torch.float32)
    g, threads = GATED[gated], torch.get_num_threads()  # the kernels follow torch's thread setting
    if fmt == "f32":
        lib.rung_gemv_f32(x.data_ptr(), m, out_features, in_features, weight.data_ptr(), _ptr(bias),
                          out.data_ptr(), accumulate, g, threads)
    elif fmt == "q8":
        lib.rung_gemv_q8(x.data_ptr(), m, out_features, in_features, group, weight.data_ptr(), scale.data_ptr(),
                         _ptr(bias), out.data_ptr(), accumulate, g, threads)
    else:
        lib.rung_gemv_q4(x.data_ptr(), m, out_features, in_features, group, weight.data_ptr(), scale.data_ptr(),
                         offset.data_ptr(), _ptr(bias), out.data_ptr(), accumulate, g, threads)
    return out


def decode_attention(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, idx: torch.Tensor,
                     lengths: torch.Tensor, scale: float, sinks: torch.Tensor | None,
                     new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None,
                     write_slots: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, hq, d] float32 (any strides with a unit last one); pools [slots, hkv, d]; idx [B, L]
    int64 visible slots in order, lengths [B] int64 → out [B, hq, d]. With ``write_slots`` [B],
    new_k / new_v [B, hkv, d] (strided views too) are first written to those slots, the same
    strides for both. See kernels.c: rung_decode_attention."""
    b, hq, d = q.shape
    out = torch.empty(b, hq, d)
    nk = new_k if new_k is not None else q  # unused without write_slots
    nv = new_v if new_v is not None else q
    library().rung_decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1), pool_k.data_ptr(), pool_v.data_ptr(), _ptr(new_k), _ptr(new_v),
        nk.stride(0), nk.stride(1), _ptr(write_slots), idx.data_ptr(), lengths.data_ptr(), b, idx.shape[1], hq,
        pool_k.shape[1], d, scale, _ptr(sinks), out.data_ptr(), torch.get_num_threads())
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x [..., K] float32 contiguous → x / rms(x) * (offset + weight)."""
    out = torch.empty_like(x)
    k = x.shape[-1]
    library().rung_rmsnorm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // k, k, eps, offset)
    return out


def rope_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """In place: RoPE on the first ``heads`` heads of each row of x [M, row] float32 contiguous;
    cos, signed_sin [M, head_dim] contiguous (model/rope.py's tables)."""
    library().rung_rope(x.data_ptr(), x.shape[0], x.shape[1], heads, head_dim, cos.data_ptr(), signed_sin.data_ptr())
