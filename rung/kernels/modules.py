"""The model's modules with rung's kernels inside, swapped in by kernels/rewrite.py's ``attach_kernels``.

Each is a subclass of a plain module in rung/model/ that adds no state (so the swap keeps every
parameter, buffer and name) and overrides only the seam the plain class exposes: a norm's
``forward`` and ``add_norm``, ``Attention.heads``, ``MoE.choose`` / ``mix``, an MLP's or a Linear's
``forward``. Any input its kernel does not take goes to the plain method, which is the reference
the kernels are tested against (tests/test_triton_kernels.py, tests/test_native_*.py).

Two families: ``Native*`` for a float32 model on the CPU (rung/native's C kernels, worth it for a
decode step's few rows, where torch's per-op overhead dominates), the others for CUDA with Triton
(or anywhere under TRITON_INTERPRET=1): one kernel where PyTorch launches several.
"""

from __future__ import annotations

import torch
from torch import nn

from rung import native
from rung.kernels.elementwise import add_rms_norm, qk_norm_rope, rms_norm
from rung.kernels.fused_moe import KERNEL_ACTIVATIONS, Activation, fused_moe, route
from rung.kernels.linear import gated_linear, linear
from rung.kernels.paged_attention import output_rounded_for_dp4a
from rung.model.attention import Attention
from rung.model.mlp import MLP, ActAndMul
from rung.model.moe import MoE
from rung.model.norm import RMSNorm

class NativeRMSNorm(RMSNorm):
    """float32 rows in one native call (torch's CPU rms_norm is about ten ops), a decode step's or a
    prompt's: every row gets the same arithmetic however many come with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[-1] % 8 == 0
                and x.is_contiguous() and not torch.is_grad_enabled()):
            return native.rmsnorm(x, self.weight, self.eps, self.offset)
        return super().forward(x)


class TritonRMSNorm(RMSNorm):
    """In 16 bits, the norm's cast, square, mean, rsqrt, scale and cast back as one kernel, and a
    block's residual add with it (kernels/elementwise.py): a decode step is mostly tiny kernels."""

    runs = False  # whether the kernel also writes its output's int8 rounding (TritonRMSNormXq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps, self.offset, self.weight_in_float32, self.runs)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype == torch.float32:
            return super().add_norm(x, residual)
        return add_rms_norm(x, residual, self.weight, self.eps, self.offset, self.weight_in_float32, self.runs)


class TritonRMSNormXq(TritonRMSNorm):
    """A block's norm in a model with packed q8 / q4 layers: for a decode step's rows its kernel
    also writes the output's int8 rounding, which the q|k|v or gate|up GEMV after it reads instead
    of launching ``quantize_runs`` (kernels/triton_dp4a.py; RUNG_FUSED_XQ=0 turns it off)."""

    runs = True


class NativeRopeAttention(Attention):
    """RoPE in place on the fused q|k|v rows (a decode step's or a prompt's), one native call for q and k (models
    without a q/k norm, whose q and k come straight from the projection)."""

    @staticmethod
    def fits(module: Attention) -> bool:
        return module.q_norm is None

    def heads(self, qkv: torch.Tensor, rotary, context):
        b, t, _ = qkv.shape
        if (rotary is not None and b == 1 and qkv.dtype == torch.float32
                and qkv.device.type == "cpu" and qkv.is_contiguous() and not qkv.requires_grad
                and rotary[0].shape[-1] == self.head_dim and rotary[0].dtype == torch.float32
                and rotary[0][0].is_contiguous() and rotary[1][0].is_contiguous()):
            native.rope_(qkv.view(t, -1), self.num_heads + self.num_kv_heads, self.head_dim, rotary[0][0], rotary[1][0])
            rotary = None
        return super().heads(qkv, rotary, context)


class FusedQKAttention(Attention):
    """In 16 bits, both q/k norms and both rotations in one kernel; and where the context says
    where this step's keys and values go (``kv_destination``: the CUDA graphs' decode step,
    engine/cuda_graphs.py), the kernel stores them too and ``attend`` gets None for them."""

    @staticmethod
    def fits(module: Attention) -> bool:  # per-head QK-norm only (not OLMo 2's whole-projection one)
        return module.q_norm is None or (isinstance(module.q_norm, RMSNorm) and not module.qk_norm_whole)

    def heads(self, qkv: torch.Tensor, rotary, context):
        if (qkv.dtype == torch.float32 or (self.q_norm is None and rotary is None)
                or (rotary is not None and rotary[0].dtype != qkv.dtype)):
            return super().heads(qkv, rotary, context)
        b, t, _ = qkv.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        norms = [None if n is None else (n.weight, n.eps, n.offset, n.weight_in_float32)
                 for n in (self.q_norm, self.k_norm)]
        store = getattr(context, "kv_destination", None)
        dest = store(self.layer) if store is not None else None
        q, k = qk_norm_rope(qkv, hq, hkv, d, *norms, *(rotary if rotary is not None else (None, None)), kv_dest=dest)
        if dest is not None:
            return q.transpose(1, 2), None, None
        v = qkv[..., (hq + hkv) * d:].view(b, t, hkv, d)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class FusedQKAttentionXq(FusedQKAttention):
    """An attention whose o_proj is a packed q8 / q4 layer (head_dim whole runs of 32): for a decode
    step's rows the paged attention kernel also writes its output's int8 rounding, which o_proj's
    GEMV reads instead of launching ``quantize_runs`` (kernels/triton_attention.py,
    kernels/triton_dp4a.py; RUNG_FUSED_XQ=0 turns it off)."""

    def forward(self, x, rotary, context) -> torch.Tensor:
        with output_rounded_for_dp4a():  # read by the paged attention kernel alone
            return super().forward(x, rotary, context)


class FusedMoE(MoE):
    """Routing in one kernel, and only the chosen experts read, grouped on the device with no host
    synchronisation (kernels/fused_moe.py); packed MXFP4 experts are decoded in registers."""

    @staticmethod
    def fits(module: MoE) -> bool:  # the routing kernel knows neither DeepSeek's groups nor its scale
        return module.router_kind in ("softmax_topk", "topk_softmax") and module.routed_scaling_factor == 1.0

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(logits, self.top_k, self.router_kind, self.norm_topk_prob)

    def mix(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        if self.activation_name not in KERNEL_ACTIVATIONS:
            return super().mix(flat, weights, experts)
        act = Activation(self.activation_name, self.limit, self.alpha)
        return fused_moe(flat, weights, experts, self.expert_weights(), act)


class SwiGLUMLP(MLP):
    """silu(gate)·up of the fused gate|up projection inside one GEMV for a decode step's few rows
    (the product in its epilogue), else F.linear and the one-kernel SwiGLU (kernels/linear.py)."""

    @staticmethod
    def fits(module: MLP) -> bool:
        return isinstance(module.act_and_mul, ActAndMul) and module.act_and_mul.activation == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.gate_up_proj
        if not (isinstance(proj, nn.Linear) and self.fits(self)):  # packed since (rung.quant): its own kernels
            return super().forward(x)
        return self.down_proj(gated_linear(x, proj.weight, proj.bias))


class GemvLinear(nn.Linear):
    """x @ wᵀ + b through kernels/linear.py: a decode step's few rows take the Triton GEMV where it
    reads the matrix faster than cuBLAS (a rule measured on the device), the rest F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
