"""BM25 over passages, through bm25s (a maintained BM25 library: numpy sparse matrices, Lucene's
scoring) with PyStemmer's English Snowball stemmer and bm25s's English stopwords.

Why bm25s and not SQLite FTS5: an FTS5 index is a database file, and opening a database someone
else wrote means trusting its schema (triggers, views) unless every defence is switched on; a
bm25s index is three numeric arrays and two JSON files, which rung reads as data: the arrays with
``numpy.load(allow_pickle=False)`` (an object array is refused, nothing is unpickled), the JSON with
the standard parser, and then every array is checked against the others (sizes, ranges, order)
before a query touches it. Scores are Lucene's BM25 (k1 1.5, b 0.75), the same on every machine.

rung reads the arrays itself rather than through ``bm25s.BM25.load`` so that each check happens
before bm25s sees the data and fails with rung's one-line error naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ARRAYS = ("data", "indices", "indptr")  # the CSC matrix of per-(term, passage) scores
FILES = {name: f"{name}.csc.index.npy" for name in ARRAYS} | {"vocab": "vocab.index.json",
                                                            "params": "params.index.json"}
PARAMS = {"k1": (int, float), "b": (int, float), "delta": (int, float), "method": str, "idf_method": (str, type(None)),
          "dtype": str, "int_dtype": str, "num_docs": int, "version": str, "backend": str}
METHODS = {"robertson", "lucene", "atire", "bm25l", "bm25+"}


class LexicalError(ValueError):
    """A BM25 file that is missing, malformed or inconsistent; names the file."""


def analyzer():
    """The stemmer and stopwords shared by passages and queries (they must match exactly)."""
    import Stemmer

    return Stemmer.Stemmer("english")


def tokenize(texts: list[str], stemmer) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)


class Lexical:
    """A bm25s retriever over n passages: scores for a query, one per passage."""

    def __init__(self, retriever, stemmer):
        self.retriever, self.stemmer = retriever, stemmer

    @classmethod
    def build(cls, texts: list[str]) -> "Lexical":
        import bm25s

        stemmer = analyzer()
        retriever = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
        retriever.index(tokenize(texts, stemmer), show_progress=False)
        return cls(retriever, stemmer)

    def terms(self, text: str) -> list[str]:
        return tokenize([text], self.stemmer)[0]

    def scores(self, query: str, context: str = "") -> np.ndarray:
        """BM25 score of every passage for ``query`` ([n_passages], float32); zeros if no term is known.
        ``context`` (the conversation's previous question) counts half: bm25s sums a score per query
        term, so the query's terms are given twice."""
        terms = [t for t in self.terms(query) if t in self.retriever.vocab_dict and t]
        if context.strip() and terms:
            terms = terms * 2
        if context.strip():
            terms += [t for t in self.terms(context) if t in self.retriever.vocab_dict and t]
        if not terms:
            return np.zeros(self.retriever.scores["num_docs"], dtype=np.float32)
        return np.asarray(self.retriever.get_scores(terms), dtype=np.float32)

    def idf(self, term: str) -> float:
        """Lucene's inverse document frequency of a (stemmed) term; a term no passage has gets the most."""
        n = self.retriever.scores["num_docs"]
        tid = self.retriever.vocab_dict.get(term)
        indptr = self.retriever.scores["indptr"]
        df = int(indptr[tid + 1] - indptr[tid]) if tid is not None and tid + 1 < len(indptr) else 0
        return float(np.log(1 + (n - df + 0.5) / (df + 0.5)))

    def save(self, folder: Path) -> None:
        self.retriever.save(folder, corpus=None, allow_pickle=False, show_progress=False)

    @classmethod
    def load(cls, folder: Path, n_passages: int) -> "Lexical":
        import bm25s

        params = _json(folder / FILES["params"], dict)
        for key, value in params.items():
            if key not in PARAMS or not isinstance(value, PARAMS[key]) or isinstance(value, bool):
                raise LexicalError(f"{folder / FILES['params']}: unexpected field {key!r} = {value!r}")
        if params.get("method") not in METHODS or params.get("num_docs") != n_passages:
            raise LexicalError(f"{folder / FILES['params']}: method {params.get('method')!r} and num_docs "
                               f"{params.get('num_docs')!r} do not describe an index of {n_passages} passages")
        if params.get("backend", "numpy") != "numpy" or params.get("dtype") != "float32":
            raise LexicalError(f"{folder / FILES['params']}: expected the numpy backend and float32 scores")
        vocab = _json(folder / FILES["vocab"], dict)
        arrays = {name: _array(folder / FILES[name]) for name in ARRAYS}
        _check(folder, arrays, vocab, n_passages)
        retriever = bm25s.BM25(k1=params["k1"], b=params["b"], delta=params.get("delta", 0.5), method=params["method"],
                               idf_method=params.get("idf_method"), dtype="float32", int_dtype=params.get("int_dtype",
                                                                                                          "int32"))
        retriever.scores = {**arrays, "num_docs": n_passages}
        retriever.vocab_dict = vocab
        retriever.unique_token_ids_set = set(vocab.values())
        retriever.nonoccurrence_array = None  # lucene needs none (bm25l and bm25+ do: refused below)
        if retriever.method in retriever.methods_requiring_nonoccurrence:
            raise LexicalError(f"{folder / FILES['params']}: method {retriever.method!r} is not one rung writes")
        return cls(retriever, analyzer())


def _json(path: Path, kind: type):
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LexicalError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LexicalError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise LexicalError(f"{path}: expected a JSON {kind.__name__}")
    return value


def _array(path: Path) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)  # never unpickle: an object array raises here
    except FileNotFoundError:
        raise LexicalError(f"{path}: missing") from None
    except (ValueError, OSError, EOFError) as e:
        raise LexicalError(f"{path}: not a numpy array file rung can read ({' '.join(str(e).split())})") from None
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "iuf":
        raise LexicalError(f"{path}: expected a 1-D numeric array, got {getattr(a, 'dtype', type(a))}")
    return a


def _check(folder: Path, a: dict[str, np.ndarray], vocab: dict, n: int) -> None:
    data, indices, indptr = a["data"], a["indices"], a["indptr"]
    where = f"{folder}/"
    if data.dtype != np.float32 or indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
        raise LexicalError(f"{where}{FILES['data']}: expected float32 scores and integer indices")
    if len(data) != len(indices) or len(indptr) < 1 or indptr[0] != 0 or indptr[-1] != len(data):
        raise LexicalError(f"{where}{FILES['indptr']}: the arrays do not form one sparse matrix "
                           f"({len(data)} scores, {len(indices)} indices, pointers ending at {indptr[-1] if len(indptr) else None})")
    if np.any(np.diff(indptr) < 0):
        raise LexicalError(f"{where}{FILES['indptr']}: pointers go backwards")
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        raise LexicalError(f"{where}{FILES['indices']}: a passage index outside 0..{n - 1}")
    if not np.all(np.isfinite(data)):
        raise LexicalError(f"{where}{FILES['data']}: scores that are not finite")
    terms = len(indptr) - 1
    ids = list(vocab.values())
    # bm25s gives the empty token (what an empty passage holds) the id after the matrix's last column
    inside = [v for k, v in vocab.items() if k != ""]
    if (not all(isinstance(k, str) for k in vocab) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ids)
            or len(set(ids)) != len(ids) or (inside and (min(inside) < 0 or max(inside) >= terms))
            or not 0 <= vocab.get("", 0) <= terms):
        raise LexicalError(f"{where}{FILES['vocab']}: expected distinct term ids in 0..{terms - 1}")
