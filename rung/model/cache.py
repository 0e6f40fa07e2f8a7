"""The simplest KV cache: contiguous per-layer keys and values for a batch decoded in lockstep.

This is the seam the engine's paged cache plugs into: the model only calls ``update`` (store this
step's keys and values, get back everything the layer may attend to, with the keys' absolute
positions) and reads ``length`` before a step and calls ``advance`` after it.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # tokens stored per sequence

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [batch, kv_heads, new, head_dim] → all keys/values of the layer so far."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat((self.keys[layer], k), dim=2)
            self.values[layer] = torch.cat((self.values[layer], v), dim=2)
        return self.keys[layer], self.values[layer]

    def key_positions(self, new: int, device: torch.device) -> torch.Tensor:
        """Absolute positions of the keys a step of ``new`` tokens attends to: [length + new]."""
        return torch.arange(self.length + new, device=device)

    def fork(self) -> "KVCache":
        """An independent continuation sharing the stored prefix (update never writes in place)."""
        other = KVCache(len(self.keys))
        other.keys, other.values, other.length = list(self.keys), list(self.values), self.length
        return other

    def advance(self, new: int) -> None:
        self.length += new
