"""Stored responses of ``POST /v1/responses`` (``store: true``), so ``previous_response_id`` can
continue a conversation.

A stored entry is the whole conversation up to and including that response, as chat messages
(its instructions excluded, as OpenAI does: a follow-up sends its own), and the response object
(``GET /v1/responses/{id}``). It lives in this process's memory only, bounded three ways: at most
``max_entries`` responses, at most ``max_bytes`` of their text in all, and ``ttl`` seconds after it
was stored. Past a bound the oldest go first; an expired or evicted id reads as unknown (404).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Stored:
    messages: list[dict]  # the conversation through this response's output, as chat messages
    response: dict  # the response object as it was returned
    expires: float  # time.monotonic() past which it is gone
    size: int  # bytes it counts against max_bytes


class ResponseStore:
    def __init__(self, max_entries: int = 1000, ttl: float = 3600.0, max_bytes: int = 256 * 2**20,
                 clock=time.monotonic):
        self.max_entries, self.ttl, self.max_bytes, self.clock = max_entries, ttl, max_bytes, clock
        self._entries: OrderedDict[str, Stored] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response_id: str, messages: list[dict], response: dict) -> bool:
        """Keep a response; False when it alone is larger than the whole budget (it is not kept)."""
        size = len(json.dumps(messages, ensure_ascii=False)) + len(json.dumps(response, ensure_ascii=False))
        if size > self.max_bytes or self.max_entries < 1:
            return False
        with self._lock:
            self._drop_expired()
            while self._entries and (len(self._entries) >= self.max_entries or self._bytes + size > self.max_bytes):
                self._pop_oldest()
            self._entries[response_id] = Stored(messages, response, self.clock() + self.ttl, size)
            self._bytes += size
        return True

    def get(self, response_id: str) -> Stored | None:
        with self._lock:
            self._drop_expired()
            return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            entry = self._entries.pop(response_id, None)
            if entry is not None:
                self._bytes -= entry.size
            return entry is not None

    def __len__(self) -> int:
        with self._lock:
            self._drop_expired()
            return len(self._entries)

    def _drop_expired(self) -> None:
        now = self.clock()
        # entries are stored in time order with one TTL, so the expired ones are the oldest
        while self._entries and next(iter(self._entries.values())).expires <= now:
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self._bytes -= entry.size
