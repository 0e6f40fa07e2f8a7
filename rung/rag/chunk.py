"""Documents → passages: runs of whole lines, cut at paragraph breaks, each with its line range.

A passage is what retrieval returns and what a citation names, so it is made of whole source lines
(its label ``source:start-end`` points at exactly what the model read). Paragraphs (runs of
non-blank lines) are packed into passages of at most ``max_chars`` characters; a paragraph longer
than that is cut between lines; a markdown heading starts a new passage and is remembered as the
section of the passages under it (indexed with them: a question about "refunds" finds the
paragraphs under "## Refunds"). JSONL records are one passage each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rung.rag.documents import Document

DEFAULT_MAX_CHARS = 800
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Passage:
    id: int  # position in the index
    source: str
    start: int  # first line, 1-based
    end: int  # last line, inclusive
    text: str
    section: str | None = None  # the markdown heading it sits under

    @property
    def label(self) -> str:
        """How a citation names it: ``docs/handbook.md:12-18`` (``:12`` for one line)."""
        lines = str(self.start) if self.start == self.end else f"{self.start}-{self.end}"
        return f"{self.source}:{lines}"

    @property
    def indexed_text(self) -> str:
        """What retrieval matches against: the section heading and the text."""
        return f"{self.section}\n{self.text}" if self.section and self.section not in self.text else self.text

    def to_dict(self) -> dict:
        return {"source": self.source, "start": self.start, "end": self.end, "text": self.text,
                "section": self.section}


def _blocks(doc: Document) -> list[tuple[int, int, str | None, bool]]:
    """Paragraphs as (first line, last line, section, is_heading), line numbers 0-based; a section
    is the path of headings above it ("Feytobel valve > History")."""
    out: list[tuple[int, int, str | None, bool]] = []
    stack: list[tuple[int, str]] = []  # (level, title) of the headings above
    start: int | None = None
    headings = doc.kind in ("markdown", "html")

    def section() -> str | None:
        return " > ".join(t for _, t in stack) or None

    for i, line in enumerate(doc.lines):
        heading = _HEADING.match(line) if headings else None
        if start is not None and (not line.strip() or heading or doc.kind == "jsonl"):
            out.append((start, i - 1, section(), False))
            start = None
        if heading:
            level = len(line.lstrip()) - len(line.lstrip().lstrip("#"))
            stack = [(lv, t) for lv, t in stack if lv < level] + [(level, heading.group(1))]
            out.append((i, i, section(), True))
        elif line.strip() and start is None:
            start = i
    if start is not None:
        out.append((start, len(doc.lines) - 1, section(), False))
    return out


def chunk_document(doc: Document, max_chars: int = DEFAULT_MAX_CHARS, first_id: int = 0) -> list[Passage]:
    lines = doc.lines
    spans: list[tuple[int, int, str | None]] = []  # passages as (first, last, section), 0-based

    def size(a: int, b: int) -> int:
        return sum(len(lines[j]) + 1 for j in range(a, b + 1))

    current: list[int] | None = None  # [first, last] of the passage being packed
    current_section: str | None = None
    only_headings = False  # the passage being packed has no text yet: the next heading joins it
    for first, last, section, heading in _blocks(doc):
        if heading:  # a heading opens a passage (consecutive headings share one)
            if current and not only_headings:
                spans.append((current[0], current[1], current_section))
                current = None
            current = [current[0] if current else first, last]
            current_section, only_headings = section, True
            continue
        if current and section == current_section and size(current[0], last) <= max_chars and doc.kind != "jsonl":
            current[1] = last
            only_headings = False
            continue
        if current and not only_headings:
            spans.append((current[0], current[1], current_section))
            current = None
        # a paragraph (after its headings, if any) longer than max_chars: cut between lines
        a = current[0] if current else first
        current, current_section, only_headings = None, section, False
        while a <= last:
            b = max(a, first)
            while b < last and size(a, b + 1) <= max_chars:
                b += 1
            if b == last:
                current = [a, b]
                break
            spans.append((a, b, section))
            a = b + 1
    if current:
        spans.append((current[0], current[1], current_section))

    passages = []
    for first, last, section in spans:
        text = "\n".join(lines[first:last + 1]).strip("\n")
        if not text.strip():
            continue
        passages.append(Passage(first_id + len(passages), doc.source, first + 1, last + 1, text, section))
    return passages
