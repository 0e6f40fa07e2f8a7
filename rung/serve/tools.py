"""Tool calls in a reply, per family, parsed as the text streams in, arguments included.

The streaming parser's API (chat streaming and the Responses route both consume it; keep these
names stable):

- ``Family.parser(tools, prompt)`` (rung/serve/family.py) builds the parser of one reply.
- ``parser.push(text) -> list[Event]`` takes the next piece of decoded text; ``parser.finish() ->
  list[Event]`` ends the reply and flushes what was held back. The parsers never raise.
- ``Event.kind`` (rung/serve/reasoning.py), in the order a reply gives them:
  - ``"content"`` / ``"reasoning"``: ``text`` is the next piece of the answer / of the reasoning;
  - ``"call_start"``: a tool call begins; ``call`` (a ``ToolCallOut``) has its ``id`` and ``name``;
  - ``"call_args"``: ``text`` is the next piece of ``call``'s arguments, as the model writes them;
  - ``"call_end"``: ``call`` is complete, ``call.arguments`` is the concatenation of its pieces;
  - ``"tool_call"``: a whole call in one event (never from a parser: the tool-policy gate of
    governance.py holds calls until the reply ends and lets them out this way).
  Calls do not interleave: a call's events run from its start to its end with nothing between.
- ``Reply`` collects events into the whole reply (content, reasoning, calls): what a non-streamed
  response is built from, so streamed and whole replies agree byte for byte.

Formats (one parser each; the suite in tests/conformance/ checks them all):

- ``HermesTools``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Qwen3,
  Qwen2.5, Hermes). Text around the blocks is content; whitespace next to a call is dropped.
- ``MistralTools``: ``[TOOL_CALLS]`` then the calls, to the end of the reply (held, then sent whole as ``tool_call`` events): a JSON list
  ``[{"name": ..., "arguments": {...}}, ...]`` (Mistral-7B-Instruct-v0.3, Mixtral-8x22B-Instruct) or,
  from tokenizer v11 on, ``NAME[ARGS]{...}`` per call, each after its own ``[TOOL_CALLS]``.
- ``JsonTools``: a reply that is a JSON call object ``{"name": ..., "arguments" | "parameters":
  {...}}``, or several (a JSON list, or objects separated by ``;`` or blanks), optionally in a
  ```` ```json ```` fence: rung's convention for templates without a tool format (SmolLM2, Gemma 3)
  and Llama 3.x's JSON tool calls, with or without ``<|python_tag|>`` (after which a call may also
  follow prose). Anything else is content.
- ``HarmonyReply`` (reasoning.py): gpt-oss, messages addressed to ``functions.NAME``.

When a call is a call. A JSON call object streams once its header is read: ``{"name": "<a tool
declared in the request>", "arguments": `` (or ``"parameters"``). Then it is committed:
``call_start`` goes out and the arguments stream, byte for byte as written, up to the end of their
JSON value; whatever follows the value inside the object is dropped. Before the header is complete
nothing is decided, and:
- a call naming a tool the request did not declare is not a call: the whole block stays content,
  as the model wrote it;
- a block whose JSON breaks before the header completes (not JSON, no name, arguments before the
  name) is held to its end and parsed whole: a call if it is one (of a declared tool), else content.
Once committed, a call stays a call: arguments that break off (max_tokens, or the block closed
before the JSON ended) end the call with the arguments as written, which then do not parse, as
OpenAI's own API returns a call cut by max_tokens. Arguments given as a JSON string
(``"arguments": "{\\"city\\": ...}"``) are decoded and sent as one piece once the string ends.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from rung.serve.reasoning import CALL_KINDS, Event, ToolCallOut, held_prefix, whole_call

__all__ = ["Event", "ToolCallOut", "Reply", "HermesTools", "JsonTools", "Pipeline", "CallStream", "call_from_json",
           "CALL_KINDS", "whole_call"]

MAX_HEADER = 1024  # characters of a call object read before its header must be complete


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
    except (ValueError, RecursionError):
        return None


# ---- one JSON call object ------------------------------------------------------------------------


_WS = " \t\r\n"


def _string_end(text: str, at: int) -> int:
    """The index after the JSON string that starts at ``text[at]`` (a quote); -1 if it is not closed."""
    i = at + 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return -1


def read_header(text: str) -> tuple[str, str | None, int]:
    """``{"name": "X", "arguments": `` at the start of ``text`` (blanks allowed between): ("yes", X,
    where the arguments' value starts), ("partial", None, 0) while it may still become one, ("no",
    None, 0) when it cannot."""
    steps = ["{", "key:name", ":", "name", ",", "key:arguments", ":"]
    i, name = 0, None
    for step in steps:
        while i < len(text) and text[i] in _WS:
            i += 1
        if i == len(text):
            return "partial", None, 0
        if step in "{:,":
            if text[i] != step:
                return "no", None, 0
            i += 1
            continue
        if text[i] != '"':
            return "no", None, 0
        end = _string_end(text, i)
        if end < 0:
            return "partial", None, 0
        value = _loads(text[i:end])
        if step == "name":
            if not isinstance(value, str) or not value:
                return "no", None, 0
            name = value
        elif value not in ({"name"} if step == "key:name" else {"arguments", "parameters"}):
            return "no", None, 0
        i = end
    while i < len(text) and text[i] in _WS:
        i += 1
    return ("yes", name, i) if i < len(text) else ("partial", None, 0)


class CallStream:
    """One JSON call object as it streams in (see the module docstring for when it is a call).

    ``feed(text)`` returns the events it completes; text after the object's closing brace is kept
    in ``rest`` and ``done`` is set. ``close()`` ends it (its block closed, or the reply ended)."""

    def __init__(self, names: set[str] | None):
        self.names = names
        self.raw = ""  # everything fed, up to the object's end
        self.state = "header"  # header | value | after | held | refused
        self.call: ToolCallOut | None = None
        self.done, self.rest = False, ""
        # the structural scan over raw: nesting depth, inside a string, after a backslash
        self.depth, self.in_string, self.escaped, self.scanned = 0, False, False, 0
        self.value_at = -1  # where the arguments' value starts in raw
        self.string_value = False  # the arguments are a JSON string (sent decoded, in one piece)

    def feed(self, text: str) -> list[Event]:
        if self.done:
            self.rest += text
            return []
        start = len(self.raw)
        self.raw += text
        events: list[Event] = []
        if self.state == "header":
            verdict, name, at = read_header(self.raw)
            if verdict == "partial" and len(self.raw) > MAX_HEADER:
                verdict = "no"
            if verdict == "no":
                self.state = "held"
            elif verdict == "yes":
                if self.names is not None and name not in self.names:
                    self.state = "refused"
                elif self.raw[at] not in '{"':  # arguments that are no object: parsed whole, at the end
                    self.state = "held"
                else:
                    self.state, self.value_at = "value", at
                    self.string_value = self.raw[at] == '"'
                    self.call = ToolCallOut(name, "")
                    events.append(Event("call_start", call=self.call))
                    start = at
        self._scan(start, events)
        return events

    def _scan(self, start: int, events: list[Event]) -> None:
        """Advance the structural scan over raw; emit the arguments' text from ``start`` on."""
        raw, i = self.raw, self.scanned
        # a string value is held whole; an object's text goes out as it is scanned
        piece_from = -1 if self.state != "value" else self.value_at if self.string_value else max(start, self.value_at)
        while i < len(raw):
            c = raw[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
            i += 1
            if self.state == "value" and i > self.value_at and self._value_ended(c):
                self._arguments(raw[piece_from:i], events)
                self.state, piece_from = "after", -1
            if self.depth <= 0 and not self.in_string and c in "}]":  # the object closed
                self.done, self.rest, self.raw = True, raw[i:], raw[:i]
                break
        self.scanned = i
        if self.state == "value" and not self.string_value:
            self._arguments(self.raw[piece_from:i], events)

    def _value_ended(self, c: str) -> bool:
        """Whether the arguments' value ended with character ``c`` (the scan stands after it)."""
        if self.string_value:
            return not self.in_string and c == '"'
        return self.depth == 1 and not self.in_string and c in "}]"

    def _arguments(self, piece: str, events: list[Event]) -> None:
        if not piece:
            return
        if self.string_value:  # a JSON string holding the arguments: its text, decoded
            decoded = _loads(piece)
            piece = decoded if isinstance(decoded, str) else piece
        self.call.arguments += piece
        events.append(Event("call_args", piece, self.call))

    def close(self) -> tuple[list[Event], bool]:
        """End the object: (events, whether it was a call). Not a call: the caller keeps ``raw`` as content."""
        if self.call is not None:
            if self.state == "value" and self.string_value:  # a string cut off: its raw text
                self.call.arguments += self.raw[self.value_at:]
                rest = self.raw[self.value_at:]
                return [Event("call_args", rest, self.call), Event("call_end", call=self.call)], True
            return [Event("call_end", call=self.call)], True
        if self.state in ("held", "header"):
            call = call_from_json(_loads(self.raw.strip()), self.names)
            if call is not None:
                return whole_call(call), True
        return [], False


# ---- Hermes / Qwen3 --------------------------------------------------------------------------------


class HermesTools:
    """``<tool_call>`` blocks. ``names``: the declared tools (None: any name is a call)."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, names: set[str] | None = None):
        self.names = names
        self.buffer = ""
        self.block: CallStream | None = None  # the open block's call
        self.calls = 0
        self._blank = ""  # whitespace held until we know it is not just the gap between calls

    def push(self, text: str) -> list[Event]:
        self.buffer += text
        return self._consume(final=False)

    def finish(self) -> list[Event]:
        events = self._consume(final=True)
        if self.block is not None:  # the reply ended inside a block
            events += self._close(terminated=False)
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

    def _close(self, terminated: bool) -> list[Event]:
        block, self.block = self.block, None
        events, called = block.close()
        if not called:
            raw = self.OPEN + block.raw + block.rest + (self.CLOSE if terminated else "")
            return [Event("content", self._flush_blank() + raw)]
        return events

    def _flush_blank(self) -> str:
        blank, self._blank = self._blank, ""
        return blank

    def _feed_block(self, text: str, events: list[Event]) -> None:
        out = self.block.feed(text)
        if any(e.kind == "call_start" for e in out):
            self.calls += 1
            self._blank = ""
        events += out

    def _consume(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while self.buffer:
            if self.block is not None:
                at = self.buffer.find(self.CLOSE)
                if at < 0:
                    keep = 0 if final else held_prefix(self.buffer, self.CLOSE)
                    self._feed_block(self.buffer[:len(self.buffer) - keep], events)
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                self._feed_block(self.buffer[:at], events)
                events += self._close(terminated=True)
                self.buffer = self.buffer[at + len(self.CLOSE):]
                continue
            at = self.buffer.find(self.OPEN)
            if at >= 0:
                self._content(self.buffer[:at], events)
                self.buffer, self.block = self.buffer[at + len(self.OPEN):], CallStream(self.names)
                continue
            keep = 0 if final else held_prefix(self.buffer, self.OPEN)
            self._content(self.buffer[:len(self.buffer) - keep], events)
            self.buffer = self.buffer[len(self.buffer) - keep:]
            break
        return events


# ---- JSON calls (SmolLM2, Gemma 3, Llama 3.x) ---------------------------------------------------------


PYTHON_TAG = "<|python_tag|>"
_FENCE_OPEN = re.compile(r"```[A-Za-z_]*[ \t]*\n?")


class JsonTools:
    """A reply made of JSON call objects (see the module docstring). ``names``: the declared tools.

    Before the first call commits, what precedes it (blanks, ``<|python_tag|>``, a fence, ``[``) is
    held; a reply that does not start like a call is content at once (except that ``<|python_tag|>``
    later in it still starts calls). After a call, separators (``,`` ``;`` ``]``, a closing fence,
    blanks) are dropped and the next object is read; anything else is content."""

    def __init__(self, names: set[str] | None):
        self.names = names
        self.mode = "start"  # start: before an object | call: inside one | text: content
        self.buffer = ""  # text not yet placed
        self.held = ""  # what was read before the current object (content if it is not a call)
        self.block: CallStream | None = None
        self.calls = 0

    def push(self, text: str) -> list[Event]:
        self.buffer += text
        return self._consume(final=False)

    def finish(self) -> list[Event]:
        events = self._consume(final=True)
        if self.block is not None:
            events += self._end_object()
        if self.buffer or self.held:  # only separators (after calls) or an unfinished start
            if not self.calls or (self.held + self.buffer).strip(" \t\r\n,;]`"):
                events.append(Event("content", self.held + self.buffer))
            self.buffer = self.held = ""
        return events

    def _consume(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while self.buffer:
            if self.mode == "text":
                at = self.buffer.find(PYTHON_TAG)
                if at < 0:
                    keep = 0 if final else held_prefix(self.buffer, PYTHON_TAG)
                    events.append(Event("content", self.buffer[:len(self.buffer) - keep]))
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                events.append(Event("content", self.buffer[:at]))
                self.held, self.buffer, self.mode = PYTHON_TAG, self.buffer[at + len(PYTHON_TAG):], "start"
                continue
            if self.mode == "call":
                events += self.block.feed(self.buffer)
                self.buffer = ""
                if not self.block.done:
                    break
                self.buffer = self.block.rest
                events += self._end_object()
                continue
            if not self._start(final, events):
                break
        return [e for e in events if e.kind != "content" or e.text]

    def _start(self, final: bool, events: list[Event]) -> bool:
        """Read what comes before an object; False when more text is needed."""
        head = self.buffer.lstrip(" \t\r\n" + (",;]" if self.calls else ""))
        skipped = self.buffer[:len(self.buffer) - len(head)]
        if not head:
            self.held, self.buffer = self.held + skipped, ""
            return False
        for tag in (PYTHON_TAG, "["):
            if head.startswith(tag):
                self.held, self.buffer = self.held + skipped + tag, head[len(tag):]
                return True
        if head.startswith("```"):
            fence = _FENCE_OPEN.match(head)
            if fence.end() == len(head) and not final:
                return False  # the fence's language may go on
            self.held, self.buffer = self.held + skipped + head[:fence.end()], head[fence.end():]
            return True
        if head.startswith("{"):
            self.held += skipped
            self.buffer, self.block, self.mode = head, CallStream(self.names), "call"
            return True
        if not final and (PYTHON_TAG.startswith(head) or "```".startswith(head)):
            return False
        # not a call: everything from here on is content (what was held goes out as it is: a
        # <|python_tag|> in it is not read again)
        events.append(Event("content", self.held))
        self.held, self.mode = "", "text"
        return True

    def _end_object(self) -> list[Event]:
        block, self.block = self.block, None
        events, called = block.close()
        if called:
            self.calls += 1
            self.held, self.mode = "", "start"
            return events
        text, self.held, self.mode = self.held + block.raw, "", "text"
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


# ---- composition -----------------------------------------------------------------------------------


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
    """Adjacent text events of one kind as one (argument pieces of one call too)."""
    out: list[Event] = []
    for e in events:
        if e.kind in ("content", "reasoning", "call_args") and not e.text:
            continue
        last = out[-1] if out else None
        if (last is not None and e.kind == last.kind and e.kind in ("content", "reasoning", "call_args")
                and e.call is last.call):
            out[-1] = Event(e.kind, last.text + e.text, e.call)
        else:
            out.append(e)
    return out


@dataclass
class Reply:
    """A reply's events collected: its content, its reasoning and its calls (complete once the
    parser finished). ``add`` takes events in order; streamed pieces and this agree by construction."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[ToolCallOut] = field(default_factory=list)

    def add(self, events: list[Event]) -> "Reply":
        for e in events:
            if e.kind == "content":
                self.content.append(e.text)
            elif e.kind == "reasoning":
                self.reasoning.append(e.text)
            elif e.kind in ("call_start", "tool_call"):
                self.calls.append(e.call)
        return self
