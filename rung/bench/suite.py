"""Eval suites: YAML or JSONL files of cases, each with the checks its answer must pass.

A suite file (YAML)::

    name: support-bot
    version: 3                    # your label; the content hash below is what identifies a suite
    defaults: {max_tokens: 64, temperature: 0}
    judge: openai:http://judge:8000/v1#qwen3-8b     # for `type: judge` checks (optional)
    cases:
      - id: capital
        prompt: What is the capital of France? Answer in one word.
        expect: {type: contains, value: Paris}
      - id: refund-json
        messages: [{role: system, content: ...}, {role: user, content: ...}]
        expect:
          - {type: json, schema: {...}, fields: {order_id: "A-17"}}
        tags: {language: en, domain: support}

A ``tool_call`` check's expected arguments may list several acceptable values, and mark an argument
(or a key of a mapping argument) optional::

    expect: {type: tool_call, name: get_weather, exact: true,
             arguments: {city: {any_of: [Paris, Paris France]}, unit: {any_of: [celsius], optional: true}}}

A mapping with the key ``any_of`` is read as such a matcher, never as a literal value.

An imported suite (``rung suite import``) also records where it came from: ``provenance`` (package,
version, subset, files, date) and ``license``; neither changes results, so neither is hashed.

A JSONL file holds one case per line; a line ``{"suite": {...}}`` sets name, defaults and judge.
``expect`` is one check or a list (all must pass); the shorthand ``{contains: Paris}`` means
``{type: contains, value: Paris}``. Check types and their options live in ``rung.bench.scorers``.

The content hash covers what changes results (defaults, judge, every case) as canonical JSON, so
key order, comments and whitespace in the YAML do not change it; name, version and description do
not either. Every report prints it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rung.extras import require

CASE_KEYS = {"id", "prompt", "messages", "system", "choices", "tools", "text", "expect", "max_tokens",
             "temperature", "samples", "vote", "stop", "tags"}
DEFAULT_KEYS = {"max_tokens", "temperature", "system", "samples", "vote", "stop"}
SUITE_KEYS = {"name", "version", "description", "defaults", "judge", "cases", "rag", "provenance", "license"}
RAG_KEYS = {"index", "k", "max_chars"}
VOTES = ("majority", "best")
# `repeats: k`, on a case or in the defaults: runs of each case with seeds apart, to measure noise
MAX_REPEATS = 100
CASE_KEYS = CASE_KEYS | {"repeats"}
DEFAULT_KEYS = DEFAULT_KEYS | {"repeats"}


class SuiteError(ValueError):
    """A suite file rung cannot run; the message names the file, the case and the field."""


@dataclass(frozen=True)
class Check:
    type: str
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.options}


@dataclass(frozen=True)
class Case:
    id: str
    checks: tuple[Check, ...]
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    system: str | None = None
    choices: tuple[str, ...] | None = None
    tools: tuple[dict, ...] | None = None
    text: str | None = None  # scored text of a perplexity case (nothing is generated)
    max_tokens: int = 64
    temperature: float = 0.0
    samples: int = 1  # self-consistency: sample n answers and vote
    vote: str = "majority"
    stop: tuple[str, ...] = ()  # stop strings, as lm-evaluation-harness's `until`: the answer ends there
    tags: dict[str, str] = field(default_factory=dict)
    # runs of the case, each with its own seed, to measure noise (pass^k, flakiness); how often a case
    # is measured, not what: left out of the content hash (each repeat is cached under its own key)
    repeats: int = 1

    @property
    def generates(self) -> bool:
        return self.prompt is not None or self.messages is not None

    def chat_messages(self) -> list[dict]:
        """The conversation sent to the model: the system prompt, then the messages or the prompt."""
        from rung.bench.scorers import choice_labels

        if self.messages is not None:
            messages = [dict(m) for m in self.messages]
        else:
            content = self.prompt
            if self.choices:  # multiple choice: list the options under their letters
                lines = [f"{label}. {choice}" for label, choice in zip(choice_labels(len(self.choices)), self.choices)]
                content = f"{content}\n" + "\n".join(lines) + "\nAnswer with the letter of the correct option."
            messages = [{"role": "user", "content": content}]
        if self.system and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system})
        return messages

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "expect": [c.to_dict() for c in self.checks], "max_tokens": self.max_tokens,
             "temperature": self.temperature, "samples": self.samples, "vote": self.vote}
        for key in ("prompt", "system", "text"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        for key in ("messages", "choices", "tools"):
            if getattr(self, key) is not None:
                d[key] = list(getattr(self, key))
        if self.stop:
            d["stop"] = list(self.stop)
        if self.tags:
            d["tags"] = dict(self.tags)
        return d


@dataclass(frozen=True)
class Suite:
    name: str
    cases: tuple[Case, ...]
    judge: str | None = None
    version: str | None = None
    description: str | None = None
    source: str | None = None  # the file it came from
    rag: dict | None = None  # {index, k, max_chars}: ground every case in this retrieval index (`rung index`)
    provenance: dict | None = None  # where an imported suite came from (package, version, files, date)
    license: str | None = None  # the license of an imported suite's data

    @property
    def hash(self) -> str:
        """``sha256:`` and 12 hex digits of the canonical content (see the module docstring)."""
        return "sha256:" + hashlib.sha256(canonical_json(self.content()).encode()).hexdigest()[:12]

    def content(self) -> dict[str, Any]:
        return {"judge": self.judge, "cases": [c.to_dict() for c in self.cases]}

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise KeyError(case_id)

    def tag_values(self, tag: str) -> set[str]:
        return {c.tags[tag] for c in self.cases if tag in c.tags}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# ---- loading -------------------------------------------------------------------------------------


def load_suite(path: str | Path) -> Suite:
    """Read a .yaml/.yml or .jsonl suite; raises SuiteError naming the file, case and field."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"{path}: no such suite file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        data = _read_jsonl(path, text)
    elif path.suffix.lower() in (".yaml", ".yml", ".json"):
        data = _read_yaml(path, text)
    else:
        raise SuiteError(f"{path}: a suite is a .yaml, .yml, .json or .jsonl file")
    return suite_from_dict(data, source=str(path))


def _read_yaml(path: Path, text: str) -> dict:
    require("bench", "yaml", what="rung.bench")
    import yaml

    try:
        data = yaml.safe_load(text)  # safe_load: plain data only, no Python objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SuiteError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if isinstance(data, list):
        data = {"cases": data}
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: expected a mapping with 'cases' (or a list of cases)")
    return data


def json_lines(path, text: str, error: type[Exception] = SuiteError):
    """(line number, object) for each non-blank line of a JSON Lines text; a line that is not a JSON
    object is an ``error`` naming the file and the line."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}: line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise error(f"{path}: line {number}: expected a JSON object")
        yield number, item


def _read_jsonl(path: Path, text: str) -> dict:
    data: dict[str, Any] = {"cases": []}
    for number, item in json_lines(path, text):
        if set(item) == {"suite"}:
            if not isinstance(item["suite"], dict):
                raise SuiteError(f"{path}: line {number}: 'suite' must be an object")
            data.update({k: v for k, v in item["suite"].items() if k != "cases"})
        else:
            item.setdefault("id", f"line-{number}")
            data["cases"].append(item)
    return data


def suite_from_dict(data: dict[str, Any], source: str | None = None, name: str | None = None) -> Suite:
    where = source or "suite"
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (expected {', '.join(sorted(SUITE_KEYS))})")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - DEFAULT_KEYS:
        raise SuiteError(f"{where}: 'defaults' takes {', '.join(sorted(DEFAULT_KEYS))}")
    raw_cases = data.get("cases")
    if not isinstance(raw_cases, list) or not raw_cases:
        raise SuiteError(f"{where}: no cases (expected a non-empty list under 'cases')")
    judge = data.get("judge")
    if judge is not None and not isinstance(judge, str):
        raise SuiteError(f"{where}: 'judge' must be a model spec string")
    cases, seen = [], set()
    for i, raw in enumerate(raw_cases):
        case = _case(raw, defaults, where, i)
        if case.id in seen:
            raise SuiteError(f"{where}: case {case.id!r}: duplicate id")
        seen.add(case.id)
        if any(c.type == "judge" and not (c.options.get("judge") or judge) for c in case.checks):
            raise SuiteError(f"{where}: case {case.id!r}: a judge check needs a judge model "
                             f"('judge:' in the check or the suite)")
        cases.append(case)
    version = data.get("version")
    if data.get("provenance") is not None and not isinstance(data["provenance"], dict):
        raise SuiteError(f"{where}: 'provenance' must be a mapping (package, version, files, ...)")
    if data.get("license") is not None and not isinstance(data["license"], str):
        raise SuiteError(f"{where}: 'license' must be a string")
    default_name = Path(source).stem if source else "suite"
    return Suite(name=str(data.get("name") or name or default_name), cases=tuple(cases), judge=judge,
                 version=None if version is None else str(version), description=data.get("description"),
                 source=source, rag=_rag(data.get("rag"), where, source), provenance=data.get("provenance"),
                 license=data.get("license"))


def _rag(rag: Any, where: str, source: str | None) -> dict | None:
    """A suite's `rag:` key: an index path, or {index, k, max_chars}; the path is relative to the suite file."""
    if rag is None:
        return None
    if isinstance(rag, str):
        rag = {"index": rag}
    if (not isinstance(rag, dict) or set(rag) - RAG_KEYS or not isinstance(rag.get("index"), str)
            or not all(isinstance(rag.get(k, 1), int) and not isinstance(rag.get(k, 1), bool) and rag.get(k, 1) >= 1
                       for k in ("k", "max_chars"))):
        raise SuiteError(f"{where}: 'rag' is an index path or {{index: PATH, k: N, max_chars: N}}")
    index = Path(rag["index"])
    if source and not index.is_absolute():
        index = Path(source).parent / index
    return {**rag, "index": str(index)}


def _case(raw: Any, defaults: dict, where: str, index: int) -> Case:
    from rung.bench.scorers import parse_check

    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: case #{index + 1}: expected a mapping")
    case_id = str(raw.get("id", f"case-{index + 1}"))
    at = f"{where}: case {case_id!r}"
    unknown = set(raw) - CASE_KEYS
    if unknown:
        raise SuiteError(f"{at}: unknown key(s) {', '.join(sorted(unknown))}")
    expect = raw.get("expect")
    if expect is None:
        raise SuiteError(f"{at}: no 'expect' (the checks its answer must pass)")
    checks = tuple(parse_check(c, at) for c in (expect if isinstance(expect, list) else [expect]))
    if not checks:
        raise SuiteError(f"{at}: 'expect' is empty")

    prompt, messages, text = raw.get("prompt"), raw.get("messages"), raw.get("text")
    perplexity = [c for c in checks if c.type == "perplexity"]
    if perplexity:
        if len(perplexity) != len(checks) or text is None:
            raise SuiteError(f"{at}: a perplexity case has a 'text' and only perplexity checks")
        if not isinstance(text, str) or not text.strip():
            raise SuiteError(f"{at}: 'text' must be a non-empty string")
    elif (prompt is None) == (messages is None):
        raise SuiteError(f"{at}: give exactly one of 'prompt' or 'messages'")
    if prompt is not None and not isinstance(prompt, str):
        raise SuiteError(f"{at}: 'prompt' must be a string")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
            raise SuiteError(f"{at}: 'messages' must be a list of {{role, content}} mappings")
    choices = raw.get("choices")
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                or not all(isinstance(c, str) for c in choices)):
        raise SuiteError(f"{at}: 'choices' must be a list of at least two strings")
    if choices is not None and messages is not None:
        raise SuiteError(f"{at}: 'choices' goes with 'prompt' (with 'messages', list the options yourself)")
    tools = raw.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(_is_tool(t) for t in tools)):
        raise SuiteError(f"{at}: 'tools' must be OpenAI tool definitions "
                         "({type: function, function: {name, description, parameters}})")
    if any(c.type == "choice" for c in checks) and not choices:
        raise SuiteError(f"{at}: a choice check needs 'choices'")

    max_tokens = _number(raw, defaults, "max_tokens", 64, int, at, minimum=1)
    temperature = _number(raw, defaults, "temperature", 0.0, float, at, minimum=0)
    samples = _number(raw, defaults, "samples", 1, int, at, minimum=1)
    repeats = _number(raw, defaults, "repeats", 1, int, at, minimum=1)
    if repeats > MAX_REPEATS:
        raise SuiteError(f"{at}: 'repeats' must be at most {MAX_REPEATS}, got {repeats}")
    vote = raw.get("vote", defaults.get("vote", "majority"))
    if vote not in VOTES:
        raise SuiteError(f"{at}: 'vote' is one of {', '.join(VOTES)}, got {vote!r}")
    if samples > 1 and "temperature" not in raw and "temperature" not in defaults:
        temperature = 0.7  # n greedy samples would all be the same answer
    tags = raw.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise SuiteError(f"{at}: 'tags' must map names to strings, e.g. {{language: en, domain: support}}")
    system = raw.get("system", defaults.get("system"))
    stop = raw.get("stop", defaults.get("stop")) or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise SuiteError(f"{at}: 'stop' must be a string or a list of non-empty strings")
    return Case(id=case_id, checks=checks, prompt=prompt, messages=tuple(messages) if messages else None,
                system=system, choices=tuple(choices) if choices else None, tools=tuple(tools) if tools else None,
                text=text, max_tokens=max_tokens, temperature=temperature, samples=samples, vote=vote,
                stop=tuple(stop), tags={str(k): v for k, v in tags.items()}, repeats=repeats)


def _number(raw: dict, defaults: dict, key: str, default, kind, at: str, minimum):
    value = raw.get(key, defaults.get(key, default))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise SuiteError(f"{at}: '{key}' must be {'a whole number' if kind is int else 'a number'}, got {value!r}")
    if value < minimum:
        raise SuiteError(f"{at}: '{key}' must be at least {minimum}, got {value}")
    return kind(value)


def _is_tool(tool: Any) -> bool:
    return (isinstance(tool, dict) and tool.get("type", "function") == "function"
            and isinstance(tool.get("function"), dict) and isinstance(tool["function"].get("name"), str))
