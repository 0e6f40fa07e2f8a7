"""Decode steps as native calls on the CPU (engine/cpu_decode.py) against the engine's PagedStep
path: the same logits and tokens for every packed layout and the families the step covers
(Llama, Qwen3's QK-norm, Gemma 3's sandwich norms and sliding windows), batches of one to
several rows, nothing leaked. (The plain pre-norm families rung has, Llama and SmolLM2, have no windows: the
read plans' windows are checked against PagedStep's on their own.)"""

from __future__ import annotations

import pytest
import torch

from rung.engine.cpu_decode import CpuDecode, unsupported
from rung.engine.engine import Engine, EngineConfig
from rung.engine.paged import Chunk, PagedStep
from rung.engine.sampling_params import SamplingParams
from rung.quant.rewrite import pack_model

from test_engine import all_blocks_free, prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _folder(tmp_path_factory, name, **config):
    from oracle import tiny_chat_model

    # widths that are multiples of 32: what the native kernels take
    return tiny_chat_model(tmp_path_factory.mktemp(name), hidden_size=64, intermediate_size=64,
                           max_position_embeddings=256, **config)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import transformers as tf

    return {"llama": _folder(tmp_path_factory, "llama"), "llama-mha": _folder(tmp_path_factory, "mha", num_key_value_heads=4),
            # QK-norm
            "qwen3": _folder(tmp_path_factory, "qwen3", config_class=tf.Qwen3Config, head_dim=16),
            # QK-norm with an offset gain, sandwich norms, GELU, a scaled embedding, sliding windows of 6
            # (prompts of up to 30 tokens: the window and its dropped blocks matter), local and global RoPE
            "gemma3": _folder(tmp_path_factory, "gemma3", config_class=tf.Gemma3TextConfig, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=24, sliding_window=6,
                              query_pre_attn_scalar=20,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"])}


def packed(folder, fmt):
    from rung.text import load_tokenizer
    from rung.weights.loader import load_model

    model = pack_model(load_model(folder), fmt, None if fmt == "f32" else 32)
    return model, load_tokenizer(folder)


def run(pair, ps, native_steps: bool):
    model, tokenizer = pair
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=96, max_seqs=6, max_batch_tokens=32,
                                                   cpu_decode=native_steps))
    out = engine.run([(p, GREEDY) for p in ps])
    return engine, [seqs[0].output_ids for seqs in out.values()]


@pytest.mark.parametrize("fmt", ["f32", "q8", "q4"])
@pytest.mark.parametrize("which", ["llama", "llama-mha", "qwen3", "gemma3"])
def test_native_decode_steps_give_the_paged_steps_tokens(which, fmt, folders):
    pair = packed(folders[which], fmt)
    assert unsupported(pair[0]) is None
    ps = prompts(5, pair[0].config.vocab_size, hi=30)  # 5 rows in flight: batched decode steps
    ref_engine, want = run(pair, ps, native_steps=False)
    assert ref_engine.cpu_decode is None
    engine, got = run(pair, ps, native_steps=True)
    assert got == want
    assert engine.cpu_decode.steps >= 10  # the decode steps ran natively
    assert all_blocks_free(engine)


def test_native_decode_logits_equal_the_paged_steps(folders):
    model, tokenizer = packed(folders["llama"], "q4")
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=96, max_seqs=6, cpu_decode=False))
    for p in prompts(3, model.config.vocab_size, lo=6, hi=20):
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(8):  # the prefills and a few decode steps
        engine.step()
    batch = engine.scheduler.schedule()
    assert len(batch) == 3 and all(n == 1 for _, n in batch)
    chunks = engine.scheduler.chunks(batch)
    ids = torch.tensor([seq.all_ids[seq.num_computed] for seq, _ in batch])
    with torch.inference_mode():
        want = model.logits(model.hidden_states(ids[None], PagedStep(engine.pool, chunks, "cpu"))[0])
        got = CpuDecode(model, engine.pool).run(ids, chunks)
    assert got.shape == want.shape == (3, model.config.vocab_size)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    # the step embeds the tokens itself (the packed table): an id outside it is refused, not read
    with pytest.raises(ValueError, match="token id outside the embedding table"):
        CpuDecode(model, engine.pool).run(ids + model.config.vocab_size, chunks)


def test_families_outside_the_plain_block_are_named(folders, tmp_path):
    import transformers as tf

    from oracle import tiny_chat_model
    from rung.weights.loader import load_model

    assert "not packed" in unsupported(load_model(folders["llama"]))  # the plain float layout: PagedStep
    assert unsupported(pack_model(load_model(folders["gemma3"]), "f32")) is None
    gpt2 = tiny_chat_model(tmp_path, tf.GPT2Config, n_embd=64, n_layer=2, n_head=4, n_positions=96)
    assert "positions" in unsupported(pack_model(load_model(gpt2), "f32"))


def test_read_plans_equal_the_paged_steps_with_a_window_and_dropped_blocks():
    """The native step builds its read plans from the block tables itself; they must be PagedStep's,
    sliding windows (and the blocks a window dropped, None in a table) included. Gemma 3's layout:
    full attention and sliding windows of 512."""
    import numpy as np

    from rung import native
    from rung.config import ModelConfig
    from rung.engine import cpu_decode
    from rung.engine.paged import KVPool

    config = ModelConfig.from_preset("gemma3-270m")
    pool = KVPool(config, 120, 16, torch.float32)
    assert [g.window for g in pool.groups] == [None, 512]
    g = torch.Generator().manual_seed(0)
    chunks = []
    for start in (700, 37, 530):
        n = start // 16 + 1
        full = torch.randperm(120, generator=g)[:n].tolist()
        dropped = max(0, (start - 511) // 16)  # blocks wholly before the window: given back
        sliding = [None] * dropped + torch.randperm(120, generator=g)[: n - dropped].tolist()
        chunks.append(Chunk([full, sliding], start, 1))
    st = native.Step(len(chunks))
    st.block = 16
    starts = np.array([ch.start for ch in chunks], dtype=np.int64)
    tables = [cpu_decode._table([ch.tables[grp] for ch in chunks]) for grp in range(2)]
    st.starts, st.starts_bytes = starts.ctypes.data, starts.nbytes
    for grp, group in enumerate(pool.groups):
        st.tables[grp], st.width[grp], st.window[grp] = tables[grp].ctypes.data, tables[grp].shape[1], group.window or 0
        st.tables_bytes[grp] = tables[grp].nbytes
    step = PagedStep(pool, chunks, "cpu")
    for grp in range(2):
        idx, lengths, slots = step.decode_plan(grp)
        got_idx, got_lengths, got_slots = native.read_plan(st, 2, grp)
        assert torch.equal(got_lengths, lengths) and torch.equal(got_slots, slots)
        for row, n in enumerate(lengths.tolist()):  # the padding past each row's length is never read
            assert torch.equal(got_idx[row, :n], idx[row, :n])
    assert native.read_plan(st, 2, 0)[1].tolist() == [701, 38, 531]
    assert native.read_plan(st, 2, 1)[1].tolist() == [512, 38, 512]
    st.width[0] = 3  # a table that does not reach position 700: refused, not read past
    with pytest.raises(ValueError, match="does not reach its row's position"):
        native.read_plan(st, 2, 0)


@pytest.mark.parametrize("fmt", ["f32", "q4"])
def test_a_decode_batch_above_max_m_runs_natively_in_parts_with_each_rows_own_tokens(fmt, folders):
    from rung import native

    pair = packed(folders["llama"], fmt)
    ps = prompts(native.MAX_M + 4, pair[0].config.vocab_size, hi=12)
    model, tokenizer = pair
    wide = Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=256, max_seqs=len(ps), max_batch_tokens=512))
    out = wide.run([(p, GREEDY) for p in ps])
    got = [seqs[0].output_ids for seqs in out.values()]
    assert wide.cpu_decode.steps >= GREEDY.max_tokens - 1  # every decode step native, the 20-row ones included
    assert all_blocks_free(wide)
    if fmt != "f32":  # q4: a 20-prompt prefill (over 16 rows) takes the dequantized float path and one
        return  # prompt alone the int8-activation kernel, so greedy tokens may part for that reason
    # each row's tokens are its own: the same as that prompt decoded alone (natively, one row a step)
    alone = Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=256, max_seqs=1, max_batch_tokens=512))
    want = [seqs[0].output_ids for seqs in alone.run([(p, GREEDY) for p in ps]).values()]
    assert got == want
