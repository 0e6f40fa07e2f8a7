"""Run under TRITON_INTERPRET=1 (tests/test_triton_dp4a.py starts it in a subprocess): the paged
decode attention's int8 rounding of its output, handed to o_proj's dp4a GEMV
(rung/kernels/triton_attention.py ``runs``, triton_dp4a's ``record`` / ``recorded``, RUNG_FUSED_XQ).
Checks that the rounding is quantize_runs' exactly on the split and the one-program kernels (GQA,
windows, sinks, head dims 64 to 256), that the 16-bit output is unchanged by it, that o_proj's GEMV
through the hand-off gives the same bits, and that a packed qwen3 decodes through the paged engine
step to the same logits with one quantize_runs launch less per layer and step. Prints one line per
check and exits non-zero on the first miss."""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

from triton_fused_xq_checks import Launches, equal, fail, layers, tiny_model  # noqa: E402

from rung.kernels import paged_attention as pa  # noqa: E402
from rung.kernels import triton_attention as ta  # noqa: E402
from rung.kernels import triton_dp4a as td  # noqa: E402

BS, BLOCKS = 4, 40


def as_o_proj_reads(out: torch.Tensor) -> torch.Tensor:
    """The attention's [N, hq, d] output as o_proj receives it: engine/paged.py's transpose to
    [1, hq, N, d], model/attention.py's back to [1, N, hq · d], quant/linear.py's rows [N, hq · d]."""
    n, hq, d = out.shape
    return out.transpose(0, 1)[None].transpose(1, 2).reshape(1, n, hq * d).reshape(-1, hq * d)


def problem(g, n: int, hq: int, hkv: int, d: int, dt, decode: bool = True):
    """q [n, hq, d] over pools of random keys: n decode tokens at scattered positions (token i on
    table row i), or one prefill chunk of n tokens; (q, pools, tables, positions, tiles)."""
    k_pool = torch.randn(BLOCKS * BS + 1, hkv, d, generator=g).to(dt)
    v_pool = (torch.randn(BLOCKS * BS + 1, hkv, d, generator=g) * 2).to(dt)
    tables = torch.stack([torch.randperm(BLOCKS, generator=g)[:20] for _ in range(5)]).to(torch.int32)
    q = torch.randn(n, hq, d, generator=g).to(dt)
    if decode:
        pos = torch.tensor([37, 5, 70, 0, 16][:n])
        return q, k_pool, v_pool, tables, pos, pa.decode_tiles(n, "cpu")
    pos = torch.arange(30, 30 + n)
    return q, k_pool, v_pool, tables, pos, pa.chunk_tiles([(0, n, 1)], pa.tokens_per_tile(hq, hkv, d, False), "cpu")


def attend(path: str, args, window, sinks, runs: bool):
    q, k_pool, v_pool, tables, pos, tiles = args
    if path == "split":
        return ta.split_decode_attention(q, k_pool, v_pool, tables, pos, tiles, BS, window, sinks, 0.2, 4, runs=runs)
    return ta.triton_paged_attention(q, k_pool, v_pool, tables, pos, tiles, BS, window, sinks, 0.2,
                                     path == "one program", split=False, runs=runs)


def rounding_checks(g) -> None:
    """(a) Each path's recorded rounding is quantize_runs_ref (and quantize_runs) of its output as
    o_proj reads it, and the 16-bit output is the one written without it (the one-program kernel
    on a short prefill chunk too: a speculative step's few tokens)."""
    cases = [  # (hq, hkv, d, tokens, dtype): GQA 4:1 and 2:1, MHA, a head not a power of two wide
        (8, 2, 64, 1, torch.bfloat16), (4, 2, 128, 3, torch.float16), (2, 2, 256, 2, torch.bfloat16),
        (4, 1, 96, 4, torch.float16)]
    for path in ("split", "one program", "prefill tile"):
        for hq, hkv, d, n, dt in cases if path != "prefill tile" else cases[1::2]:
            args = problem(g, n, hq, hkv, d, dt, decode=path != "prefill tile")
            sinks = torch.randn(hq, generator=g)
            for window, sk in ((None, None), (9, sinks)):
                name = f"{path} hq={hq} hkv={hkv} d={d} tokens={n} {dt} window={window} sinks={sk is not None}"
                td.forget()
                out = attend(path, args, window, sk, runs=True)
                rec = td._RECORD
                if rec is None or rec[0] is not out:
                    fail(f"{name}: nothing recorded")
                rows = as_o_proj_reads(out)
                if td.recorded(rows) is None:
                    fail(f"{name}: o_proj's rows do not take the hand-off")
                for part, got, want, kern in zip(("xq", "step", "xsum"), rec[2:], td.quantize_runs_ref(rows),
                                                 td.quantize_runs(rows)):
                    equal(f"rounding {name} {part}", got, want)
                    equal(f"rounding {name} {part} vs quantize_runs", got, kern)
                td.forget()
                equal(f"rounding {name}: the output as without it", out, attend(path, args, window, sk, runs=False))


def no_rounding_checks(g) -> None:
    """Nothing written (the slot emptied) where o_proj's GEMV would not take the rows or a head is
    not whole runs; nothing touched without ``runs``."""
    cases = [("5 tokens", (5, 4, 2, 64, torch.float16), {}), ("head_dim 48", (1, 4, 2, 48, torch.float16), {}),
             ("float32", (1, 4, 2, 64, torch.float32), {}),
             ("RUNG_FUSED_XQ=0", (1, 4, 2, 64, torch.bfloat16), {"RUNG_FUSED_XQ": "0"}),
             ("RUNG_DP4A=0", (1, 4, 2, 64, torch.bfloat16), {"RUNG_DP4A": "0"})]
    filler = problem(g, 1, 4, 2, 64, torch.float16)
    for name, (n, hq, hkv, d, dt), env in cases:
        for path in ("split", "one program"):
            args = problem(g, n, hq, hkv, d, dt)
            attend(path, filler, None, None, runs=True)  # something recorded
            os.environ.update(env)
            attend(path, args, None, None, runs=True)
            for key in env:
                del os.environ[key]
            if td._RECORD is not None:
                fail(f"rounding written for {name} ({path})")
            print(f"no rounding for {name} ({path}): ok")
    attend("split", filler, None, None, runs=True)
    kept = td._RECORD
    for path in ("split", "one program"):
        attend(path, filler, None, None, runs=False)  # a bf16 model's attention
        if td._RECORD is not kept:
            fail(f"an attention without runs touched the slot ({path})")
        print(f"no rounding for runs=False ({path}): ok")


def handoff_checks(g) -> None:
    """(b) o_proj's GEMV through the attention's rounding equals the GEMV that rounds x itself,
    with no quantize_runs launch."""
    for name, (fmt, data, scale, offset, group, bias, act) in layers(g):
        if act is not None:  # o_proj is never gated; its K is the layers' 192 = 3 heads of 64
            continue
        for n, path in ((1, "split"), (4, "one program")):
            args = problem(g, n, 3, 1, 64, torch.bfloat16)
            rows = as_o_proj_reads(attend(path, args, None, None, runs=True))
            with Launches() as fused:
                got = td.gemv_dp4a(rows, fmt, data, scale, offset, group, bias)
            td.forget()
            with Launches() as plain:
                want = td.gemv_dp4a(rows, fmt, data, scale, offset, group, bias)
            equal(f"o_proj gemv_dp4a through the attention's rounding {name} tokens={n} ({path})", got, want)
            if (fused.n, plain.n) != (0, 1):
                fail(f"quantize_runs launches {fused.n} with the hand-off, {plain.n} without")


def paged_decode(model, ids, steps: int, seqs: int):
    """``seqs`` copies of the prompt ids prefilled through PagedStep (one chunk each), then
    ``steps`` greedy decode steps of all of them in one batch: their logits [steps, seqs, vocab]."""
    from rung.engine.paged import Chunk, KVPool, PagedStep

    pool = KVPool(model.config, 32, 4, model.embed.weight.dtype)
    tables = [[list(range(8 * s, 8 * s + 8))] * len(pool.groups) for s in range(seqs)]
    t = ids.shape[1]
    out = []
    with torch.inference_mode():
        last = []
        for s in range(seqs):
            h = model.hidden_states(ids, PagedStep(pool, [Chunk(tables[s], 0, t)], "cpu"))
            last.append(model.logits(h[0, -1:]))
        logits = torch.cat(last)  # [seqs, vocab]
        for i in range(steps):
            step = PagedStep(pool, [Chunk(tables[s], t + i, 1) for s in range(seqs)], "cpu")
            logits = model.logits(model.hidden_states(logits.argmax(-1)[None], step)[0])
            out.append(logits.float())
    return torch.stack(out)


def qwen3(fmt, group, dt):
    """tests/triton_fused_xq_checks.py's tiny qwen3 with heads of 32 (a run each)."""
    return tiny_model(fmt, group, dt, head_dim=32)


def model_checks() -> None:
    """(c) a tiny packed qwen3 decodes through the paged step (q8: 1 sequence, the split kernel; q4:
    2 sequences, the one-program kernel) to the same logits with RUNG_FUSED_XQ=0 and 1, with 3 fewer
    quantize_runs launches per layer and step (q|k|v and gate|up from the norms, o from the
    attention: one less than the norms alone); a bf16 model's attention writes nothing."""
    from rung.kernels.modules import FusedQKAttention, FusedQKAttentionXq
    from rung.kernels.rewrite import attach_kernels

    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    steps = 1  # the interpreter's dp4a GEMVs are slow; triton_fused_xq_checks.py counts over 2 steps
    for fmt, group, dt, seqs, split in (("q8", None, torch.float16, 1, "1"), ("q4", 32, torch.bfloat16, 2, "0")):
        model = attach_kernels(qwen3(fmt, group, dt))
        kinds = [type(b.attn) for b in model.layers]
        if kinds != [FusedQKAttentionXq] * 2:
            fail(f"{fmt}: the attentions are {kinds}")
        layers = len(model.layers)
        runs = {}
        os.environ["RUNG_ATTN_SPLIT"] = split
        for flag in ("0", "1"):
            os.environ["RUNG_FUSED_XQ"] = flag
            with Launches() as n:
                runs[flag] = paged_decode(model, ids, steps, seqs)
            runs[flag + " launches"] = n.n
        del os.environ["RUNG_FUSED_XQ"], os.environ["RUNG_ATTN_SPLIT"]
        name = f"model {fmt} {dt} {seqs} sequence(s) {'split' if split == '1' else 'one program'}"
        equal(f"{name}: decode logits RUNG_FUSED_XQ=1 vs 0", runs["1"], runs["0"])
        print(f"{name}: quantize_runs launches {runs['0 launches']} -> {runs['1 launches']}")
        # left per decode step: each layer's down projection, and the LM head; per prompt (6 rows,
        # not the GEMV's) its last row's LM head
        if (runs["0 launches"] != (4 * layers + 1) * steps + seqs
                or runs["1 launches"] != (layers + 1) * steps + seqs):
            fail(f"{name}: quantize_runs launched {runs['0 launches']} and {runs['1 launches']} times")
        if [type(b.attn) for b in attach_kernels(model).layers] != [FusedQKAttentionXq] * 2:
            fail("attach_kernels again lost the rounding attentions")
    narrow = attach_kernels(tiny_model("q8", None, torch.float16))  # heads of 16: not whole runs
    plain = attach_kernels(qwen3(None, None, torch.bfloat16))
    if [type(b.attn) for b in narrow.layers + plain.layers] != [FusedQKAttention] * 4:
        fail("an attention with heads of 16, or without a packed o_proj, rounds its output")
    td.forget()
    paged_decode(plain, ids, steps, 1)
    if td._RECORD is not None:
        fail("a bf16 model's attention recorded a rounding")
    print("model bf16, and heads of 16: plain attention, nothing recorded: ok")


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rounding_checks(g)
    no_rounding_checks(g)
    handoff_checks(g)
    model_checks()
    print("the attention's rounding is quantize_runs' and o_proj's GEMV takes it")


if __name__ == "__main__":
    main()
