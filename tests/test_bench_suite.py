"""Suite files: YAML and JSONL, one-line errors naming the case and field, and the content hash."""

from __future__ import annotations

import json

import pytest

from rung.bench import starter_requirements, starter_suite
from rung.bench.suite import SuiteError, load_suite

YAML = """
name: demo
version: 2
defaults: {max_tokens: 32}
cases:
  - id: capital
    prompt: What is the capital of France?
    expect: {contains: Paris}
    tags: {language: en, domain: qa}
  - id: planet
    prompt: Which planet is red?
    choices: [Venus, Mars]
    expect: {type: choice, value: B}
    max_tokens: 8
"""

# the same content: keys reordered, flow style turned to block style, comments and blank lines added
YAML_REORDERED = """
# a comment
cases:
  - prompt: What is the capital of France?
    id: capital
    tags:
      domain: qa
      language: en
    expect:
      contains: Paris

  - max_tokens: 8
    expect: {value: B, type: choice}
    choices:
      - Venus
      - Mars
    id: planet
    prompt: Which planet is red?
defaults:
  max_tokens: 32
name: renamed    # name and version are labels, not content
version: 3
"""


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_suite_loads_with_defaults_and_overrides(tmp_path):
    suite = load_suite(write(tmp_path, "s.yaml", YAML))
    assert suite.name == "demo" and suite.version == "2" and len(suite.cases) == 2
    capital, planet = suite.cases
    assert capital.max_tokens == 32 and planet.max_tokens == 8 and capital.temperature == 0.0
    assert capital.tags == {"language": "en", "domain": "qa"} and suite.tag_values("language") == {"en"}
    content = planet.chat_messages()[0]["content"]
    assert "A. Venus\nB. Mars" in content and "letter" in content


def test_hash_ignores_key_order_whitespace_comments_and_labels(tmp_path):
    a = load_suite(write(tmp_path, "a.yaml", YAML))
    b = load_suite(write(tmp_path, "b.yaml", YAML_REORDERED))
    assert a.hash == b.hash and a.hash.startswith("sha256:") and len(a.hash) == len("sha256:") + 12
    assert load_suite(write(tmp_path, "c.yaml", YAML)).hash == a.hash  # stable across loads


@pytest.mark.parametrize("edit", [
    ("Paris", "Lyon"),  # an expected value
    ("France?", "France?!"),  # a prompt
    ("max_tokens: 32", "max_tokens: 33"),  # a default
    ("domain: qa}", "domain: geo}"),  # a tag (slices change the decision)
])
def test_hash_changes_when_content_changes(tmp_path, edit):
    a = load_suite(write(tmp_path, "a.yaml", YAML))
    b = load_suite(write(tmp_path, "b.yaml", YAML.replace(*edit)))
    assert a.hash != b.hash


def test_jsonl_suite_with_a_header_line(tmp_path):
    lines = [{"suite": {"name": "jl", "defaults": {"max_tokens": 16}}},
             {"id": "a", "prompt": "2+2?", "expect": {"numeric": 4}},
             {"prompt": "Say hi", "expect": [{"contains": "hi"}, {"regex": "^\\w"}]}]
    path = write(tmp_path, "s.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    suite = load_suite(path)
    assert suite.name == "jl" and [c.id for c in suite.cases] == ["a", "line-3"]
    assert suite.cases[1].max_tokens == 16 and [c.type for c in suite.cases[1].checks] == ["contains", "regex"]


def test_same_cases_as_yaml_and_jsonl_hash_the_same(tmp_path):
    cases = [{"id": "a", "prompt": "2+2?", "expect": {"numeric": 4}}]
    y = load_suite(write(tmp_path, "s.yaml", "cases:\n  - {id: a, prompt: '2+2?', expect: {numeric: 4}}\n"))
    j = load_suite(write(tmp_path, "s.jsonl", json.dumps(cases[0]) + "\n"))
    assert y.hash == j.hash


@pytest.mark.parametrize("text, message", [
    ("cases: []", "no cases"),
    ("cases:\n  - {id: a, prompt: hi}", "case 'a': no 'expect'"),
    ("cases:\n  - {id: a, expect: {contains: x}}", "case 'a': give exactly one of 'prompt' or 'messages'"),
    ("cases:\n  - {id: a, prompt: hi, expect: {contains: x}}\n  - {id: a, prompt: ho, expect: {contains: y}}",
     "case 'a': duplicate id"),
    ("cases:\n  - {id: a, prompt: hi, expect: {contains: x}, colour: red}", "case 'a': unknown key(s) colour"),
    ("cases:\n  - {id: a, prompt: hi, expect: {contains: x}, max_tokens: 0}", "'max_tokens' must be at least 1"),
    ("cases:\n  - {id: a, prompt: hi, expect: {choice: A}}", "a choice check needs 'choices'"),
    ("cases:\n  - {id: a, prompt: hi, expect: {type: judge, rubric: ok}}", "needs a judge model"),
    ("cases:\n  - {id: a, prompt: hi, expect: {perplexity: 10}}", "a perplexity case has a 'text'"),
    ("cases:\n  - {id: a, prompt: hi, expect: {contains: x}, tools: [{name: f}]}", "'tools' must be OpenAI tool definitions"),
    ("cases:\n  - {id: a, prompt: hi, expect: {contains: x}, vote: mode}", "'vote' is one of majority, best"),
    ("cases: [unclosed", "not valid YAML"),
    ("just a string", "expected a mapping"),
])
def test_bad_suites_are_one_line_errors_naming_the_case(tmp_path, text, message):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(SuiteError, match="no such suite file"):
        load_suite(tmp_path / "missing.yaml")
    with pytest.raises(SuiteError, match="a suite is a .yaml"):
        load_suite(write(tmp_path, "s.txt", "x"))
    with pytest.raises(SuiteError, match="line 2: not valid JSON"):
        load_suite(write(tmp_path, "s.jsonl", '{"id": "a", "prompt": "x", "expect": {"contains": "x"}}\n{oops\n'))


def test_stop_strings_default_and_override():
    from rung.bench.candidates import requests_for
    from rung.bench.suite import suite_from_dict

    suite = suite_from_dict({"defaults": {"stop": "\n"}, "cases": [
        {"id": "a", "prompt": "2+2?", "expect": {"numeric": 4}},
        {"id": "b", "prompt": "JSON", "stop": [], "expect": {"json": {"type": "object"}}},
        {"id": "c", "prompt": "x", "stop": ["END", "###"], "expect": {"contains": "x"}}]})
    assert [c.stop for c in suite.cases] == [("\n",), (), ("END", "###")]
    assert [r.stop for r in requests_for(suite.cases, 0)] == [["\n"], None, ["END", "###"]]
    with pytest.raises(SuiteError, match="'stop' must be"):
        suite_from_dict({"cases": [{"prompt": "x", "stop": [""], "expect": {"contains": "x"}}]})


def test_self_consistency_defaults_to_sampling():
    from rung.bench.suite import suite_from_dict

    suite = suite_from_dict({"cases": [{"prompt": "2+2?", "samples": 5, "expect": {"numeric": 4}},
                                       {"prompt": "3+3?", "samples": 3, "temperature": 0.2, "expect": {"numeric": 6}}]})
    assert suite.cases[0].samples == 5 and suite.cases[0].temperature == 0.7  # n greedy samples would agree
    assert suite.cases[1].temperature == 0.2


def test_the_starter_suite_covers_what_the_readme_promises():
    suite = starter_suite()
    kinds = {c.type for case in suite.cases for c in case.checks}
    assert {"contains", "numeric", "choice", "json", "tool_call", "perplexity"} <= kinds
    assert suite.tag_values("domain") >= {"factual-qa", "arithmetic", "extraction", "tools", "summary"}
    req = starter_requirements()
    assert set(req.domains) <= suite.tag_values("domain") and req.languages == ["en"]
    assert any("@int4" in c for c in req.candidates) and any("@int8" in c for c in req.candidates)
