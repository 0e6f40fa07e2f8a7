"""Stop strings across token boundaries: text is released only once no stop string can still
begin inside it, and a stop string is never emitted (unless asked)."""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str], include_stop: bool = False):
        self.stops, self.include_stop = stops, include_stop
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""  # everything decoded so far
        self.released = 0  # characters of self.text already handed out
        self.stopped = False
        self.hit: str | None = None  # the stop string that ended the text

    def push(self, delta: str) -> str:
        """Add decoded text; return what can be released now (after a stop: up to it)."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self.hold)  # a stop string may straddle the old tail
        self.text += delta
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            index, stop = min(hits)
            end = index + len(stop) if self.include_stop else index
            self.stopped, self.hit = True, stop
            return self._release(end)
        return self._release(max(self.released, len(self.text) - self.hold))

    def flush(self) -> str:
        return "" if self.stopped else self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.released:end]
        self.released = max(self.released, end)
        return out

    @property
    def output(self) -> str:
        return self.text[: self.released]
