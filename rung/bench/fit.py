"""Which presets and formats fit a memory budget, before measuring anything (``rung fit``).

    needed = weights (rung.describe, per format)
           + KV cache of ``concurrency`` sequences at ``context`` tokens (sliding layers capped at
             their window), at 2 bytes per value (4 for fp32 weights: rung keeps KV at the model's dtype)
           + runtime overhead: a fixed 0.5 GB for the framework and allocator slack, plus activations
             of one prefill chunk (512 tokens) and one float32 logits row per sequence

With ``gpus`` N (tensor parallelism, rung/distributed/shard.py) every figure is per GPU: the
weights split N ways except the key/value projections that MQA/GQA replicate when there are fewer
key/value heads than GPUs; the KV cache holds each rank's key/value heads; the runtime overhead
is per process. A model whose heads or widths do not split N ways does not fit.

An estimate to shortlist candidates; ``rung bench`` measures the real peak. Formats: fp32 and bf16
for every model, int8 and int4 (rung's weight-only quantization), and mxfp4 where a family ships it
(gpt-oss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rung.config import ModelConfig, preset_names
from rung.describe import describe, kv_cache_bytes

RUNTIME_BYTES = 500 * 10**6
PREFILL_CHUNK = 512  # EngineConfig.max_batch_tokens
FIT_FORMATS = ("fp32", "bf16", "int8", "int4", "mxfp4")


@dataclass(frozen=True)
class Fit:
    model: str
    format: str
    total_params: int
    weight_bytes: int
    kv_bytes: int
    overhead_bytes: int
    max_context: int | None
    gpus: int = 1  # with more than one, the byte figures are per GPU
    splits: bool = True  # heads and widths divide over the GPUs

    @property
    def needed_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes

    def fits(self, budget: int, context: int) -> bool:
        return self.splits and self.needed_bytes <= budget and not self.beyond_context(context)

    def beyond_context(self, context: int) -> bool:
        return self.max_context is not None and context > self.max_context

    def to_dict(self, budget: int, context: int) -> dict:
        return {**asdict(self), "needed_bytes": self.needed_bytes, "fits": self.fits(budget, context),
                "headroom_bytes": budget - self.needed_bytes, "beyond_max_context": self.beyond_context(context)}


def activation_bytes(c: ModelConfig, concurrency: int) -> int:
    ffn = c.moe.expert_intermediate_size * c.moe.top_k if c.moe else c.intermediate_size
    per_token = 4 * c.hidden_size + 3 * ffn + 2 * max(c.q_width, c.hidden_size)
    return PREFILL_CHUNK * per_token * 4 + concurrency * c.vocab_size * 4


def formats_for(c: ModelConfig) -> tuple[str, ...]:
    return FIT_FORMATS if c.model_type == "gpt_oss" else FIT_FORMATS[:4]


def splits(c: ModelConfig, gpus: int) -> bool:
    """Whether tensor parallelism can split this model over ``gpus`` (rung.distributed.shard's rules)."""
    ffn_ok = c.intermediate_size % gpus == 0 and (c.moe is None or c.moe.expert_intermediate_size % gpus == 0)
    return c.num_heads % gpus == 0 and (c.num_kv_heads % gpus == 0 or gpus % c.num_kv_heads == 0) and ffn_ok


def per_gpu(c: ModelConfig, total_params: int, weights: int, kv: int, gpus: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) of one rank of ``gpus``."""
    if gpus == 1:
        return weights, kv
    local_kv = max(1, c.num_kv_heads // gpus)
    kv_share = local_kv / c.num_kv_heads  # 1/gpus, or more where key/value heads are replicated
    kv_proj = c.num_layers * 2 * c.hidden_size * c.kv_width * weights / max(total_params, 1)
    return int(weights / gpus + kv_proj * (kv_share - 1 / gpus)), int(kv * kv_share)


def plan(context: int, concurrency: int = 1, names: list[str] | None = None, formats: list[str] | None = None,
         gpus: int = 1) -> list[Fit]:
    """Every (preset, format) with its memory figures (per GPU with ``gpus`` > 1), smallest need first."""
    out = []
    for name in names or preset_names():
        d = describe(name, context=context)
        c = d.config
        for fmt in formats_for(c):
            if formats and fmt not in formats:
                continue
            weights = d.total_params * 4 if fmt == "fp32" else d.weight_bytes[fmt]
            kv = kv_cache_bytes(c, context, bytes_per_value=4 if fmt == "fp32" else 2) * concurrency
            weights, kv = per_gpu(c, d.total_params, weights, kv, gpus)
            overhead = RUNTIME_BYTES + activation_bytes(c, concurrency) // gpus
            out.append(Fit(d.name, fmt, d.total_params, weights, kv, overhead, c.max_position_embeddings, gpus,
                           splits(c, gpus)))
    return sorted(out, key=lambda f: (f.needed_bytes, f.model))
