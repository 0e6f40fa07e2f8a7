"""Retrieval for grounding: ``rung index`` builds a local index of documents (BM25 through bm25s,
optional dense vectors fused by reciprocal rank); ``--rag INDEX`` in chat, serve and bench puts
the best passages in the prompt with their ``[source:lines]`` labels, and answers are checked for
which sources they cite and use.

    index = build_index(["docs/"], "docs.idx")          # or load_index("docs.idx")
    messages, grounding = ground(index, [{"role": "user", "content": "How long is the warranty?"}])
    ...                                                 # generate from messages
    check_answer(answer, grounding)                     # {"citations": [...], "not_in_sources": [...]}

This package imports nothing of the engine, the server or the bench: they import it.
"""

from rung.extras import require

require("rag", what="rung.rag")  # bm25s and its stemmer, imported where BM25 runs (rung/rag/lexical.py)


from rung.rag.chunk import Passage, chunk_document
from rung.rag.cite import check_answer, cited_labels, format_sources
from rung.rag.documents import DocumentError, find_documents, read_document
from rung.rag.ground import DEFAULT_K, DEFAULT_MAX_CHARS, Grounding, ground, grounded_messages, retrieve
from rung.rag.index import Hit, Index, RagError, build_index, load_index

__all__ = ["DEFAULT_K", "DEFAULT_MAX_CHARS", "DocumentError", "Grounding", "Hit", "Index", "Passage", "RagError",
           "build_index", "check_answer", "chunk_document", "cited_labels", "find_documents", "format_sources",
           "ground", "grounded_messages", "load_index", "read_document", "retrieve"]
