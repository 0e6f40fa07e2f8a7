"""Grounding a conversation: retrieve passages for its last user message and put them, with their
citation labels, in the system message, with the instruction to answer from them and cite them.

The system message is where every chat template (SmolLM2, Qwen3, Gemma 3, gpt-oss's developer
message) carries instructions; a conversation that has one keeps it, with the sources appended.
The passages given to the model are bounded by ``k`` and by ``max_chars`` of passage text (the
best passage is always given, cut to ``max_chars`` if it alone is longer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_K = 4
DEFAULT_MAX_CHARS = 3000

INSTRUCTION = ("Answer the question using only the sources below. Cite the source of each fact by its label "
               "in square brackets, for example [{example}]. If the sources do not contain the answer, say "
               "that you do not know.")


@dataclass
class Grounding:
    """What retrieval gave one request: the query, the passages (as the model saw them) and the index."""

    query: str
    hits: list  # rung.rag.index.Hit, best first
    index_hash: str
    k: int
    max_chars: int
    texts: list[str] = field(default_factory=list)  # each hit's text as put in the prompt (maybe cut)
    index: object = field(default=None, repr=False, compare=False)

    @property
    def labels(self) -> list[str]:
        return [h.label for h in self.hits]

    def sources(self) -> list[dict]:
        """The retrieved passages as JSON (label, source, lines, rank, scores, text)."""
        return [h.to_dict() | {"text": t} for h, t in zip(self.hits, self.texts)]

    def to_dict(self) -> dict:
        return {"index": self.index_hash, "query": self.query, "k": self.k, "max_chars": self.max_chars,
                "sources": self.sources()}

    def system_text(self) -> str:
        if not self.hits:
            return ""
        blocks = [f"[{h.label}]\n{t}" for h, t in zip(self.hits, self.texts)]
        return INSTRUCTION.format(example=self.hits[0].label) + "\n\nSources:\n\n" + "\n\n".join(blocks)


def _user_texts(messages: list[dict]) -> list[str]:
    out = []
    for m in messages:
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
            out.append(content or "")
    return out


def query_of(messages: list[dict]) -> str:
    """The text of the last user message (text parts joined), or "" when there is none."""
    texts = _user_texts(messages)
    return texts[-1] if texts else ""


def retrieve(index, messages: list[dict], k: int = DEFAULT_K, max_chars: int = DEFAULT_MAX_CHARS) -> Grounding:
    """The passages for the last user message, with the one before it as context (a follow-up
    question names less than the first one did)."""
    texts = _user_texts(messages)
    query = texts[-1] if texts else ""
    context = texts[-2] if len(texts) > 1 else ""
    hits = index.search(query, k, context) if query.strip() else []
    kept, texts, used = [], [], 0
    for h in hits:
        text = h.passage.text
        if used + len(text) > max_chars:
            if kept:
                break
            text = text[:max_chars].rstrip() + " …"
        kept.append(h)
        texts.append(text)
        used += len(text)
    return Grounding(query, kept, index.hash, k, max_chars, texts, index)


def grounded_messages(messages: list[dict], grounding: Grounding) -> list[dict]:
    """``messages`` with the sources in the system message (merged into one that is there)."""
    text = grounding.system_text()
    if not text:
        return [dict(m) for m in messages]
    out = [dict(m) for m in messages]
    first = out[0] if out else None
    if first is not None and first.get("role") in ("system", "developer") and isinstance(first.get("content"), str):
        first["content"] = f"{first['content'].rstrip()}\n\n{text}" if first["content"].strip() else text
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def ground(index, messages: list[dict], k: int = DEFAULT_K,
           max_chars: int = DEFAULT_MAX_CHARS) -> tuple[list[dict], Grounding]:
    grounding = retrieve(index, messages, k, max_chars)
    return grounded_messages(messages, grounding), grounding
