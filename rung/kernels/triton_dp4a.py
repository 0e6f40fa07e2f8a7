"""Decode GEMVs for int8 / int4 weights over int8 activations: four products an instruction (dp4a).

What bounds the float GEMVs of rung/kernels/triton_quant.py is not memory but integer work: each
weight code becomes a float through a shift, a mask and an or before its multiply-add, so int4 runs
at ~1.2 TB/s of packed bytes (a quarter of the H200's bandwidth) and int8 at 1.5-2.4. Here, as in
llama.cpp's MMVQ kernels, the activations are rounded to int8 once per step instead (one scale per
run of 32, ``quantize_runs``), and a weight word of four int8 codes, or eight int4 codes after two
masks, meets four activation bytes in one ``dp4a``: per 32 weights, 8 instructions (q8) or 12 (q4)
instead of ~100.

Layouts are rung's packed ones, unchanged (triton_quant's docstring): ``q8`` int8 [N, K] and
``q4`` runs of 32 values in 16 bytes, byte j = value j | value j + 16 << 4, so word w's low nibbles
are values 4w..4w+3 and its high ones 4w+16..4w+19 (activation words w and w + 4 of the run).

The sum over a run: q8 Σ q·x ≈ dx · s · Σ q·xq; q4 Σ (s·q + o)·x ≈ s · dx · Σ q·xq + o · Σx (Σx of
the float activations). ``gemv_dp4a_ref`` restates it in PyTorch with the same rounding; the
kernels run under Triton's interpreter in CI (tests/triton_dp4a_checks.py), with a plain-Triton
``dp4a`` there (the interpreter runs no PTX).

Where the rounding is done: a GEMV whose x is the output of a block's RMSNorm (the q|k|v and the
gate|up projections' input) takes it from the norm's kernel, which writes the int8 codes, steps and
Σx beside its 16-bit output (rung/kernels/triton_elementwise.py, ``record`` / ``recorded`` here):
one launch a projection less, which is what a small model's decode step is bound by. So does the o
projection from the paged decode attention (rung/kernels/triton_attention.py: the program that
writes a (token, head)'s head_dim outputs owns whole runs of the [tokens, heads · head_dim] rows
o_proj reads). Every other x (the down projection, experts' rows of a mixture) is rounded by
``quantize_runs`` first, a launch of its own. RUNG_FUSED_XQ=0 turns the hand-off off (the norms and
the attention then write nothing extra)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rung.kernels.triton_pdl import pdl_wait, pdl_wanted
from rung.kernels.triton_quant import ACTS, INTERPRET, _epilogue, _rows, _tuned, gated_ref

GEMV_M = 4


# ---- references ---------------------------------------------------------------------------------

def quantize_runs_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] → (int8 [M, K], float32 step [M, K / 32], float32 Σx [M, K / 32]): per run of 32,
    q = ⌊fma(x, 127 / max|x|, ½)⌋ (the kernel's rounding), x ≈ step · q. Σx is summed in float64 and
    rounded once, as the kernels do (``round_runs``): 32 values of a 16-bit dtype sum exactly there
    in any order (unless their magnitudes lie 2^40 apart), so the kernels that write these
    (quantize_runs, the norms') agree bit for bit whatever order their layouts sum in."""
    m, k = x.shape
    r = x.float().view(m, k // 32, 32)
    amax = r.abs().amax(-1, keepdim=True)
    # true divisions, tensor by tensor (a Python number over a tensor is its reciprocal times the
    # number: two roundings)
    c127 = torch.full_like(amax, 127.0)
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    # the kernel's fused multiply-add, rounded once: the float64 product of two float32 is exact, so
    # is its sum with ½ where |x · inv| ≥ 2^-6 (below, the floor is 0 either way), and the float32
    # rounding of that is the fma's
    q = torch.floor((r.double() * inv.double() + 0.5).float()).to(torch.int8)
    return q.view(m, k), (amax / c127).view(m, -1), r.double().sum(-1).float()


def moe_gemv_ref(x, fmt: str, data, scale, offset, group: int, experts: torch.Tensor, x_div: int,
                 act: str | None = None) -> torch.Tensor:
    """``gemv_dp4a(..., experts=, x_div=)``'s function: row r = x[r // x_div] through expert experts[r]."""
    rows = []
    for r, e in enumerate(experts.tolist()):
        rows.append(gemv_dp4a_ref(x[r // x_div:r // x_div + 1], fmt, data[e], scale[e],
                                  None if offset is None else offset[e], group, None, act))
    return torch.cat(rows)


def gemv_dp4a_ref(x, fmt: str, data, scale, offset, group: int, bias=None, act: str | None = None):
    """The kernel's function: x rounded per run to int8 (``quantize_runs_ref``), exact integer dot
    products per run, then the run's scales; float64 sums."""
    m, k = x.shape
    n = data.shape[0]
    xq, step, xsum = quantize_runs_ref(x)
    runs = k // 32
    xq = xq.double().view(m, runs, 32)
    if fmt == "q8":
        q = data.double().view(n, runs, 32)
    else:
        b = data.view(n, runs, 1, 16)
        q = torch.cat((b & 0x0F, b >> 4), dim=2).view(n, runs, 32).double()
    dots = torch.einsum("mrk,nrk->mnr", xq, q)  # exact: integers below 2^53
    s = scale.double().view(n, -1).repeat_interleave(group // 32, dim=1)  # [N, runs]
    y = dots * step.double()[:, None, :] * s[None]
    if fmt == "q4":
        o = offset.double().view(n, -1).repeat_interleave(group // 32, dim=1)
        y = y + o[None] * xsum.double()[:, None, :]
    y = y.sum(-1)
    if bias is not None:
        y = y + bias.double()
    y = y.to(x.dtype)
    return y if act is None else gated_ref(y, act)


# ---- kernels --------------------------------------------------------------------------------------

@triton.jit
def dp4a(a, b, c, SIGNED_A: tl.constexpr, ASM: tl.constexpr):
    """c + Σ_i a.byte_i · b.byte_i (b's bytes signed; a's signed if SIGNED_A, else unsigned): one
    PTX instruction on the GPU, byte by byte in plain Triton under the interpreter."""
    if ASM:
        if SIGNED_A:
            out = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                            dtype=tl.int32, is_pure=True, pack=1)
        else:
            out = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                            dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = c
        for i in tl.static_range(4):
            if SIGNED_A:
                ai = (a << (24 - 8 * i)) >> 24
            else:
                ai = (a >> (8 * i)) & 0xFF
            out += ai * ((b << (24 - 8 * i)) >> 24)
    return out


@triton.jit
def round_runs(x):
    """x float32 [R, 32] → its runs' int8 codes [R, 32], steps [R] and Σx [R] (``quantize_runs_ref``);
    the one place these are computed, for quantize_runs_kernel and the norms' kernels alike."""
    amax = tl.max(tl.abs(x), 1)
    # IEEE divisions and one fused multiply-add, spelled out: the compiler's defaults (approximate
    # division, contraction where it likes) are not what quantize_runs_ref can restate exactly
    inv = tl.where(amax > 0, tl.math.div_rn(tl.full(amax.shape, 127.0, tl.float32), tl.where(amax > 0, amax, 1.0)),
                   0.0)
    q = tl.floor(tl.fma(x, inv[:, None], 0.5)).to(tl.int8)
    step = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
    return q, step, tl.sum(x.to(tl.float64), 1).to(tl.float32)


@triton.jit
def quantize_runs_kernel(X, XQ, STEP, XSUM, K, sxm, RUNS: tl.constexpr, PDL: tl.constexpr = False):
    """One program per (row, RUNS runs): ``quantize_runs_ref`` on the GPU. PDL: launched with
    programmatic dependent launch (kernels/triton_pdl.py), it waits first thing."""
    pdl_wait(PDL)
    m = tl.program_id(0).to(tl.int64)
    run = tl.program_id(1) * RUNS + tl.arange(0, RUNS)
    r_in = run < K // 32
    k = run[:, None] * 32 + tl.arange(0, 32)[None, :]
    x = tl.load(X + m * sxm + k, mask=r_in[:, None], other=0.0).to(tl.float32)
    q, step, xsum = round_runs(x)
    tl.store(XQ + m * K + k, q, mask=r_in[:, None])
    tl.store(STEP + m * (K // 32) + run, step, mask=r_in)
    tl.store(XSUM + m * (K // 32) + run, xsum, mask=r_in)


@triton.jit
def _words(D, row, n_in, run, r_in, wpr, FMT: tl.constexpr):
    """The weight words of rows ``row`` [BN] over runs ``run`` [RUNS]: [BN, RUNS, 8] (q8) or
    [BN, RUNS, 4] (q4, two nibbles of a run's values a byte)."""
    WORDS: tl.constexpr = 8 if FMT == 8 else 4  # a run's words
    m3 = (n_in[:, None] & r_in[None, :])[:, :, None]
    kw = run[:, None] * WORDS + tl.arange(0, WORDS)[None, :]
    return tl.load(D + row[:, None, None] * wpr + kw[None], mask=m3, other=0)


@triton.jit
def _run_sums(XW, STEP, XSUM, w, S, O, row, n_in, run, r_in, K, group,
              FMT: tl.constexpr, PER_ROW: tl.constexpr, ASM: tl.constexpr):
    """[BN, RUNS] float32: each row's dot with x over each run (per-row q8 scales left out), from
    the rows' words ``w`` (``_words``)."""
    m2 = n_in[:, None] & r_in[None, :]
    step = tl.load(STEP + run, mask=r_in, other=0.0)[None, :]
    if FMT == 8:
        kw = run[:, None] * 8 + tl.arange(0, 8)[None, :]  # [RUNS, 8] words of the run
        xw = tl.load(XW + kw, mask=r_in[:, None], other=0)
        dots = tl.sum(dp4a(w, xw[None], tl.zeros_like(w), True, ASM), 2)
        out = dots.to(tl.float32) * step
        if not PER_ROW:
            out *= tl.load(S + row[:, None] * (K // group) + (run * 32 // group)[None, :], mask=m2,
                           other=0.0).to(tl.float32)
    else:
        j = tl.arange(0, 4)
        xk = run[:, None] * 8 + j[None, :]  # the words' low nibbles' activation words; the high: +4
        xlo = tl.load(XW + xk, mask=r_in[:, None], other=0)[None]
        xhi = tl.load(XW + xk + 4, mask=r_in[:, None], other=0)[None]
        lo = w & 0x0F0F0F0F
        hi = (w >> 4) & 0x0F0F0F0F
        dots = tl.sum(dp4a(lo, xlo, dp4a(hi, xhi, tl.zeros_like(w), False, ASM), False, ASM), 2)
        sidx = row[:, None] * (K // group) + (run * 32 // group)[None, :]
        s = tl.load(S + sidx, mask=m2, other=0.0).to(tl.float32)
        o = tl.load(O + sidx, mask=m2, other=0.0).to(tl.float32)
        xs = tl.load(XSUM + run, mask=r_in, other=0.0)[None, :]
        out = dots.to(tl.float32) * step * s + o * xs
    return out


@triton.jit
def gemv_dp4a_kernel(XW, STEP, XSUM, D, S, O, B, Y, NOUT, K, group, wpr, sym, EIDS, rows_e, x_div,
                     FMT: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PER_ROW: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, RUNS: tl.constexpr,
                     EXPERTS: tl.constexpr, PDL: tl.constexpr = False):
    """One program per (BLOCK_N outputs, output row): the weight rows' words streamed once, RUNS
    runs a step. XW: int8 activations as int32 words; D: the weights as int32 words, ``wpr`` a row.
    EXPERTS: D, S, O are stacks of ``rows_e``-row matrices, output row r reads expert EIDS[r] and
    x row r // x_div (a mixture-of-experts step: one row per (token, choice)).
    PDL: launched with programmatic dependent launch (kernels/triton_pdl.py): the first step's
    weight words are loaded before the wait (no kernel writes them; an expert's are chosen by data,
    so EXPERTS waits first), x and everything after it."""
    EARLY_W: tl.constexpr = PDL and not EXPERTS
    if not EARLY_W:
        pdl_wait(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < NOUT
    row = _rows(n, GATED).to(tl.int64)
    m = tl.program_id(1).to(tl.int64)
    if EXPERTS:
        e = tl.load(EIDS + m).to(tl.int64)
        D += e * rows_e * wpr
        S += e * rows_e * (K // group)
        O += e * rows_e * (K // group)
        m = m // x_div
    xw = XW + m * (K // 4)
    step = STEP + m * (K // 32)
    xsum = XSUM + m * (K // 32)
    ri = tl.arange(0, RUNS)
    acc1 = tl.zeros([BLOCK_N, RUNS], tl.float32)
    acc2 = tl.zeros([BLOCK_N, RUNS], tl.float32)
    if EARLY_W:  # the loop's first step, its weights loaded before the wait
        r_in = ri < K // 32
        w1 = _words(D, row, n_in, ri, r_in, wpr, FMT)
        w2 = w1
        if GATED:
            w2 = _words(D, row + 8, n_in, ri, r_in, wpr, FMT)
        pdl_wait(PDL)
        acc1 += _run_sums(xw, step, xsum, w1, S, O, row, n_in, ri, r_in, K, group, FMT, PER_ROW, ASM)
        if GATED:
            acc2 += _run_sums(xw, step, xsum, w2, S, O, row + 8, n_in, ri, r_in, K, group, FMT, PER_ROW, ASM)
    for r0 in range(RUNS if EARLY_W else 0, K // 32, RUNS):
        run = r0 + ri
        r_in = run < K // 32
        w1 = _words(D, row, n_in, run, r_in, wpr, FMT)
        acc1 += _run_sums(xw, step, xsum, w1, S, O, row, n_in, run, r_in, K, group, FMT, PER_ROW, ASM)
        if GATED:
            w2 = _words(D, row + 8, n_in, run, r_in, wpr, FMT)
            acc2 += _run_sums(xw, step, xsum, w2, S, O, row + 8, n_in, run, r_in, K, group, FMT, PER_ROW, ASM)
    r1 = tl.sum(acc1, 1)
    r2 = tl.sum(acc2, 1)
    if PER_ROW and FMT == 8:
        r1 = r1 * tl.load(S + row, mask=n_in, other=0.0).to(tl.float32)
        if GATED:
            r2 = r2 * tl.load(S + row + 8, mask=n_in, other=0.0).to(tl.float32)
    mm = tl.program_id(1) + tl.arange(0, 1)
    _epilogue(r1[None, :], r2[None, :], B, Y, mm, mm < mm + 1, row, n, n_in, sym, GATED, ACT, HAS_BIAS)


# ---- the hand-off from a norm ---------------------------------------------------------------------
#
# One slot: the last norm's output that came with its rounding, and that rounding. A GEMV takes it
# when its x is that output: the same memory, dtype, rows and row stride, and (where the tensor
# keeps one) the same version, so an in-place write since is seen. The slot holds the output
# itself, so its memory cannot be freed and handed to another tensor while it is recorded: a tensor
# at that address is a view of it. Inference tensors keep no version: an in-place write to a
# norm's output between the norm and its GEMV would go unseen there (the model makes none). In a
# CUDA graph, the codes a captured GEMV reads were written by the captured norm that wrote its x,
# so each replay rewrites both: the pair stays consistent, as it does eagerly.

_RECORD: tuple | None = None  # (output, its version or None, xq, step, xsum)


def fuse_wanted(rows: torch.Tensor) -> bool:
    """Whether a norm's output rows [M, K] should come with their rounding: the rows the dp4a GEMV
    takes (``usable``), unless RUNG_FUSED_XQ=0 or RUNG_DP4A=0."""
    return (os.environ.get("RUNG_FUSED_XQ") != "0" and os.environ.get("RUNG_DP4A") != "0"
            and rows.dtype in (torch.float16, torch.bfloat16) and rows.shape[0] <= GEMV_M
            and rows.shape[-1] % 32 == 0)


def rounding_buffers(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The empty (xq, step, xsum) a kernel writes the rounding of its output rows [M, K] into, for
    ``record`` once written; None where ``fuse_wanted`` says no (and the slot emptied)."""
    if not fuse_wanted(rows):
        forget()
        return None
    m, k = rows.shape
    step = torch.empty(m, k // 32, dtype=torch.float32, device=rows.device)
    return torch.empty(m, k, dtype=torch.int8, device=rows.device), step, torch.empty_like(step)


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def record(out: torch.Tensor, xq: torch.Tensor, step: torch.Tensor, xsum: torch.Tensor) -> None:
    """A kernel's output (contiguous: a norm's, the attention's) and ``quantize_runs_ref(out.reshape(-1, K))``,
    just written."""
    global _RECORD
    _RECORD = (out, _version(out), xq, step, xsum)


def forget() -> None:
    """Empty the slot (a norm that wrote no rounding this time: nothing held for longer)."""
    global _RECORD
    _RECORD = None


def recorded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(xq, step, xsum) of x [M, K] if x is the recorded output's rows, unchanged since; else None."""
    if _RECORD is None:
        return None
    out, version, xq, step, xsum = _RECORD
    k = xq.shape[1]
    if (x.data_ptr() == out.data_ptr() and x.dtype == out.dtype and x.device == out.device
            and x.shape == xq.shape and x.stride() == (k, 1) and _version(x) == version):
        return xq, step, xsum
    return None


# ---- launchers --------------------------------------------------------------------------------------

def quantize_runs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] (contiguous rows, K a multiple of 32) → ``quantize_runs_ref``'s three tensors."""
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    step = torch.empty(m, k // 32, dtype=torch.float32, device=x.device)
    xsum = torch.empty_like(step)
    runs = 16
    pdl = pdl_wanted(x.device)
    quantize_runs_kernel[(m, triton.cdiv(k // 32, runs))](x, xq, step, xsum, k, x.stride(0), RUNS=runs, PDL=pdl,
                                                          launch_pdl=pdl, num_warps=4)
    return xq, step, xsum


def usable(x: torch.Tensor, fmt: str, data: torch.Tensor) -> bool:
    """Whether this GEMV takes the call: 16-bit activations (float32 ones keep the exact float
    GEMV, which the tests of tiny float32 models rely on), at most GEMV_M rows, word-aligned rows."""
    k = x.shape[1]
    return (x.dtype in (torch.float16, torch.bfloat16) and x.shape[0] <= GEMV_M and k % 32 == 0
            and fmt in ("q8", "q4") and data.is_contiguous() and data.data_ptr() % 16 == 0)


def gemv_dp4a(x, fmt, data, scale, offset, group, bias=None, act=None, config=None, out=None,
              experts: torch.Tensor | None = None, x_div: int = 1):
    """x [M ≤ GEMV_M, K] through a q8 / q4 weight, activations rounded per run to int8.
    ``config``: (BLOCK_N, RUNS, num_warps) or None (tuned / default). With ``experts`` (int32 [R]):
    ``data`` etc. are stacks [E, N, ...] and output row r is x[r // x_div] through expert
    experts[r] (``moe_gemv_ref``)."""
    n = data.shape[-2]
    k = x.shape[1]
    n_out = n // 2 if act else n
    rows = x.shape[0] if experts is None else experts.numel()
    if x.stride(-1) != 1:
        x = x.contiguous()
    xq, step, xsum = recorded(x) or quantize_runs(x)  # the norm's rounding of x, or a launch for it
    words = data.view(torch.int32)
    y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device) if out is None else out
    pdl = pdl_wanted(x.device)

    def launch(cfg):
        bn, runs, warps = cfg
        runs = triton.next_power_of_2(min(runs, k // 32))
        gemv_dp4a_kernel[(triton.cdiv(n_out, bn), rows)](
            xq.view(torch.int32), step, xsum, words, scale, scale if offset is None else offset,
            scale if bias is None else bias, y, n_out, k, group, words.shape[-1], y.stride(0),
            step if experts is None else experts, n, x_div,
            FMT=8 if fmt == "q8" else 4, GATED=act is not None, ACT=ACTS[act], HAS_BIAS=bias is not None,
            PER_ROW=group == k, ASM=not INTERPRET, BLOCK_N=bn, RUNS=runs, EXPERTS=experts is not None,
            PDL=pdl, launch_pdl=pdl, num_warps=warps)
        return y

    if config is not None:
        return launch(config)
    return _tuned(("dp4a", fmt, n, k, act is not None, experts is not None), dp4a_configs(fmt), launch)


def dp4a_configs(fmt: str) -> list[tuple]:
    """(BLOCK_N, RUNS, num_warps) candidates, the default first; one step reads BLOCK_N · RUNS · 32
    bytes (q8) or half that (q4)."""
    if INTERPRET:
        return [(4, 2, 4)]
    # the sweep of benchmarks/gpu_quant.py on an H200 (Qwen3-8B's layers, cold): two rows of 1 KB
    # (q8) a step were the best or within 3% on o, gate_up and down; four on the QKV; eight or
    # more rows a program, or 512-byte steps, were 10-45% slower
    # (adding 8-32 rows a program with shorter steps, for a MoE expert's short rows, made whole
    # models 10-30% slower on the H200: the tuner's one-layer timing chose them, the decode step
    # did not gain; RESULTS 2026-12-04)
    r = 32 if fmt == "q8" else 64
    return [(2, r, 4), (4, r // 2, 4), (1, 2 * r, 4), (4, r, 8), (2, 2 * r, 8), (8, r // 2, 4)]
