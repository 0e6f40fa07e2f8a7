"""Decode steps on the CPU as a straight run of native calls: the CPU's counterpart of
engine/cuda_graphs.py.

A batch-1 decode step of a small model spends more time in PyTorch's and Python's per-op cost
(module calls, views, checks, small allocations: about 250 of them for SmolLM2) than in its
GEMVs. ``CpuDecode`` runs a decode-only batch through the model's own packed weights with one
native call per operation — RMSNorm, the fused q|k|v GEMV, RoPE in place, K/V write + attention
over the paged pool, the output GEMV added into the residual, RMSNorm, the gated gate|up GEMV,
the down GEMV added into the residual — on buffers it keeps per batch size. It reads the model
and never changes it. It covers the plain pre-norm families whose projections the quantization
rewrite made native (rung/quant: the f32, int8 and int4 layouts): Llama, SmolLM2, Mistral,
Qwen2-style. Anything else (QK-norm, sandwich norms, MoE, ALiBi, partial rotary) is named by
``unsupported`` and takes the engine's PagedStep path, which is also the reference the tests
compare this with."""

from __future__ import annotations

import torch

from rung import native
from rung.engine.paged import Chunk, KVPool, PagedStep
from rung.model.norm import RMSNorm


def unsupported(model) -> str | None:
    """Why ``model`` cannot decode through ``CpuDecode`` (None: it can). The engine asks only for a
    float32 model on the CPU; native-packed projections imply the native kernels were built."""
    from rung.quant.linear import PackedLinear

    c = model.config
    if c.positions != "rope" or any(r.rope.type == "dynamic" for r in model.rotaries.values()):
        return f"{c.positions} positions"
    if c.qk_norm or c.sandwich_norms or c.residual_from_norm or c.embedding_norm or c.final_logit_softcap:
        return "a norm or a cap outside the plain pre-norm block"
    if any(c.moe_layers):
        return "mixture-of-experts layers"
    for kind, rot in model.rotaries.items():
        if rot(torch.zeros(1, dtype=torch.long), torch.float32)[0].shape[-1] != c.head_dim:
            return f"partial rotary ({kind} layers)"
    for i, layer in enumerate(model.layers):
        a, m = layer.attn, layer.mlp
        if not all(isinstance(p, PackedLinear) and p._native for p in (a.qkv_proj, a.o_proj, m.gate_up, m.down_proj)):
            return f"layer {i}: projections not packed for the native kernels"
        if not (isinstance(layer.attn_norm, RMSNorm) and isinstance(layer.mlp_norm, RMSNorm)):
            return f"layer {i}: not RMSNorm"
        if a.slopes is not None or a.sinks is not None or a.head_dim % 8:
            return f"layer {i}: attention the native kernel does not cover"
    return None


class _Buffers:
    """One batch size's intermediates, shared by every layer and step (nothing allocated per layer)."""

    def __init__(self, model, b: int):
        c = model.config
        self.x = torch.empty(b, c.hidden_size)  # the residual stream
        self.h = torch.empty(b, c.hidden_size)  # its normed copy
        self.qkv = torch.empty(b, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim)
        self.att = torch.empty(b, c.num_heads * c.head_dim)
        self.gu = torch.empty(b, model.layers[0].mlp.gate_up.out_features // 2)


class CpuDecode:
    def __init__(self, model, pool: KVPool):
        self.model, self.pool = model, pool
        self.lib = native.library()
        self.buffers: dict[int, _Buffers] = {}
        self.steps = 0  # decode steps run here

    def run(self, ids: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor | None:
        """ids [B] of a decode-only batch → logits [B, vocab] float32, or None (not this batch)."""
        b = len(chunks)
        if b > native.MAX_M or any(ch.count != 1 for ch in chunks):
            return None
        model, c, lib, pool = self.model, self.model.config, self.lib, self.pool
        buf = self.buffers.get(b) or self.buffers.setdefault(b, _Buffers(model, b))
        step = PagedStep(pool, chunks, ids.device)  # the read plans: the slots each row sees, per group
        plans = [step.decode_plan(g) for g in range(len(pool.groups))]
        positions = step.positions(b, ids.device)
        tables = {kind: tuple(t.contiguous() for t in rot(positions, torch.float32)) for kind, rot in model.rotaries.items()}
        x, h = buf.x, buf.h
        x.copy_(model.embed(ids[None])[0])
        if c.embedding_scale is not None:
            x.mul_(c.embedding_scale)
        threads = torch.get_num_threads()
        hq, hkv, d = c.num_heads, c.num_kv_heads, c.head_dim
        row = buf.qkv.shape[1]  # q, k and v are column ranges of one [B, row] buffer
        q_ptr = buf.qkv.data_ptr()
        k_ptr, v_ptr = q_ptr + 4 * hq * d, q_ptr + 4 * (hq + hkv) * d
        with torch.no_grad():
            for i, layer in enumerate(model.layers):
                a, m = layer.attn, layer.mlp
                idx, lengths, slots = plans[pool.group_of[i]]
                cos, sin = tables[c.layer_types[i]]
                self._norm(layer.attn_norm, x, h, b)
                a.qkv_proj.bound()(h, out=buf.qkv)
                lib.rung_rope(q_ptr, b, row, hq + hkv, d, cos.data_ptr(), sin.data_ptr())
                lib.rung_decode_attention(
                    q_ptr, row, d, pool.keys[i].data_ptr(), pool.values[i].data_ptr(), k_ptr, v_ptr, row, d,
                    slots.data_ptr(), idx.data_ptr(), lengths.data_ptr(), b, idx.shape[1], hq, hkv, d, a.scale,
                    None, buf.att.data_ptr(), threads)  # no sinks: only gpt-oss has them, and it is MoE
                a.o_proj.bound()(buf.att, out=x, add=True)
                self._norm(layer.mlp_norm, x, h, b)
                m.gate_up.bound()(h, out=buf.gu)
                m.down_proj.bound()(buf.gu, out=x, add=True)
            self.steps += 1
            return model.logits(model.final_norm(x))

    def _norm(self, norm: RMSNorm, x: torch.Tensor, out: torch.Tensor, b: int) -> None:
        self.lib.rung_rmsnorm(x.data_ptr(), norm.weight.data_ptr(), out.data_ptr(), b, x.shape[1], norm.eps, norm.offset)
