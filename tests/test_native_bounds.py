"""The native kernels check every buffer against the shape they are told, once per call: a wrapper
called with a buffer smaller than its shape says (or an index outside the KV pool) raises a
one-line NativeError instead of reading or writing past the end. Each call runs in a bounded child
(tests/hostile.py), since before these checks they ended in a SIGSEGV or read other memory."""

from __future__ import annotations

import pytest

from hostile import run_bounded
from rung import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built (no compiler or AVX2)")

PRELUDE = """
import torch
from rung import native
x = torch.randn(1, 4096)
"""

CASES = {
    # a q8 layer declared [8192, 4096] over 4 rows of weights
    "weights": ("native.bind_gemv('q8', torch.zeros(4, 4096, dtype=torch.int8), 8192, 4096, group=4096, "
                "scale=torch.ones(8192, 1, dtype=torch.float16))(x)", "weight buffer smaller"),
    "no scale": ("native.bind_gemv('q8', torch.zeros(4096, 4096, dtype=torch.int8), 4096, 4096, group=4096)(x)",
                 "scale buffer smaller"),
    "short scale": ("native.bind_gemv('q8', torch.zeros(4096, 4096, dtype=torch.int8), 4096, 4096, group=32, "
                    "scale=torch.ones(4096, 1, dtype=torch.float16))(x)", "scale buffer smaller"),
    "no offset": ("native.bind_gemv('q4', torch.zeros(4096, 2048, dtype=torch.uint8), 4096, 4096, group=32, "
                  "scale=torch.ones(4096, 128, dtype=torch.float16))(x)", "offset buffer smaller"),
    "bias": ("native.bind_gemv('f32', torch.zeros(4096, 4096), 4096, 4096, bias=torch.zeros(3))(x)",
             "bias buffer smaller"),
    "bad group": ("native.bind_gemv('q8', torch.zeros(64, 4096, dtype=torch.int8), 64, 4096, group=48, "
                  "scale=torch.ones(64, 100, dtype=torch.float16))(x)", "layout the kernels do not know"),
    "x": ("native.bind_gemv('f32', torch.zeros(64, 4096), 64, 4096)(torch.zeros(16, 8))", "input smaller"),
    "expanded x": ("native.bind_gemv('f32', torch.zeros(64, 4096), 64, 4096)(torch.zeros(1, 4096).expand(16, 4096))",
                   "input smaller"),
    "out": ("native.bind_gemv('f32', torch.zeros(4096, 4096), 4096, 4096)(x, out=torch.zeros(1, 2))",
            "output smaller"),
    "rmsnorm": ("native.rmsnorm(torch.randn(2, 4096), torch.ones(8), 1e-6)", "input smaller"),
    "rope": ("native.rope_(torch.randn(16, 4096), 32, 128, torch.ones(1, 128), torch.ones(1, 128))", "input smaller"),
    "attention slot": ("native.decode_attention(torch.randn(1, 4, 64), torch.zeros(8, 2, 64), torch.zeros(8, 2, 64), "
                       "torch.tensor([[0, 1, 10**9]]), torch.tensor([3]), 0.125, None)", "outside the pool"),
    "attention write": ("native.decode_attention(torch.randn(1, 4, 64), torch.zeros(8, 2, 64), torch.zeros(8, 2, 64), "
                        "torch.tensor([[0]]), torch.tensor([1]), 0.125, None, torch.randn(1, 2, 64), "
                        "torch.randn(1, 2, 64), torch.tensor([-5]))", "outside the pool"),
    "attention lengths": ("native.decode_attention(torch.randn(1, 4, 64), torch.zeros(8, 2, 64), "
                          "torch.zeros(8, 2, 64), torch.tensor([[0]]), torch.tensor([100000]), 0.125, None)",
                          "outside the pool"),
}


def test_native_wrappers_refuse_buffers_smaller_than_their_shapes():
    """All cases in one child (a fresh interpreter costs seconds): each must raise NativeError;
    before the checks the child died at the first case that read past its buffer."""
    code = PRELUDE + "for name, call in " + repr({name: call for name, (call, _) in CASES.items()}) + ".items():\n"
    code += "    try:\n        eval(call)\n        print(name, '\\tran')\n"
    code += "    except native.NativeError as e:\n        print(name, '\\t', e)\n"
    out = run_bounded(code, seconds=60, catch=False).assert_ok()
    said = dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)
    for name, (_, needle) in CASES.items():
        assert needle in said.get(name + " ", ""), f"{name}: {said.get(name + ' ', 'no output')!r}"


def test_native_decode_step_refuses_a_block_table_naming_a_block_past_the_pool(tmp_path):
    """The engine's block tables are its own; a wrong one still meets the pool's size in C."""
    from oracle import tiny_chat_model

    folder = tiny_chat_model(tmp_path, hidden_size=64, intermediate_size=64)
    code = f"""
from rung.engine.cpu_decode import CpuDecode
from rung.engine.paged import Chunk, KVPool
from rung.quant.rewrite import pack_model
from rung.weights.loader import load_model
model = pack_model(load_model({str(folder)!r}), "q4", 32)
pool = KVPool(model.config, 8, 4, torch.float32)
step = CpuDecode(model, pool)
assert step.run(torch.tensor([5]), [Chunk([[0, 1]], 5, 1)]) is not None  # a table inside the pool: runs
step.run(torch.tensor([5]), [Chunk([[0, 10**6]], 5, 1)])
"""
    run_bounded(PRELUDE + code, seconds=30).assert_refused("native decode step", "outside the pool")
