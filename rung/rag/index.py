"""A retrieval index on disk: passages with their line ranges, BM25 arrays, optional dense vectors,
and a manifest that ties them together.

    INDEX/
      manifest.json      format and version, chunking, the analyzer, every document (path, sha256,
                         passages), every other file's sha256, the dense embedder (if any)
      passages.jsonl     one passage a line: source, start, end, text, section
      bm25/              bm25s's arrays (.npy) and vocabulary (json)
      dense.npy          [passages, dim] float32 unit vectors (only with an embedder)

Loading checks, in order, and fails with one line naming the file: the manifest parses and is a
rung index of a version this rung reads; every file it lists is there with the sha256 it records
(a half-written, truncated or edited index stops here); the passages are well formed and as many
as the manifest says; the BM25 arrays are consistent (lexical.py). Nothing is unpickled.

An index is *stale* when the documents it was built from have changed since: its passages still
answer, but their line numbers may no longer match the files. ``Index.stale()`` lists them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rung.rag.chunk import DEFAULT_MAX_CHARS, Passage, chunk_document
from rung.rag.dense import Embedder, load_embedder, rrf
from rung.rag.documents import find_documents, read_document
from rung.rag.lexical import FILES as BM25_FILES
from rung.rag.lexical import Lexical, LexicalError

FORMAT = "rung-rag-index"
VERSION = 1
MANIFEST = "manifest.json"
PASSAGES = "passages.jsonl"
DENSE = "dense.npy"
MAX_MANIFEST_BYTES = 64 * 2**20


class RagError(ValueError):
    """An index rung cannot use; the message names the file and what is wrong with it."""




@dataclass(frozen=True)
class Hit:
    passage: Passage
    rank: int  # 1-based
    score: float  # the fused score (BM25 alone: its BM25 score)
    bm25: float
    dense: float | None = None

    @property
    def label(self) -> str:
        return self.passage.label

    def to_dict(self) -> dict:
        p = self.passage
        out = {"label": p.label, "source": p.source, "lines": [p.start, p.end], "rank": self.rank,
               "score": round(self.score, 6), "bm25": round(self.bm25, 6), "text": p.text}
        if self.dense is not None:
            out["dense"] = round(self.dense, 6)
        if p.section:
            out["section"] = p.section
        return out


@dataclass
class Index:
    path: Path
    manifest: dict
    passages: list[Passage]
    lexical: Lexical
    vectors: np.ndarray | None = None  # [passages, dim]
    embedder: Embedder | None = field(default=None, repr=False)

    @property
    def hash(self) -> str:
        """``sha256:`` + 16 hex digits over what the index answers with (not when or where it was built):
        bench cache keys and reports carry it."""
        return self.manifest["hash"]

    def search(self, query: str, k: int = 4, context: str = "") -> list[Hit]:
        """The ``k`` best passages for ``query``, best first; passages sharing no term with the query
        (and, with dense vectors, ranked low by both) are left out. ``context``, the previous
        question of a conversation, weighs half as much in BM25: "and its warranty?" after a question
        about the Feytobel valve finds the Feytobel's warranty."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        bm25 = self.lexical.scores(query, context)
        lexical = [int(i) for i in np.lexsort((np.arange(len(bm25)), -bm25)) if bm25[i] > 0]
        if self.vectors is None:
            return [Hit(self.passages[i], r, float(bm25[i]), float(bm25[i])) for r, i in enumerate(lexical[:k], 1)]
        q = self.query_embedder().embed([query])[0]
        cosine = self.vectors @ q
        dense = [int(i) for i in np.lexsort((np.arange(len(cosine)), -cosine))][:max(50, k)]
        fused = rrf([lexical[:max(50, k)], dense])
        order = sorted(fused, key=lambda i: (-fused[i], i))[:k]
        return [Hit(self.passages[i], r, fused[i], float(bm25[i]), float(cosine[i])) for r, i in enumerate(order, 1)]

    def query_embedder(self) -> Embedder:
        """The embedder that built the dense vectors, loaded once (a server loads it at start-up,
        not on its first request); refused if the installed one gives other vectors."""
        if self.embedder is None:
            info = self.manifest["dense"]
            embedder = load_embedder(info["embedder"])
            if embedder.fingerprint() != info["fingerprint"]:
                raise RagError(f"{self.path / MANIFEST}: built with embedder {info['embedder']} "
                                  f"{info['fingerprint']}, but the installed one is {embedder.fingerprint()}; "
                                  "rebuild the index")
            self.embedder = embedder
        return self.embedder

    def passage(self, label: str) -> Passage | None:
        for p in self.passages:
            if p.label == label:
                return p
        return None

    def stale(self) -> list[str]:
        """Documents that changed (or went missing) since the index was built, as ``source: why``."""
        base = Path(self.manifest.get("base") or ".")
        out = []
        for doc in self.manifest["documents"]:
            path = Path(doc["source"]) if Path(doc["source"]).is_absolute() else base / doc["source"]
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                out.append(f"{doc['source']}: missing")
                continue
            if digest != doc["sha256"]:
                out.append(f"{doc['source']}: changed")
        return out


# ---- building -----------------------------------------------------------------------------------


def build_index(paths: list[str | Path], out: str | Path, max_chars: int = DEFAULT_MAX_CHARS,
                embedder: Embedder | str | None = None, base: str | Path | None = None) -> Index:
    """Read, chunk and index the documents under ``paths``; write the index folder ``out``
    (replacing an index already there, never another kind of folder)."""
    import bm25s

    if max_chars < 50:
        raise ValueError(f"max_chars must be at least 50, got {max_chars}")
    out, base = Path(out), Path(base or os.getcwd())
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise RagError(f"{out}: exists and is not a rung index; choose another --out")
    files = find_documents(paths)
    passages: list[Passage] = []
    documents = []
    for f in files:
        doc = read_document(f, base)
        chunks = chunk_document(doc, max_chars, first_id=len(passages))
        documents.append({"source": doc.source, "sha256": doc.sha256, "bytes": doc.size, "kind": doc.kind,
                          "passages": [len(passages), len(passages) + len(chunks)]})
        passages += chunks
    if not passages:
        raise RagError(f"no text to index in {', '.join(str(p) for p in paths)} "
                          "(rung indexes .md, .txt, .rst, .html and .jsonl files)")
    lexical = Lexical.build([p.indexed_text for p in passages])
    if isinstance(embedder, str):
        embedder = load_embedder(embedder)
    vectors = embedder.embed([p.indexed_text for p in passages]).astype(np.float32) if embedder else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with open(tmp / PASSAGES, "w", encoding="utf-8") as f:
            for p in passages:
                f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
        lexical.save(tmp / "bm25")
        if vectors is not None:
            np.save(tmp / DENSE, vectors, allow_pickle=False)
        listed = [PASSAGES] + [f"bm25/{name}" for name in BM25_FILES.values()] + ([DENSE] if vectors is not None else [])
        manifest = {
            "format": FORMAT, "version": VERSION,
            "chunking": {"max_chars": max_chars, "unit": "lines"},
            "analyzer": {"library": "bm25s", "library_version": bm25s.__version__, "method": "lucene", "k1": 1.5,
                         "b": 0.75, "stemmer": "snowball-english", "stopwords": "en"},
            "dense": None if embedder is None else {"embedder": embedder.name, "fingerprint": embedder.fingerprint(),
                                                    "dim": int(vectors.shape[1]), "fusion": "rrf-60"},
            "passages": len(passages),
            "documents": documents,
            "files": {name: _sha256(tmp / name) for name in listed},
        }
        manifest["hash"] = _content_hash(manifest)
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest["base"] = str(base.resolve())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Index(out, manifest, passages, lexical, vectors, embedder)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _content_hash(manifest: dict) -> str:
    keep = {k: manifest[k] for k in ("format", "version", "chunking", "analyzer", "dense", "passages", "files")}
    keep["documents"] = [{"source": d["source"], "sha256": d["sha256"]} for d in manifest["documents"]]
    blob = json.dumps(keep, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- loading ------------------------------------------------------------------------------------


def load_index(path: str | Path) -> Index:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise RagError(f"{path}: no such index folder (build one with `rung index DOCS --out {path}`)")
    if not mpath.is_file():
        raise RagError(f"{mpath}: missing: {path} is not a rung index (build one with `rung index`)")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise RagError(f"{mpath}: larger than {MAX_MANIFEST_BYTES} bytes: not a manifest rung wrote")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RagError(f"{mpath}: not valid JSON ({e})") from None
    _check_manifest(manifest, mpath)
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise RagError(f"{f}: missing (the manifest lists it); rebuild the index")
        if _sha256(f) != digest:
            raise RagError(f"{f}: sha256 differs from the manifest's: the file is damaged or was changed after "
                              "`rung index` wrote it; rebuild the index")
    if _content_hash(manifest) != manifest["hash"]:
        raise RagError(f"{mpath}: its hash does not match its content: the manifest was edited")
    passages = _read_passages(path / PASSAGES, manifest["passages"])
    try:
        lexical = Lexical.load(path / "bm25", len(passages))
    except LexicalError as e:
        raise RagError(str(e)) from None
    vectors = None
    if manifest["dense"] is not None:
        vectors = _read_vectors(path / DENSE, len(passages), manifest["dense"]["dim"])
    return Index(path, manifest, passages, lexical, vectors)


def _check_manifest(m, mpath: Path) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise RagError(f"{mpath}: not a rung index manifest (format is not {FORMAT!r})")
    version = m.get("version")
    if version != VERSION:
        newer = isinstance(version, int) and version > VERSION
        raise RagError(f"{mpath}: index format version {version!r}; this rung reads version {VERSION}"
                          + ("; upgrade rung" if newer else "; rebuild the index with `rung index`"))
    expect = {"chunking": dict, "analyzer": dict, "passages": int, "documents": list, "files": dict, "hash": str}
    for key, kind in expect.items():
        if not isinstance(m.get(key), kind):
            raise RagError(f"{mpath}: field {key!r} is missing or not a {kind.__name__}")
    allowed = {PASSAGES, DENSE} | {f"bm25/{n}" for n in BM25_FILES.values()}
    needed = {PASSAGES} | {f"bm25/{n}" for n in BM25_FILES.values()}
    files = m["files"]
    if not set(files) <= allowed or not needed <= set(files) or not all(isinstance(v, str) for v in files.values()):
        raise RagError(f"{mpath}: 'files' must list exactly rung's index files (got {sorted(files)})")
    for d in m["documents"]:
        if not (isinstance(d, dict) and isinstance(d.get("source"), str) and isinstance(d.get("sha256"), str)):
            raise RagError(f"{mpath}: a document entry without source and sha256")
    dense = m.get("dense")
    if dense is not None and not (isinstance(dense, dict) and isinstance(dense.get("embedder"), str)
                                  and isinstance(dense.get("dim"), int) and dense["dim"] > 0
                                  and isinstance(dense.get("fingerprint"), str) and DENSE in files):
        raise RagError(f"{mpath}: 'dense' must name the embedder, its fingerprint and dim, and list {DENSE}")


def _read_passages(path: Path, count: int) -> list[Passage]:
    passages = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                d = json.loads(line)
            except ValueError as e:
                raise RagError(f"{path}: line {number}: not valid JSON ({e})") from None
            ok = (isinstance(d, dict) and isinstance(d.get("source"), str) and isinstance(d.get("text"), str)
                  and all(isinstance(d.get(k), int) and not isinstance(d.get(k), bool) for k in ("start", "end"))
                  and 1 <= d["start"] <= d["end"] and isinstance(d.get("section"), (str, type(None))))
            if not ok:
                raise RagError(f"{path}: line {number}: expected source, start <= end (from 1), text, section")
            passages.append(Passage(len(passages), d["source"], d["start"], d["end"], d["text"], d["section"]))
    if len(passages) != count:
        raise RagError(f"{path}: {len(passages)} passages, the manifest says {count}")
    return passages


def _read_vectors(path: Path, n: int, dim: int) -> np.ndarray:
    try:
        v = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RagError(f"{path}: not a numpy array file rung can read ({' '.join(str(e).split())})") from None
    if v.dtype != np.float32 or v.shape != (n, dim) or not np.all(np.isfinite(v)):
        raise RagError(f"{path}: expected finite float32 vectors of shape ({n}, {dim}), got {v.dtype} {v.shape}")
    return v
