"""Documents → lines of plain text, each keeping its line number in the file it came from.

A citation names a file and a line range (``docs/handbook.md:12-18``), so every reader keeps the
source's own line numbers: markdown and text as they are, HTML with tags, scripts and styles
removed but each text run left on the line it was on, JSONL one record per line (the record's
``text`` or ``content`` field). Directories are walked recursively for these suffixes, in sorted
order (the same documents give the same index), skipping hidden files and folders.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

TEXT_SUFFIXES = {".md", ".markdown", ".txt", ".rst", ".text"}
HTML_SUFFIXES = {".html", ".htm"}
JSONL_SUFFIXES = {".jsonl"}
SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | JSONL_SUFFIXES
MAX_FILE_BYTES = 64 * 2**20  # a document larger than this is almost surely not prose


class DocumentError(ValueError):
    """A document rung cannot read; the message names the file (and line)."""


@dataclass(frozen=True)
class Document:
    source: str  # the path as cited: relative to the base folder when inside it
    path: Path  # where it was read
    sha256: str
    size: int
    lines: tuple[str, ...]  # plain text of line 1, 2, ... (blank where nothing is text)
    kind: str  # "markdown" (headings start sections), "text", "html", "jsonl" (one record a line)


def find_documents(paths: list[str | Path]) -> list[Path]:
    """Files named, and the readable files under folders named, without duplicates, in order."""
    found: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = []
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [Path(root) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in SUFFIXES]
            batch = sorted(files)
        elif p.is_file():
            batch = [p]
        else:
            raise DocumentError(f"{p}: no such file or folder")
        for f in batch:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.append(f)
    return found


def source_name(path: Path, base: Path) -> str:
    """The path a citation shows: relative to ``base`` (the working folder) when under it."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(base.resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def read_document(path: Path, base: Path) -> Document:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DocumentError(f"{path}: {size} bytes is larger than the {MAX_FILE_BYTES} a document may have")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise DocumentError(f"{path}: a binary file, not text (index .md, .txt, .rst, .html or .jsonl files)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{path}: not UTF-8 text (byte {e.start})") from None
    suffix = path.suffix.lower()
    if suffix in HTML_SUFFIXES:
        lines = html_lines(text)
    elif suffix in JSONL_SUFFIXES:
        lines = jsonl_lines(text, path)
    else:
        lines = text.splitlines()
    return Document(source=source_name(path, base), path=path, sha256=hashlib.sha256(raw).hexdigest(), size=size,
                    lines=tuple(line.rstrip() for line in lines), kind=_kind(suffix))


def _kind(suffix: str) -> str:
    if suffix in {".md", ".markdown"}:
        return "markdown"
    if suffix in HTML_SUFFIXES:
        return "html"
    return "jsonl" if suffix in JSONL_SUFFIXES else "text"


def jsonl_lines(text: str, path: Path) -> list[str]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            out.append("")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DocumentError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
        if isinstance(record, str):
            value = record
        elif isinstance(record, dict) and isinstance(record.get("text", record.get("content")), str):
            value = record.get("text", record.get("content"))
        else:
            raise DocumentError(f"{path}: line {number}: expected a string or an object with a 'text' (or 'content') "
                                "string")
        out.append(" ".join(value.split()))  # one record is one line: its citation is that line
    return out


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "head", "noscript", "template"}
    HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self, n_lines: int):
        super().__init__(convert_charrefs=True)
        self.lines = [""] * max(n_lines, 1)
        self.skipping = 0
        self.heading = 0  # the level of the heading being read, 0 outside headings

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.HEADINGS:
            self.heading = int(tag[1])

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self.HEADINGS:
            self.heading = 0

    def handle_data(self, data):
        if self.skipping:
            return
        line = self.getpos()[0] - 1
        for i, part in enumerate(data.split("\n")):
            at = min(line + i, len(self.lines) - 1)
            if part.strip():
                # a heading reads as markdown's, so passages break at it and keep it as their section
                mark = "#" * self.heading + " " if self.heading and not self.lines[at] else ""
                self.lines[at] = f"{self.lines[at]} {mark}{part.strip()}".strip()


def html_lines(text: str) -> list[str]:
    """The text of an HTML page, each run of text on the source line it starts on."""
    parser = _HTMLText(len(text.splitlines()))
    parser.feed(text)
    parser.close()
    return parser.lines
