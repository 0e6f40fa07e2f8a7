"""The per-conversation mapping between PII values and their placeholders, and restoring them.

A placeholder is ``<TYPE_N>`` (``<PERSON_1>``, ``<EMAIL_ADDRESS_2>``): numbered per type in the order
values are first seen, the same value always gets the same one within a vault, so the model can still
tell two people apart and refer back to "<PERSON_1>". Angle brackets and an upper-case type are rare in
prose and survive BPE tokenizers intact; a placeholder-shaped string already in the user's text is
reserved so that a new value is never given its number (it would be "restored" into their text).

Restoring replaces exactly the placeholders this vault issued; anything else is left as it is.
``StreamRestorer`` does the same over streamed deltas: it holds back a tail that may be the start
of a placeholder and never emits half of one.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)_([0-9]+)>")


@dataclass(frozen=True)
class Entity:
    """One redacted span: where it was in the original text, what it was, what replaced it."""

    type: str
    start: int
    end: int
    value: str
    placeholder: str
    score: float = 1.0


class PIIVault:
    """Value ↔ placeholder for one conversation; share one across its messages (and turns)."""

    def __init__(self):
        self._placeholder: dict[tuple[str, str], str] = {}  # (type, value) → placeholder
        self._value: dict[str, str] = {}  # placeholder → value
        self._next: Counter[str] = Counter()
        self._reserved: set[str] = set()
        self.longest = 0  # the longest placeholder issued, for the stream restorer

    def __len__(self) -> int:
        return len(self._value)

    def __contains__(self, placeholder: str) -> bool:
        return placeholder in self._value

    @property
    def mapping(self) -> dict[str, str]:
        """placeholder → original value, in the order they were issued."""
        return dict(self._value)

    def reserve(self, text: str) -> None:
        """Placeholder-shaped strings the user wrote themselves: never issued, never restored."""
        for m in PLACEHOLDER.finditer(text):
            if m.group(0) not in self._value:
                self._reserved.add(m.group(0))

    def placeholder(self, entity_type: str, value: str) -> str:
        key = (entity_type, value)
        got = self._placeholder.get(key)
        if got is None:
            while True:
                self._next[entity_type] += 1
                got = f"<{entity_type}_{self._next[entity_type]}>"
                if got not in self._reserved:
                    break
            self._placeholder[key] = got
            self._value[got] = value
            self.longest = max(self.longest, len(got))
        return got

    def value(self, placeholder: str) -> str | None:
        return self._value.get(placeholder)

    # ---- restoring --------------------------------------------------------------------------------

    def restore(self, text: str) -> str:
        if not self._value or not text:
            return text
        return PLACEHOLDER.sub(lambda m: self._value.get(m.group(0), m.group(0)), text)

    def restore_json(self, text: str) -> str:
        """Inside JSON text (tool-call arguments): each value is escaped as a JSON string's content."""
        if not self._value or not text:
            return text
        return PLACEHOLDER.sub(lambda m: _json_inner(self._value[m.group(0)]) if m.group(0) in self._value
                               else m.group(0), text)

    def restore_data(self, obj):
        """Every string in a JSON-like value (dicts, lists), keys included."""
        if isinstance(obj, str):
            return self.restore(obj)
        if isinstance(obj, dict):
            return {self.restore_data(k): self.restore_data(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.restore_data(v) for v in obj)
        return obj

    def stream(self) -> "StreamRestorer":
        return StreamRestorer(self)


def _json_inner(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]


_PREFIX = re.compile(r"<[A-Z0-9_]*\Z")


class StreamRestorer:
    """Restores placeholders in text that arrives in pieces: ``push(delta)`` returns what is safe to
    emit now, ``flush()`` the rest at the end."""

    def __init__(self, vault: PIIVault):
        self.vault = vault
        self._held = ""

    def push(self, delta: str) -> str:
        text = self._held + delta
        self._held = ""
        cut = self._pending_start(text)
        if cut is not None:
            text, self._held = text[:cut], text[cut:]
        return self.vault.restore(text)

    def flush(self) -> str:
        text, self._held = self._held, ""
        return self.vault.restore(text)

    def _pending_start(self, text: str) -> int | None:
        """Where an unfinished placeholder may begin: a trailing '<' + type characters that a
        placeholder of this vault starts with."""
        if not self.vault._value:
            return None
        start = text.rfind("<", max(0, len(text) - self.vault.longest))
        if start < 0 or not _PREFIX.match(text, start):
            return None
        tail = text[start:]
        return start if any(p.startswith(tail) for p in self.vault._value) else None
