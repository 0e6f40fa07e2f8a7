"""`rung arch`: the report, the side-by-side table, JSON, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from rung.cli import main
from rung.config import preset_dict, preset_names


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_arch_table_puts_models_side_by_side(capsys):
    rc, out, err = run(capsys, "arch", "gpt-oss-20b", "qwen3-30b-a3b", "gpt2")
    assert rc == 0 and err == ""
    for expected in (
        "gpt-oss-20b", "qwen3-30b-a3b", "gpt2",  # the columns
        "GQA 64/8×64", "GQA 32/4×128", "MHA 12/12×64",
        "learned", "yarn ×32", "clamped SwiGLU", "SwiGLU", "GELU MLP",
        "32 (4 active)", "128 (8 active)",
        "20.91 B", "3.61 B", "30.53 B", "3.04 B", "124.4 M",
        "99.0 MiB", "24.75 KiB",
    ):
        assert expected in out, expected
    assert "active = " in out  # the convention, in words


def test_arch_report_for_one_model(capsys):
    rc, out, _ = run(capsys, "arch", "gpt-oss-20b")
    assert rc == 0
    for expected in ("20,914,757,184", "3,608,307,264", "103,809,024", "13,761,264,768", "41,829,514,368",
                     "bf16", "int8", "int4", "mxfp4", "GiB", "active = "):
        assert expected in out, expected


def test_arch_context_changes_the_kv_figure(capsys):
    rc, out, _ = run(capsys, "arch", "gpt-oss-20b", "--context", "131072", "--json")
    assert rc == 0
    [d] = json.loads(out)
    assert d["context"] == 131072 and d["kv_bytes"] == 3075 * 2**20


def test_arch_json_is_a_list_of_figures(capsys):
    rc, out, _ = run(capsys, "arch", "gpt2", "gpt-oss-120b", "--json")
    assert rc == 0
    gpt2, oss = json.loads(out)
    assert gpt2["name"] == "gpt2" and gpt2["total_params"] == 124_439_808
    assert oss["active_params"] == 5_132_849_472 and oss["weight_bytes"]["mxfp4"] == 65_248_815_744


def test_arch_without_names_lists_the_presets(capsys):
    rc, out, _ = run(capsys, "arch")
    assert rc == 0 and all(name in out for name in preset_names())
    rc, out, _ = run(capsys, "arch", "--json")
    assert [r["name"] for r in json.loads(out)] == preset_names()


def test_arch_reads_a_hugging_face_folder_and_file(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset_dict("qwen3-0.6b")))
    for target in (tmp_path, tmp_path / "config.json"):
        rc, out, _ = run(capsys, "arch", str(target), "--json")
        assert rc == 0 and json.loads(out)[0]["total_params"] == 596_049_920


def one_line_error(err: str) -> bool:
    return err.startswith("rung: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_unknown_preset_is_a_one_line_error(capsys):
    rc, out, err = run(capsys, "arch", "gpt-5")
    assert rc == 2 and out == "" and one_line_error(err) and "gpt-5" in err


def test_missing_path_is_a_one_line_error(capsys, tmp_path):
    rc, _, err = run(capsys, "arch", str(tmp_path / "nope" / "config.json"))
    assert rc == 2 and one_line_error(err) and "no such file" in err


def test_folder_without_config_is_a_one_line_error(capsys, tmp_path):
    rc, _, err = run(capsys, "arch", str(tmp_path))
    assert rc == 2 and one_line_error(err) and "config.json" in err


def test_unknown_model_type_is_a_one_line_error(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    rc, _, err = run(capsys, "arch", str(tmp_path))
    assert rc == 2 and one_line_error(err) and "mamba" in err


def test_python_dash_m_rung_runs_arch():
    out = subprocess.run([sys.executable, "-m", "rung", "arch", "gpt2", "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)[0]["total_params"] == 124_439_808
