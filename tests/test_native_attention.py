"""rung's native decode attention (kernels.c: eight keys per step, a vectorised exp) against
PyTorch's softmax attention over the same slots: head widths with and without a multiple of 8,
key counts around the 8-key blocks, grouped heads, sinks, several sequences, and the K/V write."""

from __future__ import annotations

import pytest
import torch

from rung import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built")


def reference(q, pool_k, pool_v, idx, lengths, scale, sinks):
    b, hq, d = q.shape
    hkv = pool_k.shape[1]
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for i in range(b):
        slots = idx[i, : lengths[i]]
        k = pool_k[slots].double().repeat_interleave(hq // hkv, dim=1)  # [n, hq, d]
        v = pool_v[slots].double().repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].double(), k) * scale
        if sinks is not None:
            s = torch.cat((s, sinks.double()[:, None]), dim=1)
        p = torch.softmax(s, dim=1)[:, : len(slots)]
        out[i] = torch.einsum("hn,nhd->hd", p, v)
    return out


@pytest.mark.parametrize("d", [64, 36, 12])
@pytest.mark.parametrize("n", [1, 7, 8, 19, 130])
@pytest.mark.parametrize("sinks", [False, True])
def test_decode_attention_equals_softmax_attention(d, n, sinks):
    torch.manual_seed(n * 100 + d)
    b, hq, hkv, slots = 3, 6, 2, 400
    pool_k, pool_v = torch.randn(slots, hkv, d), torch.randn(slots, hkv, d)
    q = torch.randn(b, hq, d) * 2  # peaked softmaxes too
    lengths = torch.tensor([n, max(1, n // 2), n], dtype=torch.long)
    idx = torch.stack([torch.randperm(slots)[:n] for _ in range(b)])  # scattered slots, as pages are
    sink = torch.randn(hq) if sinks else None
    got = native.decode_attention(q, pool_k, pool_v, idx, lengths, 0.125, sink)
    want = reference(q, pool_k, pool_v, idx, lengths, 0.125, sink)
    assert (got.double() - want).abs().max() < 2e-6 * want.abs().max().clamp_min(1)


def test_decode_attention_writes_this_steps_keys_first():
    torch.manual_seed(0)
    b, hq, hkv, d, slots = 2, 4, 2, 16, 64
    pool_k, pool_v = torch.randn(slots, hkv, d), torch.randn(slots, hkv, d)
    q, new_k, new_v = torch.randn(b, hq, d), torch.randn(b, hkv, d), torch.randn(b, hkv, d)
    write = torch.tensor([5, 40])
    idx = torch.tensor([[1, 2, 3, 5], [7, 8, 40, 0]])
    lengths = torch.tensor([4, 3])
    want_k, want_v = pool_k.clone(), pool_v.clone()
    want_k[write], want_v[write] = new_k, new_v
    got = native.decode_attention(q, pool_k, pool_v, idx, lengths, 0.25, None, new_k, new_v, write)
    assert torch.equal(pool_k, want_k) and torch.equal(pool_v, want_v)
    want = reference(q, want_k, want_v, idx, lengths, 0.25, None)
    assert (got.double() - want).abs().max() < 2e-6 * want.abs().max()
