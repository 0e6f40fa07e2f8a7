"""Tool-use policy: which tools each API key may call, and with which arguments.

A policy file (YAML or JSON, read with ``yaml.safe_load``)::

    unknown_keys: reject          # reject (401, the default) | default: unlisted keys get `default`
    max_rounds: 2                 # denied calls fed back to the model before the reply is a refusal
    default:                      # the rules of keys without rules of their own
      tools:
        allow: ["get_*", "search"]            # globs; a tool no allow glob matches is denied
        deny: ["*delete*"]                    # deny is evaluated first: it wins over allow
      arguments:
        read_file:                            # a tool name or glob
          path: {pattern: '[\\w./-]+', max_length: 200, deny: ["@path_traversal", "^/etc/"]}
        "*":                                  # every tool
          "*": {deny: ["@shell_destructive"]} # every argument
    keys:
      ci-bot:
        sha256: 5e8848...                     # `rung policy hash-key` prints it; keys are never stored
        tools: {allow: ["*"], deny: [shell]}  # rules of its own (else `default`)

Semantics, OPA-like but small: everything is denied unless allowed (no ``allow`` list allows no tool);
deny rules are evaluated before allow rules; an argument rule constrains a call only when the call
has that argument (a tool's own schema says what is required). Argument rules: ``pattern`` (the
whole value must match), ``enum`` (one of these values), ``max_length`` (characters), ``deny``
(regexes searched in the value and in every string nested in it; ``@name`` names a built-in one,
``DENY_PATTERNS``). A non-string value is matched as its JSON text.

A ``Decision`` names the rule that fired as a path into the file (``keys.ci-bot.tools.deny[0]``) and
a reason that never quotes argument values, so it can be logged and shown to the model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DENY_PATTERNS = {
    # "..", "%2e%2e" as a path segment: climbing out of the directory a tool is meant for
    "path_traversal": r"(?i)(^|[\\/])(\.\.|%2e%2e)([\\/]|$)",
    # commands that destroy data or the machine
    "shell_destructive": (r"\brm\s+(-[A-Za-z]*\s+)*(-[A-Za-z]*[rR][A-Za-z]*f|-[A-Za-z]*f[A-Za-z]*[rR]|--recursive|-[rR]\b)"
                          r"|\bmkfs(\.\w+)?\b|\bdd\s+[^\n]*\bof=/dev/|:\(\)\s*\{\s*:\|:&\s*\};:|>\s*/dev/[sh]d[a-z]"
                          r"|\bchmod\s+-R\s+0?777\s+/(\s|$)|\b(shutdown|reboot|halt|poweroff)\b"),
    # chaining or substituting commands in what should be one argument
    "shell_metachar": r"[;&|`$<>\n]",
}

TOP_KEYS = {"version", "unknown_keys", "max_rounds", "default", "keys"}
RULE_KEYS = {"tools", "arguments"}
KEY_KEYS = RULE_KEYS | {"sha256"}
TOOLS_KEYS = {"allow", "deny"}
ARG_KEYS = {"pattern", "enum", "max_length", "deny"}


class PolicyError(ValueError):
    """A policy file rung cannot use; the message names the file and the bad key."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str = ""  # where in the file: "default.arguments.read_file.path.deny[0]"
    reason: str = ""  # for people and for the model; never quotes argument values
    kind: str = "tool"  # what was denied: "tool" (its name) or "arguments"


@dataclass(frozen=True)
class ArgRule:
    where: str  # "default.arguments.read_file.path"
    pattern: re.Pattern | None = None
    enum: tuple | None = None
    max_length: int | None = None
    deny: tuple[tuple[str, re.Pattern], ...] = ()  # (as written, compiled)

    def check(self, name: str, value: Any) -> Decision | None:
        """The decision against this value, None when it passes."""
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
        if self.max_length is not None and len(text) > self.max_length:
            return Decision(False, f"{self.where}.max_length",
                            f"argument {name!r} is longer than {self.max_length} characters", "arguments")
        for i, (written, regex) in enumerate(self.deny):
            if any(regex.search(s) for s in _strings(value)):
                return Decision(False, f"{self.where}.deny[{i}]", f"argument {name!r} matches the deny pattern {written!r}", "arguments")
        if self.enum is not None and value not in self.enum:
            return Decision(False, f"{self.where}.enum", f"argument {name!r} is not one of the allowed values", "arguments")
        if self.pattern is not None and not self.pattern.fullmatch(text):
            return Decision(False, f"{self.where}.pattern",
                            f"argument {name!r} does not match the pattern {self.pattern.pattern!r}", "arguments")
        return None


@dataclass(frozen=True)
class Rules:
    """One rule set: tool globs and argument rules (per tool glob, per argument name or "*")."""

    where: str  # "default" | "keys.ci-bot"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    arguments: tuple[tuple[str, tuple[tuple[str, ArgRule], ...]], ...] = ()

    def tool(self, name: str) -> Decision:
        """May a tool of this name be offered to the model and called at all?"""
        for i, glob in enumerate(self.deny):
            if fnmatch.fnmatchcase(name, glob):
                return Decision(False, f"{self.where}.tools.deny[{i}]", f"tool {name!r} is denied ({glob!r})")
        for i, glob in enumerate(self.allow):
            if fnmatch.fnmatchcase(name, glob):
                return Decision(True, f"{self.where}.tools.allow[{i}]")
        return Decision(False, f"{self.where}.tools.allow", f"tool {name!r} is not in the allowed tools")

    def call(self, name: str, arguments: Any) -> Decision:
        """A call the model made: its tool, then each argument rule that applies (file order)."""
        decision = self.tool(name)
        if not decision.allowed:
            return decision
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = None
        if not isinstance(arguments, dict):
            return Decision(False, f"{self.where}.arguments", f"the arguments of {name!r} are not a JSON object", "arguments")
        for glob, per_argument in self.arguments:
            if not fnmatch.fnmatchcase(name, glob):
                continue
            for arg, rule in per_argument:
                names = list(arguments) if arg == "*" else [arg] if arg in arguments else []
                for n in names:
                    denied = rule.check(n, arguments[n])
                    if denied is not None:
                        return denied
        return decision


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the key's name in the policy file (never the key) and its rules."""

    name: str
    rules: Rules | None  # None: no policy, every tool allowed


@dataclass
class Policy:
    source: str
    default: Rules
    keys: dict[str, tuple[bytes, Rules]] = field(default_factory=dict)  # name → (sha256 digest, rules)
    unknown_keys: str = "reject"
    max_rounds: int = 2

    @property
    def authenticates(self) -> bool:
        """The file lists keys: requests are authenticated against them."""
        return bool(self.keys)

    def principal(self, token: str | None) -> Principal | None:
        """The principal of a bearer token; None when the request must be refused (401)."""
        if token:
            digest = hashlib.sha256(token.encode()).digest()
            found = None
            for name, (want, rules) in self.keys.items():  # every key compared, in constant time
                if hmac.compare_digest(digest, want):
                    found = Principal(name, rules)
            if found is not None:
                return found
        if not self.keys or self.unknown_keys == "default":
            return Principal("default", self.default)
        return None

    def rules_of(self, name: str) -> Rules:
        if name == "default":
            return self.default
        if name not in self.keys:
            raise PolicyError(f"{self.source}: no key named {name!r} (keys: {', '.join(self.keys) or 'none'})")
        return self.keys[name][1]


# ---- reading a file -------------------------------------------------------------------------------


def hash_key(key: str) -> str:
    """What a policy file stores for an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_policy(path: str | Path) -> Policy:
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"{path}: cannot read the policy file: {e.strerror or e}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise PolicyError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{' '.join(str(e).split())}") from None
    return parse_policy(data, str(path))


def parse_policy(data: Any, source: str = "policy") -> Policy:
    def fail(where: str, what: str):
        raise PolicyError(f"{source}: {where}: {what}")

    if not isinstance(data, dict):
        fail("(top level)", "expected a mapping with `default` and/or `keys`")
    _known(data, TOP_KEYS, "(top level)", fail)
    unknown = data.get("unknown_keys", "reject")
    if unknown not in ("reject", "default"):
        fail("unknown_keys", f"expected reject or default, got {unknown!r}")
    rounds = data.get("max_rounds", 2)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or not 0 <= rounds <= 8:
        fail("max_rounds", f"expected an integer in [0, 8], got {rounds!r}")
    default = _rules(data.get("default") or {}, "default", fail)
    keys: dict[str, tuple[bytes, Rules]] = {}
    raw_keys = data.get("keys") or {}
    if not isinstance(raw_keys, dict):
        fail("keys", "expected a mapping of key names to {sha256, tools, arguments}")
    seen: dict[bytes, str] = {}
    for name, entry in raw_keys.items():
        where = f"keys.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name) or name == "default":
            fail(where, "a key name is 1-64 letters, digits, '_', '.' or '-' (and not 'default')")
        if not isinstance(entry, dict):
            fail(where, "expected a mapping with sha256 (and tools, arguments)")
        _known(entry, KEY_KEYS, where, fail)
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            fail(f"{where}.sha256", "expected the 64 hex digits of the key's SHA-256 (`rung policy hash-key`)")
        raw = bytes.fromhex(digest)
        if raw in seen:
            fail(f"{where}.sha256", f"the same key as keys.{seen[raw]}")
        seen[raw] = name
        rules = _rules(entry, where, fail) if RULE_KEYS & set(entry) else default  # rules name where they are written
        keys[name] = (raw, rules)
    return Policy(source, default, keys, unknown, rounds)


def _known(d: dict, allowed: set[str], where: str, fail) -> None:
    for k in d:
        if k not in allowed:
            fail(f"{where}.{k}" if where != "(top level)" else str(k),
                 f"unknown key (expected one of {', '.join(sorted(allowed))})")


def _rules(d: Any, where: str, fail) -> Rules:
    if not isinstance(d, dict):
        fail(where, "expected a mapping with tools and/or arguments")
    _known({k: v for k, v in d.items() if k != "sha256"}, RULE_KEYS, where, fail)
    tools = d.get("tools") or {}
    if not isinstance(tools, dict):
        fail(f"{where}.tools", "expected a mapping with allow and/or deny lists of globs")
    _known(tools, TOOLS_KEYS, f"{where}.tools", fail)
    globs = {}
    for k in ("allow", "deny"):
        v = tools.get(k) or []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(g, str) and g for g in v):
            fail(f"{where}.tools.{k}", "expected a list of tool names or globs")
        globs[k] = tuple(v)
    arguments = d.get("arguments") or {}
    if not isinstance(arguments, dict):
        fail(f"{where}.arguments", "expected a mapping of tool globs to {argument: rule}")
    parsed = []
    for glob, per_argument in arguments.items():
        w = f"{where}.arguments.{glob}"
        if not isinstance(per_argument, dict):
            fail(w, "expected a mapping of argument names (or '*') to rules")
        parsed.append((str(glob), tuple((str(arg), _arg_rule(rule, f"{w}.{arg}", fail))
                                        for arg, rule in per_argument.items())))
    return Rules(where, globs["allow"], globs["deny"], tuple(parsed))


def _arg_rule(d: Any, where: str, fail) -> ArgRule:
    if not isinstance(d, dict):
        fail(where, "expected a mapping with pattern, enum, max_length and/or deny")
    _known(d, ARG_KEYS, where, fail)
    pattern = d.get("pattern")
    if pattern is not None:
        pattern = _regex(pattern, f"{where}.pattern", fail)
    enum = d.get("enum")
    if enum is not None and (not isinstance(enum, list) or not enum):
        fail(f"{where}.enum", "expected a non-empty list of values")
    limit = d.get("max_length")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        fail(f"{where}.max_length", f"expected a non-negative integer, got {limit!r}")
    deny = d.get("deny") or []
    if isinstance(deny, str):
        deny = [deny]
    if not isinstance(deny, list):
        fail(f"{where}.deny", "expected a list of regexes or @names")
    compiled = []
    for i, p in enumerate(deny):
        if isinstance(p, str) and p.startswith("@"):
            if p[1:] not in DENY_PATTERNS:
                fail(f"{where}.deny[{i}]", f"no built-in pattern {p!r} (known: "
                                           f"{', '.join('@' + n for n in DENY_PATTERNS)})")
            compiled.append((p, re.compile(DENY_PATTERNS[p[1:]])))
        else:
            compiled.append((p, _regex(p, f"{where}.deny[{i}]", fail)))
    return ArgRule(where, pattern, tuple(enum) if enum is not None else None, limit, tuple(compiled))


def _regex(p: Any, where: str, fail) -> re.Pattern:
    if not isinstance(p, str):
        fail(where, f"expected a regular expression (a string), got {p!r}")
    try:
        return re.compile(p)
    except re.error as e:
        fail(where, f"not a valid regular expression: {e}")


def _strings(value: Any):
    """Every string in a JSON value (keys of objects too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
