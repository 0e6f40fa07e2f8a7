"""Decode steps on the CPU as one native call: the CPU's counterpart of engine/cuda_graphs.py.

A batch-1 decode step of a small model is ~250 short operations; run as PyTorch modules each
costs more in per-op overhead (module calls, views, checks, small allocations) than it computes,
and even as one ctypes call each, the calls and their OpenMP fork/joins cost 5-10 us apiece.
``CpuDecode`` hands a decode-only batch to ``rung_decode_step`` (rung/native/kernels.c): every
layer — RMSNorm, the fused q|k|v GEMV, RoPE, K/V write + attention over the paged pool, the
output GEMV added into the residual, RMSNorm, the gated gate|up GEMV, the down GEMV added into
the residual — then the final norm and the LM head, in one parallel region over the model's own
packed weights and buffers kept per batch size. It reads the model and never changes it. It
covers the pre-norm families whose projections the quantization rewrite made native (rung/quant:
the f32, int8 and int4 layouts): Llama, SmolLM2, Qwen2-style, Qwen3 (QK-norm) and Gemma 3 (QK-norm
with offset gains, sandwich norms, GELU, sliding windows). Anything else (MoE, learned positions,
ALiBi, partial rotary) is named by ``unsupported`` and takes the engine's PagedStep path, which is
also the reference the tests compare this with."""

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
    if c.positions != "rope" or any(r.rope.type in ("dynamic", "longrope") for r in model.rotaries.values()):
        return f"{c.positions} positions"  # (or a table chosen per call by its longest position)
    if c.mla is not None:  # the native step's pool layout is per-head keys and values
        return "multi-head latent attention (its pool holds latents; the native step reads per-head keys and values)"
    if not all(c.rope_layers):
        return "layers without RoPE (NoPE)"
    if c.attn_logit_softcap is not None:
        return "soft-capped attention scores"
    if not c.pre_norms or c.qk_norm_whole:
        return "norms after the sublayers only, or a QK-norm over the whole projection"
    if c.residual_from_norm or c.embedding_norm or c.final_logit_softcap:
        return "a norm or a cap outside the pre-norm block"
    if any(c.moe_layers):
        return "mixture-of-experts layers"
    for kind, rot in model.rotaries.items():
        if rot(torch.zeros(1, dtype=torch.long), torch.float32)[0].shape[-1] != c.head_dim:
            return f"partial rotary ({kind} layers)"
    for i, layer in enumerate(model.layers):
        a, m = layer.attn, layer.mlp
        if not all(isinstance(p, PackedLinear) and p._native for p in (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)):
            return f"layer {i}: projections not packed for the native kernels"
        if m.gate_up_proj.gated is None:
            return f"layer {i}: gate|up not packed as one gated layer"
        if not all(isinstance(n, RMSNorm) for n in _norms(layer) if n is not None):
            return f"layer {i}: not RMSNorm"
        if a.slopes is not None or a.sinks is not None or a.head_dim % 8:
            return f"layer {i}: attention the native kernel does not cover"
    return None


def _norms(layer) -> tuple:
    """A block's norms in rung_decode_step's order; None where the family has none."""
    return (layer.attn_norm, layer.mlp_norm, layer.attn.q_norm, layer.attn.k_norm, layer.post_attn_norm,
            layer.post_mlp_norm)


class _Buffers:
    """One batch size's intermediates, shared by every layer and step (nothing allocated per layer)."""

    def __init__(self, model, b: int):
        c = model.config
        self.x = torch.empty(b, c.hidden_size)  # the residual stream
        self.h = torch.empty(b, c.hidden_size)  # its normed copy
        self.qkv = torch.empty(b, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim)
        self.att = torch.empty(b, c.num_heads * c.head_dim)
        self.gu = torch.empty(b, model.layers[0].mlp.gate_up_proj.out_features // 2)
        self.logits = torch.empty(b, c.vocab_size)
        self.step = st = native.Step(b)  # the step's constant fields; run() sets the rest
        st.x, st.h, st.qkv = self.x.data_ptr(), self.h.data_ptr(), self.qkv.data_ptr()
        st.att, st.gu, st.logits = self.att.data_ptr(), self.gu.data_ptr(), self.logits.data_ptr()
        st.x_bytes, st.h_bytes, st.qkv_bytes = self.x.nbytes, self.h.nbytes, self.qkv.nbytes
        st.att_bytes, st.gu_bytes, st.logits_bytes = self.att.nbytes, self.gu.nbytes, self.logits.nbytes


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


def _embedding(model):
    """The token embedding table as a native Linear the step reads rows of (a packed table, shared
    with a tied LM head, or a float32 one) and what it points into, or None (embedded in PyTorch)."""
    from rung.quant.linear import PackedEmbedding, PackedLinear

    embed = model.embed
    if isinstance(embed, PackedEmbedding) and embed.dtype == torch.float32:
        table = embed.table[0]
        if isinstance(table, PackedLinear) and table._native:  # the layer's own struct (its bias is not read)
            return table.bound().struct, (table,)
    if isinstance(embed, torch.nn.Embedding) and embed.weight.dtype == torch.float32 and embed.weight.is_contiguous():
        weight = embed.weight.detach()
        return native.linear_struct("f32", weight, *weight.shape), (weight,)
    return None


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
        norms = [n for layer in model.layers for n in _norms(layer) if n is not None] + [model.final_norm]
        if len({(n.eps, n.offset) for n in norms}) != 1 or len(pool.groups) > native.MAX_GROUPS or len(
                self.kinds) > native.MAX_ROPES:
            raise ValueError("cpu_decode: norms with different eps, or too many KV groups or RoPE tables")
        keep, layers = [], []
        for i, layer in enumerate(model.layers):
            a, m = layer.attn, layer.mlp
            projections = [p.bound() for p in (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)]
            keep += projections
            sizes = (c.hidden_size, c.hidden_size, c.head_dim, c.head_dim, c.hidden_size, c.hidden_size)
            gains = [_gain(n, size, f"layer {i}") for n, size in zip(_norms(layer), sizes)]
            layers.append(native.Layer(
                *gains[:2], *(f.struct for f in projections), pool.keys[i].data_ptr(), pool.values[i].data_ptr(),
                pool.group_of[i], self.kinds.index(c.layer_types[i]), a.scale, *gains[2:],
                min(native.nbytes(pool.keys[i]), native.nbytes(pool.values[i]))))
        array = (native.Layer * len(layers))(*layers)
        head = _head(model)
        final = _gain(model.final_norm, c.hidden_size, "final norm") if head is not None else None
        keep += [array, head]
        widths = [p.in_features for layer in model.layers
                  for p in (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        embed = _embedding(model)
        keep += [embed]
        struct = native.Model(len(layers), c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                              max(widths + [c.hidden_size]), norms[0].eps, norms[0].offset, array, final,
                              head[0] if head is not None else native.Linear(),
                              embed[0] if embed is not None else native.Linear(),
                              1.0 if c.embedding_scale is None else c.embedding_scale, len(pool.groups))
        return struct, keep

    def run(self, ids: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor | None:
        """ids [B] of a decode-only batch → logits [B, vocab] float32, or None (not this batch).
        More than MAX_M rows go MAX_M at a time: each native call reads the weights once for its
        rows (a decode row depends on its own sequence alone), still far faster than the eager path
        for the whole batch (64 rows on 2 cores: ~420 tok/s against ~200)."""
        if any(ch.count != 1 for ch in chunks):
            return None
        m = native.MAX_M
        parts = [self._run(ids[i:i + m], chunks[i:i + m]) for i in range(0, len(chunks), m)]
        self.steps += 1
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _run(self, ids: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor:
        b = len(chunks)
        model, pool = self.model, self.pool
        buf = self.buffers.get(b) or self._buffers(b)
        # The host's part of a step is kept to a few NumPy arrays; the embedding lookup, the read
        # plans and the RoPE rows are made in the native call. After a step has streamed ~100 MB
        # of weights through the caches, every PyTorch op on the host ran cold: the embedding,
        # plans and tables took ~0.4 ms a step of ~5.
        starts = np.array([ch.start for ch in chunks], dtype=np.int64)
        tables = [_table([ch.tables[g] for ch in chunks]) for g in range(len(pool.groups))]
        rope = [self._rope(kind, int(starts.max()) + 1) for kind in self.kinds]
        tokens = np.ascontiguousarray(ids.numpy(), dtype=np.int64)  # the engine asks this path for CPU models only
        st = buf.step
        st.ids, st.starts = tokens.ctypes.data, starts.ctypes.data
        st.ids_bytes, st.starts_bytes = tokens.nbytes, starts.nbytes
        for g, table in enumerate(tables):
            st.tables[g], st.width[g], st.tables_bytes[g] = table.ctypes.data, table.shape[1], table.nbytes
        for r, (cos, sin) in enumerate(rope):
            st.cos[r], st.sin[r], st.rope_bytes[r] = cos.ctypes.data, sin.ctypes.data, min(cos.nbytes, sin.nbytes)
        with torch.no_grad():
            if not self.struct.embed.w:  # a table the kernel does not read: embedded here
                buf.x.copy_(model.embed(ids[None])[0])
                if model.config.embedding_scale is not None:
                    buf.x.mul_(model.config.embedding_scale)
            err = self.lib.rung_decode_step(ctypes.byref(self.struct), ctypes.byref(st), torch.get_num_threads())
            if err:
                native.check(err, f"native decode step (tokens {tokens.tolist()}, positions {starts.tolist()})")
            if self.struct.final_norm:
                return buf.logits.clone()
            return model.logits(model.final_norm(buf.x))

    def _buffers(self, b: int) -> "_Buffers":
        buf = self.buffers[b] = _Buffers(self.model, b)
        buf.step.block = self.pool.block_size
        for g, group in enumerate(self.pool.groups):
            buf.step.window[g] = group.window or 0
        return buf

    def _rope(self, kind: str, need: int) -> tuple[np.ndarray, np.ndarray]:
        """The cos and signed-sin tables [n >= need, head_dim] of the model's own Rotary (static:
        dynamic RoPE is unsupported here), grown by doubling; the kernel reads row p for position p."""
        cos, sin = self.tables.get(kind, (None, None))
        if cos is None or len(cos) < need:
            n = max(256, 1 << (need - 1).bit_length())
            with torch.no_grad():
                cos, sin = (t.contiguous().numpy() for t in self.model.rotaries[kind](torch.arange(n), torch.float32))
            self.tables[kind] = cos, sin
        return cos, sin


def _gain(norm, size: int, where: str) -> int | None:
    """The pointer to a norm's gain (None: the family has no such norm), checked to be the float32
    vector of ``size`` the step reads (its size does not travel to the C side)."""
    if norm is None:
        return None
    w = norm.weight
    if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous() or w.shape != (size,):
        raise native.NativeError(f"cpu_decode: {where}: a norm's gain is {w.dtype} {list(w.shape)}, expected "
                                 f"float32 [{size}]")
    return w.data_ptr()


def _table(rows: list[list[int | None]]) -> np.ndarray:
    """Block tables [B, widest] int64; None (a block a window dropped, never read) and padding as 0."""
    out = np.zeros((len(rows), max(1, max(len(r) for r in rows))), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = [blk or 0 for blk in r]
    return out
