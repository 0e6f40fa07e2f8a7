"""The KV cache seam, and its simplest implementation.

The model talks to a cache through three calls, so the engine's paged cache plugs in unchanged:
``positions(t, device)`` (absolute positions of this step's t tokens), ``attend(layer, q, k, v,
window, scale, sinks, slopes[, softcap=])`` (store the step's keys and values, attend over everything the
queries may see) and ``advance(t)`` once all layers have run. Latent attention (DeepSeek's MLA,
model/mla.py) stores its latent and RoPE key part instead: ``attend_latent(layer, q_nope, q_rope,
latent, k_rope, mla)``, calling back ``mla.absorbed`` for a decode step, ``mla.expanded`` otherwise.

``KVCache`` keeps contiguous per-layer keys and values for a batch decoded in lockstep.
"""

from __future__ import annotations

import torch

from rung.model.attention import attend, attention_bias


class KVCache:
    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # tokens stored per sequence
        self._biases: dict = {}  # per step: one mask per (window, exact)

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.length, self.length + t, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [batch, kv_heads, new, head_dim] → all keys/values of the layer so far."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat((self.keys[layer], k), dim=2)
            self.values[layer] = torch.cat((self.values[layer], v), dim=2)
        return self.keys[layer], self.values[layer]

    def attend(self, layer, q, k, v, window, scale, sinks, slopes, softcap=None) -> torch.Tensor:
        k, v = self.update(layer, k, v)
        key = (window, sinks is not None)
        if key not in self._biases:
            t = q.shape[2]
            q_pos = self.positions(t, q.device)
            k_pos = torch.arange(self.length + t, device=q.device)
            self._biases[key] = attention_bias(q_pos, k_pos, window, slopes, q.dtype, exact=sinks is not None)
        return attend(q, k, v, self._biases[key], scale, sinks, softcap)

    def attend_latent(self, layer, q_nope, q_rope, latent, k_rope, mla) -> torch.Tensor:
        """MLA: latent [b, 1, t, r] and k_rope [b, 1, t, dr] are kept where keys and values are."""
        latent, k_rope = self.update(layer, latent, k_rope)
        t = q_nope.shape[2]
        if (None, False) not in self._biases:
            q_pos = self.positions(t, q_nope.device)
            k_pos = torch.arange(self.length + t, device=q_nope.device)
            self._biases[(None, False)] = attention_bias(q_pos, k_pos, None, None, q_nope.dtype)
        run = mla.absorbed if t == 1 else mla.expanded
        return run(q_nope, q_rope, latent, k_rope, self._biases[(None, False)])

    def fork(self) -> "KVCache":
        """An independent continuation sharing the stored prefix (update never writes in place)."""
        other = KVCache(len(self.keys))
        other.keys, other.values, other.length = list(self.keys), list(self.values), self.length
        return other

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (speculative decoding drops rejected drafts)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :length], v[:, :, :length]
        self.length = min(self.length, length)
        self._biases.clear()

    def advance(self, new: int) -> None:
        self.length += new
        self._biases.clear()
