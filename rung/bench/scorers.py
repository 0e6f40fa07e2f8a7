"""Check types: how an answer is scored.

  exact       value; options ignore_case (false), strip_punctuation (false). Text is NFKC-normalised,
              trimmed, and runs of whitespace become one space before comparing.
  contains    value (a string or a list: all must appear), any (a list: one must appear), none (a
              list: none may appear); ignore_case (true), word (false: match whole words only).
  regex       pattern; flags ("i", "m", "s"); full (false: search; true: the whole answer must match).
  numeric     value; tolerance (absolute, 0), rel_tolerance (0); pick: last (default, the final
              answer as in GSM8K), first, or any. Numbers are read as people write them: "1,234.5",
              "-3", "−3" (U+2212), "$1,200", "45%", "3.2e5", full-width digits.
  choice      value (the correct letter, or the correct option's text); the case lists ``choices``.
              Reads "B", "(B)", "B.", "Answer: B", "**B**", or the option's text.
  json        schema (a JSON Schema), fields ({dotted.path: expected value}). The first JSON value in
              the answer (code fences and prose around it allowed) must validate and hold the fields;
              ``schema_valid`` on the outcome feeds schema fidelity.
  tool_call   name (the function, or null: no call expected), arguments (expected values; extra
              arguments are allowed unless exact: true). An expected value may be a matcher
              ``{any_of: [v1, v2, ...], optional: true}``: any listed value passes, and with optional
              the argument (or a key of a mapping argument) may also be left out. Values compare as in
              ``same_value``, lists item by item, mappings key by key. From the API's tool_calls, else
              parsed from the text: <tool_call>{...}</tool_call>, a bare {"name", "arguments"} object,
              or name(k=v).
  perplexity  max (the highest perplexity that passes) over the case's ``text``; local models score
              from their logits, endpoints through completions logprobs with echo (else unsupported).
  judge       rubric; judge (a model spec; else the suite's judge). The judge answers PASS or FAIL.

Every check also sets ``answer``, the normalised answer self-consistency votes on.
"""

from __future__ import annotations

import ast
import json
import math
import re
import unicodedata
from typing import Any

from rung.bench.records import CheckOutcome, Sample
from rung.bench.suite import Check, SuiteError
from rung.extras import require

CHECK_OPTIONS = {
    "exact": {"value", "ignore_case", "strip_punctuation"},
    "contains": {"value", "any", "none", "ignore_case", "word"},
    "regex": {"pattern", "flags", "full"},
    "numeric": {"value", "tolerance", "rel_tolerance", "pick"},
    "choice": {"value"},
    "json": {"schema", "fields"},
    "tool_call": {"name", "arguments", "exact"},
    "perplexity": {"max"},
    "judge": {"rubric", "judge"},
}
REQUIRED = {"exact": "value", "regex": "pattern", "numeric": "value", "choice": "value", "tool_call": "name",
            "perplexity": "max", "judge": "rubric"}


# ---- parsing a check ---------------------------------------------------------------------------


def parse_check(raw: Any, at: str) -> Check:
    """A check from its canonical form ``{type: T, ...}`` or the shorthand ``{T: value, ...}``."""
    if not isinstance(raw, dict):
        raise SuiteError(f"{at}: a check is a mapping like {{type: contains, value: Paris}}")
    raw = dict(raw)
    if "type" in raw:
        kind = raw.pop("type")
    else:
        kinds = [k for k in raw if k in CHECK_OPTIONS]
        if len(kinds) != 1:
            raise SuiteError(f"{at}: a check needs 'type' (one of {', '.join(CHECK_OPTIONS)})")
        kind = kinds[0]
        value = raw.pop(kind)
        key = REQUIRED.get(kind, "value")
        if kind == "json" and isinstance(value, dict):
            key = "schema"
        raw[key] = value
    if kind not in CHECK_OPTIONS:
        raise SuiteError(f"{at}: unknown check type {kind!r} (one of {', '.join(CHECK_OPTIONS)})")
    unknown = set(raw) - CHECK_OPTIONS[kind]
    if unknown:
        raise SuiteError(f"{at}: {kind} check: unknown option(s) {', '.join(sorted(unknown))} "
                         f"(takes {', '.join(sorted(CHECK_OPTIONS[kind]))})")
    if kind in REQUIRED and REQUIRED[kind] not in raw:
        raise SuiteError(f"{at}: {kind} check needs '{REQUIRED[kind]}'")
    _validate(kind, raw, f"{at}: {kind} check")
    return Check(kind, raw)


def _validate(kind: str, o: dict, at: str) -> None:
    if kind == "contains" and not any(k in o for k in ("value", "any", "none")):
        raise SuiteError(f"{at}: needs 'value', 'any' or 'none'")
    for key in ("value", "any", "none") if kind == "contains" else ():
        if key in o and not (isinstance(o[key], str) or (isinstance(o[key], list) and all(isinstance(v, str) for v in o[key]))):
            raise SuiteError(f"{at}: '{key}' must be a string or a list of strings")
    if kind == "regex":
        try:
            re.compile(o["pattern"], _flags(o.get("flags", ""), at))
        except (re.error, TypeError) as e:
            raise SuiteError(f"{at}: bad pattern {o['pattern']!r} ({e})") from None
    if kind == "numeric":
        if _to_number(o["value"]) is None:
            raise SuiteError(f"{at}: 'value' must be a number, got {o['value']!r}")
        for key in ("tolerance", "rel_tolerance"):
            if key in o and (not isinstance(o[key], (int, float)) or o[key] < 0):
                raise SuiteError(f"{at}: '{key}' must be a non-negative number")
        if o.get("pick", "last") not in ("last", "first", "any"):
            raise SuiteError(f"{at}: 'pick' is last, first or any")
    if kind == "json":
        if "schema" not in o and "fields" not in o:
            raise SuiteError(f"{at}: needs 'schema' and/or 'fields'")
        if "schema" in o:
            require("bench", "jsonschema", what="rung.bench")
            from jsonschema import SchemaError
            from jsonschema.validators import validator_for

            try:
                validator_for(o["schema"]).check_schema(o["schema"])
            except SchemaError as e:
                raise SuiteError(f"{at}: not a valid JSON Schema ({e.message})") from None
        if "fields" in o and not isinstance(o["fields"], dict):
            raise SuiteError(f"{at}: 'fields' maps dotted paths to expected values")
    if kind == "tool_call":
        if o["name"] is not None and not isinstance(o["name"], str):
            raise SuiteError(f"{at}: 'name' is the function's name (or null: no call expected)")
        if "arguments" in o and not isinstance(o["arguments"], dict):
            raise SuiteError(f"{at}: 'arguments' maps argument names to expected values")
        for key, want in o.get("arguments", {}).items():
            _validate_expected(want, f"{at}: argument {key!r}")
    if kind == "perplexity" and (not isinstance(o["max"], (int, float)) or o["max"] <= 1):
        raise SuiteError(f"{at}: 'max' must be a number above 1")
    if kind == "judge" and not isinstance(o["rubric"], str):
        raise SuiteError(f"{at}: 'rubric' must be a string")


MATCHER_KEYS = {"any_of", "optional"}
MAX_EXPECTED_DEPTH = 32  # nesting of an expected argument value (BFCL's deepest is 3)


def is_matcher(want: Any) -> bool:
    """``{any_of: [...]}`` (with an optional ``optional``): a set of acceptable values, not a literal mapping."""
    return isinstance(want, dict) and "any_of" in want


def is_optional(want: Any) -> bool:
    return is_matcher(want) and want.get("optional") is True


def _validate_expected(want: Any, at: str, depth: int = 0) -> None:
    """An expected argument value: a literal, or a matcher, checked all the way down."""
    if depth > MAX_EXPECTED_DEPTH:
        raise SuiteError(f"{at}: nested deeper than {MAX_EXPECTED_DEPTH} levels")
    if is_matcher(want):
        if set(want) - MATCHER_KEYS:
            raise SuiteError(f"{at}: a matcher takes only 'any_of' and 'optional', got {', '.join(sorted(want))}")
        if not isinstance(want["any_of"], list) or not want["any_of"]:
            raise SuiteError(f"{at}: 'any_of' must be a non-empty list of acceptable values")
        if not isinstance(want.get("optional", False), bool):
            raise SuiteError(f"{at}: 'optional' must be true or false")
        children = want["any_of"]
    else:
        children = want.values() if isinstance(want, dict) else want if isinstance(want, list) else []
    for child in children:
        _validate_expected(child, at, depth + 1)


def _flags(flags: str, at: str) -> int:
    table = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}
    out = 0
    for f in flags or "":
        if f not in table:
            raise SuiteError(f"{at}: unknown regex flag {f!r} (i, m, s)")
        out |= table[f]
    return out


# ---- text normalisation and extraction ---------------------------------------------------------


def normalize(text: str, ignore_case: bool = False, strip_punctuation: bool = False) -> str:
    """NFKC (full-width → ASCII, ligatures, composed accents), whitespace collapsed, trimmed."""
    text = unicodedata.normalize("NFKC", text)
    if strip_punctuation:
        text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


# A number as written: optional sign (ASCII, or U+2212, which NFKC leaves alone), thousands groups of
# exactly three digits, a decimal part, an exponent; units may follow ("5kg"). Not preceded by a
# letter, digit or dot, so "3-4" reads 3 and 4 and neither "v2" nor "1.2.3" is read as a number.
_NUMBER = re.compile(r"(?<![\w.])([-−]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?:[eE]([-+]?\d+))?(?!\d|\.\d)")


def extract_numbers(text: str) -> list[float]:
    text = unicodedata.normalize("NFKC", text)
    out = []
    for m in _NUMBER.finditer(text):
        sign, whole, frac, exp = m.groups()
        value = float(whole.replace(",", "") + (frac or "") + (f"e{exp}" if exp else ""))
        out.append(-value if sign else value)
    return out


def _to_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        found = extract_numbers(value)
        return found[0] if len(found) == 1 else None
    return None


def extract_json(text: str) -> tuple[Any, str | None]:
    """The first JSON object or array in ``text`` and None, or (None, why there is none)."""
    fenced = re.search(r"```(?:json|JSON)?\s*\n?(.*?)```", text, re.DOTALL)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    decoder = json.JSONDecoder()
    error = "no JSON object in the answer"
    for chunk in candidates:
        stripped = chunk.strip()
        # a model's answer is untrusted: integers past Python's digit limit raise ValueError, deep
        # nesting RecursionError; either is an answer without usable JSON, never a crash of the bench
        try:
            return json.loads(stripped), None
        except (ValueError, RecursionError):
            pass
        for m in re.finditer(r"[\[{]", chunk):
            try:
                value, _ = decoder.raw_decode(chunk, m.start())
                if isinstance(value, (dict, list)):
                    return value, None
            except json.JSONDecodeError as e:
                error = f"invalid JSON ({e.msg} at char {e.pos})"
            except (ValueError, RecursionError) as e:
                error = f"unusable JSON ({type(e).__name__})"
                break  # every later start lies inside the same value
    return None, error


def choice_labels(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def extract_choice(text: str, choices: list[str]) -> str | None:
    """The letter the answer picks, or None when it picks none or several."""
    labels = choice_labels(len(choices))
    letters = "".join(labels)
    t = unicodedata.normalize("NFKC", text).strip().replace("*", "")
    patterns = [
        rf"^\(?([{letters}])\)?(?:[.):\]]|\s*$)",  # "B", "B.", "(B)", "B) Paris" at the start
        rf"^\(?([{letters}])\s*[-–—]\s",  # "B - Paris"
        rf"\banswer(?:\s+is)?\s*[:=]?\s*\(?([{letters}])\b",  # "Answer: B", "the answer is (B)"
        rf"\b(?:option|choice)\s*\(?([{letters}])\b",  # "option B"
    ]
    for pattern in patterns:
        m = re.search(pattern, t, re.IGNORECASE if "answer" in pattern or "option" in pattern else 0)
        if m:
            return m.group(1).upper()
    found = set(re.findall(rf"\(([{letters}])\)|\b([{letters}])\)", t))  # "(B)" or "B)" anywhere
    found = {a or b for a, b in found}
    if len(found) == 1:
        return found.pop()
    named = [label for label, choice in zip(labels, choices) if _has_words(t, choice)]
    return named[0] if len(named) == 1 else None


def _has_words(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(normalize(phrase, True))}(?!\w)", normalize(text, True)) is not None


def parse_tool_calls(text: str, tool_names: list[str] | None = None) -> list[dict]:
    """Tool calls written in the text, for models and servers that do not return them structured."""
    calls = []
    for m in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.DOTALL):
        call = _call_from_json(extract_json(m.group(1))[0])
        if call:
            calls.append(call)
    if calls:
        return calls
    value, _ = extract_json(text)
    for item in value if isinstance(value, list) else [value]:
        call = _call_from_json(item)
        if call:
            calls.append(call)
    if calls or not tool_names:
        return calls
    # name(key="value", n=3): read as Python syntax, literals only (ast.literal_eval evaluates nothing)
    for m in re.finditer(rf"\b({'|'.join(map(re.escape, tool_names))})\s*\(", text):
        call = _call_from_python(text[m.start():])
        if call:
            calls.append(call)
    return calls


def _call_from_json(value: Any) -> dict | None:
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # {"type": "function", "function": {...}}
        value = value["function"]
    name = value.get("name") or (value.get("function") if isinstance(value.get("function"), str) else None)
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # the OpenAI wire format carries arguments as a JSON string
        args, _ = extract_json(args)
    if not isinstance(name, str) or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": args}


def _call_from_python(text: str) -> dict | None:
    depth, end = 0, None
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == ")" and depth == 0:
            end = i + 1
            break
    if end is None:
        return None
    try:
        node = ast.parse(text[:end], mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        return {"name": node.func.id, "arguments": {k.arg: ast.literal_eval(k.value) for k in node.keywords}}
    except (SyntaxError, ValueError):
        return None


# ---- scoring -----------------------------------------------------------------------------------


def score_check(check: Check, sample: Sample, choices: list[str] | None = None,
                tool_names: list[str] | None = None) -> CheckOutcome:
    """Score one sample's answer. Perplexity and judge checks are scored by the runner."""
    if sample.error:
        return CheckOutcome(check.type, False, 0.0, f"request failed: {sample.error}")
    o, text = check.options, sample.text
    if check.type == "exact":
        ic, sp = o.get("ignore_case", False), o.get("strip_punctuation", False)
        got, want = normalize(text, ic, sp), normalize(str(o["value"]), ic, sp)
        return CheckOutcome("exact", got == want, float(got == want), "" if got == want else f"expected {want!r}", got)
    if check.type == "contains":
        return _contains(o, text)
    if check.type == "regex":
        return _regex(o, text)
    if check.type == "numeric":
        return _numeric(o, text)
    if check.type == "choice":
        return _choice(o, text, choices or [])
    if check.type == "json":
        return _json(o, text)
    if check.type == "tool_call":
        return _tool_call(o, sample, tool_names)
    raise ValueError(f"{check.type} checks are scored by the runner")


def _contains(o: dict, text: str) -> CheckOutcome:
    ic = o.get("ignore_case", True)
    hay = normalize(text, ic)

    def found(needle: str) -> bool:
        n = normalize(needle, ic)
        if o.get("word"):
            return re.search(rf"(?<!\w){re.escape(n)}(?!\w)", hay) is not None
        return n in hay

    def listed(key: str) -> list[str]:
        v = o.get(key, [])
        return [v] if isinstance(v, str) else v

    required, anyof, forbidden = listed("value"), listed("any"), listed("none")
    missing = [n for n in required if not found(n)]
    hits = [n for n in anyof if found(n)]
    present = [n for n in forbidden if found(n)]
    problems = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + \
               ([f"none of {', '.join(map(repr, anyof))}"] if anyof and not hits else []) + \
               ([f"contains {', '.join(map(repr, present))}"] if present else [])
    total = len(required) + bool(anyof) + len(forbidden)
    good = len(required) - len(missing) + bool(hits) + len(forbidden) - len(present)
    return CheckOutcome("contains", not problems, good / total, "; ".join(problems), hay)


def _regex(o: dict, text: str) -> CheckOutcome:
    pattern = re.compile(o["pattern"], _flags(o.get("flags", ""), "regex"))
    text = unicodedata.normalize("NFC", text)
    m = pattern.fullmatch(text.strip()) if o.get("full") else pattern.search(text)
    return CheckOutcome("regex", m is not None, float(m is not None),
                        "" if m else f"no match for /{o['pattern']}/", m.group(0) if m else None)


def _numeric(o: dict, text: str) -> CheckOutcome:
    want = _to_number(o["value"])
    numbers = extract_numbers(text)
    if not numbers:
        return CheckOutcome("numeric", False, 0.0, "no number in the answer")
    tol = max(o.get("tolerance", 0), o.get("rel_tolerance", 0) * abs(want), 1e-9 * max(1.0, abs(want)))

    def close(x: float) -> bool:
        return abs(x - want) <= tol

    pick = o.get("pick", "last")
    if pick == "any":
        hit = next((x for x in numbers if close(x)), None)
        got = hit if hit is not None else numbers[-1]
    else:
        got = numbers[-1] if pick == "last" else numbers[0]
    ok = close(got)
    return CheckOutcome("numeric", ok, float(ok), "" if ok else f"read {got:g}, expected {want:g}", got)


def _choice(o: dict, text: str, choices: list[str]) -> CheckOutcome:
    labels = choice_labels(len(choices))
    want = str(o["value"]).strip()
    if want.upper() not in labels:  # the option's text
        matches = [label for label, c in zip(labels, choices) if normalize(c, True) == normalize(want, True)]
        want = matches[0] if matches else want
    got = extract_choice(text, choices)
    ok = got == want.upper()
    detail = "" if ok else ("no option picked (or several)" if got is None else f"picked {got}, expected {want.upper()}")
    return CheckOutcome("choice", ok, float(ok), detail, got)


def _json(o: dict, text: str) -> CheckOutcome:
    value, error = extract_json(text)
    if error:
        return CheckOutcome("json", False, 0.0, error, schema_valid=False if "schema" in o else None)
    problems, schema_valid = [], None
    if "schema" in o:
        from jsonschema.validators import validator_for

        schema = o["schema"]
        errors = sorted(validator_for(schema)(schema).iter_errors(value), key=lambda e: list(e.path))
        schema_valid = not errors
        if errors:
            e = errors[0]
            path = "/".join(map(str, e.path)) or "(root)"
            problems.append(f"schema: {path}: {e.message}" + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    fields = o.get("fields", {})
    wrong = []
    for path, expected in fields.items():
        ok, got = _lookup(value, str(path))
        if not ok:
            wrong.append(f"{path} missing")
        elif not same_value(got, expected):
            wrong.append(f"{path}={json.dumps(got, ensure_ascii=False)} (expected {json.dumps(expected, ensure_ascii=False)})")
    if wrong:
        problems.append("fields: " + ", ".join(wrong))
    right = len(fields) - len(wrong)
    score = (right + (schema_valid is not False)) / (len(fields) + 1)
    answer = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return CheckOutcome("json", not problems, score, "; ".join(problems), answer, schema_valid=schema_valid)


def _lookup(value: Any, path: str) -> tuple[bool, Any]:
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return False, None
    return True, value


def same_value(got: Any, want: Any) -> bool:
    """Equal as an answer: numbers by value (30 == 30.0), strings NFKC-normalised and case-folded."""
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want if isinstance(want, bool) and isinstance(got, bool) else False
    if isinstance(want, (int, float)):
        g = got if isinstance(got, (int, float)) else _to_number(got) if isinstance(got, str) else None
        return g is not None and _same_number(g, want)
    if isinstance(want, str):
        return isinstance(got, str) and normalize(got, True) == normalize(want, True)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same_value, got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(same_value(got[k], want[k]) for k in want)
    return got == want


def _same_number(got: int | float, want: int | float) -> bool:
    """Whole numbers (counts, ids, millisecond timestamps) exactly; others to 1e-12, which absorbs float
    rounding but not a real difference (1e-9 read a timestamp one second off as the same)."""
    if isinstance(got, int) and isinstance(want, int):
        return got == want
    try:
        got, want = float(got), float(want)
    except OverflowError:  # an int beyond any float (a model may write 400 digits): no float equals it
        return False
    if got.is_integer() and want.is_integer():
        return got == want
    return math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-12)


def argument_matches(got: Any, want: Any) -> bool:
    """``same_value``, extended for tool arguments: a matcher accepts any of its values, and a mapping's
    keys whose expected value is optional may be absent (others must be there, and no key may be extra)."""
    if is_matcher(want):
        return any(argument_matches(got, w) for w in want["any_of"])
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) <= set(want) and all(
            argument_matches(got[k], w) if k in got else is_optional(w) for k, w in want.items())
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(argument_matches, got, want))
    return same_value(got, want)


def _argument_problems(args: dict, want_args: dict, exact: bool) -> list[str]:
    problems = []
    for key, want in want_args.items():
        if key not in args:
            if not is_optional(want):
                problems.append(f"{key} missing")
        elif not argument_matches(args[key], want):
            shown = want["any_of"] if is_matcher(want) else want
            problems.append(f"{key}={json.dumps(args[key], ensure_ascii=False)} (expected "
                            f"{'one of ' if is_matcher(want) else ''}{json.dumps(shown, ensure_ascii=False)})")
    if exact:
        problems += [f"unexpected argument {k}" for k in args if k not in want_args]
    return problems


def _tool_call(o: dict, sample: Sample, tool_names: list[str] | None) -> CheckOutcome:
    calls = sample.tool_calls if sample.tool_calls else parse_tool_calls(sample.text, tool_names)
    want_name, want_args = o["name"], o.get("arguments", {})
    if want_name is None:
        ok = not calls
        return CheckOutcome("tool_call", ok, float(ok), "" if ok else f"called {calls[0]['name']} (no call expected)",
                            None if ok else calls[0]["name"])
    if not calls:
        return CheckOutcome("tool_call", False, 0.0, f"no tool call (expected {want_name})")
    named = [c for c in calls if c.get("name") == want_name]
    if not named:
        return CheckOutcome("tool_call", False, 0.0, f"called {calls[0].get('name')!r}, expected {want_name!r}",
                            calls[0].get("name"))
    best, best_problems = None, None
    for call in named:
        problems = _argument_problems(call.get("arguments") or {}, want_args, bool(o.get("exact")))
        if best_problems is None or len(problems) < len(best_problems):
            best, best_problems = call, problems
    ok = not best_problems
    total = len(want_args) + 1
    answer = json.dumps({"name": best["name"], "arguments": best.get("arguments") or {}}, sort_keys=True, ensure_ascii=False)
    return CheckOutcome("tool_call", ok, max(0.0, (total - len(best_problems)) / total),
                        "; ".join(best_problems), answer)


def score_perplexity(check: Check, perplexity: float | None, why: str = "") -> CheckOutcome:
    if perplexity is None:
        return CheckOutcome("perplexity", False, 0.0, why or "perplexity unsupported", unsupported=True)
    ok = perplexity <= check.options["max"]
    return CheckOutcome("perplexity", ok, perplexity, "" if ok else f"perplexity {perplexity:.2f} > {check.options['max']}",
                        round(perplexity, 4))


# ---- model-graded ------------------------------------------------------------------------------

JUDGE_PROMPT = """You are grading an answer against a rubric. Reply with one word, PASS or FAIL, then one short sentence of reasons.

Question:
{question}

Answer:
{answer}

Rubric:
{rubric}

Verdict (PASS or FAIL):"""


def judge_messages(check: Check, question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": JUDGE_PROMPT.format(question=question, answer=answer,
                                                            rubric=check.options["rubric"])}]


def score_judge(check: Check, verdict_text: str, judge: str) -> CheckOutcome:
    m = re.search(r"\b(PASS|FAIL)(?:ED|ES)?\b", unicodedata.normalize("NFKC", verdict_text), re.IGNORECASE)
    if not m:
        return CheckOutcome("judge", False, 0.0, f"judge {judge} gave no verdict: {verdict_text[:80]!r}")
    ok = m.group(1).upper() == "PASS"
    return CheckOutcome("judge", ok, float(ok), f"judge {judge}: {verdict_text.strip()[:160]}", ok)


# ---- self-consistency --------------------------------------------------------------------------


def vote(outcomes: list[list[CheckOutcome]], how: str) -> int:
    """The sample a case's outcome comes from: the majority answer (ties: the earliest), or the best score."""
    if how == "best":
        return max(range(len(outcomes)), key=lambda i: (sum(c.passed for c in outcomes[i]),
                                                        sum(c.score for c in outcomes[i]), -i))
    keys = [json.dumps([c.answer for c in per], sort_keys=True, default=str) for per in outcomes]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    # an unreadable answer (None) never wins a vote it shares with a readable one
    readable = [k for k in counts if any(c.answer is not None for c in outcomes[keys.index(k)])] or list(counts)
    top = max(readable, key=lambda k: (counts[k], -keys.index(k)))
    return keys.index(top)
