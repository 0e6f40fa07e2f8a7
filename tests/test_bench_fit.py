"""`rung fit` on known presets: weights + KV cache + overhead against a budget, figures by hand."""

from __future__ import annotations

import json

from rung.bench.fit import RUNTIME_BYTES, activation_bytes, plan
from rung.cli import main
from rung.config import ModelConfig


def test_smollm2_figures_by_hand():
    fits = {f.format: f for f in plan(4096, 1, ["smollm2-135m"])}
    assert set(fits) == {"fp32", "bf16", "int8", "int4"}  # mxfp4 only where a family ships it
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 → 2 (K, V) × 3 × 64 values per layer per token
    kv_values = 30 * 2 * 3 * 64 * 4096
    assert fits["bf16"].kv_bytes == kv_values * 2 and fits["fp32"].kv_bytes == kv_values * 4
    assert fits["bf16"].total_params == 134_515_008  # the published count (tied embeddings)
    assert fits["bf16"].weight_bytes == 134_515_008 * 2 and fits["fp32"].weight_bytes == 134_515_008 * 4
    assert fits["int4"].weight_bytes < fits["int8"].weight_bytes < fits["bf16"].weight_bytes
    c = ModelConfig.from_preset("smollm2-135m")
    assert fits["bf16"].overhead_bytes == RUNTIME_BYTES + activation_bytes(c, 1)
    assert fits["bf16"].needed_bytes == fits["bf16"].weight_bytes + fits["bf16"].kv_bytes + fits["bf16"].overhead_bytes


def test_sliding_windows_and_concurrency_in_the_kv_cache():
    [f] = plan(32768, 8, ["gpt-oss-20b"], ["mxfp4"])
    # 24 layers, 8 KV heads of 64, bf16; every other layer keeps only its 128-token window
    per_token_layer = 2 * 8 * 64 * 2
    assert f.kv_bytes == 8 * per_token_layer * (12 * 32768 + 12 * 128)


def _fit_json(capsys, *args) -> list[dict]:
    assert main(["fit", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_what_fits_24gb_at_32k_by_8(capsys):
    rows = {(r["model"], r["format"]): r for r in _fit_json(capsys, "--memory", "24GB", "--context", "32768",
                                                               "--concurrency", "8")}
    assert rows[("gpt-oss-20b", "mxfp4")]["fits"]  # 13.8 GB of weights, windows keep the KV small
    assert not rows[("qwen3-8b", "int4")]["fits"]  # 4.7 GB of weights but 38.7 GB of KV at 32K × 8
    assert rows[("smollm2-135m", "int4")]["beyond_max_context"] and not rows[("smollm2-135m", "int4")]["fits"]
    assert not rows[("gpt-oss-120b", "mxfp4")]["fits"]
    for r in rows.values():
        assert r["fits"] == (r["needed_bytes"] <= 24 * 10**9 and not r["beyond_max_context"])


def test_budget_units_and_the_table(capsys):
    gib = {(r["model"], r["format"]): r["headroom_bytes"] for r in _fit_json(capsys, "--memory", "2GiB", "smollm2-135m")}
    gb = {(r["model"], r["format"]): r["headroom_bytes"] for r in _fit_json(capsys, "--memory", "2GB", "smollm2-135m")}
    assert all(gib[k] - gb[k] == 2 * 2**30 - 2 * 10**9 for k in gib)
    assert main(["fit", "--memory", "1GB", "smollm2-135m", "gemma3-270m"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert any("smollm2-135m" in r and "int4" in r for r in rows) and "do not fit" in out
    assert not any("fp32" in r for r in rows)  # 1.24 GB needed: left out of the table


def test_bad_budget_is_a_one_line_error(capsys):
    assert main(["fit", "--memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rung: error: --memory:") and err.count("\n") == 1


def test_gpus_give_the_per_rank_plan(capsys):
    one = {f.format: f for f in plan(32768, 1, ["qwen3-235b-a22b"], ["bf16"])}["bf16"]
    four = {f.format: f for f in plan(32768, 1, ["qwen3-235b-a22b"], ["bf16"], gpus=4)}["bf16"]
    eight = {f.format: f for f in plan(32768, 1, ["qwen3-235b-a22b"], ["bf16"], gpus=8)}["bf16"]
    # 4 KV heads: split 4 ways, and at 8 ranks each rank holds one head, replicated (1/4 of the cache)
    assert four.kv_bytes == one.kv_bytes // 4 and eight.kv_bytes == one.kv_bytes // 4
    # 94 layers × 2 × 4096 × 512 bf16 k/v projection bytes are replicated twice at 8 ranks
    kv_proj = 94 * 2 * 4096 * 512 * 2
    assert abs(four.weight_bytes - one.weight_bytes / 4) <= 1
    assert abs(eight.weight_bytes - (one.weight_bytes / 8 + kv_proj * (1 / 4 - 1 / 8))) <= 1
    assert not one.fits(141 * 10**9, 32768) and four.fits(141 * 10**9, 32768)
    # 64 query heads do not split 3 ways
    [three] = plan(4096, 1, ["qwen3-235b-a22b"], ["bf16"], gpus=3)
    assert not three.splits and not three.fits(10**15, 4096)
    rows = _fit_json(capsys, "--memory", "141GB", "--gpus", "4", "--context", "32768", "qwen3-235b-a22b", "--format", "bf16")
    assert rows[0]["gpus"] == 4 and rows[0]["fits"]
    assert main(["fit", "--memory", "141GB", "--gpus", "0"]) == 2
