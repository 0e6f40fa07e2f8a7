"""Decode steps on the CPU as one native call: the CPU's counterpart of engine/cuda_graphs.py.

A batch-1 decode step of a small model is ~250 short operations; run as PyTorch modules each
costs more in per-op overhead (module calls, views, checks, small allocations) than it computes,
and even as one ctypes call each, the calls and their OpenMP fork/joins cost 5-10 us apiece.
``CpuDecode`` hands a decode-only batch to ``rung_decode_step`` (rung/native/kernels.c): every
layer — RMSNorm, the fused q|k|v GEMV, RoPE, K/V write + attention over the paged pool, the
output GEMV added into the residual, RMSNorm, the gated gate|up GEMV, the down GEMV added into
the residual — then the final norm and the LM head, in one parallel region over the model's own
packed weights and buffers kept per batch size. It reads the model and never changes it. It
covers the plain pre-norm families whose projections the quantization rewrite made native
(rung/quant: the f32, int8 and int4 layouts): Llama, SmolLM2, Mistral, Qwen2-style. Anything
else (QK-norm, sandwich norms, MoE, ALiBi, partial rotary) is named by ``unsupported`` and takes
the engine's PagedStep path, which is also the reference the tests compare this with."""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from rung import native
from rung.engine.paged import Chunk, KVPool
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
        self.logits = torch.empty(b, c.vocab_size)


def _head(model):
    """The LM head as a native Linear and the tensors it points into, or None (logits in PyTorch)."""
    from rung.quant.linear import PackedLinear

    head = model.lm_head
    if head is None and isinstance(model.embed, torch.nn.Embedding):  # tied, float
        weight = model.embed.weight.detach()
    elif isinstance(head, torch.nn.Linear) and head.bias is None:
        weight = head.weight.detach()
    elif isinstance(head, PackedLinear) and head._native and head.gated is None:
        return head.bound().struct, (head,)
    else:
        return None
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        return None
    return native.linear_struct("f32", weight, *weight.shape), (weight,)


class CpuDecode:
    def __init__(self, model, pool: KVPool):
        self.model, self.pool = model, pool
        self.lib = native.library()
        self.buffers: dict[int, _Buffers] = {}
        self.steps = 0  # decode steps run here
        self.kinds = list(model.rotaries)  # RoPE tables by layer type
        self.tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # cos, signed sin of positions [0, n), per kind
        self.struct, self.keep = self._model_struct()

    def _model_struct(self):
        """The model's constants for rung_decode_step, built once (pointers into the model's own
        buffers and the pool, which the engine keeps for the model's life)."""
        model, c, pool = self.model, self.model.config, self.pool
        norms = [n for layer in model.layers for n in (layer.attn_norm, layer.mlp_norm)] + [model.final_norm]
        if len({(n.eps, n.offset) for n in norms}) != 1 or len(pool.groups) > native.MAX_GROUPS or len(
                self.kinds) > native.MAX_ROPES:
            raise ValueError("cpu_decode: norms with different eps, or too many KV groups or RoPE tables")
        keep, layers = [], []
        for i, layer in enumerate(model.layers):
            a, m = layer.attn, layer.mlp
            projections = [p.bound() for p in (a.qkv_proj, a.o_proj, m.gate_up, m.down_proj)]
            keep += projections
            layers.append(native.Layer(
                layer.attn_norm.weight.data_ptr(), layer.mlp_norm.weight.data_ptr(), *(f.struct for f in projections),
                pool.keys[i].data_ptr(), pool.values[i].data_ptr(), pool.group_of[i],
                self.kinds.index(c.layer_types[i]), a.scale))
        array = (native.Layer * len(layers))(*layers)
        head = _head(model)
        final = model.final_norm.weight.data_ptr() if head is not None else None
        keep += [array, head]
        widths = [p.in_features for layer in model.layers
                  for p in (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up, layer.mlp.down_proj)]
        struct = native.Model(len(layers), c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                              max(widths + [c.hidden_size]), norms[0].eps, norms[0].offset, array, final,
                              head[0] if head is not None else native.Linear())
        return struct, keep

    def run(self, ids: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor | None:
        """ids [B] of a decode-only batch → logits [B, vocab] float32, or None (not this batch)."""
        b = len(chunks)
        if b > native.MAX_M or any(ch.count != 1 for ch in chunks):
            return None
        model, c = self.model, self.model.config
        buf = self.buffers.get(b) or self.buffers.setdefault(b, _Buffers(model, b))
        # the host's part of a step is built in NumPy: at ~5 ms a step, PyTorch's per-op overhead on
        # these few-element arrays (read plans, RoPE rows, the argmax) was a tenth of it
        plans = self._plans(chunks)
        positions = np.array([ch.start for ch in chunks], dtype=np.int64)
        rope = [self._rope(kind, positions) for kind in self.kinds]
        with torch.no_grad():
            buf.x.copy_(model.embed(ids[None])[0])
            if c.embedding_scale is not None:
                buf.x.mul_(c.embedding_scale)
            st = native.Step(b)
            for g, (idx, lengths, slots) in enumerate(plans):
                st.idx[g], st.lengths[g], st.slots[g] = idx.ctypes.data, lengths.ctypes.data, slots.ctypes.data
                st.L[g] = idx.shape[1]
            for r, (cos, sin) in enumerate(rope):
                st.cos[r], st.sin[r] = cos.ctypes.data, sin.ctypes.data
            st.x, st.h, st.qkv, st.att = buf.x.data_ptr(), buf.h.data_ptr(), buf.qkv.data_ptr(), buf.att.data_ptr()
            st.gu, st.logits = buf.gu.data_ptr(), buf.logits.data_ptr()
            self.lib.rung_decode_step(ctypes.byref(self.struct), ctypes.byref(st), torch.get_num_threads())
            self.steps += 1
            if self.struct.final_norm:
                return buf.logits.clone()
            return model.logits(model.final_norm(buf.x))

    def _plans(self, chunks: list[Chunk]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per KV group: the slots each row reads, in position order [B, L] int64 (its window
        applied), how many [B], and the slot its new key and value go to [B] (its last read)."""
        bs, plans = self.pool.block_size, []
        for g, group in enumerate(self.pool.groups):
            rows = []
            for ch in chunks:
                table = np.array([blk or 0 for blk in ch.tables[g]], dtype=np.int64)  # None: a block the window dropped
                pos = np.arange(group.first_needed(ch.start), ch.start + 1)
                rows.append(table[pos // bs] * bs + pos % bs)
            lengths = np.array([len(r) for r in rows], dtype=np.int64)
            idx = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)
            for i, r in enumerate(rows):
                idx[i, : len(r)] = r
            plans.append((idx, lengths, idx[np.arange(len(rows)), lengths - 1].copy()))
        return plans

    def _rope(self, kind: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The cos and signed-sin rows [B, head_dim] of ``positions``, from a table of the model's own
        Rotary (static: dynamic RoPE is unsupported here) grown by doubling."""
        need = int(positions.max()) + 1
        cos, sin = self.tables.get(kind, (None, None))
        if cos is None or len(cos) < need:
            n = max(256, 1 << (need - 1).bit_length())
            with torch.no_grad():
                cos, sin = (t.contiguous().numpy() for t in self.model.rotaries[kind](torch.arange(n), torch.float32))
            self.tables[kind] = cos, sin
        return cos[positions], sin[positions]
