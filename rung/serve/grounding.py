"""`rung serve --rag INDEX`: retrieval for chat completions, and the sources and citations in replies.

A chat request is grounded unless it says ``"rag": false``; ``"rag": {"k": 2, "max_chars": 1500}``
overrides the server's defaults for one request. The passages go into the system message
(rung.rag.ground). Replies carry what was retrieved and what the answer did with it, in an
extension field OpenAI clients pass through (the openai package keeps unknown fields):

    "rung": {"rag": {"index": "sha256:...", "query": "...", "sources": [{label, source, lines, rank, score, text}]}}
        at the top of a reply (streamed: on the first chunk)
    choices[i].rung.citations: [{label, source, lines, rank, cited, overlap, supported}]
    choices[i].rung.not_in_sources: ["made/up.md:3"]
        on each choice (streamed: on its finishing chunk), from rung.rag.cite.check_answer

``Prepared.grounding`` holds the request's rung.rag.Grounding: a verifier reads the passages the
model saw from ``grounding.texts``.
"""

from __future__ import annotations

from rung.serve.errors import bad_request


def ground_chat(server, req, messages: list[dict]):
    """(messages to render, Grounding or None) for one chat request."""
    from rung.rag import grounded_messages, retrieve

    index = server.config.rag
    option = req.rag
    if option is False or (option is None and index is None):
        return messages, None
    if index is None:
        raise bad_request("this server has no retrieval index (start it with --rag INDEX)", "rag")
    k = server.config.rag_k
    max_chars = server.config.rag_max_chars
    if option is not None and option is not True:
        k = option.k if option.k is not None else k
        max_chars = option.max_chars if option.max_chars is not None else max_chars
    grounding = retrieve(index, messages, k, max_chars)
    return grounded_messages(messages, grounding), grounding


def reply_fields(prepared: list) -> dict:
    """The top-level ``rung`` field of a reply: what was retrieved (nothing when not grounded)."""
    grounding = next((p.grounding for p in prepared if getattr(p, "grounding", None) is not None), None)
    if grounding is None:
        return {}
    return {"rag": {"index": grounding.index_hash, "query": grounding.query, "sources": grounding.sources()}}


def choice_fields(prepared, choice) -> dict:
    """A choice's citations and the labels it cites that are not among the sources."""
    from rung.rag import check_answer

    grounding = getattr(prepared, "grounding", None)
    if grounding is None:
        return {}
    return check_answer("".join(choice.content), grounding)


def add_rung(target: dict, fields: dict) -> dict:
    """Merge ``fields`` into ``target["rung"]`` (other parts of the server put theirs there too)."""
    if fields:
        target["rung"] = {**(target.get("rung") or {}), **fields}
    return target
