"""Programmatic dependent launch (rung/kernels/triton_pdl.py): when the decode kernels take it, and
what the compiled kernels do with it. No GPU: the decision with the device's capability stubbed,
and the kernels compiled for sm_90 (Triton compiles without a device) and read as PTX. That PDL
changes no output and gains on an H200 is benchmarks/gpu_pdl.py's business."""

from __future__ import annotations

import inspect

import pytest
import torch

triton = pytest.importorskip("triton")

from rung.kernels import triton_pdl as tp  # noqa: E402  (imports Triton)


@pytest.fixture
def hopper(monkeypatch):
    """A compiled-Triton process on an sm_90 device, RUNG_PDL unset."""
    monkeypatch.delenv("RUNG_PDL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(tp, "cuda_capability", lambda index: (9, 0))
    monkeypatch.setattr(tp, "triton_has_gdc", lambda: True)
    return monkeypatch


def test_pdl_is_wanted_on_hopper_cuda_devices(hopper):
    assert tp.pdl_wanted(torch.device("cuda", 0)) and tp.pdl_wanted("cuda:1")
    hopper.setenv("RUNG_PDL", "1")
    assert tp.pdl_wanted("cuda:0")
    hopper.setattr(tp, "cuda_capability", lambda index: (10, 0))
    assert tp.pdl_wanted("cuda:0")


def test_pdl_is_not_wanted_on_cpu_interpreter_pre_hopper_or_when_turned_off(hopper):
    assert not tp.pdl_wanted("cpu") and not tp.pdl_wanted(torch.device("cpu"))
    hopper.setenv("RUNG_PDL", "0")
    assert not tp.pdl_wanted("cuda:0")
    hopper.delenv("RUNG_PDL")
    hopper.setenv("TRITON_INTERPRET", "1")  # the interpreter (CI) never meets the gdc calls
    assert not tp.pdl_wanted("cuda:0")
    hopper.delenv("TRITON_INTERPRET")
    for capability in ((8, 0), (8, 9), (7, 5)):  # Ampere, Ada, Turing: no griddepcontrol
        hopper.setattr(tp, "cuda_capability", lambda index, c=capability: c)
        assert not tp.pdl_wanted("cuda:0")
    hopper.setattr(tp, "cuda_capability", lambda index: (9, 0))
    hopper.setattr(tp, "triton_has_gdc", lambda: False)  # a Triton before 3.4
    assert not tp.pdl_wanted("cuda:0")


def test_this_triton_has_the_gdc_calls():
    tp.triton_has_gdc.cache_clear()
    assert tp.triton_has_gdc()


def _ptx(fn, pointers: dict, constexprs: dict, ints=()) -> str:
    """``fn`` compiled for sm_90: arguments named in ``pointers`` get that pointer type, capitalised
    names a bf16 pointer unless in ``ints``, the rest int32."""
    from triton.backends.compiler import GPUTarget

    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "*bf16" if name[0].isupper() and name not in ints else "i32"
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
    except RuntimeError as exc:  # no CUDA backend tools in this Triton build
        pytest.skip(f"cannot compile for sm_90 here: {exc}")


def _loads_before_wait(ptx: str) -> int:
    lines = ptx.splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    return sum("ld.global" in line for line in lines[:wait])


DP4A = dict(FMT=8, GATED=True, ACT=1, HAS_BIAS=False, PER_ROW=True, ASM=True, BLOCK_N=2, RUNS=32)
DP4A_POINTERS = {"XW": "*i32", "D": "*i32", "EIDS": "*i32", "STEP": "*fp32", "XSUM": "*fp32", "S": "*fp16",
                 "O": "*fp16", "B": "*fp16"}


def test_a_pdl_gemv_loads_its_first_weights_before_the_wait_and_nothing_else():
    """The dp4a, fp8 and bf16 GEMVs launched with PDL: griddepcontrol.wait and .launch_dependents in
    the PTX, only the weight words loaded before the wait (x, scales, expert ids after); a
    mixture's GEMV, whose expert ids are data, loads nothing before it; without PDL, no gdc."""
    from rung.kernels import triton_dp4a, triton_fp8, triton_gemv

    ints = ("NOUT", "K", "N", "M")
    off = _ptx(triton_dp4a.gemv_dp4a_kernel, DP4A_POINTERS, dict(DP4A, EXPERTS=False, PDL=False), ints)
    assert "griddepcontrol" not in off
    on = _ptx(triton_dp4a.gemv_dp4a_kernel, DP4A_POINTERS, dict(DP4A, EXPERTS=False, PDL=True), ints)
    assert "griddepcontrol.wait" in on and "griddepcontrol.launch_dependents" in on
    # 2 rows x (gate, up) x 32 runs x 8 words over 128 threads: 8 words a thread, nothing else
    assert _loads_before_wait(on) == 8
    experts = _ptx(triton_dp4a.gemv_dp4a_kernel, DP4A_POINTERS, dict(DP4A, EXPERTS=True, PDL=True), ints)
    assert _loads_before_wait(experts) == 0
    fp8 = dict(GATED=True, ACT=1, HAS_BIAS=False, BLOCK_N=4, BLOCK_K=512, CVT=True)
    fp8_pointers = {"D": "*u8", "S": "*fp32", "B": "*fp32", "EIDS": "*i32"}
    assert _loads_before_wait(_ptx(triton_fp8.fp8_gemv_kernel, fp8_pointers, dict(fp8, EXPERTS=False, PDL=True), ints)) > 0
    assert _loads_before_wait(_ptx(triton_fp8.fp8_gemv_kernel, fp8_pointers, dict(fp8, EXPERTS=True, PDL=True), ints)) == 0
    bf16 = _ptx(triton_gemv.gemv_kernel, {}, dict(M_P=1, GATED=False, HAS_BIAS=False, BLOCK_N=2, BLOCK_K=1024,
                                                  STAGES=1, PDL=True), ints)
    assert 0 < _loads_before_wait(bf16) and "griddepcontrol.launch_dependents" in bf16


def test_a_pdl_norm_waits_before_any_load():
    from rung.kernels import triton_elementwise

    ptx = _ptx(triton_elementwise.add_rms_norm_kernel, {"XQ": "*i8", "STEP": "*fp32", "XSUM": "*fp32"},
               dict(W_F32=False, BLOCK=1024, RUNS_OUT=True, PDL=True))
    assert "griddepcontrol.launch_dependents" in ptx and _loads_before_wait(ptx) == 0


ATTENTION_POINTERS = {"Tables": "*i32", "Pos": "*i32", "TileFirst": "*i32", "TileCount": "*i32", "TileRow": "*i32",
                      "Sinks": "*fp32", "PartAcc": "*fp32", "PartM": "*fp32", "PartL": "*fp32", "Counter": "*i32",
                      "XQ": "*i8", "STEP": "*fp32", "XSUM": "*fp32", "scale": "fp32"}


def _stores_before_wait(ptx: str) -> int:
    lines = ptx.splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    return sum("st.global" in line or "atom.global" in line for line in lines[:wait])


@pytest.mark.parametrize("kernel", ["paged_attention_kernel", "paged_decode_split_kernel"])
def test_a_pdl_decode_attention_writing_its_int8_rounding_waits_before_any_load_or_store(kernel):
    """The decode attention kernels with RUNS_OUT (o_proj's int8 rounding, kernels/triton_attention.py)
    compile for sm_90 and keep PDL's rules: nothing loaded or stored before the wait, int8 codes
    stored after it."""
    from rung.kernels import triton_attention

    common = dict(GROUP=4, BLOCK_M=16, D=128, D_P=128, PAGE=16, HAS_WINDOW=True, HAS_SINKS=True, IEEE=False,
                  PDL=True, RUNS_OUT=True)
    if kernel == "paged_attention_kernel":
        constexprs = dict(common, BLOCK_N=64, EARLY_V=True)
    else:
        constexprs = dict(common, GROUP_P=4, BLOCK_N=32, SPLITS=16, SPLITS_P=16)
    ptx = _ptx(getattr(triton_attention, kernel), ATTENTION_POINTERS, constexprs)
    assert "griddepcontrol.launch_dependents" in ptx
    assert _loads_before_wait(ptx) == 0 and _stores_before_wait(ptx) == 0
    assert "st.global.b8" in ptx  # the int8 codes
