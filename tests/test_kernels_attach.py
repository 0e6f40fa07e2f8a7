"""rung/model/ is plain PyTorch and the reference; rung/kernels/rewrite.py's attach_kernels swaps
in the fast modules from outside, once the model is on its device (Triton's side is checked
against the plain model under the interpreter: tests/triton_interpret_checks.py)."""

from __future__ import annotations

import ast
import copy
import io
import tokenize
from pathlib import Path

import pytest
import torch

from rung import native
from rung.config import ModelConfig
from rung.kernels.modules import NativeRMSNorm, NativeRopeAttention
from rung.kernels.rewrite import PLAIN, attach_kernels
from rung.model import Decoder
from rung.model.attention import Attention
from rung.model.norm import RMSNorm

MODEL = Path(__file__).parents[1] / "rung" / "model"
DEVICE_WORDS = {"is_cuda", "use_triton", "triton", "native", "kernels", "available"}


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _code_names(source: str) -> list[str]:
    """The source's identifiers, in order, without comments or strings (docstrings may cite kernels)."""
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type in (tokenize.NAME, tokenize.OP) and t.string not in "()[]{},:"]


@pytest.mark.parametrize("path", sorted(MODEL.glob("*.py")), ids=lambda p: p.name)
def test_model_package_imports_no_kernels_and_asks_no_device(path):
    source = path.read_text()
    imported = _imports(ast.parse(source))
    assert not {m for m in imported if m.startswith(("rung.native", "rung.kernels", "triton"))}, imported
    names = _code_names(source)
    assert not DEVICE_WORDS & set(names), DEVICE_WORDS & set(names)
    asks_device_type = any(names[i: i + 3] == ["device", ".", "type"] for i in range(len(names)))
    assert not asks_device_type, f"{path.name} asks device.type"


def _tiny(model_type: str, **extra) -> Decoder:
    raw = dict(model_type=model_type, vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, **extra)
    model = Decoder(ModelConfig.from_hf(raw)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _prefill_then_decode(model, ids) -> torch.Tensor:
    cache = model.new_cache()
    with torch.inference_mode():
        steps = [model(ids[:, :5], cache)] + [model(ids[:, i: i + 1], cache) for i in range(5, ids.shape[1])]
    return torch.cat(steps, dim=1)


def _counting(monkeypatch, name: str) -> list:
    calls, real = [], getattr(native, name)
    monkeypatch.setattr(native, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.skipif(not native.available(), reason="rung's native kernels are not built here")
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_attach_kernels_on_the_cpu_swaps_in_the_native_modules_and_keeps_the_logits(model_type, monkeypatch):
    plain = _tiny(model_type)
    fast = attach_kernels(copy.deepcopy(plain))
    norms = [m for m in fast.modules() if isinstance(m, RMSNorm)]
    assert norms and all(type(m) is NativeRMSNorm for m in norms)
    # RoPE in place on the fused rows only where q and k come straight from the projection
    want_attention = NativeRopeAttention if model_type == "llama" else Attention
    assert all(type(layer.attn) is want_attention for layer in fast.layers)
    assert {n: p.data_ptr() for n, p in fast.state_dict().items()} == \
        {n: p.data_ptr() for n, p in attach_kernels(fast).state_dict().items()}  # the same tensors, nothing copied

    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    want = _prefill_then_decode(plain, ids)
    norm_calls, rope_calls = _counting(monkeypatch, "rmsnorm"), _counting(monkeypatch, "rope_")
    got = _prefill_then_decode(fast, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    steps, layers = 5, fast.config.num_layers  # a 5-row prefill and 4 decode steps
    assert len(norm_calls) >= steps * (2 * layers + 1)  # each step's block norms and final norm, natively
    assert len(rope_calls) == (steps * layers if model_type == "llama" else 0)

    again = attach_kernels(fast)  # idempotent: the same modules, the same logits
    assert again is fast and [type(m) for m in again.modules()] == [type(m) for m in fast.modules()]
    torch.testing.assert_close(_prefill_then_decode(again, ids), want, atol=1e-5, rtol=1e-5)


def test_a_model_built_by_hand_stays_plain_and_a_moved_one_is_chosen_for_again():
    model = _tiny("llama")
    assert not any(type(m) in PLAIN for m in model.modules())
    attach_kernels(model)
    attach_kernels(model.to(torch.bfloat16))  # no native kernel takes bfloat16 on the CPU: back to plain
    assert not any(type(m) in PLAIN for m in model.modules())
    assert type(model.layers[0].attn) is Attention and type(model.final_norm) is RMSNorm


@pytest.mark.skipif(not native.available(), reason="rung's native kernels are not built here")
def test_loaded_models_come_with_their_kernels_attached(llama):
    model, _ = llama  # load_model on the CPU in float32
    assert type(model.final_norm) is NativeRMSNorm and type(model.layers[0].attn) is NativeRopeAttention
