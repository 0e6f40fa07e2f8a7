"""`rung index DOCS... --out INDEX`: build a retrieval index (rung/rag) for `--rag INDEX`.

With no DOCS it opens the index at --out instead (checking it), and with --query it prints the
passages a question retrieves: what chat, serve and bench would put in the prompt.
"""

from __future__ import annotations

import argparse
import sys
import time

from rung.commands.base import Command, CommandError
from rung.extras import require


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("docs", nargs="*", metavar="DOCS",
                   help="files and folders (recursive) of .md, .txt, .rst, .html, .jsonl documents")
    p.add_argument("--out", "-o", required=True, metavar="INDEX", help="the index folder to write (or, without DOCS, to open)")
    p.add_argument("--max-chars", type=int, default=None, metavar="N",
                   help="the most characters in one passage (default 800); passages are whole lines")
    p.add_argument("--embedder", default=None, metavar="NAME",
                   help="also store dense vectors from this embedder (fused with BM25 by reciprocal rank)")
    p.add_argument("--query", "-q", action="append", default=None, metavar="TEXT",
                   help="print the passages TEXT retrieves (repeatable)")
    p.add_argument("-k", type=int, default=4, help="passages per --query (default 4)")


def _run(args: argparse.Namespace) -> int:
    require("rag", what="rung index")
    from rung.rag import build_index, load_index
    from rung.rag.chunk import DEFAULT_MAX_CHARS

    if args.k < 1:
        raise CommandError("-k must be at least 1")
    if args.docs:
        start = time.perf_counter()
        index = build_index(args.docs, args.out, max_chars=args.max_chars or DEFAULT_MAX_CHARS, embedder=args.embedder)
        m = index.manifest
        dense = f", dense vectors from {m['dense']['embedder']}" if m["dense"] else ""
        print(f"indexed {len(m['documents'])} documents into {m['passages']} passages{dense}: {args.out} "
              f"({index.hash}, {time.perf_counter() - start:.1f} s)")
    else:
        if args.max_chars or args.embedder:
            raise CommandError("--max-chars and --embedder apply when building: name the DOCS to index")
        index = load_index(args.out)
        m = index.manifest
        print(f"{args.out}: {len(m['documents'])} documents, {m['passages']} passages, {index.hash}, "
              f"built {m.get('created', '?')}")
        for line in index.stale():
            print(f"  stale: {line} since the index was built", file=sys.stderr)
    for query in args.query or []:
        print(f"\n{query}")
        hits = index.search(query, args.k)
        if not hits:
            print("  (no passage shares a term with it)")
        for h in hits:
            first = " ".join(h.passage.text.split())[:100]
            print(f"  {h.rank}. [{h.label}] {h.score:.3f}  {first}")
    return 0


INDEX = Command("index", "build a retrieval index of documents for --rag (BM25, optional dense vectors)", _arguments, _run)


# ---- --rag, shared by chat, serve and bench -----------------------------------------------------


def rag_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retrieval")
    g.add_argument("--rag", metavar="INDEX", default=None,
                   help="ground answers in the passages this index (`rung index`) retrieves; answers cite them")
    g.add_argument("--rag-k", type=int, default=None, metavar="K", help="passages per question (default 4)")
    g.add_argument("--rag-max-chars", type=int, default=None, metavar="N",
                   help="the most characters of passages in one prompt (default 3000)")


def open_rag(args: argparse.Namespace):
    """The index --rag names, checked before any model loads (a stale one is a warning), or None;
    fills in --rag-k and --rag-max-chars."""
    if args.rag is None:
        if args.rag_k is not None or args.rag_max_chars is not None:
            raise CommandError("--rag-k and --rag-max-chars need --rag INDEX")
        return None
    require("rag", what="--rag")
    from rung.rag import DEFAULT_K, DEFAULT_MAX_CHARS, load_index

    if (args.rag_k is not None and args.rag_k < 1) or (args.rag_max_chars is not None and args.rag_max_chars < 100):
        raise CommandError("--rag-k must be at least 1 and --rag-max-chars at least 100")
    args.rag_k = args.rag_k or DEFAULT_K
    args.rag_max_chars = args.rag_max_chars or DEFAULT_MAX_CHARS
    index = load_index(args.rag)
    if index.vectors is not None:
        index.query_embedder()  # a missing or different embedder is an error now, not on the first question
    for line in index.stale():
        print(f"rung: warning: {args.rag} is stale: {line} since it was indexed (rebuild it with `rung index`)",
              file=sys.stderr)
    return index
