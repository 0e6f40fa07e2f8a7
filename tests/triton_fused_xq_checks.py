"""Run under TRITON_INTERPRET=1 (tests/test_triton_dp4a.py starts it in a subprocess): the block
norms' int8 rounding of their output, handed to the dp4a GEMV after them (rung/kernels/triton_dp4a.py's
``record`` / ``recorded``, RUNG_FUSED_XQ). Checks that the rounding is quantize_runs' exactly, that a
GEMV fed through the hand-off gives the same bits, that nothing else takes it, and that a packed
model decodes to the same logits with one quantize_runs launch less per fused projection. Prints
one line per check and exits non-zero on the first miss."""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET") == "1"

import copy  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import weakref  # noqa: E402

import torch  # noqa: E402

from rung.kernels import triton_dp4a as td  # noqa: E402
from rung.kernels import triton_elementwise as te  # noqa: E402
from rung.quant.formats import quantize  # noqa: E402


def fail(msg: str) -> None:
    sys.exit(f"FAIL {msg}")


def equal(name: str, got, want) -> None:
    """Bit for bit (int8 codes, float32 steps and sums, 16-bit outputs)."""
    if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got, want):
        fail(f"{name}: not bit-equal")
    print(f"{name}: equal")


class Launches:
    """Counts td.quantize_runs launches (gemv_dp4a calls it by its module name)."""

    def __init__(self):
        self.n = 0
        self.real = td.quantize_runs

    def __enter__(self):
        def counted(x):
            self.n += 1
            return self.real(x)

        td.quantize_runs = counted
        return self

    def __exit__(self, *exc):
        td.quantize_runs = self.real


def norm(kind: str, x, w, offset, f32, runs=True, residual=None):
    """The norm's output (add_rms_norm: of x + residual, x's negation unless given) through its kernel."""
    if kind == "rms_norm":
        return te.triton_rms_norm(x, w, 1e-6, offset, f32, runs)
    return te.triton_add_rms_norm(x, -0.5 * x if residual is None else residual, w, 1e-6, offset, f32, runs)[1]


def rounding_checks(g) -> None:
    """(a) The extra outputs are quantize_runs_ref (and quantize_runs) of the stored output, for
    both norms, row widths that are and are not the kernel's block (a power of two), 1-4 rows."""
    for kind in ("rms_norm", "add_rms_norm"):
        for dt in (torch.float16, torch.bfloat16):
            for k, shape, offset, f32 in ((96, (1, 96), 0.0, False), (192, (3, 192), 1.0, False),
                                          (64, (2, 2, 64), 0.0, True), (256, (4, 256), 1.0, True),
                                          (32, (1, 1, 32), 0.0, False)):
                x = (torch.randn(*shape, generator=g) * 3).to(dt)
                x.view(-1, k)[0, :32] = 0  # an all-zero run of the input
                w = torch.randn(k, generator=g).to(dt)
                w[32:64] = 0 if k > 32 else w[32:64]  # an all-zero run of the output: step 0
                td.forget()
                out = norm(kind, x, w, offset, f32)
                rec = td._RECORD
                if rec is None or rec[0] is not out:
                    fail(f"{kind} {dt} {shape}: nothing recorded")
                rows = out.reshape(-1, k)
                name = f"{kind} {dt} shape={list(shape)} offset={offset} f32={f32}"
                for part, got, want, kern in zip(("xq", "step", "xsum"), rec[2:], td.quantize_runs_ref(rows),
                                                 td.quantize_runs(rows)):
                    equal(f"rounding {name} {part}", got, want)
                    equal(f"rounding {name} {part} vs quantize_runs", got, kern)
                td.forget()
                equal(f"rounding {name}: the output as without it", out, norm(kind, x, w, offset, f32, runs=False))
    # no rounding written where the GEMV would not take the rows, or when it is turned off
    w = torch.randn(64, generator=g).half()
    cases = [("5 rows", torch.randn(5, 64, generator=g).half(), w, {}),
             ("K=48", torch.randn(1, 48, generator=g).half(), w[:48], {}),
             ("RUNG_FUSED_XQ=0", torch.randn(1, 64, generator=g).half(), w, {"RUNG_FUSED_XQ": "0"}),
             ("RUNG_DP4A=0", torch.randn(1, 64, generator=g).half(), w, {"RUNG_DP4A": "0"})]
    for name, x, wk, env in cases:
        os.environ.update(env)
        norm("rms_norm", torch.randn(1, 64, generator=g).half(), w, 0.0, False)  # something recorded
        norm("add_rms_norm", x, wk, 0.0, False)
        for key in env:
            del os.environ[key]
        if td._RECORD is not None:
            fail(f"rounding written for {name}")
        print(f"no rounding for {name}: ok")
    norm("rms_norm", torch.randn(1, 64, generator=g).half(), w, 0.0, False)
    kept = td._RECORD
    norm("rms_norm", torch.randn(1, 64, generator=g).half(), w, 0.0, False, runs=False)  # a bf16 model's norm
    if td._RECORD is not kept:
        fail("a norm without runs touched the slot")
    print("no rounding for runs=False: ok")


def layers(g):
    """(fmt, group, act, bias) layers of 96 outputs over K = 192 (q8 per channel and grouped, q4)."""
    for fmt, group, act, bias in (("q8", None, None, True), ("q8", 32, "silu", False), ("q4", 32, None, False),
                                  ("q4", 64, "silu", True)):
        p = quantize(torch.randn(96, 192, generator=g), fmt, group)
        yield f"{fmt} group={p.group} act={act}", (p.fmt, p.data, p.scale, p.offset, p.group,
                                                   torch.randn(96, generator=g) if bias else None, act)


def handoff_checks(g) -> None:
    """(b) the GEMV through the hand-off equals the GEMV that rounds x itself, with no launch;
    (c) nothing that only shares the address takes it."""
    w = torch.randn(192, generator=g).bfloat16()
    for name, args in layers(g):
        for m in (1, 4):
            x = torch.randn(2, m, 192, generator=g).bfloat16()[:1]  # [1, m, K]: a decode step's rows
            out = te.triton_rms_norm(x, w, 1e-6, 0.0, False, True)
            rows = out.reshape(-1, 192)
            with Launches() as fused:
                got = td.gemv_dp4a(rows, *args)
            td.forget()
            with Launches() as plain:
                want = td.gemv_dp4a(rows, *args)
            equal(f"gemv_dp4a through the norm's rounding {name} M={m}", got, want)
            if (fused.n, plain.n) != (0, 1):
                fail(f"quantize_runs launches {fused.n} with the hand-off, {plain.n} without")
    # what must not take it: each a tensor at the recorded output's address, or equal to it
    x = torch.randn(4, 192, generator=g).bfloat16()

    def fresh():
        out = te.triton_rms_norm(x, w, 1e-6, 0.0, False, True)
        if td.recorded(out) is None:
            fail("the recorded output itself is not taken")
        return out

    out = fresh()
    out.add_(1)  # written in place since (its version counter moved)
    others = {"written in place": out}
    out = fresh()
    others["fewer rows"] = out[:2]
    others["another dtype"] = out.view(torch.float16)
    others["other strides"] = out.as_strided((4, 192), (1, 4))
    others["a copy"] = out.clone()
    others["the same rows as float32"] = out.float()
    for what, t in others.items():
        if td.recorded(t) is not None:
            fail(f"the hand-off taken by a tensor with {what}")
        print(f"hand-off not taken: {what}: ok")
    first = fresh()
    second = te.triton_rms_norm(torch.randn(1, 192, generator=g).bfloat16(), w, 1e-6, 0.0, False, True)
    if td.recorded(first) is not None or td.recorded(second) is None:
        fail("a later norm's record does not replace the earlier one")
    print("hand-off not taken: an earlier norm's output: ok")
    # the slot keeps the recorded output alive (its memory cannot go to another tensor), until replaced
    alive = weakref.ref(second)
    del second
    gc.collect()
    if alive() is None:
        fail("the recorded output was freed while recorded")
    fresh()
    gc.collect()
    if alive() is not None:
        fail("a replaced record is still held")
    print("the recorded output is held while recorded, and only then: ok")
    # inference tensors (no version counter): the recorded output is still taken, and its views
    with torch.inference_mode():
        out = te.triton_rms_norm(x.view(2, 2, 192), w, 1e-6, 0.0, False, True)
        if td.recorded(out.view(4, 192)) is None or td.recorded(out.view(4, 192)[1:]) is not None:
            fail("inference tensors: the hand-off")
    print("hand-off under inference_mode: ok")
    td.forget()


def tiny_model(fmt: str, group, dt, head_dim: int = 16):
    from rung.config import ModelConfig
    from rung.model import Decoder
    from rung.quant.rewrite import pack_model

    raw = dict(model_type="qwen3", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256,
               rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Decoder(ModelConfig.from_hf(raw)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model = model.to(dt)
    return model if fmt is None else pack_model(model, fmt, group)


def decode(model, ids, steps: int):
    """A prefill of ids (more rows than a GEMV takes), then ``steps`` greedy decode steps: their logits."""
    out = []
    with torch.inference_mode():
        cache = model.new_cache()
        logits = model(ids, cache)[:, -1]
        for _ in range(steps):
            logits = model(logits.argmax(-1, keepdim=True), cache)[:, -1]
            out.append(logits.float())
    return torch.stack(out)


def model_checks() -> None:
    """(d) a tiny packed model decodes to the same logits with RUNG_FUSED_XQ=0 and 1, with 2 fewer
    quantize_runs launches per layer and step (q|k|v, gate|up); a bf16 model's norms write nothing."""
    from rung.kernels.modules import TritonRMSNorm, TritonRMSNormXq
    from rung.kernels.rewrite import attach_kernels

    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    steps = 2
    for fmt, group, dt in (("q8", None, torch.float16), ("q4", 32, torch.bfloat16)):
        model = attach_kernels(tiny_model(fmt, group, dt))
        kinds = [type(b.attn_norm) for b in model.layers] + [type(b.mlp_norm) for b in model.layers]
        if kinds != [TritonRMSNormXq] * 4 or type(model.final_norm) is not TritonRMSNorm:
            fail(f"{fmt}: the block norms are {kinds}, the final norm {type(model.final_norm)}")
        runs = {}
        for flag in ("0", "1"):
            os.environ["RUNG_FUSED_XQ"] = flag
            with Launches() as n:
                runs[flag] = decode(model, ids, steps)
            runs[flag + " launches"] = n.n
        del os.environ["RUNG_FUSED_XQ"]
        equal(f"model {fmt} {dt}: decode logits RUNG_FUSED_XQ=1 vs 0", runs["1"], runs["0"])
        saved = runs["0 launches"] - runs["1 launches"]
        print(f"model {fmt} {dt}: quantize_runs launches {runs['0 launches']} -> {runs['1 launches']}")
        # left per step: each layer's o and down projections, and the LM head (after the final norm)
        if saved != 2 * len(model.layers) * steps or runs["1 launches"] != (2 * len(model.layers) + 1) * steps:
            fail(f"model {fmt}: quantize_runs launched {runs['0 launches']} and {runs['1 launches']} times")
        again = attach_kernels(model)  # attaching again keeps the choice
        if [type(b.attn_norm) for b in again.layers] != [TritonRMSNormXq] * 2:
            fail("attach_kernels again lost the fused norms")
    plain = attach_kernels(tiny_model(None, None, torch.bfloat16))
    if any(type(m) is TritonRMSNormXq for m in plain.modules()):
        fail("a model without packed layers got fused norms")
    td.forget()
    decode(plain, ids, steps)
    if td._RECORD is not None:
        fail("a bf16 model's norms recorded a rounding")
    print("model bf16: plain norms, nothing recorded: ok")


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rounding_checks(g)
    handoff_checks(g)
    model_checks()
    print("the norms' rounding is quantize_runs' and the GEMV takes it only for their output")


if __name__ == "__main__":
    main()
