"""MkDocs hooks (mkdocs.yml): two pages of the site live outside docs/, each kept in one file.

README.md is the site's home page (index.md) and benchmarks/RESULTS.md its results page
(results.md). Every page's relative links are written for GitHub, from where its file sits in the
repository; here they are rewritten to the site's pages (``docs/engine.md`` in the README becomes
``engine.md``, ``../README.md`` in a manual ``index.md``). A link that still leaves docs/ is left as
written, so ``mkdocs build --strict`` fails on it, as on any other broken link.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = {"index.md": "README.md", "results.md": "benchmarks/RESULTS.md"}  # site page -> repository file
PAGE_OF = {repo: page for page, repo in OUTSIDE.items()}
# [text](target#anchor) and ![alt](target): the target up to an optional #anchor
LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?\)")


def on_files(files, config):
    for page, repo in OUTSIDE.items():
        files.append(File.generated(config, page, abs_src_path=str(ROOT / repo)))
    return files


def site_page(repo_path: str) -> str | None:
    """The site's path for a repository file, or None for a file the site does not hold."""
    if repo_path in PAGE_OF:
        return PAGE_OF[repo_path]
    return repo_path.removeprefix("docs/") if repo_path.startswith("docs/") else None


def on_page_markdown(markdown, page, config, files):
    src = page.file.src_uri
    here = posixpath.dirname(OUTSIDE.get(src, "docs/" + src))  # the file's folder in the repository

    def rewrite(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return m.group(0)
        page_path = site_page(posixpath.normpath(posixpath.join(here, target)))
        if page_path is None:
            return m.group(0)
        new = posixpath.relpath(page_path, posixpath.dirname(src) or ".")
        return f"{m.group(1)}{new}{m.group(3) or ''})"

    return LINK.sub(rewrite, markdown)
