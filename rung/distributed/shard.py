"""Which slice of each parameter a tensor-parallel rank holds (Megatron-LM's layout, as vLLM and
gpt-fast's tp.py shard a decoder).

Per block, with ``world`` ranks:

- attention: column-parallel q|k|v (each rank its query heads and their key/value heads), row-
  parallel o; key/value heads are split when there are at least as many as ranks, otherwise each
  rank holds the one its query heads read (MQA: every rank the same head). Sinks and ALiBi slopes
  go with their heads; per-head q/k norms (one ``head_dim`` vector) are replicated.
- dense MLP: column-parallel gate|up (each rank the same rows of gate and of up), row-parallel down.
- MoE: every expert split on its intermediate dimension (gate/up rows, down columns); the router
  is replicated, so every rank routes every token the same way.
- vocabulary: the embedding table and the LM head split by rows (vocab-parallel), padded to a
  multiple of ``world`` rows.

A row-parallel layer's rank outputs are partial sums: rung/distributed/collectives.py adds them
with one all-reduce, and only rank 0 keeps the layer's bias, so it is added once.

Everything here is arithmetic on shapes and index ranges: the loaders call ``ShardPlan.slice`` on
each converted checkpoint tensor before it is copied in, so a rank never holds more than its shard
plus the one full tensor being read.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from rung.config import ModelConfig


class ShardError(ValueError):
    """A model that cannot be split over this many ranks (heads or widths that do not divide)."""


@dataclass(frozen=True)
class ShardPlan:
    config: ModelConfig  # the full model's
    rank: int
    world: int

    def __post_init__(self):
        c, n = self.config, self.world
        if not (isinstance(n, int) and n >= 1 and 0 <= self.rank < n):
            raise ShardError(f"tensor parallel rank {self.rank} of {n}: not a valid rank")
        if c.num_heads % n:
            raise ShardError(f"tensor_parallel_size {n} does not divide num_heads {c.num_heads}")
        if c.num_kv_heads % n and n % c.num_kv_heads:
            raise ShardError(f"tensor_parallel_size {n} and num_kv_heads {c.num_kv_heads}: one must divide the other")
        if c.intermediate_size % n:
            raise ShardError(f"tensor_parallel_size {n} does not divide intermediate_size {c.intermediate_size}")
        if c.moe is not None and c.moe.expert_intermediate_size % n:
            raise ShardError(f"tensor_parallel_size {n} does not divide the experts' intermediate size "
                             f"{c.moe.expert_intermediate_size}")

    # ---- this rank's sizes ---------------------------------------------------------------------

    @property
    def heads(self) -> range:
        per = self.config.num_heads // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def kv_heads(self) -> range:
        c, n = self.config, self.world
        if c.num_kv_heads >= n:
            per = c.num_kv_heads // n
            return range(self.rank * per, (self.rank + 1) * per)
        head = self.rank // (n // c.num_kv_heads)  # the kv head this rank's query heads read
        return range(head, head + 1)

    @property
    def vocab_rows(self) -> int:
        """Rows of the embedding table and LM head per rank (the vocabulary padded to a multiple)."""
        return -(-self.config.vocab_size // self.world)

    @property
    def vocab(self) -> range:
        start = self.rank * self.vocab_rows
        return range(start, start + self.vocab_rows)

    def local_config(self) -> ModelConfig:
        """The config this rank's modules are built from: its heads and widths, the full vocabulary
        (logits are gathered to the full width before anyone reads them)."""
        c, n = self.config, self.world
        moe = c.moe and dataclasses.replace(c.moe, expert_intermediate_size=c.moe.expert_intermediate_size // n)
        return dataclasses.replace(c, num_heads=len(self.heads), num_kv_heads=len(self.kv_heads),
                                   intermediate_size=c.intermediate_size // n, moe=moe)

    # ---- what each parameter keeps ---------------------------------------------------------------

    def _rows(self, ranges: list[range], width: int) -> torch.Tensor:
        """Row indices of the given head ranges in a tensor of ``width``-row heads."""
        return torch.cat([torch.arange(r.start * width, r.stop * width) for r in ranges])

    def _qkv_rows(self) -> torch.Tensor:
        c, d = self.config, self.config.head_dim
        kv = self.kv_heads
        offset_k, offset_v = c.num_heads, c.num_heads + c.num_kv_heads
        return self._rows([self.heads, range(offset_k + kv.start, offset_k + kv.stop),
                           range(offset_v + kv.start, offset_v + kv.stop)], d)

    def _half_rows(self, width: int) -> torch.Tensor:
        """gate|up (rows [gate | up], each ``width`` wide): this rank's rows of each half."""
        per = width // self.world
        start = self.rank * per
        return torch.cat([torch.arange(start, start + per), torch.arange(width + start, width + start + per)])

    def _split(self, width: int) -> slice:
        per = width // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def slice(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full parameter ``name`` (a rung parameter name)."""
        c = self.config
        if self.world == 1:
            return value
        leaf = _leaf(name)
        if name in ("embed.weight", "lm_head.weight"):
            return self._vocab_slice(value)
        if leaf in ("attn.qkv_proj.weight", "attn.qkv_proj.bias"):
            return value[self._qkv_rows()]
        if leaf == "attn.o_proj.weight":
            return value[:, self._rows([self.heads], c.head_dim)]
        if leaf == "attn.sinks":
            return value[self.heads.start:self.heads.stop]
        if leaf in ("mlp.gate_up_proj.weight", "mlp.gate_up_proj.bias"):
            return value[self._half_rows(c.intermediate_size)]
        if leaf in ("mlp.up_proj.weight", "mlp.up_proj.bias"):
            return value[self._split(c.intermediate_size)]
        if leaf == "mlp.down_proj.weight" and value.dim() == 2:
            return value[:, self._split(c.intermediate_size)]
        if c.moe is not None and leaf in ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_bias", "mlp.up_bias"):
            return value[:, self._split(c.moe.expert_intermediate_size)]  # [E, I, H] / [E, I]
        if c.moe is not None and leaf == "mlp.down_proj":
            return value[:, :, self._split(c.moe.expert_intermediate_size)]  # [E, H, I]
        if leaf in ROW_PARALLEL_BIASES and self.rank:
            return torch.zeros_like(value)  # the all-reduce adds rank 0's copy once
        return value  # replicated: norms, router, positions

    def _vocab_slice(self, value: torch.Tensor) -> torch.Tensor:
        rows = value[self.vocab.start:self.vocab.stop]
        if rows.shape[0] < self.vocab_rows:  # the last rank's padding rows: never the argmax (see collectives)
            rows = torch.cat((rows, rows.new_zeros(self.vocab_rows - rows.shape[0], *rows.shape[1:])))
        return rows

    def slice_packed(self, name: str, packed):
        """This rank's part of a packed weight (rung.quant.formats.Packed) the loader kept quantized
        (GGUF blocks): rows select directly; a row-parallel layer's columns split on group bounds."""
        from rung.quant.formats import Packed

        c = self.config
        if self.world == 1:
            return packed
        leaf = _leaf(name)
        if name in ("embed.weight", "lm_head.weight"):
            rows = torch.arange(self.vocab.start, min(self.vocab.stop, packed.shape[0]))
            p = packed.rows(rows)
            if len(rows) < self.vocab_rows:
                pad = self.vocab_rows - len(rows)
                grow = lambda t: None if t is None else torch.cat((t, t.new_zeros(pad, *t.shape[1:])))  # noqa: E731
                p = Packed(p.fmt, grow(p.data), (self.vocab_rows, p.shape[1]), p.group, grow(p.scale), grow(p.offset))
            return p
        if leaf == "attn.qkv_proj.weight":
            return packed.rows(self._qkv_rows())
        if leaf == "mlp.gate_up_proj.weight":
            return packed.rows(self._half_rows(c.intermediate_size))
        if leaf == "mlp.up_proj.weight":
            return packed.rows(torch.arange(c.intermediate_size)[self._split(c.intermediate_size)])
        if leaf == "attn.o_proj.weight":
            return packed_columns(packed, self.heads.start * c.head_dim, self.heads.stop * c.head_dim)
        if leaf == "mlp.down_proj.weight":
            cols = self._split(c.intermediate_size)
            return packed_columns(packed, cols.start, cols.stop)
        raise ShardError(f"{name}: no tensor-parallel rule for a packed weight")


ROW_PARALLEL_BIASES = ("attn.o_proj.bias", "mlp.down_proj.bias", "mlp.down_bias")
SPLIT = {"embed.weight", "lm_head.weight", "attn.qkv_proj.weight", "attn.qkv_proj.bias", "attn.o_proj.weight",
         "attn.sinks", "mlp.gate_up_proj.weight", "mlp.gate_up_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias",
         "mlp.down_proj.weight", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.gate_bias", "mlp.up_bias",
         *ROW_PARALLEL_BIASES}
# the same on every rank: norms over the hidden size, the router, learned positions
REPLICATED = {"attn_norm.weight", "attn_norm.bias", "mlp_norm.weight", "mlp_norm.bias", "post_attn_norm.weight",
              "post_mlp_norm.weight", "final_norm.weight", "final_norm.bias", "embed_norm.weight", "embed_norm.bias",
              "mlp.router.weight", "mlp.router.bias", "pos_embed.weight"}
PER_HEAD = {"attn.q_norm.weight", "attn.k_norm.weight"}  # replicated only while they are one head_dim vector


def check_shardable(plan: ShardPlan, full_model) -> None:
    """Every parameter of the full model has a rule here: a family added later whose parameter has
    none (a norm over the whole q projection, a latent attention) is refused by name rather than
    split wrongly."""
    if plan.world == 1:
        return
    for name, p in full_model.named_parameters():
        leaf = _leaf(name)
        if leaf in SPLIT or leaf in REPLICATED:
            continue
        if leaf in PER_HEAD and tuple(p.shape) == (plan.config.head_dim,):
            continue
        raise ShardError(f"{plan.config.model_type}: parameter {name} {list(p.shape)} has no tensor-parallel rule; "
                         "this family cannot be split over ranks yet")


def _leaf(name: str) -> str:
    """``layers.3.attn.o_proj.weight`` → ``attn.o_proj.weight``."""
    return re.sub(r"^layers\.\d+\.", "", name)


def packed_columns(packed, start: int, stop: int):
    """Columns [start, stop) of a packed matrix; both on the format's group boundaries."""
    from rung.quant.formats import Packed

    if packed.fmt == "f32":
        return Packed("f32", packed.data[:, start:stop].contiguous(), (packed.shape[0], stop - start))
    per_byte = 2 if packed.fmt == "q4" else 1
    if packed.group in (None, packed.shape[1]):  # one scale per row: it holds for any columns of the row
        return Packed(packed.fmt, packed.data[:, start // per_byte:stop // per_byte].contiguous(),
                      (packed.shape[0], stop - start), stop - start, packed.scale, packed.offset)
    group = packed.group
    if start % group or stop % group:
        raise ShardError(f"a {packed.fmt} weight in groups of {group} cannot split its columns at {start}:{stop}; "
                         "choose a tensor_parallel_size that splits on group boundaries")
    cut = lambda t, unit: None if t is None else t[:, start // unit:stop // unit].contiguous()  # noqa: E731
    return Packed(packed.fmt, cut(packed.data, per_byte), (packed.shape[0], stop - start), packed.group,
                  cut(packed.scale, group), cut(packed.offset, group))


def sharded_meta_decoder(plan: ShardPlan):
    """This rank's Decoder on the meta device: its heads, widths and vocabulary rows. Its config
    says the full vocabulary (the gathered logits' width) and this rank's heads and widths."""
    from rung.model.attention import alibi_slopes
    from rung.model.decoder import meta_decoder

    check_shardable(plan, meta_decoder(plan.config))
    local = plan.local_config()
    model = meta_decoder(dataclasses.replace(local, vocab_size=plan.vocab_rows))
    model.config = local
    if plan.config.positions == "alibi":  # slopes depend on the head count: the full model's, sliced
        slopes = alibi_slopes(plan.config.num_heads)[plan.heads.start:plan.heads.stop]
        for block in model.layers:
            block.attn.slopes = slopes
    return model
