"""The decoder: small components chosen by ModelConfig, in plain PyTorch: the reference. Knows nothing of
the engine or of devices; rung/kernels/rewrite.py attaches the fast modules from outside."""

from rung.model.cache import KVCache
from rung.model.decoder import Decoder

__all__ = ["Decoder", "KVCache"]
