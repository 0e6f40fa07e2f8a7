"""Linear layers over packed weights: native kernels for decode rows, the reference otherwise.

``PackedLinear`` holds one ``Packed`` weight as buffers (so ``.to()``, ``state_dict`` and
safetensors see them). A call of at most ``MAX_M`` rows of float32 on the CPU (a decode step)
runs rung's native kernel (rung/native), which reads each weight byte once. So does a q8 / q4
layer's prompt inside ``native_prompts()``, which the engine's steps use (rung/engine/runner.py):
every row then gets a decode row's arithmetic (x rounded to int8 in runs of 32, as llama.cpp),
whatever its batch, and no prompt dequantizes the whole weight. A plain call with more rows keeps
the dequantizing reference, whose logits are exactly the dequantized model's (what a packed model
is checked against); an f32 layer's prompt is PyTorch's matmul either way (faster than a GEMV
over many rows). On CUDA a q8 / q4 layer
runs rung's Triton kernels over the same buffers (rung/kernels/triton_quant.py: a GEMV for decode
rows, a dequantizing matmul for small batches, dequantize + cuBLAS for prefill) and an f8 layer
rung/kernels/triton_fp8.py's (a GEMV for decode rows, ``torch._scaled_mm`` above); anything else
dequantizes and calls ``F.linear``, the reference the kernels are tested against.

``gated``: the weight holds a gated MLP's gate and up rows interleaved in blocks of 8 (8 gate rows,
their 8 up rows, ...) and the layer returns act(gate) * up, so one kernel call does both
projections and the activation.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from rung import native
from rung.model.mlp import ACTIVATIONS
from rung.quant.formats import Packed, check_packed, dequantize

GATE_BLOCK = 8  # rows of gate (then of up) per block of a gated weight; kernels.c's BLOCK / 2
_NATIVE_PROMPTS = contextvars.ContextVar("rung_native_prompts", default=False)


@contextlib.contextmanager
def native_prompts():
    """Within it, a q8 / q4 layer's prompt rows on the CPU go through the native kernel too."""
    token = _NATIVE_PROMPTS.set(True)
    try:
        yield
    finally:
        _NATIVE_PROMPTS.reset(token)
NATIVE_ACTIVATIONS = ("silu", "gelu_tanh")


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [I, ...] → [2I, ...]: blocks of GATE_BLOCK gate rows, each followed by its up rows."""
    i = gate.shape[0]
    g = gate.reshape(i // GATE_BLOCK, 1, GATE_BLOCK, *gate.shape[1:])
    u = up.reshape(i // GATE_BLOCK, 1, GATE_BLOCK, *up.shape[1:])
    return torch.cat((g, u), dim=1).reshape(2 * i, *gate.shape[1:])


class PackedLinear(nn.Module):
    def __init__(self, packed: Packed, bias: torch.Tensor | None = None, gated: str | None = None):
        super().__init__()
        check_packed(packed)  # the kernels read these buffers through raw pointers, by this shape
        if bias is not None and tuple(bias.shape) != (packed.shape[0],):
            raise ValueError(f"{packed.fmt} [{packed.shape[0]}, {packed.shape[1]}]: bias of shape {list(bias.shape)}, "
                             f"expected [{packed.shape[0]}]")
        self.fmt, self.group = packed.fmt, packed.group
        self.out_features, self.in_features = packed.shape
        self.register_buffer("data", packed.data)
        self.register_buffer("scale", packed.scale)
        self.register_buffer("offset", packed.offset)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        if gated is not None and (gated not in ACTIVATIONS or self.out_features % (2 * GATE_BLOCK)):
            raise ValueError(f"a gated layer needs a known activation and a multiple of {2 * GATE_BLOCK} rows")
        self.gated = gated
        self._native = (native.available() and self.fmt in native.FORMATS and self.in_features % 32 == 0 and self.data is not None
                        and self.data.device.type == "cpu" and (gated is None or gated in NATIVE_ACTIVATIONS))
        self._call = None  # the kernel bound to this layer's buffers (rebound if they move)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)  # .to(device) and friends: the kernel applies on the CPU only
        self._native = self._native and self.data is not None and self.data.device.type == "cpu"
        self._call = None
        return out

    @property
    def packed(self) -> Packed:
        return Packed(self.fmt, self.data, (self.out_features, self.in_features), self.group, self.scale, self.offset)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.fmt != "f32" else ""
        gated = f", gated={self.gated}" if self.gated else ""
        return f"{self.in_features} → {self.out_features}, {self.fmt}{group}{gated}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if (self._native and x.dtype == torch.float32 and not x.is_cuda
                and (rows.shape[0] <= native.MAX_M or (self.fmt != "f32" and _NATIVE_PROMPTS.get()))):
            out = self.bound()(rows.contiguous())
        elif self._triton_ok(x):  # CUDA, or anywhere under TRITON_INTERPRET=1 (the tests)
            out = self.triton(rows)
        else:
            out = self.reference(rows)
        return out.view(*lead, out.shape[-1])

    def bound(self):
        """The native kernel bound to this layer's buffers: ``call(x, out=None, add=False)`` (see
        native.bind_gemv); only where ``_native`` holds."""
        if self._call is None or self._call[0] != self.data.data_ptr():
            self._call = (self.data.data_ptr(), native.bind_gemv(
                self.fmt, self.data, self.out_features, self.in_features, group=self.group, scale=self.scale,
                offset=self.offset, bias=self.bias, gated=self.gated))
        return self._call[1]

    def _triton_ok(self, x: torch.Tensor) -> bool:
        from rung.kernels import use_triton

        return (self.fmt in ("q8", "q4", "f8") and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
                and self.gated in (None, "silu", "gelu_tanh", "gelu", "relu") and use_triton(x, self.data))

    def triton(self, rows: torch.Tensor) -> torch.Tensor:
        """The Triton path (CUDA, or anywhere under TRITON_INTERPRET=1): the same function as ``reference``."""
        if self.fmt == "f8":
            from rung.kernels.triton_fp8 import fp8_linear

            return fp8_linear(rows, self.data, self.scale, self.bias, self.gated)
        from rung.kernels.triton_quant import quant_linear

        return quant_linear(rows, self.fmt, self.data, self.scale, self.offset, self.group, self.bias, self.gated)

    def reference(self, rows: torch.Tensor) -> torch.Tensor:
        weight = self.data if self.fmt == "f32" and self.data.dtype == rows.dtype else dequantize(self.packed, rows.dtype)
        bias = None if self.bias is None else self.bias.to(rows.dtype)
        y = F.linear(rows, weight, bias)
        if self.gated is None:
            return y
        y = y.view(rows.shape[0], -1, 2, GATE_BLOCK)
        return (ACTIVATIONS[self.gated](y[:, :, 0]) * y[:, :, 1]).reshape(rows.shape[0], -1)


class PackedEmbedding(nn.Module):
    """An embedding table read from a packed weight (shared with a tied LM head): the looked-up
    rows are dequantized, nothing else."""

    def __init__(self, table: PackedLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.table = [table]  # a list: the LM head owns the buffers; no second registration
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    @property
    def weight(self) -> torch.Tensor:
        """The whole table in float (a reference path only; a decode step never builds it)."""
        return dequantize(self.table[0].packed, self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.table[0].packed.rows(flat), self.dtype)
        return rows.view(*ids.shape, self.embedding_dim)
