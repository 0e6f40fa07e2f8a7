"""The collectives of a tensor-parallel model, attached from outside as forward hooks (the model in
rung/model/ stays plain and knows nothing of ranks).

- after each row-parallel layer (attention's o_proj, a dense MLP's down_proj, a whole MoE block):
  one all-reduce adds the ranks' partial sums;
- the vocab-parallel embedding: each rank looks up the ids in its rows (others read row 0 and are
  zeroed), then one all-reduce;
- the vocab-parallel LM head: each rank's logits [.., vocab / world] are all-gathered and the
  padding columns dropped, so every caller sees the full vocabulary.

Hooks go on the model's final modules, after packing (rung/quant/rewrite.py replaces layers) and
kernel attachment (which changes classes, not objects), so they are installed last.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from rung.distributed.shard import ShardPlan


def _all_reduce(module, args, output):
    dist.all_reduce(output)
    return output


def install_collectives(model: nn.Module, plan: ShardPlan) -> nn.Module:
    """In place; returns the model (a no-op for one rank)."""
    if plan.world == 1:
        return model
    for block in model.layers:
        block.attn.o_proj.register_forward_hook(_all_reduce)
        mlp = block.mlp
        target = mlp if getattr(mlp, "router", None) is not None else mlp.down_proj  # MoE: the whole block
        target.register_forward_hook(_all_reduce)
    _vocab_parallel_embedding(model.embed, plan)
    _gathered_logits(model, plan)
    model.tensor_parallel = plan
    return model


def _vocab_parallel_embedding(embed: nn.Module, plan: ShardPlan) -> None:
    start, rows = plan.vocab.start, plan.vocab_rows
    outside: list[torch.Tensor] = []  # the ids of this call that other ranks hold

    def local_ids(module, args):
        ids = args[0] - start
        mask = (ids < 0) | (ids >= rows)
        outside[:] = [mask]
        return (ids.masked_fill(mask, 0),) + tuple(args[1:])

    def reduce(module, args, output):
        output = output.masked_fill(outside[0][..., None], 0)
        dist.all_reduce(output)
        return output

    embed.register_forward_pre_hook(local_ids)
    embed.register_forward_hook(reduce)


def _gathered_logits(model: nn.Module, plan: ShardPlan) -> None:
    local_logits = model.logits  # the bound method: this rank's columns
    vocab = plan.config.vocab_size

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        part = local_logits(hidden).contiguous()
        parts = [torch.empty_like(part) for _ in range(plan.world)]
        dist.all_gather(parts, part)
        return torch.cat(parts, dim=-1)[..., :vocab]

    model.logits = logits  # an instance attribute: Decoder.forward calls self.logits
