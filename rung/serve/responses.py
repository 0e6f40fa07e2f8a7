"""Engine deltas → OpenAI response objects and stream chunks.

A ``Choice`` follows one sample: it feeds the delta text to the family's reply parser (reasoning,
content, tool calls) and keeps token ids and logprobs. Streamed and whole replies come from the
same events, so they agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from rung.serve.reasoning import Event


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


@dataclass
class Choice:
    index: int
    parser: object | None = None  # None: raw text (text completions)
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    refusal: str | None = None  # governance ended the reply (rung/serve/governance.py)
    verdict: dict | None = None  # the verifier's, when one runs
    max_calls: int | None = None  # parallel_tool_calls false: 1 (the calls after it are dropped)
    dropped: set = field(default_factory=set)  # ids of the call objects dropped by max_calls

    def feed(self, delta) -> list[Event]:
        """Take one engine delta; return the events it completes (all of them on the last delta)."""
        self.token_ids += delta.token_ids
        if delta.logprobs:
            self.logprobs += delta.logprobs
        if self.parser is None:
            events = [Event("content", delta.text)] if delta.text else []
        else:
            events = self.parser.push(delta.text) if delta.text else []
            if delta.finish_reason:
                events += self.parser.finish()
        kept = []
        for e in events:
            if e.call is not None and self._over_limit(e):
                continue
            if e.kind == "content":
                self.content.append(e.text)
            elif e.kind == "reasoning":
                self.reasoning.append(e.text)
            elif e.kind in ("call_start", "tool_call"):
                self.calls.append(e.call)  # its arguments are complete by its call_end
            kept.append(e)
        if delta.finish_reason:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        return kept

    def _over_limit(self, e) -> bool:
        """Whether a call's event is past ``max_calls`` (OpenAI's parallel_tool_calls false: the
        reply carries the first call only, as vLLM does): its call and every later event of it go."""
        if id(e.call) in self.dropped:
            return True
        if self.max_calls is not None and e.kind in ("call_start", "tool_call") and len(self.calls) >= self.max_calls:
            self.dropped.add(id(e.call))
            return True
        return False

    def refuse(self, text: str, replace: bool = False) -> str:
        """End the reply with a refusal (after what was said, or instead of it); the text to emit."""
        if replace:
            self.content.clear()
        said = "".join(self.content).strip()
        emitted = f"\n\n{text}" if said else text
        self.content.append(emitted)
        self.refusal = text
        self.finish_reason, self.stop_reason = "content_filter", None
        return emitted

    @property
    def openai_finish_reason(self) -> str | None:
        if self.finish_reason is None:
            return None
        if self.calls and self.finish_reason == "stop":
            return "tool_calls"
        return "stop" if self.finish_reason == "abort" else self.finish_reason

    def message(self) -> dict:
        text = "".join(self.content)
        out = {"role": "assistant", "content": (text.strip() if self.calls else text) or (None if self.calls else ""),
               "tool_calls": [call_json(c) for c in self.calls] if self.calls else None}
        if self.reasoning:
            out["reasoning_content"] = "".join(self.reasoning)
        if self.refusal:
            out["refusal"] = self.refusal
        return out


def call_json(call, index: int | None = None) -> dict:
    out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return out if index is None else {"index": index, **out}


# ---- logprobs -------------------------------------------------------------------------------------


class TokenText:
    """A token's text and bytes as OpenAI reports them (bytes from llguidance's byte view of the
    vocabulary when available: a token can hold part of a UTF-8 character)."""

    def __init__(self, tokenizer, grammars=None):
        self.tokenizer, self.grammars = tokenizer, grammars
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id])
            raw = None
            if self.grammars is not None:
                raw = self.grammars.tokenizer.decode_bytes([token_id])
                raw = raw[1:] if raw[:1] == b"\xff" else raw  # llguidance marks special tokens with 0xFF
            hit = self._cache[token_id] = (text, list(raw if raw is not None else text.encode("utf-8")))
        return hit


def _ranked(lp: dict[int, float], token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    chosen = lp.get(token, float("-inf"))
    others = sorted(((t, v) for t, v in lp.items()), key=lambda x: -x[1])
    return chosen, others[:top]


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], top: int, text: TokenText) -> list[dict]:
    out = []
    for token, lp in zip(token_ids, logprobs):
        chosen, best = _ranked(lp, token, top)
        s, b = text(token)
        out.append({"token": s, "logprob": _finite(chosen), "bytes": b,
                    "top_logprobs": [{"token": text(t)[0], "logprob": _finite(v), "bytes": text(t)[1]}
                                     for t, v in best]})
    return out


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], top: int, text: TokenText,
                        offset: int = 0) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for token, lp in zip(token_ids, logprobs):
        chosen, best = _ranked(lp, token, top)
        s = text(token)[0]
        tokens.append(s)
        values.append(_finite(chosen))
        tops.append({text(t)[0]: _finite(v) for t, v in best} if top else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _finite(x: float) -> float:
    return x if x > -9999.0 else -9999.0  # JSON has no -Infinity; OpenAI clamps the same way


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# ---- one run's objects ----------------------------------------------------------------------------


class OpenAIReply:
    """The OpenAI objects of one run: stream chunks and the whole reply, shaped from its choices.

    Shaping only: the run restores redacted values before a chunk is shaped and passes in the
    ``rung`` fields (the verifier's verdict, the citations) that governance and grounding add."""

    def __init__(self, kind: str, id: str, created: int, model: str, req, prepared: list, text: TokenText):
        self.kind, self.id, self.created, self.model = kind, id, created, model
        self.req, self.prepared, self.text = req, prepared, text

    def envelope(self) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def prompt_text(self, choice_index: int) -> str:
        """The prompt a choice continues (echo=true puts it before a completion's text)."""
        return self.prepared[choice_index // self.req.n].prompt_text or ""

    def chunk(self, choice: Choice, delta: dict | None = None, finish: bool = False, logprobs=None,
              text: str | None = None, rung: dict | None = None) -> dict:
        if self.kind == "chat":
            c = {"index": choice.index, "delta": delta or {}, "logprobs": logprobs,
                 "finish_reason": choice.openai_finish_reason if finish else None}
        else:
            c = {"index": choice.index, "text": text or "", "logprobs": logprobs,
                 "finish_reason": choice.openai_finish_reason if finish else None}
        if rung:
            c["rung"] = rung
        if finish and choice.stop_reason is not None:
            c["stop_reason"] = choice.stop_reason
        return {**self.envelope(), "choices": [c]}

    def logprobs(self, choice: Choice, start: int):
        """The logprobs of the choice's tokens from ``start`` on, or None when none were asked for."""
        want = self.req.logprobs
        if want is None or want is False or start == len(choice.token_ids):
            return None
        ids, lps = choice.token_ids[start:], choice.logprobs[start:]
        if self.kind == "chat":
            return {"content": chat_logprobs(ids, lps, self.req.top_logprobs or 0, self.text)}
        offset = sum(len(self.text(t)[0]) for t in choice.token_ids[:start])
        return completion_logprobs(ids, lps, want, self.text, offset)

    def choice(self, c: Choice) -> dict:
        """One finished choice of the whole reply."""
        if self.kind == "chat":
            lp = ({"content": chat_logprobs(c.token_ids, c.logprobs, self.req.top_logprobs or 0, self.text)}
                  if self.req.logprobs else None)
            return {"index": c.index, "message": c.message(), "logprobs": lp,
                    "finish_reason": c.openai_finish_reason, "stop_reason": c.stop_reason}
        completion = "".join(c.content)
        if self.req.echo:
            completion = self.prompt_text(c.index) + completion
        lp = (completion_logprobs(c.token_ids, c.logprobs, self.req.logprobs, self.text)
              if self.req.logprobs is not None else None)
        return {"index": c.index, "text": completion, "logprobs": lp,
                "finish_reason": c.openai_finish_reason, "stop_reason": c.stop_reason}

    def whole(self, choices: list[dict], usage: dict) -> dict:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}


def _call_index(choice: Choice, call) -> int:
    return next(i for i, c in enumerate(choice.calls) if c is call)


def event_delta(choice: Choice, e: Event) -> dict | None:
    """A chat chunk's delta for one reply event (None: the event sends nothing). A streamed call's
    first delta has its index, id, type and name; the next ones pieces of its arguments only."""
    if e.kind == "tool_call":
        return {"tool_calls": [call_json(e.call, _call_index(choice, e.call))]}
    if e.kind == "call_start":
        return {"tool_calls": [{"index": _call_index(choice, e.call), "id": e.call.id, "type": "function",
                                "function": {"name": e.call.name, "arguments": ""}}]}
    if e.kind == "call_args":
        return {"tool_calls": [{"index": _call_index(choice, e.call), "function": {"arguments": e.text}}]}
    if e.kind == "call_end":
        return None
    if e.kind == "reasoning":
        return {"reasoning_content": e.text}
    if choice.refusal and e.text.strip() == choice.refusal:
        return {"content": e.text, "refusal": choice.refusal}
    return {"content": e.text}


def whole_calls(events: list[Event]) -> list[Event]:
    """The events with each streamed call as one ``tool_call`` event at its end (for a consumer that
    needs a call's arguments whole, as the restoring of redacted values does)."""
    return [Event("tool_call", call=e.call) if e.kind == "call_end" else e for e in events
            if e.kind not in ("call_start", "call_args")]
