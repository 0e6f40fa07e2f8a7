"""Two datasets of OpenAI's ``evals`` package (its registry ships them as JSONL in the wheel).

- ``arc``: evals' ``arc`` is the Abstraction and Reasoning Corpus (Chollet's grid puzzles), not AI2's
  multiple-choice science questions: a few input/output grids, then an input whose output grid the
  model must write. evals scores it by match against the output (``evals.elsuite.basic.match``); rung
  by an ``exact`` check (whitespace collapsed).
- ``medmcqa``: MedMCQA's medical-entrance questions, four options each; ``choice`` cases.

evals' LICENSE.md puts the registry data under MIT except the datasets it lists (neither is listed).
"""

from __future__ import annotations

import re

from rung.bench.importers.package import Package, SuiteImportError

PACKAGE = "evals"
ARC = "evals/registry/data/arc/samples.jsonl"
MEDMCQA = "evals/registry/data/medmcqa/samples.jsonl"
LICENSE_FILE = "evals-{version}.dist-info/LICENSE.md"


def data_license(package: Package, data: str) -> str:
    """evals' LICENSE.md: the repository's license (its first line), which covers the registry data
    except the datasets listed under "Dataset Licenses" by their **Location**; refuses a listed one
    rather than guess which of its licenses applies."""
    inside = LICENSE_FILE.format(version=package.version)
    text = package.read_text(inside)
    folder = data.rsplit("/", 1)[0]
    if re.search(rf"\*\*Location\*\*:\s*{re.escape(folder)}\s*$", text, re.MULTILINE):
        raise SuiteImportError(f"{inside}: {folder} has a license of its own; read it there")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    name = first.removesuffix(" License").strip() or "unknown"
    return f"{name} ({package.name} {package.version}; {inside}: the repository's license, which covers {folder})"


def import_arc(package: Package, subset: None, limit: int | None) -> dict:
    cases = []
    for number, row in enumerate(package.read_jsonl(ARC)[:limit], 1):
        messages, ideal = _sample(package, ARC, number, row)
        cases.append({"id": f"arc-{number}", "messages": messages,
                      "max_tokens": len(ideal) + 16,  # a token is at least a character
                      "expect": {"type": "exact", "value": ideal}, "tags": {"domain": "abstraction"}})
    return {"name": "arc", "description": "Abstraction and Reasoning Corpus (evals' arc): write the output grid "
                                          "the demonstrated transformation gives",
            "files": [ARC], "license": data_license(package, ARC), "defaults": {"temperature": 0}, "cases": cases}


# "a) Hyperplasia": MedMCQA's four options, one a line, at the end of the user message
_OPTION = re.compile(r"^([a-d])\) (.*)$", re.MULTILINE)


def import_medmcqa(package: Package, subset: None, limit: int | None) -> dict:
    cases = []
    for number, row in enumerate(package.read_jsonl(MEDMCQA)[:limit], 1):
        messages, ideal = _sample(package, MEDMCQA, number, row)
        system, question = (messages[0]["content"], messages[1]["content"]) if len(messages) == 2 else (None, None)
        options = _OPTION.findall(question or "")
        answer = re.match(r"([a-d])\) ", ideal)
        if (system is None or messages[0]["role"] != "system" or [o[0] for o in options] != list("abcd")
                or not answer):
            raise SuiteImportError(f"{package.path(MEDMCQA)}: sample {number}: not a system prompt, a question and "
                                   f"options a) to d) with an answer 'x) ...'")
        stem = question[:_OPTION.search(question).start()].strip()
        cases.append({"id": f"medmcqa-{number}", "system": system, "prompt": stem,
                      "choices": [text.strip() for _, text in options],
                      "expect": {"type": "choice", "value": answer.group(1).upper()},
                      "tags": {"subject": _subject(stem)}})
    return {"name": "medmcqa", "description": "MedMCQA (evals' medmcqa): medical entrance-exam questions, four options",
            "files": [MEDMCQA], "license": data_license(package, MEDMCQA),
            "defaults": {"max_tokens": 16, "temperature": 0}, "cases": cases}


def _sample(package: Package, inside: str, number: int, row: dict) -> tuple[list[dict], str]:
    """An evals sample's chat input and its one ideal answer."""
    messages, ideal = row.get("input"), row.get("ideal")
    if isinstance(ideal, list) and len(ideal) == 1:
        ideal = ideal[0]
    if (not isinstance(messages, list) or not messages or not isinstance(ideal, str)
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise SuiteImportError(f"{package.path(inside)}: sample {number}: expected 'input' (chat messages) and "
                               f"one 'ideal' answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages], ideal


def _subject(stem: str) -> str:
    m = re.match(r"Subject: (.+)", stem)
    return m.group(1).strip() if m else "unknown"
