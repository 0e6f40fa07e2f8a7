"""Fused mixture-of-experts: the selected experts only, no host synchronisation, bf16 or MXFP4.

Each token's top-k choices are ``slots`` (slot s = token s // k, choice s % k). ``moe_align`` sorts
the slots by expert and pads each expert's run to a multiple of ``block_m``, all on the device with
static shapes (CUDA-graph safe): ``sorted_ids`` [P] (a slot, or S for padding), ``block_expert``
[P / block_m] and ``total`` [1] (padded length used). The kernels run one program per
(block of ``block_m`` slots, tile of outputs) and read only that block's expert, so a decode step
reads exactly the active experts' weights once:

    hidden[s] = act(x[token] @ gate[e]ᵀ + b, x[token] @ up[e]ᵀ + b)      (one kernel, both GEMMs)
    y[s]      = (hidden[s] @ down[e]ᵀ + b) · weight[s]                   (a second kernel)
    out[t]    = Σ_k y[t·k + j]

MXFP4 experts stay packed (4.25 bits a weight): the kernel loads the bytes and scales, decodes
them to the activation dtype in registers (E2M1 → bits of a float32 with the block exponent added),
and splits the K axis into even and odd elements so no nibble interleaving is needed.
``fused_moe_ref`` computes the same function from the same alignment in plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rung.kernels import use_triton
from rung.model.moe import ExpertWeights, route as route_ref  # the reference: the model's own routing

__all__ = ["Activation", "ExpertWeights", "fused_moe", "fused_moe_ref", "moe_align", "moe_slot_layout", "route",
           "route_ref"]


@dataclass(frozen=True)
class Activation:
    kind: str  # "silu" (down(silu(gate) * up)) or "swiglu_clamped" (gpt-oss)
    limit: float = 7.0
    alpha: float = 1.702

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu_clamped":
            gate = gate.clamp(max=self.limit)
            up = up.clamp(-self.limit, self.limit)
            return gate * torch.sigmoid(gate * self.alpha) * (up + 1)
        return F.silu(gate) * up


KERNEL_ACTIVATIONS = ("silu", "swiglu_clamped")


def route(logits: torch.Tensor, top_k: int, router: str, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's choice: one kernel on CUDA (torch's softmax, top-k (a sort) and the rest are
    six to eight kernels a layer, as long as the experts' GEMVs at batch 1), else ``route_ref``.
    Expert ids come back int32 from the kernel, int64 from the reference."""
    if use_triton(logits) and logits.dtype != torch.float32 and logits.shape[-1] <= 1024:
        from rung.kernels.triton_moe import triton_route

        return triton_route(logits, top_k, router == "topk_softmax", norm_topk_prob)
    return route_ref(logits, top_k, router, norm_topk_prob)


def moe_align(experts: torch.Tensor, num_experts: int, block_m: int):
    """experts [n, k] → (sorted_ids [P] int32, block_expert [P // block_m] int32, total [1] int32);
    P = S + min(E, S)·(block_m - 1) rounded up, a bound on the padded length that only shapes decide."""
    flat = experts.reshape(-1).long()  # [S]
    s = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, in slot order within one
    sorted_e = flat[order]
    rank = torch.arange(s, device=dev) - start[sorted_e]
    dest = pad_end[sorted_e] - padded[sorted_e] + rank
    p = -(-(s + min(num_experts, s) * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.full((p,), s, dtype=torch.int32, device=dev).scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, p, block_m, device=dev)
    block_expert = torch.searchsorted(pad_end, block_start, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, block_expert, pad_end[-1:].to(torch.int32)


_slot_layouts: dict = {}


def moe_slot_layout(experts: torch.Tensor, num_experts: int, block_m: int):
    """``moe_align``'s triple for few slots (decode): one slot per block, so no sort at all; a
    block's expert is its slot's. Two tokens on one expert read it twice, which only costs
    while a batch is small enough for this layout."""
    s = experts.numel()
    key = (s, block_m, experts.device)
    if key not in _slot_layouts:  # built at the first (eager) call, before any graph capture
        ids = torch.full((s * block_m,), s, dtype=torch.int32, device=experts.device)
        ids[::block_m] = torch.arange(s, dtype=torch.int32, device=experts.device)
        _slot_layouts[key] = ids, torch.tensor([s * block_m], dtype=torch.int32, device=experts.device)
    ids, total = _slot_layouts[key]
    return ids, experts.reshape(-1).to(torch.int32), total


def fused_moe_ref(x, weights, experts, w: ExpertWeights, act: Activation, block_m: int = 16,
                  layout=moe_align) -> torch.Tensor:
    """The kernels' function in PyTorch, block by block over ``layout``'s blocks (``moe_align``
    or ``moe_slot_layout``). x [n, H], weights/experts [n, k] → [n, H]."""
    n, k = experts.shape
    s = n * k
    sorted_ids, block_expert, total = layout(experts, w.num_experts, block_m)
    y = torch.zeros(s, x.shape[1], dtype=x.dtype, device=x.device)
    route_w = weights.reshape(-1)
    for b in range(int(total) // block_m):
        slots = sorted_ids[b * block_m:(b + 1) * block_m].long()
        slots = slots[slots < s]
        if slots.numel() == 0:
            continue
        e = int(block_expert[b])
        xs = x[slots // k].float()
        gate = xs @ w.expert("gate", e, torch.float32).T
        up = xs @ w.expert("up", e, torch.float32).T
        if w.gate_bias is not None:
            gate, up = gate + w.gate_bias[e].float(), up + w.up_bias[e].float()
        hidden = act(gate, up).to(x.dtype).float()
        out = hidden @ w.expert("down", e, torch.float32).T
        if w.down_bias is not None:
            out = out + w.down_bias[e].float()
        y[slots] = (out * route_w[slots].float()[:, None]).to(x.dtype)
    return y.view(n, k, -1).float().sum(1).to(x.dtype)


def fused_moe(x, weights, experts, w: ExpertWeights, act: Activation) -> torch.Tensor:
    """x [n, H], weights/experts [n, k] → [n, H]: the Triton kernels where they run, else the reference."""
    if not (use_triton(x) and act.kind in KERNEL_ACTIVATIONS):
        return fused_moe_ref(x, weights, experts, w, act)
    from rung.kernels.triton_moe import triton_fused_moe

    return triton_fused_moe(x, weights, experts, w, act)
