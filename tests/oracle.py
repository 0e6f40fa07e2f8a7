"""transformers as the oracle: tiny random models, perturbed, saved, reloaded by rung, compared."""

from __future__ import annotations

import torch

import rung

TOL = 1e-4


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """transformers initialises norms to 1 and biases and sinks to 0: move every parameter so a
    missing bias, sink or norm weight cannot pass unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def hf_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    return perturb(model, seed)


def save(model, folder, **kwargs) -> str:
    model.save_pretrained(folder, **kwargs)
    return str(folder)


def ids_for(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed + 31 * seq + batch))


@torch.no_grad()
def max_logit_diff(reference, model, shapes) -> float:
    """Largest |Δlogit| over batches of the given (batch, seq) shapes, run in increasing length
    (transformers' dynamic NTK keeps state across calls)."""
    worst = 0.0
    vocab = model.config.vocab_size
    for b, t in sorted(shapes, key=lambda s: s[1]):
        ids = ids_for(vocab, b, t)
        expected = reference(ids).logits.float()
        got = model(ids)
        assert got.shape == (b, t, vocab)
        worst = max(worst, (expected - got).abs().max().item())
    return worst


@torch.no_grad()
def cached_decode_diff(model, batch: int = 2, seq: int = 12, prefill: int = 5) -> float:
    """Prefill, then one token at a time through the KV cache, against one full forward pass."""
    ids = ids_for(model.config.vocab_size, batch, seq, seed=7)
    full = model(ids)
    cache = model.new_cache()
    steps = [model(ids[:, :prefill], cache)]
    for t in range(prefill, seq):
        steps.append(model(ids[:, t:t + 1], cache))
    return (torch.cat(steps, dim=1) - full).abs().max().item()


def check_family(config, tmp_path, shapes=((1, 1), (2, 7), (3, 19)), seed: int = 0, decode: bool = True):
    reference = hf_model(config, seed)
    folder = save(reference, tmp_path / "model")
    model = rung.load_model(folder)
    diff = max_logit_diff(reference, model, shapes)
    assert diff < TOL, f"logits differ from transformers by {diff}"
    if decode:
        d = cached_decode_diff(model)
        assert d < TOL, f"cached decoding differs from the full forward pass by {d}"
    return reference, model


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_model(folder, config_class=None, **config):
    """A tiny random Llama (or ``config_class``) with a real byte-level BPE tokenizer and a ChatML
    template, saved as a Hugging Face folder."""
    import json

    import transformers as tf
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    corpus = ["Hello world, the quick brown fox jumps over the lazy dog.", "Bonjour à tous — 你好，世界 🙂",
              "def f(x):\n    return x"]
    bpe.train_from_iterator(corpus * 20, vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            min_frequency=1)
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False}))
    base = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=bpe.get_vocab_size(), max_position_embeddings=96, eos_token_id=bpe.token_to_id("<|im_end|>"))
    hf_model((config_class or tf.LlamaConfig)(**{**base, **config})).save_pretrained(folder)
    return folder
