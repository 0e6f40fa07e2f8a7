"""Tool calls in a reply's content, per family, as text streams in.

- ``HermesTools``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Qwen3,
  Qwen2.5, Hermes). Text around the blocks is content.
- ``MistralTools``: ``[TOOL_CALLS]`` then the calls, to the end of the reply: a JSON list
  ``[{"name": ..., "arguments": {...}}, ...]`` (Mistral-7B-Instruct-v0.3, Mixtral-8x22B-Instruct) or,
  from tokenizer v11 on, ``NAME[ARGS]{...}`` per call, each after its own ``[TOOL_CALLS]``.
- ``JsonTools``: the convention for models whose template has no tool format (SmolLM2): the whole
  reply is one JSON object ``{"name": ..., "arguments": {...}}`` (or a list of them) naming a tool
  that was offered. A reply that starts like JSON is held until it ends, since only then can it be
  told apart from an answer that happens to be JSON.

Anything that does not parse as a call (broken JSON, an unknown tool, a missing name) stays
content, as the model wrote it: the parsers never raise.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rung.serve.reasoning import Event, ToolCallOut, held_prefix


def call_from_json(value: Any, names: set[str] | None = None) -> ToolCallOut | None:
    """{"name": str, "arguments" (or "parameters"): object or JSON text} → a call, else None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    if names is not None and value["name"] not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCallOut(value["name"], json.dumps(args, ensure_ascii=False))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


class HermesTools:
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self):
        self.buffer = ""
        self.in_call = False
        self.calls = 0
        self._blank = ""  # whitespace held until we know it is not just the gap between calls

    def push(self, text: str) -> list[Event]:
        self.buffer += text
        return self._consume(final=False)

    def finish(self) -> list[Event]:
        events = self._consume(final=True)
        if self.in_call:  # the reply ended inside a block: a call if its JSON is whole
            events += self._close(self.buffer, terminated=False)
            self.buffer, self.in_call = "", False
        if self._blank and not self.calls:
            events.append(Event("content", self._blank))
        self._blank = ""
        return events

    def _content(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        body = text.rstrip()
        if not body:
            self._blank += text
            return
        # trailing whitespace is held the same way whatever the chunking: dropped before a call
        events.append(Event("content", self._blank + body))
        self._blank = text[len(body):]

    def _close(self, body: str, terminated: bool) -> list[Event]:
        call = call_from_json(_loads(body.strip()))
        if call is None:
            raw = self.OPEN + body + (self.CLOSE if terminated else "")
            return [Event("content", self._flush_blank() + raw)]
        self.calls += 1
        self._blank = ""
        return [Event("tool_call", call=call)]

    def _flush_blank(self) -> str:
        blank, self._blank = self._blank, ""
        return blank

    def _consume(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while self.buffer:
            if self.in_call:
                at = self.buffer.find(self.CLOSE)
                if at < 0:
                    break  # a call is emitted whole, once it closes
                events += self._close(self.buffer[:at], terminated=True)
                self.buffer, self.in_call = self.buffer[at + len(self.CLOSE):], False
                continue
            at = self.buffer.find(self.OPEN)
            if at >= 0:
                self._content(self.buffer[:at], events)
                self.buffer, self.in_call = self.buffer[at + len(self.OPEN):], True
                continue
            keep = 0 if final else held_prefix(self.buffer, self.OPEN)
            self._content(self.buffer[:len(self.buffer) - keep], events)
            self.buffer = self.buffer[len(self.buffer) - keep:]
            break
        return events


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class JsonTools:
    def __init__(self, names: set[str]):
        self.names = names
        self.mode = "start"  # "start" | "held" (looks like JSON) | "text"
        self.buffer = ""

    def push(self, text: str) -> list[Event]:
        if self.mode == "text":
            return [Event("content", text)] if text else []
        self.buffer += text
        head = self.buffer.lstrip()
        if self.mode == "start" and head:
            self.mode = "held" if head[0] in "{[`" else "text"
        if self.mode == "text":
            out, self.buffer = self.buffer, ""
            return [Event("content", out)]
        return []

    def finish(self) -> list[Event]:
        text, self.buffer = self.buffer, ""
        if self.mode != "held":
            return [Event("content", text)] if text else []
        body = text.strip()
        fenced = _FENCE.match(body)
        value = _loads(fenced.group(1) if fenced else body)
        items = value if isinstance(value, list) and value else [value]
        calls = [call_from_json(v, self.names) for v in items]
        if all(c is not None for c in calls):
            return [Event("tool_call", call=c) for c in calls]
        return [Event("content", text)]


# ---- issue 21 (families): Mistral's [TOOL_CALLS] -----------------------------------------------


class MistralTools:
    """Text before ``[TOOL_CALLS]`` is content; everything after it is held to the end of the reply
    (the calls close the reply) and parsed whole. Calls that do not parse stay content, as written."""

    MARK = "[TOOL_CALLS]"
    _ARGS = "[ARGS]"

    def __init__(self, names: set[str] | None = None):
        self.names = names
        self.buffer = ""
        self.calling = False

    def push(self, text: str) -> list[Event]:
        self.buffer += text
        if self.calling:
            return []
        at = self.buffer.find(self.MARK)
        if at >= 0:
            content, self.buffer, self.calling = self.buffer[:at], self.buffer[at:], True
            return [Event("content", content)] if content else []
        keep = held_prefix(self.buffer, self.MARK)
        content, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return [Event("content", content)] if content else []

    def finish(self) -> list[Event]:
        text, self.buffer = self.buffer, ""
        if not self.calling:
            return [Event("content", text)] if text else []
        calls = self._calls(text)
        if calls:
            return [Event("tool_call", call=c) for c in calls]
        return [Event("content", text)]

    def _calls(self, text: str) -> list[ToolCallOut] | None:
        """Every call of ``[TOOL_CALLS]…`` (all must parse), or None."""
        calls: list[ToolCallOut] = []
        for part in text.split(self.MARK)[1:]:
            part = part.strip()
            if not part:
                continue
            if part[0] in "[{":  # v0.3: a JSON list of {"name", "arguments"} (or one object)
                value = _loads(part)
                items = value if isinstance(value, list) and value else [value]
                found = [call_from_json(v, self.names) for v in items]
            else:  # v11: NAME[ARGS]{json}
                name, sep, args = part.partition(self._ARGS)
                found = [call_from_json({"name": name.strip(), "arguments": _loads(args.strip())}, self.names)
                         if sep else None]
            if any(c is None for c in found):
                return None
            calls += found
        return calls or None

# ---- end issue 21 (families) --------------------------------------------------------------------


class Pipeline:
    """Parsers in a row: each one's content events feed the next (reasoning first, then tools)."""

    def __init__(self, *stages):
        self.stages = stages

    def push(self, text: str) -> list[Event]:
        return self._run([Event("content", text)], final=False)

    def finish(self) -> list[Event]:
        return self._run([], final=True)

    def _run(self, events: list[Event], final: bool) -> list[Event]:
        for stage in self.stages:
            out = []
            for e in events:
                out += stage.push(e.text) if e.kind == "content" else [e]
            if final:
                out += stage.finish()
            events = out
        return _merge(events)


def _merge(events: list[Event]) -> list[Event]:
    """Adjacent text events of one kind as one."""
    out: list[Event] = []
    for e in events:
        if e.kind != "tool_call" and not e.text:
            continue
        if out and e.kind != "tool_call" and out[-1].kind == e.kind:
            out[-1] = Event(e.kind, out[-1].text + e.text)
        else:
            out.append(e)
    return out
