"""Attach rung's kernels to a model from outside, once it is on its device (as rung/quant/rewrite.py
packs it, and gpt-fast's quantize.py rewrites its model).

The model in rung/model/ is plain PyTorch and the reference. ``attach_kernels(model)`` swaps its
modules for the subclasses in kernels/modules.py that suit where its parameters are:

    float32 on the CPU, with rung/native built   RMSNorm → NativeRMSNorm, Attention → NativeRopeAttention
    CUDA with Triton (or TRITON_INTERPRET=1)     RMSNorm → TritonRMSNorm, Attention → FusedQKAttention,
                                                 MoE → FusedMoE, a SwiGLU MLP → SwiGLUMLP,
                                                 the blocks' nn.Linear → GemvLinear; and a block's
                                                 norm before packed q8 / q4 layers → TritonRMSNormXq
                                                 (it also rounds its output to int8 for their GEMV),
                                                 an attention with a packed q8 / q4 o_proj →
                                                 FusedQKAttentionXq (its decode kernel does the same)

The subclasses add no state, so a swap is a change of class: parameters, buffers, names and
state_dict stay as they are. A module is chosen from its plain class each time, so calling this
again is harmless (the loaders call it, and the engine again), and a model moved to another
device since is chosen for afresh. A model built by hand (``Decoder(config)``) stays plain until
attached.
"""

from __future__ import annotations

import torch
from torch import nn

from rung import native
from rung.kernels import use_triton
from rung.kernels.modules import (FusedMoE, FusedQKAttention, FusedQKAttentionXq, GemvLinear, NativeRMSNorm,
                                  NativeRopeAttention, SwiGLUMLP, TritonRMSNorm, TritonRMSNormXq)
from rung.model.attention import Attention
from rung.model.mlp import MLP
from rung.model.moe import MoE
from rung.model.norm import RMSNorm

# plain class → (its module for a float32 model on the CPU with rung/native, its module for Triton)
KERNEL_MODULES = {
    RMSNorm: (NativeRMSNorm, TritonRMSNorm),
    Attention: (NativeRopeAttention, FusedQKAttention),
    MoE: (None, FusedMoE),
    MLP: (None, SwiGLUMLP),
    nn.Linear: (None, GemvLinear),  # inside the blocks only: the LM head keeps F.linear
}
PLAIN = {kernel: plain for plain, kernels in KERNEL_MODULES.items() for kernel in kernels if kernel is not None}
PLAIN[TritonRMSNormXq] = RMSNorm
PLAIN[FusedQKAttentionXq] = Attention
DP4A_FORMATS = ("q8", "q4")  # packed layers whose decode GEMV rounds its input to int8 (kernels/triton_dp4a.py)


def attach_kernels(model: nn.Module) -> nn.Module:
    """In place; returns the model. See the module docstring for what is swapped where."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return model
    on_triton = use_triton(param)  # checks the tensor first: a CPU process never imports Triton here
    on_native = param.device.type == "cpu" and param.dtype == torch.float32 and native.available()
    for name, module in model.named_modules():
        plain = PLAIN.get(type(module), type(module))
        if plain not in KERNEL_MODULES or (plain is nn.Linear and not name.startswith("layers.")):
            continue
        for_native, for_triton = KERNEL_MODULES[plain]
        chosen = plain
        for kernel, wanted in ((for_native, on_native), (for_triton, on_triton)):
            if kernel is not None and wanted and getattr(kernel, "fits", lambda m: True)(module):
                chosen = kernel
                break
        module.__class__ = chosen
    for block in getattr(model, "layers", ()):
        _norms_round_for_dp4a(block)
        _attention_rounds_for_dp4a(block)
    return model


def _norms_round_for_dp4a(block: nn.Module) -> None:
    """A block's norm whose branch has packed q8 / q4 layers (rung/quant's modules carry ``fmt``)
    writes its output's int8 rounding too, for their GEMV; a bf16 model's norms write nothing more."""
    for norm, branch in (("attn_norm", "attn"), ("mlp_norm", "mlp")):
        module, after = getattr(block, norm, None), getattr(block, branch, None)
        if type(module) is TritonRMSNorm and after is not None and any(
                getattr(m, "fmt", None) in DP4A_FORMATS for m in after.modules()):
            module.__class__ = TritonRMSNormXq


def _attention_rounds_for_dp4a(block: nn.Module) -> None:
    """A block's attention whose o_proj is a packed q8 / q4 layer writes its output's int8 rounding
    too, for that GEMV, where a head's outputs are whole runs of 32 (head_dim a multiple of 32)."""
    attn = getattr(block, "attn", None)
    if (type(attn) is FusedQKAttention and getattr(attn.o_proj, "fmt", None) in DP4A_FORMATS
            and attn.head_dim % 32 == 0):
        attn.__class__ = FusedQKAttentionXq
