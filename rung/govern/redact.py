"""PII redaction on the way in, restoration on the way out.

    import rung
    r = rung.redact("Mail jane.doe@example.com about card 4111 1111 1111 1111")
    r.text        # 'Mail <EMAIL_ADDRESS_1> about card <CREDIT_CARD_1>'
    r.entities    # [Entity(type='EMAIL_ADDRESS', start=5, end=25, value='jane.doe@example.com', ...), ...]
    r.restore(answer)   # the model's answer with the placeholders put back

Detection is Microsoft Presidio's (rung/govern/pii_engine.py): checksum-validated recognizers for
cards (Luhn), IBANs, US SSNs, IPs, e-mail, phone numbers (Google's libphonenumber), and spaCy's NER
for people and places. Placeholders come from a ``PIIVault`` (pii_vault.py), one per conversation:
pass the same vault to every call of a conversation and the same value keeps its placeholder.

Where Presidio's results overlap, one wins (``TIERS``: validated formats before NER guesses, then the
higher score, then the longer span): one span of text is one entity, so restoring is exact
(``restore(redact(x).text) == x``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

from rung.govern.pii_engine import PIIUnavailable, analyze, analyzer
from rung.govern.pii_vault import Entity, PIIVault, StreamRestorer

# the list: structured identifiers plus names and places (Presidio's names for them)
DEFAULT_ENTITIES = ("PERSON", "LOCATION", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS",
                    "US_SSN")
# Presidio scores a bare phone number 0.4 and an SSN in its usual 3-2-4 shape 0.5; below 0.4 are its
# "very weak" patterns (any 9 digits as an SSN), which would redact order numbers and prices
DEFAULT_THRESHOLD = 0.4


class RedactionError(ValueError):
    """A redaction setting rung cannot use (an unknown entity type, a bad threshold)."""


@dataclass
class Redaction:
    """What ``rung.redact`` returns: the redacted text (or messages), what was found, and the vault
    that restores it."""

    text: str | None
    entities: list[Entity]
    vault: PIIVault
    messages: list[dict] | None = None

    def restore(self, text: str) -> str:
        return self.vault.restore(text)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(e.type for e in self.entities))

    def __str__(self) -> str:
        return self.text if self.text is not None else str(self.messages)


@dataclass
class Redactor:
    """Which entity types to redact, from what score, in which language (a spaCy model for it).

    ``redact`` takes a string or a list of OpenAI chat messages; ``vault`` carries a conversation's
    placeholders from one call to the next."""

    entities: tuple[str, ...] = DEFAULT_ENTITIES
    score_threshold: float = DEFAULT_THRESHOLD
    language: str = "en"
    model: str | None = None  # a spaCy pipeline: an installed package's name or a folder

    def __post_init__(self):
        self.entities = tuple(dict.fromkeys(e.strip().upper() for e in self.entities if e.strip()))
        if not self.entities:
            raise RedactionError("redaction needs at least one entity type")
        if not 0 <= self.score_threshold <= 1:
            raise RedactionError(f"score_threshold must be in [0, 1], got {self.score_threshold}")

    def load(self) -> "Redactor":
        """Build the analyzer now (a second or more) and check the entity types; returns self."""
        known = set(self.engine.get_supported_entities(self.language))
        unknown = [e for e in self.entities if e not in known]
        if unknown:
            raise RedactionError(f"unknown PII entity type(s) {', '.join(unknown)}; "
                                 f"Presidio knows {', '.join(sorted(known))}")
        return self

    @property
    def engine(self):
        return analyzer(self.language, self.model)

    def key(self) -> dict[str, Any]:
        """What changes the redacted text: part of a bench cache key."""
        return {"entities": sorted(self.entities), "score_threshold": self.score_threshold,
                "language": self.language, "model": self.model}

    # ---- finding ----------------------------------------------------------------------------------

    def find(self, text: str) -> list[tuple[str, int, int, float]]:
        """(type, start, end, score) of the PII in ``text``, not overlapping, in text order."""
        if not text or not text.strip():
            return []
        results = analyze(self.engine, text, self.language, self.entities, self.score_threshold)
        taken: list[tuple[str, int, int, float]] = []
        for r in sorted(results, key=_rank):
            if r.end <= r.start or not text[r.start:r.end].strip():
                continue
            if all(r.end <= s or r.start >= e for _, s, e, _ in taken):
                taken.append((r.entity_type, r.start, r.end, r.score))
        return sorted(taken, key=lambda t: t[1])

    # ---- redacting --------------------------------------------------------------------------------

    def redact_text(self, text: str, vault: PIIVault | None = None) -> Redaction:
        vault = vault if vault is not None else PIIVault()
        vault.reserve(text)
        out, entities, at = [], [], 0
        for kind, start, end, score in self.find(text):
            value = text[start:end]
            placeholder = vault.placeholder(kind, value)
            entities.append(Entity(kind, start, end, value, placeholder, round(score, 3)))
            out += [text[at:start], placeholder]
            at = end
        out.append(text[at:])
        return Redaction("".join(out), entities, vault)

    def redact_messages(self, messages: Iterable[dict], vault: PIIVault | None = None) -> Redaction:
        """OpenAI chat messages, copied: string content, text parts, tool-call arguments (as JSON
        text or objects) and reasoning are redacted; roles, names and ids are left as they are."""
        vault = vault if vault is not None else PIIVault()
        entities: list[Entity] = []

        def text(s: str) -> str:
            r = self.redact_text(s, vault)
            entities.extend(r.entities)
            return r.text

        out = []
        for m in messages:
            m = dict(m)
            content = m.get("content")
            if isinstance(content, str):
                m["content"] = text(content)
            elif isinstance(content, list):
                m["content"] = [_redact_part(p, text) for p in content]
            for key in ("reasoning_content", "reasoning", "refusal"):
                if isinstance(m.get(key), str):
                    m[key] = text(m[key])
            if m.get("tool_calls"):
                m["tool_calls"] = [_redact_call(c, text) for c in m["tool_calls"]]
            out.append(m)
        return Redaction(None, entities, vault, messages=out)

    def redact(self, value: str | list[dict], vault: PIIVault | None = None) -> Redaction:
        if isinstance(value, str):
            return self.redact_text(value, vault)
        if isinstance(value, (list, tuple)):
            return self.redact_messages(value, vault)
        raise TypeError(f"redact takes a string or a list of chat messages, not {type(value).__name__}")


# Which of two overlapping matches wins: a checksum-validated one (card, IBAN), then a format that is
# hard to mistake (e-mail, IP), then SSN, then phone numbers (libphonenumber reads many digit runs as
# one: "50.230.80.144" parses as a phone number), then any other pattern; within a tier the higher
# score, then the longer span. spaCy's NER guesses come last: spaCy reads "+4915122584197" as a
# PERSON and "Card 4428-1465-..." as one, and a validated match knows better.
TIERS = {"CREDIT_CARD": 0, "IBAN_CODE": 0, "EMAIL_ADDRESS": 1, "IP_ADDRESS": 1, "US_SSN": 2, "PHONE_NUMBER": 3}


def _rank(r) -> tuple:
    ner = (r.recognition_metadata or {}).get("recognizer_name") == "SpacyRecognizer"
    return 5 if ner else TIERS.get(r.entity_type, 4), -r.score, -(r.end - r.start), r.start


def _redact_part(part, text):
    if isinstance(part, dict) and isinstance(part.get("text"), str):
        return {**part, "text": text(part["text"])}
    return part


def _redact_call(call, text):
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    fn = dict(call["function"])
    args = fn.get("arguments")
    if isinstance(args, str):
        fn["arguments"] = _redact_json_text(args, text)
    elif isinstance(args, (dict, list)):
        fn["arguments"] = _redact_strings(args, text)
    return {**call, "function": fn}


def _redact_json_text(args: str, text) -> str:
    """Arguments as JSON text: the strings inside are redacted, and it stays valid JSON."""
    import json

    try:
        data = json.loads(args)
    except ValueError:
        return text(args)
    redacted = _redact_strings(data, text)
    return args if redacted == data else json.dumps(redacted, ensure_ascii=False)


def _redact_strings(obj, text):
    if isinstance(obj, str):
        return text(obj)
    if isinstance(obj, dict):
        return {k: _redact_strings(v, text) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact_strings(v, text) for v in obj]
    return obj


_default: dict[tuple, Redactor] = {}


def redact(value: str | list[dict], *, entities: Iterable[str] | None = None, score_threshold: float | None = None,
           language: str = "en", model: str | None = None, vault: PIIVault | None = None) -> Redaction:
    """Redact a string or a list of chat messages; ``.restore()`` the model's answer with the result.

    ``entities``: Presidio entity types (default ``DEFAULT_ENTITIES``); ``vault``: the conversation's
    PIIVault, to keep placeholders consistent across calls. Needs ``pip install 'rung[pii]'``."""
    key = (tuple(entities) if entities is not None else DEFAULT_ENTITIES,
           DEFAULT_THRESHOLD if score_threshold is None else score_threshold, language, model)
    redactor = _default.get(key)
    if redactor is None:
        redactor = _default[key] = Redactor(*key).load()
    return redactor.redact(value, vault)


__all__ = ["DEFAULT_ENTITIES", "Entity", "PIIUnavailable", "PIIVault", "Redaction", "RedactionError", "Redactor",
           "StreamRestorer", "redact"]
