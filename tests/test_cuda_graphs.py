"""The static-shape decode path that CUDA graphs capture (engine/cuda_graphs.py), run eagerly on
the CPU: the same tokens as the engine's own steps, padding rows harmless, no block lost."""

from __future__ import annotations

import pytest

from rung.engine.cuda_graphs import DecodeGraphs, unsupported
from rung.engine.engine import Engine, EngineConfig

from test_engine import GREEDY, all_blocks_free, prompts


def run(pair, ps, static: bool):
    model, tokenizer = pair
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=96, max_seqs=6, max_batch_tokens=32))
    assert engine.graphs is None  # CPU: never on by itself
    if static:
        engine.graphs = DecodeGraphs(model, engine.pool, engine.max_model_len, engine.config.max_seqs, capture=False)
    out = engine.run([(p, GREEDY) for p in ps])
    return engine, [seqs[0].output_ids for seqs in out.values()]


@pytest.mark.parametrize("which", ["llama", "gpt_oss"])
def test_static_decode_path_gives_the_engines_tokens(which, request):
    pair = request.getfixturevalue(which)
    ps = prompts(5, pair[0].config.vocab_size)  # 5 rows in the 6-row bucket: one padding row
    _, want = run(pair, ps, static=False)
    engine, got = run(pair, ps, static=True)
    assert got == want
    assert engine.graphs.steps >= 9  # the decode steps ran on the static path
    assert engine.graphs.bucket(5) == 6 and engine.graphs.bucket(7) is None
    assert all_blocks_free(engine)


def test_models_with_host_work_in_the_forward_are_not_captured(llama):
    import dataclasses

    model, _ = llama
    assert unsupported(model) is None
    alibi = type("M", (), {"config": dataclasses.replace(model.config, positions="alibi"), "rotaries": {}})()
    assert "alibi" in unsupported(alibi)
