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


MOE_SCALARS = {"limit": "fp32", "alpha": "fp32"}
MOE_KERNELS = {  # the kernels of a batch-1 MoE decode step: (pointers, constexprs, int arguments)
    "route_kernel": ({"I": "*i32"}, dict(K=8, K_P=8, BLOCK_E=128, TOPK_SOFTMAX=False, NORM=True), ("E",)),
    "combine_kernel": ({}, dict(K=8, BLOCK=1024), ("H",)),
    "combine_kernel weighted": ({"Wr": "*fp32"}, dict(K=8, BLOCK=1024, WEIGHTED=True), ("H",)),
    "moe_gemv_mxfp4": (dict(MOE_SCALARS, W1="*u8", W2="*u8", S1="*u8", S2="*u8", Experts="*i32"),
                       dict(X_DIV=4, TWO=True, ACT=2, HAS_BIAS=True, MUL_ROUTE=False, BLOCK_N=8, GROUPS=32, ASM=True,
                            STAGES=1), ("N", "K")),
    "moe_gemm": (dict(MOE_SCALARS, SortedIds="*i32", BlockExpert="*i32", Total="*i32"),
                 dict(X_DIV=8, TWO=True, ACT=1, HAS_BIAS=False, MUL_ROUTE=False, PACKED=False, DOT_SCALED=False,
                      LHS_FMT="bf16", BLOCK_M=16, BLOCK_N=32, BLOCK_K=256), ("N", "K")),
    "moe_gemm packed": (dict(MOE_SCALARS, W1="*u8", W2="*u8", S1="*u8", S2="*u8", SortedIds="*i32",
                             BlockExpert="*i32", Total="*i32"),
                        dict(X_DIV=1, TWO=False, ACT=0, HAS_BIAS=True, MUL_ROUTE=True, PACKED=True, DOT_SCALED=False,
                             LHS_FMT="bf16", BLOCK_M=16, BLOCK_N=32, BLOCK_K=256), ("N", "K")),
}


@pytest.mark.parametrize("kernel", list(MOE_KERNELS))
def test_a_pdl_moe_kernel_waits_before_any_load_or_store(kernel):
    """Routing, the experts' GEMV and GEMM, and the combine, compiled for sm_90 with PDL: the gdc
    wait and launch_dependents, and nothing loaded or stored before the wait (expert ids, the slot
    layout and routing weights are data, and an expert's weight address depends on its id);
    without PDL, no griddepcontrol at all."""
    from rung.kernels import triton_moe

    fn = getattr(triton_moe, kernel.split()[0])
    pointers, constexprs, ints = MOE_KERNELS[kernel]
    off = _ptx(fn, pointers, dict(constexprs, PDL=False), ints)
    assert "griddepcontrol" not in off
    on = _ptx(fn, pointers, dict(constexprs, PDL=True), ints)
    assert "griddepcontrol.wait" in on and "griddepcontrol.launch_dependents" in on
    assert _loads_before_wait(on) == 0 and _stores_before_wait(on) == 0
    assert "ld.global" in on and "st.global" in on  # the loads and stores are there, after it


class _Launches:
    """Stands in for a Triton kernel: records each launch's keyword arguments."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, kwargs))


@pytest.mark.parametrize("wanted", [False, True])
def test_moe_launchers_pass_pdl_wanted_as_both_the_constexpr_and_launch_pdl(monkeypatch, wanted):
    """triton_route, triton_fused_moe (bf16 experts: moe_gemm twice, then combine) and
    triton_moe_gemv (MXFP4 experts, tuned or under the interpreter) launch every kernel with
    PDL = launch_pdl = pdl_wanted(device), as the dense decode kernels' launchers do."""
    from rung.kernels import triton_moe as tm
    from rung.kernels.fused_moe import Activation, ExpertWeights

    log: list = []
    for name in ("route_kernel", "combine_kernel", "moe_gemm", "moe_gemv_mxfp4", "_moe_gemv_tuned"):
        monkeypatch.setattr(tm, name, _Launches(name, log))
    asked = []
    monkeypatch.setattr(tm, "pdl_wanted", lambda device: asked.append(torch.device(device)) or wanted)
    e, h, i, n, k = 4, 64, 32, 1, 2
    x = torch.zeros(n, h, dtype=torch.bfloat16)
    tm.triton_route(torch.zeros(n, e, dtype=torch.bfloat16), k, False, True)
    weights, experts = torch.full((n, k), 0.5, dtype=torch.bfloat16), torch.tensor([[0, 3]], dtype=torch.int32)
    dense = ExpertWeights(*(torch.zeros(e, *shape, dtype=torch.bfloat16) for shape in ((i, h), (i, h), (h, i))))
    tm.triton_fused_moe(x, weights, experts, dense, Activation("silu"))
    packed_shapes = ((i, h // 2), (i, h // 2), (h, i // 2)) + ((i, h // 32), (i, h // 32), (h, i // 32))  # bytes, scales
    packed = ExpertWeights(*(torch.zeros(e, *shape, dtype=torch.uint8) for shape in packed_shapes))
    for interpret in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        tm.triton_moe_gemv(x, weights, experts, packed, Activation("swiglu_clamped"))
    names = [name for name, _ in log]
    assert names == ["route_kernel", "moe_gemm", "moe_gemm", "combine_kernel",
                     "moe_gemv_mxfp4", "moe_gemv_mxfp4", "combine_kernel",
                     "_moe_gemv_tuned", "_moe_gemv_tuned", "combine_kernel"]
    assert all(kwargs["PDL"] is wanted and kwargs["launch_pdl"] is wanted for _, kwargs in log), log
    assert asked and all(d.type == "cpu" for d in asked)
