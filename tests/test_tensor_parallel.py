"""Tensor parallelism on the CPU (gloo, 2 processes): every family's tiny model gives the same
greedy tokens as one process, and logits equal to 1e-5 in float32; a rank that dies takes the
group down with a clear error and no hang."""

from __future__ import annotations

import time

import pytest
import torch
import transformers as tf

from oracle import tiny_chat_model
from rung.distributed.shard import ShardError, ShardPlan
from rung.engine.engine import EngineDeadError
from rung.engine.sampling_params import SamplingParams
from rung.llm import LLM

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [250, 3], list(range(40, 75))]  # the last one runs past the windows

FAMILIES = {
    "llama_gqa": (None, dict()),
    "llama_mqa": (None, dict(num_key_value_heads=1)),
    "gpt_oss_windows_sinks_moe": (tf.GptOssConfig, dict(
        hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, num_local_experts=8, num_experts_per_tok=3, sliding_window=5)),
    "qwen3_moe_renormalised": (tf.Qwen3MoeConfig, dict(
        moe_intermediate_size=40, num_experts=6, num_experts_per_tok=2, head_dim=12, norm_topk_prob=True)),
    "qwen3_moe_not_renormalised": (tf.Qwen3MoeConfig, dict(
        moe_intermediate_size=40, num_experts=6, num_experts_per_tok=2, head_dim=12, norm_topk_prob=False)),
    "gemma3": (tf.Gemma3TextConfig, dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1,
        head_dim=24, sliding_window=6, query_pre_attn_scalar=20, final_logit_softcapping=5.0)),
}


def _compare(spec: str, prompts=PROMPTS) -> None:
    one = LLM(spec)
    expected = [o.outputs[0].token_ids for o in one.generate(prompts, GREEDY)]
    ids = torch.tensor([prompts[0]])
    with torch.inference_mode():
        reference = one.model(ids)
    with LLM(spec, tensor_parallel_size=2) as two:
        got = [o.outputs[0].token_ids for o in two.generate(prompts, GREEDY)]
        with torch.inference_mode():
            logits = two.tp_group.forward(two.model, ids)
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() < 1e-5
    assert got == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_match_one_process(family, tmp_path):
    config_class, config = FAMILIES[family]
    _compare(str(tiny_chat_model(tmp_path, config_class, **config)))


def test_packed_int4_shards_match_one_process(tmp_path):
    # widths that are multiples of 32 on every rank: the int4 groups are the same as unsplit
    folder = tiny_chat_model(tmp_path, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    _compare(f"{folder}@int4")


def test_a_dead_rank_takes_the_group_down_without_a_hang(tmp_path):
    folder = tiny_chat_model(tmp_path)
    llm = LLM(str(folder), tensor_parallel_size=2)
    try:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))  # the group works
        worker = llm.tp_group.processes[0]
        worker.kill()
        worker.join(timeout=10)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="tensor parallel rank 1 exited"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
        assert time.monotonic() - start < 10
        with pytest.raises(EngineDeadError):  # and it stays down
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
    finally:
        llm.shutdown()


def test_a_split_the_heads_do_not_allow_is_refused_before_any_worker_hangs(tmp_path):
    folder = tiny_chat_model(tmp_path)  # 4 query heads, 2 kv heads
    start = time.monotonic()
    with pytest.raises(ShardError, match="tensor_parallel_size 3 does not divide num_heads 4"):
        LLM(str(folder), tensor_parallel_size=3)
    assert time.monotonic() - start < 60


def test_shard_plan_replicates_kv_heads_when_fewer_than_ranks():
    from rung.config import ModelConfig

    config = ModelConfig(model_type="llama", vocab_size=11, hidden_size=32, num_layers=1, num_heads=8,
                         num_kv_heads=2, head_dim=4, intermediate_size=8)
    plans = [ShardPlan(config, r, 4) for r in range(4)]
    assert [list(p.heads) for p in plans] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # query head h reads kv head h // 4: ranks 0-1 hold kv head 0, ranks 2-3 kv head 1
    assert [list(p.kv_heads) for p in plans] == [[0], [0], [1], [1]]
    assert [p.vocab_rows for p in plans] == [3] * 4  # 11 rows padded to 12
    embed = torch.arange(11.0)[:, None]
    assert plans[3].slice("embed.weight", embed).flatten().tolist() == [9.0, 10.0, 0.0]
    with pytest.raises(ShardError, match="one must divide the other"):
        ShardPlan(config.__class__(**{**config.__dict__, "num_kv_heads": 6, "num_heads": 24}), 0, 4)


def test_rung_serve_with_two_ranks_answers_as_one_process(tmp_path):
    from openai import OpenAI

    from serve_helpers import rung_serve

    folder = tiny_chat_model(tmp_path)
    answers = []
    for tp in ("1", "2"):
        with rung_serve(["-m", str(folder), "--tensor-parallel-size", tp], tmp_path / f"serve{tp}.log",
                        f"rung serve -tp {tp}") as (port, proc):
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
            reply = client.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": "Hello"}],
                                                   max_tokens=8, temperature=0)
            answers.append(reply.choices[0].message.content)
        assert proc.wait(timeout=30) is not None
    assert answers[0] == answers[1]


def test_gguf_q4_blocks_kept_and_split_on_group_bounds_match_one_process(tmp_path):
    """A GGUF's Q4_0 blocks are kept packed and each rank takes its rows (q|k|v, gate|up) or its
    groups of columns (o, down); the 101-row vocabulary pads to 51 rows a rank."""
    from gguf import GGMLQuantizationType as Q

    from oracle import hf_model
    from rung.distributed.workers import TensorParallelGroup
    from rung.weights.loader import load_model
    from test_gguf_convert import write_gguf

    reference = hf_model(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64))
    path = tmp_path / "tiny-q4_0.gguf"
    write_gguf(path, reference, quant=lambda name, a: Q.Q4_0 if a.ndim == 2 and a.shape[1] % 32 == 0 else Q.F32)
    spec = f"{path}@int4"
    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 100]])
    with torch.inference_mode():
        expected = load_model(spec)(ids)
    group, shard = TensorParallelGroup.start(spec, 2)
    try:
        assert shard.layers[0].attn.qkv_proj.fmt == "q4" and shard.layers[0].attn.o_proj.in_features == 32
        with torch.inference_mode():
            got = group.forward(shard, ids)
    finally:
        group.shutdown()
    assert got.shape == expected.shape == (1, 8, 101)
    assert (got - expected).abs().max().item() < 1e-5


def test_rung_bench_runs_a_candidate_over_two_ranks_with_the_same_answers(tmp_path):
    from rung.bench.run import BenchSettings, run_bench
    from rung.bench.suite import suite_from_dict

    folder = str(tiny_chat_model(tmp_path))
    suite = suite_from_dict({"name": "t", "cases": [
        {"id": "a", "prompt": "Hello world", "expect": {"contains": "x"}, "max_tokens": 6},
        {"id": "b", "prompt": "the quick brown fox", "expect": {"contains": "y"}, "max_tokens": 6},
        {"id": "ppl", "text": "The cat sat on the mat.", "expect": {"perplexity": 1e9}}]})
    outputs = []
    for tp in (1, 2):
        settings = BenchSettings(concurrency=2, isolate=False, tensor_parallel_size=tp)
        [run] = run_bench([folder], suite, settings)
        outputs.append([(c.case_id, [s.text for s in c.samples]) for c in run.cases])
        assert ("tensor_parallel_size" in settings.key(suite)) == (tp == 2)
    assert outputs[0] == outputs[1]


def test_a_parameter_without_a_rule_is_refused_by_name():
    """A family whose norm spans the whole q projection (OLMo 2's QK-norm) would be split wrongly
    as a replicated head_dim vector: the plan names it instead."""
    from torch import nn

    from rung.config import ModelConfig
    from rung.distributed.shard import check_shardable
    from rung.model.decoder import meta_decoder

    config = ModelConfig(model_type="llama", vocab_size=11, hidden_size=32, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=8, qk_norm=True)
    model = meta_decoder(config)
    check_shardable(ShardPlan(config, 0, 2), model)  # per-head norms: fine
    model.layers[0].attn.q_norm.weight = nn.Parameter(torch.empty(32, device="meta"))  # over all 4 heads
    with pytest.raises(ShardError, match=r"layers.0.attn.q_norm.weight \[32\] has no tensor-parallel rule"):
        check_shardable(ShardPlan(config, 0, 2), model)
