"""The decoder: small components chosen by ModelConfig. Knows nothing of the engine."""

from rung.model.cache import KVCache
from rung.model.decoder import Decoder

__all__ = ["Decoder", "KVCache"]
