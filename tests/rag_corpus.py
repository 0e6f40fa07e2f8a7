"""A deterministic document set of made-up facts for the retrieval tests.

50 documents (markdown, text, HTML and JSONL), each about one invented device with made-up names
and numbers; every document has the same sections and the same vocabulary (designer, pressure,
warranty, colour code, ...), so what tells passages apart is the device's name together with the
attribute asked about. ``QUESTIONS`` pairs a question with the file and line of the one sentence
that answers it (the planted passage) and the answer's distinctive token.
"""

from __future__ import annotations

import html
import json
import random
from dataclasses import dataclass
from pathlib import Path

SYLLABLES = ["zor", "vex", "quil", "mar", "tob", "ren", "kas", "lio", "pra", "dun", "fey", "gol", "hux", "ivo",
             "jas", "nel", "orb", "pim", "sul", "tam", "ulv", "wyn", "xer", "yal"]
KINDS = ["valve", "pump", "turbine", "relay", "sensor"]
FIRST = ["Halvin", "Osra", "Teodric", "Mirelle", "Baxto", "Quenna", "Ludo", "Farrah", "Imre", "Sabeth"]
LAST = ["Moresk", "Calloway", "Dunstraw", "Vellacott", "Ashgrove", "Penhallow", "Torvik", "Wrenfield"]


@dataclass(frozen=True)
class Question:
    question: str
    source: str  # relative to the corpus folder
    line: int  # the line of the planted sentence
    answer: str  # the distinctive token an answer must contain
    paraphrase: str = ""  # the same question in words the document does not use (benchmarks/rag.py)


def _names(rng: random.Random, n: int) -> list[str]:
    seen, out = set(), []
    while len(out) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize() + rng.choice(["ix", "on", "ar", "el"])
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _facts(rng: random.Random, name: str, kind: str) -> dict:
    return {"name": name, "kind": kind, "designer": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "year": rng.randint(1931, 2019), "pressure": rng.randint(120, 990), "warranty": rng.randint(7, 97),
            "colour": f"{rng.choice('BCDFGHJKLMNPRSTVWXZ')}{rng.choice('AEIOU')}-{rng.randint(1000, 9999)}",
            "plant": f"{rng.choice(SYLLABLES).capitalize()}{rng.choice(['ford', 'holm', 'wick', 'stead'])}",
            "interval": rng.randint(3, 40)}


def _sections(f: dict) -> list[tuple[str, list[str]]]:
    n, k = f["name"], f["kind"]
    return [
        ("Overview", [f"The {n} {k} is an industrial {k} used in cooling loops and process lines.",
                      f"Operators describe the {n} as quiet and easy to service."]),
        ("History", [f"The {n} {k} was designed by {f['designer']} in {f['year']}.",
                     f"Early units of the {k} were assembled at the {f['plant']} plant."]),
        ("Specifications", [f"The maximum operating pressure of the {n} {k} is {f['pressure']} kPa.",
                            f"The housing of the {n} is painted in colour code {f['colour']}."]),
        ("Warranty", [f"Every {n} {k} carries a warranty of {f['warranty']} months from the date of delivery.",
                      f"The warranty does not cover damage from frozen lines."]),
        ("Maintenance", [f"Seals of the {n} {k} should be replaced every {f['interval']} weeks.",
                         "Use only the lubricant listed in the service manual."]),
    ]


QUESTION_FORMS = {
    "History": ("Who designed the {n} {k}?", "designer"),
    "Specifications": ("What is the maximum operating pressure of the {n} {k}?", "pressure"),
    "Warranty": ("How many months of warranty does the {n} {k} carry?", "warranty"),
    "Maintenance": ("How often should the seals of the {n} {k} be replaced?", "interval"),
}


PARAPHRASES = {
    "History": "Which engineer came up with the {n} {k}?",
    "Specifications": "How much load can the {n} {k} take at most?",
    "Warranty": "What guarantee period comes with a {n} {k}?",
    "Maintenance": "How frequently must the {n} {k} get new gaskets?",
}


def write_corpus(folder: Path, n_docs: int = 50, seed: int = 7) -> list[Question]:
    """Write the documents under ``folder``; return 20 questions with their planted lines."""
    rng = random.Random(seed)
    names = _names(rng, n_docs)
    planted: list[Question] = []
    forms = list(QUESTION_FORMS)
    for i, name in enumerate(names):
        f = _facts(rng, name, KINDS[i % len(KINDS)])
        sections = _sections(f)
        fmt = ["md", "md", "txt", "html", "jsonl"][i % 5]
        rel = f"{f['kind']}s/{name.lower()}.{fmt}"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        where: dict[str, int] = {}  # section -> line of its first sentence
        if fmt == "md":
            lines += [f"# {name} {f['kind']}", ""]
            for title, sentences in sections:
                lines += [f"## {title}", ""]
                where[title] = len(lines) + 1
                lines += sentences + [""]
        elif fmt == "txt":
            lines += [f"{name.upper()} {f['kind'].upper()}: DATA SHEET", ""]
            for title, sentences in sections:
                where[title] = len(lines) + 1
                lines += [" ".join(sentences), ""]
        elif fmt == "html":
            lines += ["<!doctype html>", "<html><head><title>x</title><style>p { color: red }</style></head><body>",
                      f"<h1>{html.escape(name)} {f['kind']}</h1>"]
            for title, sentences in sections:
                lines.append(f"<h2>{title}</h2>")
                where[title] = len(lines) + 1
                lines += [f"<p>{html.escape(s)}</p>" for s in sentences]
            lines += ["<script>var warranty = 'not text';</script>", "</body></html>"]
        else:
            for title, sentences in sections:
                where[title] = len(lines) + 1
                lines.append(json.dumps({"id": f"{name}-{title}", "text": " ".join(sentences)}))
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if i % 2 == 0 and len(planted) < 20:  # every format, every question form
            title = forms[len(planted) % len(forms)]
            question, key = QUESTION_FORMS[title]
            answer = str(f[key]).split()[-1]
            planted.append(Question(question.format(n=name, k=f["kind"]), rel, where[title], answer,
                                    PARAPHRASES[title].format(n=name, k=f["kind"])))
    return planted[:20]
