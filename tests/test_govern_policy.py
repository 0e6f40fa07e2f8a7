"""The tool-use policy file: parsing with one-line errors, deny before allow, argument rules, keys
by hash, and `rung policy`."""

from __future__ import annotations

import json

import pytest

from rung.govern.policy import PolicyError, hash_key, load_policy, parse_policy

POLICY = f"""
unknown_keys: reject
max_rounds: 1
default:
  tools:
    allow: ["get_*", read_file, run]
    deny: ["*delete*"]
  arguments:
    read_file:
      path: {{pattern: '[\\w./-]+', max_length: 40, deny: ["@path_traversal", "^/etc/"]}}
    get_weather:
      unit: {{enum: [celsius, fahrenheit]}}
    "*":
      "*": {{deny: ["@shell_destructive"]}}
keys:
  ci-bot:
    sha256: {hash_key("ci-secret")}
  admin:
    sha256: {hash_key("admin-secret")}
    tools: {{allow: ["*"], deny: [format_disk]}}
"""


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return load_policy(path)


def test_keys_are_found_by_hash_and_unknown_keys_are_refused(policy):
    assert policy.principal("ci-secret").name == "ci-bot"
    assert policy.principal("admin-secret").name == "admin"
    assert policy.principal("wrong") is None and policy.principal(None) is None
    assert "ci-secret" not in repr(policy)  # only digests are kept
    opened = parse_policy({"unknown_keys": "default", "keys": {"a": {"sha256": hash_key("x")}}})
    assert opened.principal("anything").name == "default" and opened.principal("x").name == "a"
    assert parse_policy({}).principal(None).name == "default"  # no keys: the file does not authenticate


def test_deny_is_evaluated_before_allow_and_unlisted_tools_are_denied(policy):
    rules = policy.default
    assert rules.tool("get_weather").allowed
    d = rules.tool("get_delete_user")  # matches allow get_* and deny *delete*: deny wins
    assert not d.allowed and d.rule == "default.tools.deny[0]" and d.kind == "tool"
    d = rules.tool("shell")
    assert not d.allowed and d.rule == "default.tools.allow" and "not in the allowed tools" in d.reason
    assert not parse_policy({}).default.tool("anything").allowed  # no allow list allows nothing
    admin = policy.rules_of("admin")
    assert admin.tool("shell").allowed and not admin.tool("format_disk").allowed
    assert policy.rules_of("ci-bot").tool("shell").allowed is False  # a key without rules has the default's


@pytest.mark.parametrize("name, arguments, rule", [
    ("read_file", {"path": "docs/readme.md"}, None),
    ("read_file", {"path": "../../etc/passwd"}, "default.arguments.read_file.path.deny[0]"),
    ("read_file", {"path": "docs/%2E%2E/secret"}, "default.arguments.read_file.path.deny[0]"),
    ("read_file", {"path": "/etc/shadow"}, "default.arguments.read_file.path.deny[1]"),
    ("read_file", {"path": "a" * 41}, "default.arguments.read_file.path.max_length"),
    ("read_file", {"path": "notes; cat x"}, "default.arguments.read_file.path.pattern"),
    ("get_weather", {"city": "Paris", "unit": "kelvin"}, "default.arguments.get_weather.unit.enum"),
    ("get_weather", {"city": "Paris", "unit": "celsius"}, None),
    ("run", {"command": "ls -la"}, None),
    ("run", {"command": "cd /tmp && rm -rf /"}, "default.arguments.*.*.deny[0]"),
    ("run", {"command": "rm -r -f build"}, "default.arguments.*.*.deny[0]"),
    ("run", {"steps": [{"cmd": "sudo rm -fr ~"}]}, "default.arguments.*.*.deny[0]"),  # nested strings too
    ("run", {"command": "format the report"}, None),
    ("read_file", "not json", "default.arguments"),
])
def test_argument_rules(policy, name, arguments, rule):
    d = policy.default.call(name, json.dumps(arguments) if isinstance(arguments, dict) else arguments)
    assert d.allowed is (rule is None), d
    if rule:
        assert d.rule == rule and d.kind == "arguments"
        for value in (arguments.values() if isinstance(arguments, dict) else []):
            assert str(value) not in d.reason  # reasons never quote what the model sent


@pytest.mark.parametrize("data, message", [
    ({"defualt": {}}, "policy.yaml: defualt: unknown key"),
    ({"default": {"tools": {"alow": ["x"]}}}, "policy.yaml: default.tools.alow: unknown key"),
    ({"default": {"tools": {"allow": "x", "deny": [3]}}}, "policy.yaml: default.tools.deny: expected a list"),
    ({"default": {"arguments": {"t": {"a": {"pattern": "("}}}}}, "default.arguments.t.a.pattern: not a valid regular"),
    ({"default": {"arguments": {"t": {"a": {"deny": ["@nope"]}}}}}, "default.arguments.t.a.deny[0]: no built-in"),
    ({"default": {"arguments": {"t": {"a": {"max_length": -1}}}}}, "default.arguments.t.a.max_length"),
    ({"default": {"arguments": {"t": {"a": {"regex": "x"}}}}}, "default.arguments.t.a.regex: unknown key"),
    ({"keys": {"bot": {"sha256": "abc"}}}, "policy.yaml: keys.bot.sha256: expected the 64 hex digits"),
    ({"keys": {"bot": {"key": "plain"}}}, "policy.yaml: keys.bot.key: unknown key"),
    ({"keys": {"a": {"sha256": "0" * 64}, "b": {"sha256": "0" * 64}}}, "keys.b.sha256: the same key as keys.a"),
    ({"unknown_keys": "allow"}, "unknown_keys: expected reject or default"),
    ({"max_rounds": 99}, "max_rounds: expected an integer in [0, 8]"),
    (["not", "a", "mapping"], "policy.yaml: (top level): expected a mapping"),
])
def test_bad_files_are_one_line_errors_naming_the_file_and_key(tmp_path, data, message):
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    text = str(info.value)
    assert message in text and "\n" not in text
    path.write_text("default: [unclosed")
    with pytest.raises(PolicyError, match=r"policy.yaml: not valid YAML"):
        load_policy(path)
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path / "missing.yaml")


def test_yaml_tags_are_not_constructed(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("default: !!python/object/apply:os.system ['echo unsafe']")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(path)


def test_rung_policy_check_and_dry_run(policy, tmp_path, capsys):
    from rung.cli import main

    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    assert main(["policy", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "ci-bot" in out and "admin" in out
    assert main(["policy", "check", str(path), "--key", "ci-bot", "--tool", "read_file",
                 "--arguments", '{"path": "../x"}']) == 1
    out = capsys.readouterr().out
    assert "deny" in out and "default.arguments.read_file.path.deny[0]" in out
    assert main(["policy", "check", str(path), "--key", "admin", "--tool", "shell"]) == 0
    assert "allow" in capsys.readouterr().out
    path.write_text("keys: {x: {sha256: nope}}")
    assert main(["policy", "check", str(path)]) == 2
    assert "keys.x.sha256" in capsys.readouterr().err
    import io
    import sys

    sys_stdin, sys.stdin = sys.stdin, io.StringIO("ci-secret\n")
    try:
        assert main(["policy", "hash-key"]) == 0
    finally:
        sys.stdin = sys_stdin
    assert capsys.readouterr().out.strip() == hash_key("ci-secret")
