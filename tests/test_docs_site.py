"""The docs stay honest: the site builds without a warning, every relative link in the README and
docs/ reaches a file (and a heading, where it names one), and the README stays a front door."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
MANUALS = ["architecture", "install", "engine", "formats", "quantization", "kernels", "serve", "bench",
           "retrieval", "redaction", "governance", "security"]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r'<a (?:id|name)="([^"]+)"></a>')


def prose_lines(text: str):
    """The lines outside fenced code, with inline code removed."""
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield INLINE_CODE.sub("", line)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation removed, spaces as hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def toc_slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives it: ASCII only, runs of spaces and hyphens as one."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def anchors(path: Path) -> set[str]:
    """Anchors that GitHub and the site both give the file's headings, and its <a id="..."></a>."""
    seen: dict[str, int] = {}
    found = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            found.update(HTML_ANCHOR.findall(line))
        m = None if in_fence else HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            seen[slug] = seen.get(slug, 0) + 1
            if seen[slug] == 1 and slug == toc_slug(m.group(2)):  # repeats: "-1" on GitHub, "_1" in the site
                found.add(slug)
    return found


def broken_links(page: Path) -> list[str]:
    problems = []
    for number, line in enumerate(prose_lines(page.read_text(encoding="utf-8")), 1):
        for target in LINK.findall(line):
            if "://" in target or target.startswith("mailto:"):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                problems.append(f"{where}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with that anchor on GitHub and in the site")
    return problems


def test_relative_links_in_readme_docs_and_results_resolve():
    problems = [p for page in PAGES for p in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_link_checker_catches_a_missing_file_and_a_missing_anchor(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Set-up: two commands\n\n## The `engine`\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#set-up-two-commands) [ok](a.md#the-engine) `[code](nowhere.md)`\n"
                    "[gone](nowhere.md) [bad](a.md#no-such-heading)\n```\n[fenced](nowhere.md)\n```\n")
    problems = broken_links(page)
    assert len(problems) == 2 and "nowhere.md" in problems[0] and "no-such-heading" in problems[1], problems


def test_readme_is_a_front_door_that_links_every_manual():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "make run" in readme and "make test" in readme
    missing = [m for m in MANUALS if f"(docs/{m}.md" not in readme]
    assert not missing, f"README links no manual for {missing}"


def test_every_docs_page_is_in_the_site_nav():
    nav = set(re.findall(r":\s*([\w-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= nav, f"not in mkdocs.yml's nav: {sorted(pages - nav)}"
    assert {"index.md", "results.md"} <= nav  # README.md and benchmarks/RESULTS.md, through docs/hooks.py


def test_results_start_with_a_current_section_for_every_benchmark_script_in_the_history():
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    assert sections[:2] == ["Current", "History"], sections
    current, history = text.split("\n## History\n")
    in_history = {name for heading in re.findall(r"^### (20\d\d-.+)$", history, flags=re.M)
                  for name in re.findall(r"\b(\w+\.py)\b", heading) if (ROOT / "benchmarks" / name).exists()}
    in_current = set(re.findall(r"^### (\w+\.py)$", current, flags=re.M))
    assert in_history and in_history <= in_current, f"no current figures for {sorted(in_history - in_current)}"
    assert all((ROOT / "benchmarks" / name).exists() for name in in_current)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs-material is not installed (pip install 'rung[docs]')")
def test_docs_site_builds_strict_without_warnings(tmp_path):
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # Material's end-of-life banner
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert "WARNING" not in log, log
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "make run" in home and 'href="architecture/"' in home  # the README, its docs/ links rewritten
    assert 'class="mermaid"' in (site / "architecture" / "index.html").read_text(encoding="utf-8")
    assert (site / "results" / "index.html").exists()
