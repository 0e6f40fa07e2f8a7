"""The Berkeley Function-Calling Leaderboard (BFCL) as rung ``tool_call`` cases.

Each BFCL question offers one or more functions and expects one call (or, in the irrelevance
subsets, none). Its possible-answer file lists, per parameter, every acceptable value, with ""
meaning the parameter may be left out; a mapping parameter lists acceptable values per key the same
way. That becomes a ``tool_call`` check with ``exact: true`` (BFCL refuses parameters it does not
list) whose arguments are plain values or ``{any_of: [...], optional: true}`` matchers.

As BFCL does for OpenAI-style and open models, a dotted function name (``math.factorial``) becomes
``math_factorial``, and BFCL's Python-flavoured parameter types become JSON Schema (dict → object,
float → number, tuple → array, any → string). Reference: bfcl_eval/eval_checker/ast_eval/
ast_checker.py (simple_function_checker) and bfcl_eval/model_handler/utils.py (convert_to_tool).
"""

from __future__ import annotations

import re
from typing import Any

from rung.bench.importers.package import Package, SuiteImportError

PACKAGE = "bfcl-eval"
DATA = "bfcl_eval/data"
# subset -> what it asks; each is one question that expects one call (or none)
SUBSETS = {
    "simple_python": "one Python function offered, one call expected",
    "multiple": "several functions offered, one call to the right one expected",
    "live_simple": "user-contributed questions, one function, one call expected",
    "live_multiple": "user-contributed questions, several functions, one call expected",
    "irrelevance": "no offered function fits: the right answer is no call",
    "live_irrelevance": "user-contributed questions no offered function fits: no call",
}
NO_CALL_SUBSETS = {"irrelevance", "live_irrelevance"}
# BFCL's parameter types as JSON Schema (bfcl_eval/constants/type_mappings.py, GORILLA_TO_OPENAPI)
JSON_TYPES = {"integer": "integer", "number": "number", "float": "number", "string": "string",
              "boolean": "boolean", "bool": "boolean", "array": "array", "list": "array", "dict": "object",
              "object": "object", "tuple": "array", "any": "string"}
OPTIONAL = ""  # in a possible answer: the parameter may be left out
OMIT = object()  # a parameter whose only acceptable form is leaving it out (None is a value BFCL accepts)


def data_files(subset: str) -> list[str]:
    files = [f"{DATA}/BFCL_v4_{subset}.json"]
    return files if subset in NO_CALL_SUBSETS else files + [f"{DATA}/possible_answer/BFCL_v4_{subset}.json"]


def import_bfcl(package: Package, subset: str, limit: int | None) -> dict:
    """The suite (as a dict, before provenance) of the first ``limit`` questions of ``subset``."""
    if subset not in SUBSETS:
        raise SuiteImportError(f"unknown BFCL subset {subset!r} (one of: {', '.join(SUBSETS)})")
    files = data_files(subset)
    questions = package.read_jsonl(files[0])[:limit]
    answers = {row.get("id"): row for row in package.read_jsonl(files[1])} if len(files) > 1 else {}
    cases = []
    for row in questions:
        at = f"{package.path(files[0])}: {row.get('id')!r}"
        try:
            cases.append(_case(row, answers, subset))
        except SuiteImportError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, StopIteration) as e:  # an unknown layout
            raise SuiteImportError(f"{at}: unexpected layout ({type(e).__name__}: {e})") from None
    return {
        "name": f"bfcl-{subset}",
        "description": f"Berkeley Function-Calling Leaderboard, {subset}: {SUBSETS[subset]}",
        "files": files,
        "license": data_license(package),
        "defaults": {"max_tokens": 128, "temperature": 0},
        "cases": cases,
    }


def data_license(package: Package) -> str:
    """The license the data card (bfcl_eval/data/README.md, its YAML front matter) declares for the data,
    else the package metadata's, with both quoted."""
    card = package.read_text(f"{DATA}/README.md")
    declared = re.search(r"^license:\s*(\S+)\s*$", card.split("\n---", 1)[0], re.MULTILINE) if card.startswith("---") else None
    if not package.license and not declared:
        raise SuiteImportError(f"{package.name} {package.version}: neither its metadata nor {DATA}/README.md names a license")
    parts = [f"{DATA}/README.md: {declared.group(1)}"] if declared else []
    parts += [f"package metadata: {package.license}"] if package.license else []
    return f"{declared.group(1) if declared else package.license} ({package.name} {package.version}; {'; '.join(parts)})"


def _case(row: dict, answers: dict, subset: str) -> dict:
    (messages,) = row["question"]  # one turn; these subsets have no multi-turn questions
    functions = row["function"]
    renamed = {f["name"]: f["name"].replace(".", "_") for f in functions}
    if len(set(renamed.values())) != len(renamed):
        raise SuiteImportError(f"BFCL {row['id']!r}: two functions share a name once dots become underscores "
                               f"({', '.join(renamed)})")
    case: dict[str, Any] = {"id": row["id"]}
    if len(messages) == 1 and messages[0]["role"] == "user":
        case["prompt"] = messages[0]["content"]
    else:
        case["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    case["tools"] = [_tool(f, renamed[f["name"]]) for f in functions]
    if subset in NO_CALL_SUBSETS:
        case["expect"] = {"type": "tool_call", "name": None}
    else:
        (call,) = answers[row["id"]]["ground_truth"]
        ((name, params),) = call.items()
        schema = next(f for f in functions if f["name"] == name)["parameters"].get("properties", {})
        arguments = {}
        for param, values in params.items():
            expected = _expected(values, schema.get(param, {}))
            if expected is not OMIT:
                arguments[param] = expected
        case["expect"] = {"type": "tool_call", "name": renamed[name], "exact": True, "arguments": arguments}
    case["tags"] = {"subset": subset}
    return case


# ---- functions as OpenAI tools ------------------------------------------------------------------


def _tool(function: dict, name: str) -> dict:
    parameters = _schema({**function.get("parameters", {}), "type": "dict"})
    return {"type": "function",
            "function": {"name": name, "description": function.get("description", ""), "parameters": parameters}}


def _schema(schema: dict) -> dict:
    """BFCL's parameter schema as JSON Schema: its types mapped, nested properties and items too."""
    out = dict(schema)
    out["type"] = JSON_TYPES.get(schema.get("type"), "string")
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: _schema(v) for k, v in schema["properties"].items()}
    if isinstance(schema.get("items"), dict):
        out["items"] = _schema(schema["items"])
    return out


# ---- possible answers as expected values --------------------------------------------------------


def _expected(values: list, schema: dict) -> Any:
    """One parameter's acceptable values as a rung expected value: the value itself when there is one,
    else ``{any_of: [...]}``, with ``optional: true`` where BFCL lists "". OMIT when the parameter may
    only be left out (it is not listed, so with ``exact: true`` passing it fails)."""
    if not isinstance(values, list):
        raise TypeError(f"acceptable values should be a list, got {values!r}")
    optional = OPTIONAL in values
    accepted = [_value(v, schema) for v in values if v != OPTIONAL]
    if not accepted:
        return OMIT
    if len(accepted) == 1 and not optional:
        return accepted[0]
    return {"any_of": accepted, "optional": True} if optional else {"any_of": accepted}


def _value(value: Any, schema: dict) -> Any:
    """A mapping parameter's answer maps each key to its acceptable values (BFCL's dict_checker); a list
    of mappings holds one such answer per item (list_dict_checker); anything else is a literal."""
    kind, items = schema.get("type"), schema.get("items") or {}
    if kind == "dict" and isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
        nested = {k: _expected(v, (schema.get("properties") or {}).get(k, {})) for k, v in value.items()}
        return {k: v for k, v in nested.items() if v is not OMIT}
    if kind in ("array", "tuple") and items.get("type") == "dict" and isinstance(value, list):
        return [_value(item, items) for item in value]
    return value
