"""PII redaction in `rung serve`: requests are redacted before the chat template sees them, replies
are restored on the way out (whole and streamed, content, reasoning and tool-call arguments).

Per server, ``--redact`` (entity types with ``--redact-entities``) redacts every request; a request
cannot turn it off. Without it a request asks with the extension field ``"redact": true`` (default
entity types) or ``"redact": ["EMAIL_ADDRESS", ...]``. Everything after redaction (the prompt, the
--log-prompts field, the policy's and the verifier's views, errors that quote a message) holds
placeholders only; the client alone sees the values again. Logprobs stay as generated (placeholder
tokens): they describe what the model produced.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from rung.serve.errors import bad_request


async def redaction_for(server, req) -> "RequestRedaction | None":
    """The request's redaction (its messages or prompts already redacted), or None when it is off."""
    asked = getattr(req, "redact", None)
    redactor = server.redactor
    if redactor is not None:  # the server redacts everything
        if asked is False or isinstance(asked, list):
            raise bad_request("this server redacts every request (rung serve --redact); 'redact' may only be true",
                              "redact")
    elif asked is None or asked is False:
        return None
    else:
        redactor = await asyncio.to_thread(server.request_redactor, None if asked is True else tuple(asked))
    return await asyncio.to_thread(RequestRedaction, redactor, req)


class RequestRedaction:
    """One request's vault: redacts it (``.request``), restores what goes back, counts what it hid."""

    def __init__(self, redactor, req):
        from rung.govern.pii_vault import PIIVault

        self.vault = PIIVault()
        self.counts: Counter[str] = Counter()
        self._streams: dict[tuple[int, str], object] = {}
        update = {"redact": None}
        if hasattr(req, "messages"):
            r = redactor.redact_messages([m.model_dump(exclude_none=True) for m in req.messages], self.vault)
            self.counts.update(e.type for e in r.entities)
            update["messages"] = [type(req.messages[0]).model_validate(m) for m in r.messages]
        else:
            prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            if not all(isinstance(p, str) for p in prompts):
                raise bad_request("prompts given as token ids cannot be redacted; send text", "prompt")
            texts = [self._text(redactor, p) for p in prompts]
            update["prompt"] = texts[0] if isinstance(req.prompt, str) else texts
        if req.user:  # logged with the request: often an e-mail address
            update["user"] = self._text(redactor, req.user)
        self.request = req.model_copy(update=update)

    def _text(self, redactor, text: str) -> str:
        r = redactor.redact_text(text, self.vault)
        self.counts.update(e.type for e in r.entities)
        return r.text

    # ---- restoring ----------------------------------------------------------------------------------

    def message(self, message: dict) -> dict:
        """A whole reply's message, restored."""
        out = dict(message)
        for key in ("content", "reasoning_content", "refusal"):
            if isinstance(out.get(key), str):
                out[key] = self.vault.restore(out[key])
        if out.get("tool_calls"):
            out["tool_calls"] = [self._call(c) for c in out["tool_calls"]]
        return out

    def text(self, text: str) -> str:
        return self.vault.restore(text)

    def choice(self, choice: dict) -> dict:
        """A whole reply's choice, restored: its message (chat) or its text (completions)."""
        if "message" in choice:
            return {**choice, "message": self.message(choice["message"])}
        return {**choice, "text": self.text(choice["text"])}

    def delta(self, index: int, delta: dict | None, text: str | None, finish: bool):
        """One stream chunk's delta (chat) or text (completions) of choice ``index``, restored; a
        placeholder cut between chunks is held back and sent whole, the rest flushed at the finish."""
        if delta:
            delta = dict(delta)
            for key in ("content", "reasoning_content"):
                if isinstance(delta.get(key), str):
                    delta[key] = self._stream(index, key).push(delta[key])
            if isinstance(delta.get("refusal"), str):
                delta["refusal"] = self.vault.restore(delta["refusal"])
            if delta.get("tool_calls"):
                delta["tool_calls"] = [self._call(c) for c in delta["tool_calls"]]
        if text is not None:
            text = self._stream(index, "text").push(text)
        if finish:
            for (i, key), stream in self._streams.items():
                if i != index:
                    continue
                rest = stream.flush()
                if not rest:
                    continue
                if key == "text":
                    text = (text or "") + rest
                else:
                    delta = dict(delta or {})
                    delta[key] = (delta.get(key) or "") + rest
        return delta, text

    def _stream(self, index: int, key: str):
        stream = self._streams.get((index, key))
        if stream is None:
            stream = self._streams[(index, key)] = self.vault.stream()
        return stream

    def _call(self, call: dict) -> dict:
        fn = dict(call.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            fn["arguments"] = self.vault.restore_json(fn["arguments"])
        return {**call, "function": fn}
