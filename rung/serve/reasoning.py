"""A reply's reasoning apart from its answer, as text streams in.

Every parser here takes text deltas (``push``) and returns ``Event``s; ``finish`` flushes what it
held back. Parsers hold back only what may be the start of a tag split across deltas, so streamed
and non-streamed replies split the same way. They never raise on odd model output: text they
cannot place is content.

- ``ThinkSplitter``: Qwen3 (and DeepSeek-R1 style) ``<think>…</think>`` before the answer.
- ``HarmonyReply``: gpt-oss harmony: ``analysis`` is reasoning, ``final`` (and preambles) content,
  messages addressed to ``functions.NAME`` tool calls, whose arguments stream as they are written.

The event kinds, and the parsers of tool calls, are in rung/serve/tools.py.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


@dataclass
class ToolCallOut:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class Event:
    """One piece of a parsed reply (rung/serve/tools.py lists the kinds and their order)."""

    kind: str  # "content" | "reasoning" | "call_start" | "call_args" | "call_end" | "tool_call"
    text: str = ""  # content, reasoning, or a call_args piece of the call's arguments
    call: ToolCallOut | None = None  # the call a call_* or tool_call event belongs to


CALL_KINDS = ("call_start", "call_args", "call_end", "tool_call")


def whole_call(call: ToolCallOut) -> list[Event]:
    """A call whose arguments are all known, as the events a streaming parser gives for it."""
    return [Event("call_start", call=call), Event("call_args", call.arguments, call), Event("call_end", call=call)]


def held_prefix(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` could begin ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """``<think>reasoning</think>answer``. ``thinking=True`` when the prompt itself opened the
    block (the reply starts inside it); otherwise a reply that begins with ``<think>`` opens one.
    A reply without the tag is all content."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, thinking: bool = False):
        self.state = "thinking" if thinking else "start"
        self.buffer = ""

    def push(self, text: str) -> list[Event]:
        self.buffer += text
        return self._consume(final=False)

    def finish(self) -> list[Event]:
        return self._consume(final=True)

    def _consume(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while self.buffer:
            if self.state == "start":
                head = self.buffer.lstrip()
                if head.startswith(self.OPEN):
                    self.buffer, self.state = head[len(self.OPEN):], "thinking"
                elif not final and (not head or self.OPEN.startswith(head)):
                    break  # could still become "<think>"
                else:
                    self.state = "content"
            elif self.state == "thinking":
                at = self.buffer.find(self.CLOSE)
                if at >= 0:
                    if at:
                        events.append(Event("reasoning", self.buffer[:at]))
                    self.buffer, self.state = self.buffer[at + len(self.CLOSE):], "after"
                    continue
                keep = 0 if final else held_prefix(self.buffer, self.CLOSE)
                if len(self.buffer) > keep:
                    events.append(Event("reasoning", self.buffer[:len(self.buffer) - keep]))
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            elif self.state == "after":  # the blank lines between </think> and the answer
                stripped = self.buffer.lstrip()
                if not stripped:
                    self.buffer = ""
                    break
                self.buffer, self.state = stripped, "content"
            else:
                events.append(Event("content", self.buffer))
                self.buffer = ""
        return events


class HarmonyReply:
    """gpt-oss's harmony reply (text decoded with its special tokens) → reasoning, content and tool
    calls. A message addressed to a declared function is a call: it starts when its header is
    complete (``call_start``), its content streams as the arguments (``call_args``) and it ends with
    the message (``call_end``). ``names``: the declared functions (None: any); a message addressed to
    anything else, or any addressed message when ``tools`` is false, is content."""

    def __init__(self, tools: bool = True, names: set[str] | None = None):
        from rung.text.harmony import HarmonyStreamParser

        self.parser = HarmonyStreamParser("assistant")
        self.tools, self.names = tools, names
        self.call: ToolCallOut | None = None  # the call the current message is
        self.called = False  # the current message is addressed (a call, or one refused as content)

    def push(self, text: str) -> list[Event]:
        return self._events(self.parser.push(text))

    def finish(self) -> list[Event]:
        return self._events(self.parser.finish())

    def _events(self, events) -> list[Event]:
        out = []
        for e in events:
            addressed = bool(e.recipient and e.recipient != "all")
            if e.kind == "start":
                self.called, self.call = addressed, None
                name = e.recipient[len("functions."):] if addressed and e.recipient.startswith("functions.") \
                    else e.recipient
                if addressed and self.tools and (self.names is None or name in self.names):
                    self.call = ToolCallOut(name, "")
                    out.append(Event("call_start", call=self.call))
            elif e.kind == "delta":
                if self.call is not None:
                    self.call.arguments += e.delta
                    out.append(Event("call_args", e.delta, self.call))
                elif self.called:
                    out.append(Event("content", e.delta))
                else:
                    out.append(Event("reasoning" if e.channel == "analysis" else "content", e.delta))
            elif e.kind == "end":
                if self.call is not None:
                    out.append(Event("call_end", call=self.call))
                self.called, self.call = False, None
        return out
