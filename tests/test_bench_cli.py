"""`rung bench` end to end on a tiny local model (in process and in its worker process), the
reports it writes, --check for CI, and the no-argument starter run."""

from __future__ import annotations

import json

import pytest

from bench_fakes import Scripted
from oracle import tiny_chat_model
from rung.cli import main

SUITE = """
name: tiny
cases:
  - {id: hello, prompt: Hello world, expect: {contains: the}, max_tokens: 6, tags: {language: en}}
  - {id: count, prompt: "def f(x):", expect: {numeric: 3}, max_tokens: 6}
  - {id: json, prompt: Bonjour, expect: {json: {type: object}}, max_tokens: 6}
  - {id: vote, prompt: The quick brown fox, expect: {regex: "o"}, samples: 3, max_tokens: 4}
  - {id: ppl, text: "Hello world, the quick brown fox jumps over the lazy dog.", expect: {perplexity: 1000000}}
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_chat_model(tmp_path_factory.mktemp("bench-model")))


@pytest.fixture
def files(tmp_path):
    (tmp_path / "suite.yaml").write_text(SUITE)
    return tmp_path


def bench(files, *extra) -> list[str]:
    return ["bench", str(files / "suite.yaml"), "--out", str(files / "out"), "--cache-dir", str(files / "cache"), *extra]


def test_bench_a_local_model_writes_reports_and_caches(folder, files, capsys):
    assert main(bench(files, "-m", folder, "--in-process", "--concurrency", "2")) == 0
    out = capsys.readouterr().out
    assert "tiny (5 cases, sha256:" in out and "recommendation:" in out and "tiny.html" in out

    report = json.loads((files / "out" / "tiny.json").read_text())
    [c] = report["candidates"]
    m = c["metrics"]
    assert m["error"] is None and m["cases"] == 5 and m["total_params"] > 0 and m["weight_bytes"] > 0
    assert m["ttft_p95_ms"] > 0 and m["e2e_p95_ms"] >= m["ttft_p95_ms"] and m["output_tokens"] > 0
    assert m["perplexity"] > 1 and m["by_check"]["perplexity"] == 1.0
    assert len(report["cases"]) == 5 and report["suite"]["hash"].startswith("sha256:")
    vote = next(case for case in report["cases"] if case["id"] == "vote")
    assert len(vote["outcomes"][folder]["samples"]) == 3

    html = (files / "out" / "tiny.html").read_text()
    assert html.startswith("<!doctype html>") and html.count("<svg") == 3 and html.count("<details>") == 5
    assert "passing region" in html and report["suite"]["hash"] in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained: nothing fetched

    assert main(bench(files, "-m", folder, "--in-process", "--concurrency", "2")) == 0
    assert "(cached)" in capsys.readouterr().out


def test_a_local_model_in_its_worker_process_measures_its_own_memory(folder, files, capsys):
    assert main(bench(files, "-m", folder, "--no-cache")) == 0
    [c] = json.loads((files / "out" / "tiny.json").read_text())["candidates"]
    info, m = c["info"], c["metrics"]
    assert info["peak_memory_bytes"] > info["model_memory_bytes"] > 0  # the process, then what loading added
    assert info["load_peak_bytes"] >= info["model_memory_bytes"]
    assert m["accuracy"] is not None and m["by_check"]["perplexity"] == 1.0
    assert not (files / "cache").exists()  # --no-cache writes nothing


def test_check_exits_1_when_the_chosen_model_fails(folder, files, capsys):
    req = files / "req.yaml"
    req.write_text(f"success: {{accuracy: 1.0}}\nchosen: {folder}\n")
    assert main(bench(files, "--in-process", "-r", str(req), "--check")) == 1  # the random model misses cases
    out = capsys.readouterr().out
    assert "check failed" in out and "no longer passes: accuracy" in out
    req.write_text(f"success: {{accuracy: 0.0}}\nchosen: {folder}\n")
    assert main(bench(files, "--in-process", "-r", str(req), "--check")) == 0
    assert "check passed" in capsys.readouterr().out
    assert main(bench(files, "--in-process", "--check", "no-such-model")) == 1  # cannot load: fails the check


def test_user_errors_are_one_line(files, capsys):
    for args, message in [(["bench", str(files / "missing.yaml")], "no such suite file"),
                          (bench(files, "-r", str(files / "missing.yaml"), "-m", "x"), "no such requirements file"),
                          (bench(files), "no candidates"),
                          (bench(files, "-m", "x", "--concurrency", "0"), "--concurrency must be at least 1")]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("rung: error:") and message in err and err.count("\n") == 1


def test_no_arguments_runs_the_starter_and_skips_variants_that_cannot_load(monkeypatch, tmp_path, capsys):
    """The README's main job, with scripted candidates standing in for the real models."""
    import rung.bench as rb

    seen, real = {}, rb.run_bench

    def scripted_run_bench(candidates, suite, settings, cache, progress):
        seen["candidates"], seen["suite"] = list(candidates), suite
        right = {c.id: _right_answer(c) for c in suite.cases}
        cands = []
        for spec in candidates:
            if spec.endswith("@int8"):
                cands.append(Scripted(spec, right, fail_open="unknown format 'int8'"))
            elif spec.startswith("gemma"):
                cands.append(Scripted(spec, {}, params=268_000_000))
            else:
                cands.append(Scripted(spec, right, params=134_515_008,
                                      weight_bytes=90_000_000 if "int4" in spec else 538_000_000))
        return real(cands, suite, settings, cache, progress)

    monkeypatch.setattr(rb, "run_bench", scripted_run_bench)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert seen["suite"].name == "starter" and len(seen["candidates"]) == 4
    assert "skipped smollm2-135m@int8: unknown format 'int8'" in out
    # every case right, but the summary domain has 2 cases: 18 cases cannot make it reliable, and the report says so
    assert "recommendation: no candidate passes reliably" in out and "provisional answer: smollm2-135m@int4" in out
    assert out.rstrip().splitlines()[-3:-1] == ["deploy: rung serve -m smollm2-135m@int4 --max-concurrent 4 "
                                                "--kv-cache-mb 20", "requirements file: chosen: smollm2-135m@int4"]
    assert (tmp_path / "rung-bench" / "starter.html").is_file()
    report = json.loads((tmp_path / "rung-bench" / "starter.json").read_text())
    assert [c["metrics"]["name"] for c in report["candidates"]] == ["smollm2-135m@int4", "smollm2-135m@fp32", "gemma3-270m"]


def _right_answer(case):
    check = case.checks[0]
    o = check.options
    if check.type == "contains":
        values = o.get("value", [])
        return " ".join(([values] if isinstance(values, str) else values) + (o.get("any") or [])[:1])
    if check.type in ("numeric", "choice"):
        return str(o["value"])
    if check.type == "json":
        value = {key: 1 if spec.get("type") == "integer" else "x" for key, spec in o["schema"]["properties"].items()}
        return json.dumps({**value, **o.get("fields", {})})
    if check.type == "tool_call":
        return {"name": o["name"], "arguments": o.get("arguments", {})}
    return ""


def test_a_local_judge_model_grades_in_process(folder, tmp_path):
    """The judge is a model spec like any candidate: here the tiny model judges itself (its verdicts
    are noise, so the check fails with the judge's reply quoted, never with an exception)."""
    from rung.bench.run import BenchSettings, run_bench
    from rung.bench.suite import suite_from_dict

    suite = suite_from_dict({"judge": folder, "cases": [
        {"id": "j", "prompt": "Hello world", "max_tokens": 4, "expect": {"type": "judge", "rubric": "says hello"}}]})
    [run] = run_bench([folder], suite, BenchSettings(isolate=False, concurrency=1))
    [check] = run.cases[0].checks
    assert run.error is None and check.type == "judge" and f"judge {folder}" in check.detail


def test_check_exits_0_reliable_1_failing_2_provisional(monkeypatch, files, capsys):
    """--check's exit codes: 0 the chosen model passes reliably, 1 it fails, 2 it passes only on the
    point estimate (its interval straddles a threshold): a CI job can tell "worse" from "unproven"."""
    import rung.bench as rb

    real = rb.run_bench
    right = {"hello": "the", "count": "3", "json": "{}", "vote": "o", "ppl": ""}
    monkeypatch.setattr(rb, "run_bench", lambda candidates, suite, settings, cache, progress: real(
        [Scripted(spec, {**right, "count": "4"}) for spec in candidates], suite, settings, cache, progress))
    req = files / "req.yaml"
    for accuracy, code, said in [(0.1, 0, "check passed: m still passes reliably"),  # 80% [38%, 96%] ≥ 10%
                                 (0.7, 2, "check provisional: m passes only on the point estimate: accuracy 80% is "
                                          "within noise of 70%"),
                                 (0.9, 1, "check failed: m no longer passes: accuracy 80% < 90%")]:
        req.write_text(f"success: {{accuracy: {accuracy}}}\nchosen: m\n")
        assert main(bench(files, "-r", str(req), "--check", "--no-cache")) == code
        assert said in capsys.readouterr().out
    req.write_text("success: {accuracy: 0.7}\n")  # no chosen model: the decision itself is guarded
    assert main(bench(files, "-r", str(req), "-m", "m", "--check", "--no-cache")) == 2
    assert "check provisional: no candidate passes reliably" in capsys.readouterr().out


def test_repeats_flag_is_checked_and_reaches_the_report(monkeypatch, files, capsys):
    import rung.bench as rb

    real = rb.run_bench
    monkeypatch.setattr(rb, "run_bench", lambda candidates, suite, settings, cache, progress: real(
        [Scripted(spec, {"hello": "the"}) for spec in candidates], suite, settings, cache, progress))
    assert main(bench(files, "-m", "m", "--repeats", "3")) == 0
    out = capsys.readouterr().out
    assert "5 cases × up to 3 runs" in out and "pass@k" in out
    [c] = json.loads((files / "out" / "tiny.json").read_text())["candidates"]
    assert c["metrics"]["repeats"] == 3 and c["metrics"]["pass_hat_k"] is not None
    for bad in ("0", "101"):
        assert main(bench(files, "-m", "m", "--repeats", bad)) == 2
        assert "--repeats must be between 1 and 100" in capsys.readouterr().err


def test_the_deploy_lines_model_spec_is_one_rung_serve_accepts(capsys):
    """The deploy line serves NAME@int4 as benched: `rung serve` used to refuse the spec before loading
    ("no such file or folder"); here it gets as far as the next check."""
    assert main(["serve", "-m", "smollm2-135m@int4", "--max-concurrent", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-concurrent must be at least 1" in err and "no such file" not in err
    assert main(["serve", "-m", "smollm2-135m@int3"]) == 2
    assert "unknown format 'int3'" in capsys.readouterr().err


def test_the_report_keeps_its_evidence_version_suite_hash_settings_and_weights_sha256(folder, files, capsys):
    """An incident traces back to the exact model and suite that were approved."""
    import hashlib
    from pathlib import Path

    import rung

    assert main(bench(files, "-m", folder, "--in-process", "--concurrency", "2")) == 0
    capsys.readouterr()
    report = json.loads((files / "out" / "tiny.json").read_text())
    [c] = report["candidates"]
    weights = c["info"]["weights"]
    by_name = {f["name"]: f for f in weights["files"]}
    safetensors = Path(folder) / "model.safetensors"
    assert by_name["model.safetensors"]["sha256"] == hashlib.sha256(safetensors.read_bytes()).hexdigest()
    assert {"config.json", "tokenizer.json"} <= set(by_name)
    lines = "".join(f"{f['name']} {f['sha256']}\n" for f in weights["files"])
    assert weights["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert report["rung"] == rung.__version__ and report["settings"]["concurrency"] == 2
    html = (files / "out" / "tiny.html").read_text()
    evidence = html[html.index("<h2 id=evidence>"):]
    assert weights["sha256"] in evidence and report["suite"]["hash"] in evidence and rung.__version__ in evidence
    # hashed once: the digest is cached by path, size and mtime beside the results
    cached = json.loads((files / "cache" / "sha256.json").read_text())
    assert hashlib.sha256(safetensors.read_bytes()).hexdigest() in cached.values()


def test_an_endpoint_says_its_weights_cannot_be_hashed():
    from rung.bench.evidence import weights_evidence

    assert weights_evidence({"spec": "openai:http://h/v1#m"}) == {
        "sha256": None, "note": "remote endpoint: its weights cannot be hashed"}
