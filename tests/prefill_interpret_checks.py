"""Run under TRITON_INTERPRET=1 (tests/test_prefill_attention.py starts it in a subprocess): the
FlashAttention-2 prefill kernel over the paged pool against paged_attention_ref, and a model's
chunked prefill through PagedStep (SDPA for the fresh chunk, the flash kernel for the chunks that
continue from cached blocks, the packed kernel for a short one) against the plain model. Prints
one line per check and exits non-zero on the first miss."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

from interpret import check, rel  # noqa: E402, F401

from rung.kernels import paged_attention as pa  # noqa: E402
from rung.kernels import triton_attention  # noqa: E402


def flash_checks(g) -> None:
    """Chunks continuing from cached blocks (start > 0), a fresh one, a one-token one; GQA 4:1;
    windows shorter than a tile and longer; sinks; a softcap; head_dim not a power of two; tiles
    of 16 tokens × 8-key steps so that every loop (window edge, bulk, diagonal) runs."""
    hq, hkv, bs, blocks = 8, 2, 4, 64
    config = (16, 8, 4, 1)  # BLOCK_M, BLOCK_N, warps, stages
    for d, dt in ((16, torch.float32), (24, torch.float32), (16, torch.float16)):
        k_pool = torch.randn(blocks * bs + 1, hkv, d, generator=g).to(dt)
        v_pool = torch.randn(blocks * bs + 1, hkv, d, generator=g).to(dt)
        tables = torch.stack([torch.randperm(blocks, generator=g)[:24] for _ in range(3)]).to(torch.int32)
        sinks = torch.randn(hq, generator=g)
        layout = [(0, 37, 0), (37, 1, 1), (38, 20, 2)]  # (first token, count, table row)
        starts = [50, 70, 0]
        pos = torch.cat([torch.arange(s, s + n) for (_, n, _), s in zip(layout, starts)])
        rows = torch.cat([torch.full((n,), r) for _, n, r in layout])
        q = torch.randn(pos.numel(), hq, d, generator=g).to(dt)
        tiles = pa.chunk_tiles(layout, config[0], "cpu")
        for window, sk, cap in ((None, None, None), (9, sinks, None), (40, None, 5.0), (None, sinks, 2.0)):
            got = triton_attention.flash_prefill_attention(q, k_pool, v_pool, tables, pos, tiles, bs, window, sk,
                                                           0.3, softcap=cap, config=config)
            want = pa.paged_attention_ref(q, k_pool, v_pool, tables, rows, pos, bs, window, sk, 0.3, softcap=cap)
            tol = 1e-5 if dt == torch.float32 else 2e-3
            check(f"flash prefill d={d} {dt} window={window} sinks={sk is not None} softcap={cap}", got, want, tol)


def engine_checks(g) -> None:
    """A float16 Qwen3-shaped model, kernels attached, prefilling 40 tokens in chunks of 24 + 16
    (SDPA_MIN_TOKENS lowered so the first, fresh chunk takes SDPA; the second continues from the
    pool through the flash kernel) and then 3 (the packed kernel), against the plain model."""
    from rung.config import ModelConfig
    from rung.engine.paged import Chunk, KVPool, PagedStep
    from rung.kernels.rewrite import attach_kernels
    from rung.model import Decoder

    raw = dict(model_type="qwen3", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Decoder(ModelConfig.from_hf(raw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model = model.half()
    ids = torch.randint(0, 96, (1, 43), generator=g)
    with torch.no_grad():
        want = model(ids)[0]  # plain: SDPA over the whole sequence
        attach_kernels(model)
        pa.SDPA_MIN_TOKENS = 8
        pa.FLASH_MIN_TOKENS = 8
        import rung.engine.paged as paged
        paged.SDPA_MIN_TOKENS = 8
        pool = KVPool(model.config, 16, 4, torch.float16)
        table = [list(range(11))] * len(pool.groups)
        kinds = []
        choose = paged.prefill_kernel
        paged.prefill_kernel = lambda *a, **k: kinds.append(choose(*a, **k)) or kinds[-1]
        got = []
        for start, n in ((0, 24), (24, 16), (40, 3)):
            step = PagedStep(pool, [Chunk(table, start, n)], "cpu")
            got.append(model.logits(model.hidden_states(ids[:, start:start + n], step)[0]))
        paged.prefill_kernel = choose
    per_chunk = [kinds[i * 2] for i in range(3)]  # two layers a chunk
    if per_chunk != ["sdpa", "flash", "packed"]:
        sys.exit(f"FAIL chunked prefill took {kinds}")
    check("chunked prefill sdpa → flash → packed against the plain model", torch.cat(got), want, 2e-3)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    flash_checks(g)
    engine_checks(g)
    print("prefill kernels agree with their references")
