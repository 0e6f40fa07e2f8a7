"""The Triton kernels themselves, on the CPU: Triton's interpreter (TRITON_INTERPRET=1) runs each
kernel in NumPy, so CI checks what the GPU runs against the PyTorch references (kernels/), not only
the references against the model. Speed is the GPU benchmark's business (benchmarks/gpu.py)."""

from __future__ import annotations

import pytest



from interpret import needs_interpreter, run_checks


@needs_interpreter
def test_triton_kernels_agree_with_their_references_under_the_interpreter():
    lines = run_checks("triton_interpret_checks.py", timeout=600, drop_env=("RUNG_MOE_GEMV", "RUNG_MXFP4_DEQUANT"))
    assert lines[-1] == "all Triton kernels agree with their references"
    assert sum("GEMV" in line for line in lines) == 4 and sum("paged attention" in line for line in lines) == 12
    assert sum(line.startswith("qk norm+rope torch") for line in lines) == 20 and sum(line.startswith("model ") for line in lines) == 4
    assert sum(line.startswith("routing") for line in lines) == 4 and "write_kv: equal" in lines
    assert sum(line.startswith("combine") for line in lines) == 4
    assert sum("GEMM dequantized" in line for line in lines) == 2 and "mxfp4_dequantize: equal (float32, bfloat16, float16)" in lines
    assert sum(line.startswith("linear gemv") for line in lines) == 17
    assert sum(line.startswith("add+rms_norm") for line in lines) == 8
    assert sum(line.startswith("qk norm+rope to the pools") for line in lines) == 10


def test_decode_splits_fill_the_gpu_at_batch_one_and_stay_eight_for_batches(monkeypatch):
    """Programs per (token, kv head): a batch-1 step of Qwen3-8B (8 kv heads) splits its keys 16
    ways (128 programs for 132 SMs; 8 ways left half of an H200 idle at 128K tokens), batches keep
    8, never more than MAX_SPLITS; RUNG_ATTN_SPLITS forces a count."""
    pytest.importorskip("triton")
    from rung.kernels import triton_attention as ta

    monkeypatch.delenv("RUNG_ATTN_SPLITS", raising=False)
    assert ta.decode_splits(8) == 16 and ta.decode_splits(4) == ta.MAX_SPLITS == 16
    assert ta.decode_splits(16) == ta.decode_splits(64) == ta.decode_splits(127) == 8
    assert ta.decode_splits(1) == 16 and ta.decode_splits(9) == 16 and ta.decode_splits(12) == 16
    monkeypatch.setenv("RUNG_ATTN_SPLITS", "8")
    assert ta.decode_splits(8) == 8


def test_mxfp4_prefill_dequantizes_at_prefill_sizes_per_expert_unless_turned_off(monkeypatch):
    """Packed experts at DEQUANT_SLOTS_PER_EXPERT slots an expert or more (the pass costs in
    proportion to the experts), never dense ones; RUNG_MXFP4_DEQUANT=0 turns it off."""
    pytest.importorskip("triton")
    import torch

    from rung.kernels import triton_moe as tm
    from rung.kernels.fused_moe import ExpertWeights

    def packed(experts):
        return ExpertWeights(*(torch.zeros(experts, 4, 16, dtype=torch.uint8) for _ in range(3)),
                             *(torch.zeros(experts, 4, 1, dtype=torch.uint8) for _ in range(3)))

    dense = ExpertWeights(*(torch.zeros(2, 4, 32) for _ in range(3)))
    least = tm.DEQUANT_SLOTS_PER_EXPERT
    monkeypatch.delenv("RUNG_MXFP4_DEQUANT", raising=False)
    for experts in (2, 32, 128):
        assert packed(experts).num_experts == experts
        assert tm._dequantized_prefill(least * experts, packed(experts))
        assert not tm._dequantized_prefill(least * experts - 1, packed(experts))
    assert not tm._dequantized_prefill(1 << 20, dense)
    monkeypatch.setenv("RUNG_MXFP4_DEQUANT", "0")
    assert not tm._dequantized_prefill(1 << 20, packed(2))


def test_mxfp4_prefill_keeps_the_packed_tiles_without_room_for_the_dequantized_copies(monkeypatch):
    """gate and up dequantized at once: 2 x E x I x H elements of the activations' dtype, plus a
    margin, must fit in the free memory and what torch's allocator holds unused."""
    pytest.importorskip("triton")
    import torch

    from rung.kernels import triton_moe as tm

    cuda = torch.device("cuda", 0)
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 1 << 40))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 << 20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1 << 20)  # 2 MiB cached, unused
    need = 10 << 20
    free["bytes"] = need - (2 << 20)
    assert tm._room_for(need, cuda)
    free["bytes"] -= 1
    assert not tm._room_for(need, cuda)
    assert tm._room_for(1 << 50, torch.device("cpu"))  # the interpreter: no such question

    class Packed:  # 4 experts of 8 x 16 packed bytes: 2 x 4 x 8 x 32 elements dequantized
        packed, num_experts = True, 4
        gate = torch.zeros(4, 8, 16, dtype=torch.uint8)

    asked = []
    monkeypatch.setattr(tm, "_room_for", lambda nbytes, device: asked.append(nbytes) or False)
    monkeypatch.delenv("RUNG_MXFP4_DEQUANT", raising=False)
    assert not tm._dequantized_prefill(1 << 20, Packed(), torch.bfloat16)
    assert asked == [2 * 4 * 8 * 32 * 2 + tm.DEQUANT_MARGIN]
