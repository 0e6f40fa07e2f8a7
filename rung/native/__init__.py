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

import numpy as np
import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno"]
# AVX-512 with VNNI (Zen 4, Ice Lake and later): the 4- and 8-bit kernels' integer dot products
# take one instruction per 64 bytes. Added only where /proc/cpuinfo lists all four, or never with
# RUNG_NATIVE_ISA=avx2 (how the tests exercise the AVX2 kernels on an AVX-512 machine).
VNNI_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
VNNI_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
MAX_M = 16  # rows of x the whole-step kernels take (kernels.c's MAX_M): a decode batch
GATED = {None: 0, "silu": 1, "gelu_tanh": 2}
MAX_GROUPS, MAX_ROPES = 4, 4  # kernels.c: KV pool groups and RoPE tables a decode step may have


def _cpu_flags() -> set[str]:
    if sys.platform != "linux":
        return set()
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(flags.split()[2:])


def _cpu_supports() -> bool:
    return {"avx2", "fma", "f16c"} <= _cpu_flags()


def build_flags() -> list[str]:
    """The compiler flags for this CPU (and RUNG_NATIVE_ISA)."""
    isa = os.environ.get("RUNG_NATIVE_ISA", "auto")
    if isa not in ("auto", "avx2"):
        raise ValueError(f"RUNG_NATIVE_ISA={isa!r}: expected auto or avx2")
    vnni = isa == "auto" and VNNI_CPU_FLAGS <= _cpu_flags()
    return FLAGS + VNNI_FLAGS if vnni else FLAGS


def _cache_dir() -> Path:
    root = os.environ.get("RUNG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rung")
    return Path(root) / "native"


def _build() -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, flags = SOURCE.read_bytes(), build_flags()
    tag = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"rung_kernels_{tag}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent first uses (pytest workers) never see half a file
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        pass
    proc = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp.name, "-lm"], capture_output=True, text=True)
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
    # every buffer's pointer travels with the bytes behind it (i64), which the C side checks the
    # shapes against; each returns 0 or an error of ERRORS
    lib.rung_gemv.argtypes = [p, p, i64, i64, p, i64, i32, i32]
    lib.rung_decode_attention.argtypes = [p, i64, i64, i64, p, p, i64, p, p, i64, i64, i64, p, i64, p, i64, p, i64,
                                          i64, i64, i64, i64, i64, ctypes.c_float, p, i64, p, i64, i32]
    lib.rung_rmsnorm.argtypes = [p, i64, p, i64, p, i64, i64, i64, ctypes.c_float, ctypes.c_float]
    lib.rung_rope.argtypes = [p, i64, i64, i64, i64, i64, p, p, i64]
    lib.rung_decode_step.argtypes = [p, p, i32]
    for f in (lib.rung_gemv, lib.rung_decode_attention, lib.rung_rmsnorm, lib.rung_rope, lib.rung_decode_step):
        f.restype = ctypes.c_int
    lib.rung_read_plan.argtypes = [p, i64, i64, p, i64, p, p]
    lib.rung_read_plan.restype = i64
    lib.rung_vnni.restype = ctypes.c_int
    if lib.rung_max_m() != MAX_M:
        raise RuntimeError(f"{path}: built with MAX_M {lib.rung_max_m()}, rung expects {MAX_M}")
    groups, ropes, step = ctypes.c_int64(), ctypes.c_int64(), ctypes.c_int64()
    sizes = lib.rung_decode_step_limits(ctypes.byref(groups), ctypes.byref(ropes), ctypes.byref(step))
    if ((groups.value, ropes.value, step.value) != (MAX_GROUPS, MAX_ROPES, ctypes.sizeof(Step))
            or sizes != ctypes.sizeof(Model) * 1000 + ctypes.sizeof(Layer)):
        raise RuntimeError(f"{path}: its decode-step structs differ from rung/native/__init__.py's")
    return lib


def available() -> bool:
    return library() is not None


def isa() -> str | None:
    """Which kernels were built: "avx512-vnni", "avx2", or None (reference paths)."""
    lib = library()
    return None if lib is None else "avx512-vnni" if lib.rung_vnni() else "avx2"


FORMATS = {"f32": 0, "q8": 1, "q4": 2}

# kernels.c's error codes (its enum), in words
ERRORS = {-1: "a token id outside the embedding table", -2: "out of memory",
          -3: "a block table that does not reach its row's position", -4: "an index buffer too narrow",
          -5: "a KV slot or block outside the pool", -6: "a weight layout the kernels do not know",
          -7: "a weight buffer smaller than its shape", -8: "a scale buffer smaller than its shape",
          -9: "an offset buffer smaller than its shape", -10: "a bias buffer smaller than its shape",
          -11: "an input smaller than its shape", -12: "an output smaller than its shape",
          -13: "sizes that disagree with each other", -14: "a step buffer smaller than the batch needs",
          -15: "a position past the RoPE table"}


class NativeError(ValueError):
    """A native kernel refused its arguments (kernels.c checks every buffer against its shape)."""


def check(code: int, what: str) -> None:
    if code:
        raise NativeError(f"{what}: {ERRORS.get(code, f'error {code}')}")


def nbytes(t: torch.Tensor | np.ndarray | None) -> int:
    """The bytes a kernel may read from ``t``'s first element on: to the end of its storage (a
    strided view reaches that far at most), 0 for None or a tensor not on the CPU."""
    if t is None:
        return 0
    if isinstance(t, np.ndarray):
        return t.nbytes if t.flags.c_contiguous else 0
    if not t.is_cpu:
        return 0
    return t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()


class Linear(ctypes.Structure):
    """kernels.c's Linear: one projection's weight and constants, and the bytes behind each pointer."""
    _fields_ = [("format", ctypes.c_int64), ("gated", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("group", ctypes.c_int64), ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("offset", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("w_bytes", ctypes.c_int64),
                ("scale_bytes", ctypes.c_int64), ("offset_bytes", ctypes.c_int64), ("bias_bytes", ctypes.c_int64)]


def linear_struct(fmt: str, weight: torch.Tensor, out_features: int, in_features: int, *, group: int | None = None,
                  scale: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, gated: str | None = None) -> Linear:
    """The struct for a layer's buffers (which must outlive it: the caller keeps them). The
    buffers' dtypes are checked here, their sizes by the kernels on every call."""
    for t, dtype in ((weight, {"f32": torch.float32, "q8": torch.int8, "q4": torch.uint8}.get(fmt)),
                     (scale, torch.float16), (offset, torch.float16), (bias, torch.float32)):
        if t is not None and t.dtype != dtype:
            raise NativeError(f"{fmt} layer [{out_features}, {in_features}]: a {t.dtype} buffer where the kernels "
                              f"read {dtype}")
    return Linear(FORMATS.get(fmt, -1), GATED.get(gated, -1), out_features, in_features, group or in_features,
                  weight.data_ptr(), _ptr(scale), _ptr(offset), _ptr(bias), nbytes(weight), nbytes(scale),
                  nbytes(offset), nbytes(bias))


def bind_gemv(fmt: str, weight: torch.Tensor, out_features: int, in_features: int, *, group: int | None = None,
              scale: torch.Tensor | None = None, offset: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, gated: str | None = None):
    """The GEMV with the layer's constants bound once (a struct built here): the returned
    ``call(x, out=None, add=False)`` takes x [M, K] float32 contiguous (any M) and returns
    [M, N] (or N / 2 gated); ``out`` is written, or with ``add`` added into (a fused residual add)."""
    lib = library()
    n_out = out_features // 2 if gated else out_features
    lin = linear_struct(fmt, weight, out_features, in_features, group=group, scale=scale, offset=offset, bias=bias,
                        gated=gated)
    ref, fn = ctypes.byref(lin), lib.rung_gemv

    def call(x: torch.Tensor, out: torch.Tensor | None = None, add: bool = False) -> torch.Tensor:
        if out is None:
            out = torch.empty(x.shape[0], n_out)
        if x.dtype is not torch.float32 or out.dtype is not torch.float32:
            raise NativeError(f"rung_gemv: x and out must be float32 (got {x.dtype}, {out.dtype})")
        # contiguous rows of float32 (the callers' case): numel * 4 bytes from data_ptr
        err = fn(ref, x.data_ptr(), x.nbytes if x.is_contiguous() else 0, x.shape[0], out.data_ptr(),
                 out.nbytes if out.is_contiguous() else 0, add, torch.get_num_threads())
        if err:
            check(err, f"rung_gemv ({fmt} [{out_features}, {in_features}], x {list(x.shape)}, out {list(out.shape)})")
        return out

    call.keep = (weight, scale, offset, bias, lin)  # the buffers outlive the bound call
    call.struct = lin
    return call


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _expect(dtype: torch.dtype, *tensors: torch.Tensor | None) -> None:
    """CPU tensors of ``dtype`` (or None): what the kernel reads through their pointers."""
    for t in tensors:
        if t is not None and (t.dtype is not dtype or not t.is_cpu):
            raise NativeError(f"a native kernel reads {dtype} CPU tensors, got {t.dtype} on {t.device}")


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
    _expect(torch.float32, q, pool_k, pool_v, new_k, new_v, sinks)
    _expect(torch.int64, idx, lengths, write_slots)
    if (q.stride(2) != 1 or nk.stride(2) != 1 or nk.stride()[:2] != nv.stride()[:2] or not idx.is_contiguous()
            or pool_k.shape != pool_v.shape or not pool_k.is_contiguous() or not pool_v.is_contiguous()):
        raise NativeError("rung_decode_attention: unit last strides, k and v with the same strides, contiguous "
                          "pools of one shape and indices expected")
    check(library().rung_decode_attention(
        q.data_ptr(), nbytes(q), q.stride(0), q.stride(1), pool_k.data_ptr(), pool_v.data_ptr(),
        min(pool_k.nbytes, pool_v.nbytes), _ptr(new_k), _ptr(new_v), min(nbytes(nk), nbytes(nv)), nk.stride(0),
        nk.stride(1), _ptr(write_slots), nbytes(write_slots), idx.data_ptr(), idx.nbytes, lengths.data_ptr(),
        nbytes(lengths), b, idx.shape[1], hq, pool_k.shape[1], d, scale, _ptr(sinks), nbytes(sinks), out.data_ptr(),
        out.nbytes, torch.get_num_threads()), "rung_decode_attention")
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x [..., K] float32 contiguous → x / rms(x) * (offset + weight)."""
    out = torch.empty_like(x)
    k = x.shape[-1]
    _expect(torch.float32, x, weight)
    if not x.is_contiguous() or not weight.is_contiguous():
        raise NativeError("rung_rmsnorm: contiguous x and weight expected")
    check(library().rung_rmsnorm(x.data_ptr(), x.nbytes, weight.data_ptr(), weight.nbytes, out.data_ptr(), out.nbytes,
                                 x.numel() // k, k, eps, offset), "rung_rmsnorm")
    return out


def rope_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """In place: RoPE on the first ``heads`` heads of each row of x [M, row] float32 contiguous;
    cos, signed_sin [M, head_dim] contiguous (model/rope.py's tables)."""
    _expect(torch.float32, x, cos, signed_sin)
    if not (x.is_contiguous() and cos.is_contiguous() and signed_sin.is_contiguous()):
        raise NativeError("rung_rope: contiguous x and tables expected")
    check(library().rung_rope(x.data_ptr(), x.nbytes, x.shape[0], x.shape[1], heads, head_dim, cos.data_ptr(),
                              signed_sin.data_ptr(), min(cos.nbytes, signed_sin.nbytes)), "rung_rope")


# ---- a whole decode step (kernels.c: rung_decode_step; engine/cpu_decode.py fills these) ----------

class Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("qkv", Linear), ("o", Linear),
                ("gate_up", Linear), ("down", Linear), ("kpool", ctypes.c_void_p), ("vpool", ctypes.c_void_p),
                ("group", ctypes.c_int64), ("rope", ctypes.c_int64), ("scale", ctypes.c_float),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p), ("post_attn_norm", ctypes.c_void_p),
                ("post_mlp_norm", ctypes.c_void_p), ("pool_bytes", ctypes.c_int64)]


class Model(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("hq", ctypes.c_int64),
                ("hkv", ctypes.c_int64), ("d", ctypes.c_int64), ("max_k", ctypes.c_int64), ("eps", ctypes.c_float),
                ("norm_offset", ctypes.c_float), ("layer", ctypes.POINTER(Layer)), ("final_norm", ctypes.c_void_p),
                ("head", Linear), ("embed", Linear), ("embed_scale", ctypes.c_float), ("groups", ctypes.c_int64)]



class Step(ctypes.Structure):
    _fields_ = [("B", ctypes.c_int64), ("block", ctypes.c_int64), ("ids", ctypes.c_void_p), ("starts", ctypes.c_void_p),
                ("tables", ctypes.c_void_p * MAX_GROUPS), ("width", ctypes.c_int64 * MAX_GROUPS),
                ("window", ctypes.c_int64 * MAX_GROUPS),
                ("cos", ctypes.c_void_p * MAX_ROPES), ("sin", ctypes.c_void_p * MAX_ROPES), ("x", ctypes.c_void_p),
                ("h", ctypes.c_void_p), ("qkv", ctypes.c_void_p), ("att", ctypes.c_void_p), ("gu", ctypes.c_void_p),
                ("logits", ctypes.c_void_p), ("ids_bytes", ctypes.c_int64), ("starts_bytes", ctypes.c_int64),
                ("tables_bytes", ctypes.c_int64 * MAX_GROUPS), ("rope_bytes", ctypes.c_int64 * MAX_ROPES),
                ("x_bytes", ctypes.c_int64), ("h_bytes", ctypes.c_int64), ("qkv_bytes", ctypes.c_int64),
                ("att_bytes", ctypes.c_int64), ("gu_bytes", ctypes.c_int64), ("logits_bytes", ctypes.c_int64)]


def read_plan(step: Step, groups: int, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group g's read plan as rung_decode_step builds it from ``step``'s block tables and starts:
    idx [B, L] (row b valid up to lengths[b]), lengths [B], slots [B] (for the tests)."""
    cap = 1
    while True:
        idx, lengths, slots = (torch.zeros(step.B, cap, dtype=torch.long), torch.zeros(step.B, dtype=torch.long),
                               torch.zeros(step.B, dtype=torch.long))
        got = library().rung_read_plan(ctypes.byref(step), groups, g, idx.data_ptr(), cap, lengths.data_ptr(),
                                       slots.data_ptr())
        if got == -4:
            cap *= 2
            continue
        check(min(got, 0), "rung_read_plan")
        return idx[:, :got], lengths, slots
