"""CUDA check: the decoder and the engine give on the GPU what they give on the CPU.

Tiny random models (Llama, gpt-oss with windows and sinks, Qwen3-MoE; issue 21's Qwen2.5, Mistral,
Mixtral, Phi-3 with LongRoPE, Gemma 2 with soft-capping, OLMo 2 and SmolLM3; DeepSeek-V3 and
V2-Lite with latent attention, from the Hugging Face folder and from the GGUF llama.cpp's converter
would write), float32: logits against transformers on the GPU, engine greedy tokens (a batch of 8,
chunked prefill, prefix cache) against the CPU engine. Prints a short table; exits non-zero on a
mismatch. The Qwen3-MoE (hidden 48, experts 20 wide, 6 experts, top-3) is the shape whose float32
MoE tile once needed 240 KB of shared memory on an H200 (kernels/moe_tiles.py).

    PYTHONPATH=.:tests python3 benchmarks/cuda_check.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from oracle import ids_for, tiny_chat_model  # noqa: E402
from deepseek_gguf import write as write_deepseek_gguf  # noqa: E402

from rung.engine.engine import Engine, EngineConfig  # noqa: E402
from rung.engine.sampling_params import SamplingParams  # noqa: E402
from rung.text import load_tokenizer  # noqa: E402
from rung.weights.loader import load_model  # noqa: E402


def check(name, config_class, gguf=None, **config):
    """``gguf(path, model)``: load rung's models from that GGUF of the transformers model instead."""
    folder = tiny_chat_model(Path(tempfile.mkdtemp()), config_class, max_position_embeddings=256, **config)
    tok = load_tokenizer(folder)
    ref = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    path = folder
    if gguf is not None:
        path = folder / "model.gguf"
        gguf(path, ref)
    gpu, cpu = load_model(path, device="cuda"), load_model(path)
    ref = ref.cuda()
    ids = ids_for(gpu.config.vocab_size, 2, 40).cuda()
    with torch.no_grad():
        diff = (gpu(ids) - ref(ids).logits).abs().max().item()
    prompts = [ids_for(gpu.config.vocab_size, 1, 5 + 7 * i, seed=i)[0].tolist() for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = []
    for model in (gpu, cpu):
        engine = Engine(model, tok, EngineConfig(block_size=8, num_blocks=128, max_batch_tokens=64))
        res = engine.run([(p, params) for p in prompts])
        outs.append([s[0].output_ids for s in res.values()])
    same = sum(a == b for a, b in zip(*outs))
    return name, diff, same, len(prompts)


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    rows = [check("llama", tf.LlamaConfig),
            check("gpt-oss", tf.GptOssConfig, head_dim=12, num_local_experts=4, num_experts_per_tok=2,
                  intermediate_size=32, sliding_window=5),
            check("qwen3-moe", tf.Qwen3MoeConfig, head_dim=12, moe_intermediate_size=20, num_experts=6,
                  num_experts_per_tok=3, norm_topk_prob=True)]
    # issue 21 (families): windows of 6 are shorter than most of the prompts
    rows += [check("qwen2.5", tf.Qwen2Config),
             check("mistral", tf.MistralConfig, sliding_window=6),
             check("mixtral", tf.MixtralConfig, num_local_experts=4, num_experts_per_tok=2, sliding_window=6),
             check("phi3", tf.Phi3Config, pad_token_id=0, rope_parameters={
                 "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                 "original_max_position_embeddings": 32, "short_factor": [1.0, 1.5, 2.0], "long_factor": [2.0, 4.0, 6.0]}),
             check("gemma2", tf.Gemma2Config, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
                   attn_logit_softcapping=3.0, final_logit_softcapping=10.0, num_hidden_layers=3),
             check("olmo2", tf.Olmo2Config, pad_token_id=0),
             check("smollm3", tf.SmolLM3Config, num_hidden_layers=4, pad_token_id=0)]
    # DeepSeek (issue 21): the paged pool holds latents, decode attends in the absorbed form
    mla = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
               n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, first_k_dense_replace=1,
               num_hidden_layers=3)
    v3 = dict(mla, q_lora_rank=24, n_group=4, topk_group=2, n_shared_experts=1)
    lite = dict(mla, q_lora_rank=None, n_shared_experts=2)
    rows += [check("deepseek-v3", tf.DeepseekV3Config, **v3),
             check("deepseek-v2-lite", tf.DeepseekV2Config, **lite),
             check("deepseek-v3 gguf", tf.DeepseekV3Config, gguf=write_deepseek_gguf, **v3),
             check("deepseek-v2-lite gguf", tf.DeepseekV2Config, gguf=write_deepseek_gguf, **lite)]
    print(f"{'model':<22}{'max |Δlogit| vs transformers (cuda)':>38}{'engine cuda == cpu':>20}")
    for name, diff, same, n in rows:
        print(f"{name:<22}{diff:>38.2e}{same:>15}/{n}")
    sys.exit(0 if all(d < 1e-3 and s == n for _, d, s, n in rows) else 1)


if __name__ == "__main__":
    main()
