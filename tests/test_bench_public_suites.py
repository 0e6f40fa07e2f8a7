"""`rung suite import`: BFCL, ARC and MedMCQA read from their installed packages' data (bfcl-eval and
evals, installed --no-deps by `make test`) and scored by rung's own scorers.

The BFCL tests build each correct call from BFCL's possible-answer file, read here independently of
the importer, and score it with the real tool_call check: every case must pass it and fail the
wrong calls."""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys

import pytest

from rung.bench.importers import import_suite, write_suite
from rung.bench.records import Sample
from rung.bench.scorers import is_matcher, score_check
from rung.bench.suite import load_suite, suite_from_dict


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_bfcl = pytest.mark.skipif(not _installed("bfcl-eval"),
                                reason="bfcl-eval is not installed (make test installs it: pip install --no-deps bfcl-eval)")
needs_evals = pytest.mark.skipif(not _installed("evals"),
                                 reason="evals is not installed (make test installs it: pip install --no-deps evals)")
CALL_SUBSETS = ("simple_python", "multiple", "live_simple", "live_multiple")


def bfcl_rows(name: str) -> dict[str, dict]:
    """A BFCL data file, by id, read the way BFCL's README says (one JSON object a line)."""
    dist = importlib.metadata.distribution("bfcl-eval")
    (path,) = [f for f in dist.files if str(f) == f"bfcl_eval/data/{name}"]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {row["id"]: row for row in rows}


def first_acceptable(values: list, include_optional: bool):
    """(present, value): BFCL's first acceptable value; "" marks a parameter that may be left out. A
    mapping answer lists acceptable values per key, a list of mappings one such answer per item."""
    accepted = [v for v in values if v != ""]
    if not accepted or ("" in values and not include_optional):
        return False, None
    return True, _concrete(accepted[0], include_optional)


def _concrete(value, include_optional: bool):
    if isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
        out = {}
        for key, values in value.items():
            present, v = first_acceptable(values, include_optional)
            if present:
                out[key] = v
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_concrete(v, include_optional) for v in value]
    return value


def correct_call(answer: dict, include_optional: bool = False) -> dict:
    ((name, params),) = answer["ground_truth"][0].items()
    arguments = {}
    for param, values in params.items():
        present, value = first_acceptable(values, include_optional)
        if present:
            arguments[param] = value
    return {"name": name.replace(".", "_"), "arguments": arguments}


def tool_check(case, calls: list[dict]):
    (check,) = case.checks
    names = [t["function"]["name"] for t in case.tools]
    return score_check(check, Sample(text="", tool_calls=calls), None, names)


# ---- BFCL ------------------------------------------------------------------------------------------


@needs_bfcl
def test_bfcl_simple_python_20_cases_convert_and_the_correct_call_passes_every_one(tmp_path, capsys):
    from rung.cli import main

    out = tmp_path / "bfcl.yaml"
    assert main(["suite", "import", "bfcl", "--subset", "simple_python", "--limit", "20", "--out", str(out)]) == 0
    assert "20 cases from bfcl-eval" in capsys.readouterr().out
    suite = load_suite(out)
    answers = bfcl_rows("possible_answer/BFCL_v4_simple_python.json")
    assert [c.id for c in suite.cases] == [f"simple_python_{i}" for i in range(20)]
    for case in suite.cases:
        assert case.prompt and case.tools and case.checks[0].type == "tool_call"
        for include_optional in (False, True):
            outcome = tool_check(case, [correct_call(answers[case.id], include_optional)])
            assert outcome.passed, (case.id, include_optional, outcome.detail)
    assert suite.license.startswith("apache-2.0 (bfcl-eval") and "package metadata: Apache 2.0" in suite.license
    p = suite.provenance
    assert p["package"] == "bfcl-eval" and p["version"] == importlib.metadata.version("bfcl-eval")
    assert p["subset"] == "simple_python" and p["cases"] == 20 and p["imported"]
    assert p["files"] == ["bfcl_eval/data/BFCL_v4_simple_python.json",
                          "bfcl_eval/data/possible_answer/BFCL_v4_simple_python.json"]
    assert "bfcl_eval" not in sys.modules  # its data was read, its code (and heavy dependencies) never imported


@needs_bfcl
@pytest.mark.parametrize("subset", CALL_SUBSETS)
def test_bfcl_every_case_passes_its_correct_call_and_fails_wrong_ones(subset):
    suite = suite_from_dict(import_suite("bfcl", subset))
    answers = bfcl_rows(f"possible_answer/BFCL_v4_{subset}.json")
    assert len(suite.cases) == len(answers)
    for case in suite.cases:
        right = correct_call(answers[case.id])
        assert tool_check(case, [right]).passed, (case.id, tool_check(case, [right]).detail)
        assert not tool_check(case, [{**right, "name": right["name"] + "_x"}]).passed, case.id
        assert not tool_check(case, []).passed, case.id
        extra = {**right, "arguments": {**right["arguments"], "not_a_parameter": 1}}
        assert not tool_check(case, [extra]).passed, case.id  # BFCL refuses parameters it does not list
        for param, value in right["arguments"].items():
            assert not tool_check(case, [{**right, "arguments": {**right["arguments"], param: _wrong(value)}}]).passed, \
                (case.id, param)
            (check,) = case.checks
            if not is_matcher(check.options["arguments"][param]) or not check.options["arguments"][param].get("optional"):
                missing = {k: v for k, v in right["arguments"].items() if k != param}
                assert not tool_check(case, [{**right, "arguments": missing}]).passed, (case.id, param)


def _wrong(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1000.5
    if isinstance(value, str):
        return value + " and something else entirely"
    if isinstance(value, list):
        return value + ["an extra item"]
    if isinstance(value, dict):
        return {**value, "an_extra_key": 1}
    return "not " + repr(value)


@needs_bfcl
def test_bfcl_every_acceptable_value_passes():
    """Each of a parameter's listed values passes, not only the first (BFCL's possible answers)."""
    suite = suite_from_dict(import_suite("bfcl", "simple_python"))
    answers = bfcl_rows("possible_answer/BFCL_v4_simple_python.json")
    tried = 0
    for case in suite.cases:
        right = correct_call(answers[case.id])
        ((_, params),) = answers[case.id]["ground_truth"][0].items()
        for param, values in params.items():
            for value in [v for v in values if v != ""][1:]:
                call = {**right, "arguments": {**right["arguments"], param: _concrete(value, False)}}
                assert tool_check(case, [call]).passed, (case.id, param, value)
                tried += 1
    assert tried > 100  # simple_python lists several values for many parameters


@needs_bfcl
def test_bfcl_integers_pass_for_float_parameters_as_in_bfcl():
    suite = suite_from_dict(import_suite("bfcl", "simple_python"))
    answers = bfcl_rows("possible_answer/BFCL_v4_simple_python.json")
    tried = 0
    for case in suite.cases:
        right = correct_call(answers[case.id])
        for param, value in right["arguments"].items():
            if isinstance(value, float) and value.is_integer():
                call = {**right, "arguments": {**right["arguments"], param: int(value)}}
                assert tool_check(case, [call]).passed, (case.id, param)
                tried += 1
    assert tried > 0


@needs_bfcl
@pytest.mark.parametrize("subset", ["irrelevance", "live_irrelevance"])
def test_bfcl_irrelevance_passes_no_call_and_fails_any_call(subset):
    suite = suite_from_dict(import_suite("bfcl", subset, limit=30))
    for case in suite.cases:
        assert tool_check(case, []).passed
        name = case.tools[0]["function"]["name"]
        assert not tool_check(case, [{"name": name, "arguments": {}}]).passed


@needs_bfcl
def test_bfcl_tools_are_json_schema_and_names_have_no_dots():
    suite = suite_from_dict(import_suite("bfcl", "simple_python"))

    def types(schema):
        yield schema.get("type")
        for sub in (schema.get("properties") or {}).values():
            yield from types(sub)
        if isinstance(schema.get("items"), dict):
            yield from types(schema["items"])

    found = {t for case in suite.cases for tool in case.tools for t in types(tool["function"]["parameters"])}
    assert found <= {"object", "string", "integer", "number", "boolean", "array"}, found
    assert all("." not in tool["function"]["name"] for case in suite.cases for tool in case.tools)
    assert suite.case("simple_python_1").checks[0].options["name"] == "math_factorial"


# ---- evals: ARC and MedMCQA -------------------------------------------------------------------------


@needs_evals
def test_medmcqa_cases_have_four_choices_and_the_right_letter_passes(tmp_path):
    out = tmp_path / "medmcqa.yaml"
    write_suite(import_suite("medmcqa", limit=25), out)
    suite = load_suite(out)
    assert len(suite.cases) == 25 and suite.license.startswith("MIT")
    assert suite.provenance["files"] == ["evals/registry/data/medmcqa/samples.jsonl"]
    for case in suite.cases:
        assert len(case.choices) == 4 and case.checks[0].type == "choice"
        letter = case.checks[0].options["value"]
        assert letter in "ABCD"
        right = score_check(case.checks[0], Sample(text=letter), list(case.choices))
        assert right.passed, case.id
        wrong = "ABCD"[("ABCD".index(letter) + 1) % 4]
        assert not score_check(case.checks[0], Sample(text=wrong), list(case.choices)).passed
        assert case.prompt.startswith("Subject:") and not re.search(r"(?m)^[a-d]\) ", case.prompt)


@needs_evals
def test_medmcqa_answer_letters_name_the_option_evals_calls_ideal():
    dist = importlib.metadata.distribution("evals")
    (path,) = [f for f in dist.files if str(f) == "evals/registry/data/medmcqa/samples.jsonl"]
    ideals = [json.loads(line)["ideal"] for line in path.read_text().splitlines() if line.strip()]
    suite = suite_from_dict(import_suite("medmcqa"))
    assert len(suite.cases) == len(ideals) == 300
    for case, ideal in zip(suite.cases, ideals):
        letter = case.checks[0].options["value"]
        assert ideal == f"{letter.lower()}) {case.choices['ABCD'.index(letter)]}"


@needs_evals
def test_arc_cases_are_grid_puzzles_scored_by_the_output_grid():
    suite = suite_from_dict(import_suite("arc", limit=10))
    assert len(suite.cases) == 10
    for case in suite.cases:
        (check,) = case.checks
        grid = check.options["value"]
        assert check.type == "exact" and grid.startswith("Output:\n")
        assert case.messages[-1]["content"].startswith("Input:") and case.max_tokens > len(grid)
        assert score_check(check, Sample(text=grid + "\n")).passed
        assert not score_check(check, Sample(text=grid[:-1] + ("1" if grid[-1] != "1" else "2"))).passed


# ---- errors: one line each ---------------------------------------------------------------------------


@needs_bfcl
def test_import_refuses_an_existing_file_unless_forced(tmp_path, capsys):
    from rung.cli import main

    out = tmp_path / "s.yaml"
    out.write_text("my edited suite\n")
    assert main(["suite", "import", "bfcl", "--limit", "2", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "my edited suite\n"
    assert main(["suite", "import", "bfcl", "--limit", "2", "--out", str(out), "--force"]) == 0
    assert len(load_suite(out).cases) == 2


def refused(capsys, *args: str) -> str:
    """`rung ARGS` exits 2 with one line on stderr (and no traceback: an exception would end the test)."""
    from rung.cli import main

    assert main(list(args)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rung: error: "), lines
    return lines[0]


@needs_bfcl
@pytest.mark.parametrize("args, needle", [
    (["nosuch"], "unknown public suite 'nosuch' (one of: bfcl, arc, medmcqa)"),
    (["bfcl", "--subset", "parallel"], "unknown bfcl subset 'parallel' (one of: simple_python,"),
    (["bfcl", "--limit", "0"], "--limit must be at least 1, got 0"),
    (["bfcl", "--limit", "-3"], "--limit must be at least 1, got -3"),
    (["arc", "--subset", "x"], "arc has no subsets"),
])
def test_import_errors_are_one_line(tmp_path, capsys, args, needle):
    out = tmp_path / "s.yaml"
    assert needle in refused(capsys, "suite", "import", *args, "--out", str(out))
    assert not out.exists()


def test_import_refuses_an_out_file_that_is_not_yaml(tmp_path, capsys):
    assert "name it .yaml or .yml" in refused(capsys, "suite", "import", "bfcl", "--out", str(tmp_path / "s.jsonl"))
    assert "no such folder" in refused(capsys, "suite", "import", "bfcl", "--out", str(tmp_path / "no" / "s.yaml"))


def test_a_missing_package_says_how_to_install_it_in_one_line(tmp_path, capsys, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    line = refused(capsys, "suite", "import", "bfcl", "--out", str(tmp_path / "s.yaml"))
    assert line.endswith("the bfcl-eval package is not installed; install it with: pip install --no-deps 'bfcl-eval'")
    line = refused(capsys, "suite", "import", "medmcqa", "--out", str(tmp_path / "s.yaml"))
    assert "install it with: pip install --no-deps 'evals'" in line


# ---- a package whose data is not what the importer knows ----------------------------------------------


def fake_package(tmp_path, files: dict[str, str]):
    from rung.bench.importers.package import Package

    paths = {}
    for inside, text in files.items():
        path = tmp_path / inside
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths[inside] = path
    return Package("bfcl-eval", "0.0", paths)


def test_a_data_file_the_importer_does_not_know_is_a_one_line_error(tmp_path):
    from rung.bench.importers import bfcl, openai_evals
    from rung.bench.importers.package import SuiteImportError

    question, answer = bfcl.data_files("simple_python")
    good = '{"id": "q0", "question": [[{"role": "user", "content": "hi"}]], "function": []}'
    cases = [
        ({question: good + "\n{not json\n", answer: ""}, "line 2: not valid JSON"),
        ({question: "[1, 2]\n", answer: ""}, "line 1: expected a JSON object"),
        ({question: good + "\n", answer: '{"id": "other", "ground_truth": []}\n'}, "'q0': unexpected layout (KeyError"),
        ({question: '{"id": "q1", "question": [], "function": []}\n', answer: ""}, "'q1': unexpected layout"),
        ({answer: ""}, "no bfcl_eval/data/BFCL_v4_simple_python.json in the installed package"),
    ]
    for files, needle in cases:
        with pytest.raises(SuiteImportError, match=re.escape(needle)):
            bfcl.import_bfcl(fake_package(tmp_path, files), "simple_python", None)
    arc = fake_package(tmp_path, {openai_evals.ARC: '{"input": "not messages", "ideal": "x"}\n'})
    with pytest.raises(SuiteImportError, match="sample 1: expected 'input'"):
        openai_evals.import_arc(arc, None, None)
    med = fake_package(tmp_path, {openai_evals.MEDMCQA: json.dumps(
        {"input": [{"role": "system", "content": "s"}, {"role": "user", "content": "Q?\na) x\nb) y"}], "ideal": "a) x"})})
    with pytest.raises(SuiteImportError, match=re.escape("sample 1: not a system prompt, a question and options a) to d)")):
        openai_evals.import_medmcqa(med, None, None)


def test_a_data_file_over_the_size_bound_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from rung.bench.importers import package

    monkeypatch.setattr(package, "MAX_DATA_BYTES", 1 << 10)
    big = fake_package(tmp_path, {"big.json": "x" * 2048})
    with pytest.raises(package.SuiteImportError, match="2048 bytes, larger than"):
        big.read_jsonl("big.json")


def test_evals_data_with_a_license_of_its_own_is_refused_not_guessed(tmp_path):
    from rung.bench.importers import openai_evals
    from rung.bench.importers.package import Package, SuiteImportError

    license_md = tmp_path / "LICENSE.md"
    license_md.write_text("MIT License\n\n### Dataset Licenses\n- **Location**: evals/registry/data/medmcqa\n")
    package = Package("evals", "9", {openai_evals.LICENSE_FILE.format(version="9"): license_md})
    with pytest.raises(SuiteImportError, match="evals/registry/data/medmcqa has a license of its own"):
        openai_evals.data_license(package, openai_evals.MEDMCQA)
    assert openai_evals.data_license(package, openai_evals.ARC).startswith("MIT (evals 9;")
