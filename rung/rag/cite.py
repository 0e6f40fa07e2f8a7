"""Which sources an answer cites, and which it uses: a deterministic check after generation.

Two signals, reported side by side so a reader (or a verifier) can weigh them:
- ``cited``: the answer names the passage's label in brackets, ``[docs/a.md:12-18]`` (several
  labels in one bracket may be separated by ``;`` or ``,``). A cited label is *real* when its source
  is a retrieved passage's source (or a path suffix of it: ``[a.md:12]`` for ``docs/a.md``) and its
  lines overlap that passage's lines; any other bracketed ``file:line`` label is reported as not
  among the sources (a citation the model made up).
- ``overlap``: of the terms the answer adds to the question (stemmed, stopwords out, the same
  analyzer as BM25), the share found in the passage, each term weighted by its inverse document
  frequency in the index: a unit every passage mentions ("kPa") weighs little, a made-up part
  number a lot. A passage whose names and numbers the answer repeats scores near 1.0, whether or
  not the model cited it.

A passage is ``supported`` when it is cited, or when it is one of the passages that together
hold the answer's new terms, taken greedily (the passage holding most of the weight not yet
explained first), each adding at least ``MIN_SHARE`` of the weight: an answer drawn from two
passages credits both, while a passage that shares only the phrasing every passage has ("carries a
warranty of ... months", with another number) adds nothing once the right one is taken.
"""

from __future__ import annotations

import re

MIN_SHARE = 0.25
_BRACKET = re.compile(r"\[([^\[\]\n]{1,400})\]")
_LABEL = re.compile(r"^\s*(?:source:\s*)?([^\s:;,][^:;,]*?):\s*(\d+)(?:\s*[-–]\s*(\d+))?\s*$", re.IGNORECASE)


def cited_labels(text: str) -> list[tuple[str, int, int]]:
    """Every ``[source:start-end]`` label in ``text`` as (source, start, end), in order, without repeats."""
    out: list[tuple[str, int, int]] = []
    for bracket in _BRACKET.finditer(text):
        for part in re.split(r"[;,]|\]\s*\[", bracket.group(1)):
            m = _LABEL.match(part)
            if m:
                start = int(m.group(2))
                end = int(m.group(3)) if m.group(3) else start
                item = (m.group(1).strip().strip("`'\""), min(start, end), max(start, end))
                if item not in out:
                    out.append(item)
    return out


def _same_source(cited: str, source: str) -> bool:
    cited, source = cited.replace("\\", "/").lstrip("./"), source.replace("\\", "/")
    return cited == source or source.endswith("/" + cited)


def check_answer(answer: str, grounding) -> dict:
    """The answer's citations against the grounding's sources:

    ``{"citations": [{label, source, lines, rank, cited, overlap, supported}], "not_in_sources": [label]}``
    with one citation entry per retrieved passage the answer cites or whose content it uses.
    """
    labels = cited_labels(answer)
    hits = grounding.hits
    matched: set[int] = set()
    unknown = []
    for source, start, end in labels:
        found = False
        for i, h in enumerate(hits):
            p = h.passage
            if _same_source(source, p.source) and start <= p.end and end >= p.start:
                matched.add(i)
                found = True
        if not found:
            unknown.append(f"{source}:{start}" if start == end else f"{source}:{start}-{end}")
    lexical = getattr(grounding.index, "lexical", None)
    analyze = lexical.terms if lexical is not None else (lambda s: re.findall(r"\w\w+", s.lower()))
    weight = lexical.idf if lexical is not None else (lambda term: 1.0)
    new = set(analyze(answer)) - set(analyze(grounding.query)) - {""}
    total = sum(weight(t) for t in new)
    held = [new & set(analyze(text)) for text in grounding.texts]  # per passage: the answer's terms it holds
    overlaps = [sum(weight(t) for t in h) / total if total else 0.0 for h in held]
    used: set[int] = set()  # the passages that explain the answer, taken greedily
    unexplained = set(new)

    def gain(i: int) -> float:
        return sum(weight(t) for t in held[i] & unexplained) / total

    while total and len(used) < len(hits):
        best = max((i for i in range(len(hits)) if i not in used), key=lambda i: (gain(i), -i))  # ties: better rank
        if gain(best) < MIN_SHARE:
            break
        used.add(best)
        unexplained -= held[best]
    citations = []
    for i, (h, overlap) in enumerate(zip(hits, overlaps)):
        cited = i in matched
        supported = cited or i in used
        if cited or supported:
            p = h.passage
            citations.append({"label": p.label, "source": p.source, "lines": [p.start, p.end], "rank": h.rank,
                              "cited": cited, "overlap": round(overlap, 3), "supported": supported})
    return {"citations": citations, "not_in_sources": unknown}


def format_sources(grounding, check: dict | None = None) -> str:
    """Lines a terminal shows after an answer: each source, marked when the answer cites or uses it."""
    marks = {c["label"]: ("cited" if c["cited"] else "used") for c in (check or {}).get("citations", [])}
    lines = []
    for h in grounding.hits:
        mark = marks.get(h.label)
        lines.append(f"  [{h.rank}] {h.label}" + (f"  ({mark})" if mark else ""))
    for label in (check or {}).get("not_in_sources", []):
        lines.append(f"  cited but not among the sources: {label}")
    return "\n".join(lines)
