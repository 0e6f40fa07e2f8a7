"""A small Hugging Face → GGUF converter for the GGUF tests, and transformers' GGUF loader as an oracle.

``write_gguf`` mirrors what llama.cpp's convert_hf_to_gguf.py does to each architecture (tensor
names, the llama Q/K row permutation, Gemma's + 1 on norms, GPT-2's Conv1D transposes, gpt-oss's
split of the interleaved gate/up experts, the llama3 rope_freqs tensor), written here in the
converter's direction so that rung's loader, which undoes it, is checked against an independent
implementation. ``hf_from_gguf`` loads a GGUF with transformers' own GGUF code.
"""

from __future__ import annotations

import contextlib
import functools
import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES

from rung.weights.gguf import read_gguf
from rung.weights.keymaps import _unpermute
from rung.weights.mxfp4 import dequantize_mxfp4, quantize_mxfp4

GGUF_ARCH = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss", "gpt2": "gpt2",
             "gemma3_text": "gemma3"}
# gguf.quants has dequantizers for these but no quantizers: tests write random blocks with sane scales
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# byte offsets of each K-quant block's float16 super-block scale(s) (d, and dmin where present)
_K_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
_K_SCALE = {Q.Q2_K: 4e-3, Q.Q3_K: 1e-3, Q.Q4_K: 1e-4, Q.Q5_K: 5e-5, Q.Q6_K: 2e-5}  # weights of about ±0.1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on two OpenMP threads run about 30 times slower than on one on a 2-core machine
    (and pytest -n 2 already keeps both cores busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- encoding one tensor -------------------------------------------------------------------------


def random_k_blocks(shape: tuple[int, ...], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks for a [..., cols] tensor, with small positive float16 scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (math.prod(shape) // block, size), dtype=np.uint8)
    for offset in _K_SCALE_OFFSETS[qtype]:
        d = rng.uniform(0.5, 1.0, len(raw)).astype(np.float16) * np.float16(_K_SCALE[qtype])
        raw[:, offset:offset + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def encode(array: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, Q | None]:
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F32:
        return array, None
    if qtype == Q.F16:
        return array.astype(np.float16), None
    if qtype in K_QUANTS:
        return random_k_blocks(array.shape, qtype, rng), qtype
    return gguf.quants.quantize(array, qtype), qtype


def default_quant(qtype: Q):
    """Matrices in ``qtype`` where their rows fit its blocks, everything else (norms, biases, sinks) F32."""
    block = GGML_QUANT_SIZES[qtype][0]

    def choose(name: str, array: np.ndarray) -> Q:
        return qtype if array.ndim >= 2 and array.shape[-1] % block == 0 else Q.F32
    return choose


# ---- the converter's direction -----------------------------------------------------------------


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py / conversion/llama.py)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's LlamaModel.generate_extra_tensors: one divisor per frequency (rope_freqs.weight)."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _llama_family_tensors(cfg, sd: dict[str, np.ndarray], fuse_experts: bool) -> list[tuple[str, np.ndarray]]:
    mt = cfg.model_type
    offset = 1.0 if mt == "gemma3_text" else 0.0  # Gemma3Model.norm_shift

    def norm(w):
        return w + offset

    out = [("token_embd.weight", sd["model.embed_tokens.weight"]),
           ("output_norm.weight", norm(sd["model.norm.weight"]))]
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", sd["lm_head.weight"]))
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out.append((b + "attn_norm.weight", norm(sd[p + "input_layernorm.weight"])))
        if mt == "gemma3_text":
            out += [(b + "post_attention_norm.weight", norm(sd[p + "post_attention_layernorm.weight"])),
                    (b + "ffn_norm.weight", norm(sd[p + "pre_feedforward_layernorm.weight"])),
                    (b + "post_ffw_norm.weight", norm(sd[p + "post_feedforward_layernorm.weight"]))]
        elif mt == "gpt_oss":
            out.append((b + "post_attention_norm.weight", sd[p + "post_attention_layernorm.weight"]))
        else:
            out.append((b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]))
        for hf, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            for kind in ("weight", "bias"):
                w = sd.get(f"{p}self_attn.{hf}.{kind}")
                if w is None:
                    continue
                if mt == "llama" and hf in ("q_proj", "k_proj"):
                    w = permute(w, heads if hf == "q_proj" else kv)
                out.append((f"{b}{name}.{kind}", w))
        if p + "self_attn.q_norm.weight" in sd:
            out += [(b + "attn_q_norm.weight", norm(sd[p + "self_attn.q_norm.weight"])),
                    (b + "attn_k_norm.weight", norm(sd[p + "self_attn.k_norm.weight"]))]
        if mt == "gpt_oss":
            e = p + "mlp.experts."
            gate_up = sd[e + "gate_up_proj"].transpose(0, 2, 1)  # [E, 2I, H], gate and up rows interleaved
            bias = sd[e + "gate_up_proj_bias"]
            out += [(b + "attn_sinks.weight", sd[p + "self_attn.sinks"]),
                    (b + "ffn_gate_inp.weight", sd[p + "mlp.router.weight"]),
                    (b + "ffn_gate_inp.bias", sd[p + "mlp.router.bias"]),
                    (b + "ffn_gate_exps.weight", gate_up[:, ::2]), (b + "ffn_up_exps.weight", gate_up[:, 1::2]),
                    (b + "ffn_gate_exps.bias", bias[:, ::2]), (b + "ffn_up_exps.bias", bias[:, 1::2]),
                    (b + "ffn_down_exps.weight", sd[e + "down_proj"].transpose(0, 2, 1)),
                    (b + "ffn_down_exps.bias", sd[e + "down_proj_bias"])]
        elif p + "mlp.gate.weight" in sd:  # Qwen3-MoE: transformers fuses gate | up as [E, 2I, H]
            gate_up, n = sd[p + "mlp.experts.gate_up_proj"], cfg.moe_intermediate_size
            out.append((b + "ffn_gate_inp.weight", sd[p + "mlp.gate.weight"]))
            if fuse_experts:
                out.append((b + "ffn_gate_up_exps.weight", gate_up))
            else:
                out += [(b + "ffn_gate_exps.weight", gate_up[:, :n]), (b + "ffn_up_exps.weight", gate_up[:, n:])]
            out.append((b + "ffn_down_exps.weight", sd[p + "mlp.experts.down_proj"]))
        else:
            for hf, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                for kind in ("weight", "bias"):
                    if f"{p}mlp.{hf}.{kind}" in sd:
                        out.append((f"{b}{name}.{kind}", sd[f"{p}mlp.{hf}.{kind}"]))
    rope = cfg.rope_parameters if isinstance(cfg.rope_parameters, dict) else {}
    if rope.get("rope_type") == "llama3":
        out.append(("rope_freqs.weight", llama3_rope_factors(rope, cfg.head_dim)))
    return out


def _gpt2_tensors(cfg, sd: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    out = [("token_embd.weight", sd["transformer.wte.weight"]),
           ("position_embd.weight", sd["transformer.wpe.weight"]),
           ("output_norm.weight", sd["transformer.ln_f.weight"]), ("output_norm.bias", sd["transformer.ln_f.bias"])]
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", sd["lm_head.weight"]))
    for i in range(cfg.n_layer):
        p, b = f"transformer.h.{i}.", f"blk.{i}."
        # Conv1D weights are [in, out]: the converter transposes them to nn.Linear's [out, in]
        for hf, name, conv in (("ln_1", "attn_norm", False), ("ln_2", "ffn_norm", False),
                               ("attn.c_attn", "attn_qkv", True), ("attn.c_proj", "attn_output", True),
                               ("mlp.c_fc", "ffn_up", True), ("mlp.c_proj", "ffn_down", True)):
            w = sd[f"{p}{hf}.weight"]
            out += [(f"{b}{name}.weight", w.T if conv else w), (f"{b}{name}.bias", sd[f"{p}{hf}.bias"])]
    return out


def _metadata(w: gguf.GGUFWriter, cfg, vocab: int) -> None:
    mt = cfg.model_type
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if mt == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_feed_forward_length(4 * cfg.n_embd)  # what llama.cpp's GPT2Model writes, whatever n_inner is
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    rope = cfg.rope_parameters
    if mt == "gemma3_text":
        rope = rope["full_attention"]
    w.add_context_length(cfg.max_position_embeddings)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_feed_forward_length(cfg.intermediate_size)
    if mt == "llama":
        w.add_vocab_size(vocab)
        w.add_rope_dimension_count(cfg.head_dim)
    else:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if mt == "qwen3_moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if mt == "gpt_oss":
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.intermediate_size)
        w.add_sliding_window(cfg.sliding_window)
    if mt == "gemma3_text":
        w.add_sliding_window(cfg.sliding_window)
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)


def write_gguf(path: Path, model, quant=None, *, fuse_experts: bool = False, seed: int = 0,
               edit=None, metadata: dict | None = None, arch: str | None = None) -> dict[str, tuple[np.ndarray, Q]]:
    """Write ``model`` (a transformers model) as llama.cpp would; returns name → (stored data, type).

    ``quant(name, float32 array) -> GGMLQuantizationType`` picks each tensor's type (default: F32);
    ``edit(list of (name, array))`` may change the tensor list before writing; ``metadata`` (key →
    (value, GGUFValueType)) adds or overrides keys; ``arch`` overrides general.architecture.
    """
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = _gpt2_tensors(cfg, sd) if cfg.model_type == "gpt2" else _llama_family_tensors(cfg, sd, fuse_experts)
    if edit is not None:
        tensors = edit(tensors)
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH[cfg.model_type])
    embed = sd["transformer.wte.weight" if cfg.model_type == "gpt2" else "model.embed_tokens.weight"]
    _metadata(writer, cfg, embed.shape[0])
    if arch is not None:
        metadata = {"general.architecture": (arch, gguf.GGUFValueType.STRING), **(metadata or {})}
    for key, (value, vtype) in (metadata or {}).items():
        writer.add_key_value(key, value, vtype)  # replaces a key _metadata wrote
    rng = np.random.default_rng(seed)
    stored = {}
    for name, array in tensors:
        qtype = quant(name, array) if quant else Q.F32
        data, raw = encode(array, qtype, rng)
        writer.add_tensor(name, data, raw_dtype=raw)
        stored[name] = (data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


# ---- transformers' GGUF loader as the oracle ---------------------------------------------------


class _ReaderWithoutVocabulary(gguf.GGUFReader):
    """gguf's reader, stepping over the tokenizer's arrays instead of parsing them.

    GGUFReader makes a numpy view of every array element, and transformers then converts each one:
    a minute for Gemma 3's 262,144 tokens, scores and types, all of which only feed transformers'
    tokenizer. Every other key is parsed by gguf's own ``_get_field_parts``, as in GGUFReader.
    """

    def _build_fields(self, offs: int, count: int) -> int:
        for _ in range(count):
            start = offs
            key_len, key_data = self._get_str(offs)
            offs += int(key_len.nbytes + key_data.nbytes)
            key = str(bytes(key_data), encoding="utf-8")
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            if key.startswith("tokenizer.ggml.") and raw_type[0] == gguf.GGUFValueType.ARRAY:
                offs = self._skip_array(offs)
                continue
            size, parts, indices, types = self._get_field_parts(offs, raw_type[0])
            self._push_field(gguf.ReaderField(start, key, [key_len, key_data, raw_type, *parts],
                                              [i + 3 for i in indices], types), skip_sum=True)
            offs += size
        return offs

    def _skip_array(self, offs: int) -> int:
        item_type, count = struct.unpack_from("<IQ", self.data, offs)
        offs += 12
        if item_type != gguf.GGUFValueType.STRING:
            return offs + count * np.dtype(self.gguf_scalar_to_np[gguf.GGUFValueType(item_type)]).itemsize
        for _ in range(count):
            offs += 8 + struct.unpack_from("<Q", self.data, offs)[0]
        return offs


@contextlib.contextmanager
def _quick_gguf():
    """transformers' GGUF path opens the file twice and rebuilds gguf's tensor-name table once per
    module: open it once (without the vocabulary, see above) and build each table once."""
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, *args):
        key = (str(path), args)
        if key not in readers:
            readers[key] = _ReaderWithoutVocabulary(path, *args)
        return readers[key]

    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()  # its warning about the vocabulary size: hf_from_gguf sets it
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map
        tf.logging.set_verbosity(verbosity)


def hf_from_gguf(path: Path):
    """A transformers model loaded from a GGUF by transformers' own GGUF code (config mapping, tensor
    processors, gguf's dequantizers): from_pretrained(gguf_file=...) minus its accelerate plumbing."""
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with _quick_gguf():
        config_dict = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        if "vocab_size" not in config_dict:  # transformers counts the skipped token list otherwise
            config_dict["vocab_size"] = read_gguf(path).tensors["token_embd.weight"][0][0]
        config = tf.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        with no_init_weights():  # every weight comes from the file (checked below)
            model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set()), missing
    model.tie_weights()
    return model.eval()


# ---- checks of the converter's pieces ----------------------------------------------------------


def test_llama_qk_permutation_is_undone():
    w = torch.randn(6 * 8, 5)  # 6 heads of 8 rows
    assert torch.equal(_unpermute(6)(torch.from_numpy(permute(w.numpy(), 6))), w)
    assert not torch.equal(torch.from_numpy(permute(w.numpy(), 6)), w)


def _ggml_mxfp4_from_hf(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """llama.cpp's GptOssModel.repack_mxfp4: HF blocks (element 2j low nibble of byte j) to ggml's
    layout (element j low nibble, element j + 16 high nibble), scale byte first."""
    lo, hi = blocks & 0x0F, blocks >> 4
    values = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., 32] codes in element order
    packed = values[..., :16] | (values[..., 16:] << 4)
    return torch.cat((scales.unsqueeze(-1), packed), dim=-1).numpy()  # [..., G, 17]


def test_gguf_mxfp4_blocks_decode_like_gpt_oss_checkpoint_blocks():
    """The same MXFP4 numbers in OpenAI's layout (rung's dequantize_mxfp4) and in ggml's, as the
    converter repacks them (gguf's dequantizer), decode to the same values."""
    weight = torch.randn(3, 10, 64) * 0.1
    blocks, scales = quantize_mxfp4(weight)  # [3, 10, 2, 16], [3, 10, 2]
    ggml = _ggml_mxfp4_from_hf(blocks, scales).reshape(3, 10, 2 * 17)
    ours = dequantize_mxfp4(blocks, scales)
    theirs = torch.from_numpy(gguf.quants.dequantize(ggml, Q.MXFP4))
    assert torch.equal(ours, theirs)
