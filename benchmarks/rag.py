"""Retrieval and grounding on a generated document set: rung's BM25 (bm25s) and hybrid (BM25 +
all-MiniLM-L6-v2, reciprocal rank fusion) beside SQLite FTS5's bm25() over the same passages; then
SmolLM2-135M answering the same questions with and without `--rag`.

The documents are the tests' (tests/rag_corpus.py): 50 files about invented devices, 210 passages,
20 questions whose answer is in one planted passage, each asked twice: in the documents' words and
paraphrased ("which engineer came up with" for "designed by"). Retrieval figures: recall@1,
recall@3, mean reciprocal rank (over the top 10), and milliseconds per query. Grounding figures
(through `rung bench`, greedy, 48 tokens): the share of answers holding the planted fact, the
share whose citations (rung.rag.cite) name the planted passage as supported, and the share that
wrote a label themselves.

    .venv/bin/python benchmarks/rag.py [--skip-model]
"""

from __future__ import annotations

import argparse
import platform
import re
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from rag_corpus import write_corpus  # noqa: E402  the tests' generated documents

from rung.rag import build_index, check_answer, load_index, retrieve  # noqa: E402


def planted(passage, q) -> bool:
    return passage.source == f"docs/{q.source}" and passage.start <= q.line <= passage.end


def figures(search, questions, field: str) -> dict:
    r1 = r3 = mrr = 0.0
    start = time.perf_counter()
    for q in questions:
        ranked = search(getattr(q, field), 10)
        rank = next((i + 1 for i, p in enumerate(ranked) if planted(p, q)), None)
        r1 += rank == 1
        r3 += rank is not None and rank <= 3
        mrr += 1 / rank if rank else 0.0
    n = len(questions)
    return {"recall@1": r1 / n, "recall@3": r3 / n, "mrr": mrr / n,
            "ms/query": (time.perf_counter() - start) * 1000 / n}


def fts5(index):
    """SQLite FTS5 over the same passages (porter stemmer), terms OR'ed as a question needs."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE p USING fts5(text, tokenize='porter unicode61')")
    db.executemany("INSERT INTO p(rowid, text) VALUES (?, ?)", [(p.id, p.indexed_text) for p in index.passages])

    def search(query: str, k: int):
        terms = [t for t in re.findall(r"\w\w+", query.lower())]
        match = " OR ".join(f'"{t}"' for t in terms)
        rows = db.execute("SELECT rowid FROM p WHERE p MATCH ? ORDER BY bm25(p) LIMIT ?", (match, k)).fetchall()
        return [index.passages[r[0]] for r in rows]

    return search


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-model", action="store_true", help="retrieval figures only")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="rung-rag-bench-"))
    questions = write_corpus(root / "docs")
    start = time.perf_counter()
    bm25 = build_index([root / "docs"], root / "bm25.idx", base=root)
    t_bm25 = time.perf_counter() - start
    start = time.perf_counter()
    hybrid = build_index([root / "docs"], root / "hybrid.idx", embedder="minilm", base=root)
    t_hybrid = time.perf_counter() - start
    hybrid = load_index(root / "hybrid.idx")
    hybrid.search("warm up", 1)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"{len(bm25.manifest['documents'])} documents, {len(bm25.passages)} passages; "
          f"index build {t_bm25:.2f} s (BM25), {t_hybrid:.2f} s (hybrid)\n")
    engines = {"rung BM25 (bm25s)": lambda q, k: [h.passage for h in bm25.search(q, k)],
               "rung hybrid (BM25 + MiniLM, RRF)": lambda q, k: [h.passage for h in hybrid.search(q, k)],
               "SQLite FTS5 bm25()": fts5(bm25)}
    print("| retriever | questions | recall@1 | recall@3 | MRR | ms/query |")
    print("|---|---|---|---|---|---|")
    for name, search in engines.items():
        for field in ("question", "paraphrase"):
            f = figures(search, questions, field)
            print(f"| {name} | {'as written' if field == 'question' else 'paraphrased'} | {f['recall@1']:.2f} | "
                  f"{f['recall@3']:.2f} | {f['mrr']:.2f} | {f['ms/query']:.2f} |")
    if args.skip_model:
        return

    from rung.bench.run import BenchSettings, run_bench
    from rung.bench.suite import suite_from_dict

    suite = suite_from_dict({"name": "rag", "defaults": {"max_tokens": 48},
                             "cases": [{"id": f"q{i}", "prompt": q.question, "expect": {"contains": q.answer}}
                                       for i, q in enumerate(questions)]})
    print("\n| SmolLM2-135M | answer holds the planted fact | planted passage supported | wrote a label | wall s |")
    print("|---|---|---|---|---|")
    for label, settings in (("ungrounded", BenchSettings(isolate=False, concurrency=4)),
                            ("--rag (BM25, k=2)", BenchSettings(isolate=False, concurrency=4, rag=bm25, rag_k=2))):
        start = time.perf_counter()
        [run] = run_bench(["smollm2-135m"], suite, settings)
        wall = time.perf_counter() - start
        correct = supported = labelled = 0
        for q, case in zip(questions, run.cases):
            text = case.samples[0].text or ""
            correct += case.passed
            g = retrieve(bm25, [{"role": "user", "content": q.question}], 2)
            check = check_answer(text, g) if settings.rag is not None else {"citations": []}
            supported += any(c["supported"] and c["source"] == f"docs/{q.source}" for c in check["citations"])
            labelled += bool(re.search(r"\[[^\]]+:\d+", text))
        n = len(questions)
        print(f"| {label} | {correct}/{n} | {supported}/{n} | {labelled}/{n} | {wall:.0f} |")


if __name__ == "__main__":
    main()
