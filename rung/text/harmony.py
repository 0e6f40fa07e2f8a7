"""gpt-oss's harmony format: rendering prompts and parsing replies, without openai-harmony.

openai-harmony (and tiktoken) download their vocabulary on first use, so rung renders and parses
harmony as text itself; the text is then encoded with the tokenizer.json gpt-oss folders ship, in
which `<|start|>`, `<|channel|>`, `<|message|>`, ... are special tokens.

Grammar (docs/architectures-gpt-oss.md §8.2):

    <|start|>{role}[ to={recipient}][<|channel|>{channel}][ {content_type}]<|message|>{content}{end}
    end = <|end|> | <|call|> (assistant message with a recipient) | <|return|> (last final, generated)

The renderer follows openai-harmony's (src/encoding.rs: Render<Message>, SystemContent, DeveloperContent,
template_tools_section, json_schema_to_typescript); the parser follows its StreamableParser and header
parsing, but never raises: whatever it cannot read becomes plain content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CALL, RETURN, CONSTRAIN = "<|call|>", "<|return|>", "<|constrain|>"
ENDOFTEXT = "<|endoftext|>"
STOPS = (END, CALL, RETURN, ENDOFTEXT)  # each ends a message; <|return|> and <|call|> also end the reply
MARKERS = (START, CHANNEL, MESSAGE, *STOPS)
ROLES = ("system", "developer", "user", "assistant", "tool")
CHANNELS = ("analysis", "commentary", "final")

MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
REASONING_EFFORTS = ("low", "medium", "high")


@dataclass
class HarmonyMessage:
    """One harmony message. A tool's message has role "tool" and its name (`functions.get_weather`)
    as `name`; `end` is the terminator it was parsed with (None when the text stopped inside it)."""

    role: str
    content: str = ""
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None
    end: str | None = field(default=None, compare=False)

    @property
    def function_name(self) -> str | None:
        """The function this message calls (`functions.NAME` recipient), on any channel: the model
        sometimes calls functions from `analysis` (§12)."""
        if self.role == "assistant" and self.recipient and self.recipient.startswith("functions."):
            return self.recipient[len("functions."):]
        return None


@dataclass
class HarmonyEvent:
    """A streaming parser event: `start` when a header is complete, `delta` for new content, `end`
    when a message is complete (with the whole message)."""

    kind: str
    role: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    delta: str = ""
    message: HarmonyMessage | None = None


# -- rendering -------------------------------------------------------------------------------------------


def _rust_lines(text: str) -> list[str]:
    """Rust's str::lines(): split on \\n, drop one trailing \\r per line and a final empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _json_compact(value: Any) -> str:
    """serde_json's Display: compact JSON."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _is_enum(spec: dict) -> bool:
    return isinstance(spec.get("enum"), list) and len(spec["enum"]) > 0


def _default_comment(spec: dict) -> str:
    """A property's default: strings quoted, an enum's string bare, anything else as compact JSON."""
    default = spec["default"]
    if isinstance(default, str):
        return f"default: {default}" if _is_enum(spec) else f'default: "{default}"'
    return f"default: {_json_compact(default)}"


def json_schema_to_typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema as harmony's TypeScript-like type (encoding.rs json_schema_to_typescript)."""
    if not isinstance(schema, dict):
        return "any"

    def nullable(variant: dict, text: str) -> str:
        return f"{text} | null" if variant.get("nullable") is True and "null" not in text else text

    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        out = ""
        for i, variant in enumerate(one_of):
            out += f"\n{indent} | "
            out += nullable(variant, json_schema_to_typescript(variant, indent + "   "))
            comments = []
            if isinstance(variant, dict):
                if isinstance(variant.get("description"), str):
                    comments.append(variant["description"])
                if "default" in variant:  # here an enum's string default stays JSON-quoted (encoding.rs)
                    d = variant["default"]
                    comments.append(f'default: "{d}"' if isinstance(d, str) and not _is_enum(variant)
                                    else f"default: {_json_compact(d)}")
            if comments:
                out += " // " + " ".join(comments)
        return out
    kind = schema.get("type")
    if isinstance(kind, list):
        names = ["number" if t == "integer" else t for t in kind if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(kind, str):
        return "any"
    if kind == "object":
        out = f"{indent}// {schema['description']}\n" if isinstance(schema.get("description"), str) else ""
        out += "{\n"
        properties = schema.get("properties")
        if isinstance(properties, dict):
            required = set(r for r in schema.get("required", []) or [] if isinstance(r, str))
            for key, spec in properties.items():
                spec = spec if isinstance(spec, dict) else {}
                optional = "" if key in required else "?"
                if isinstance(spec.get("title"), str):
                    out += f"{indent}// {spec['title']}\n{indent}//\n"
                variants = spec.get("oneOf")
                if not isinstance(variants, list) and isinstance(spec.get("description"), str):
                    out += f"{indent}// {spec['description']}\n"
                examples = spec.get("examples")
                if isinstance(examples, list) and examples:
                    out += f"{indent}// Examples:\n"
                    out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
                if isinstance(variants, list):
                    out += _one_of_property(key, optional, spec, variants, indent)
                    continue
                out += f"{indent}{key}{optional}: "
                out += nullable(spec, json_schema_to_typescript(spec, indent + "    ")) + ","
                if "default" in spec:
                    out += " // " + _default_comment(spec)
                out += "\n"
        return out + f"{indent}}}"
    if kind == "string":
        enum = schema.get("enum")
        if isinstance(enum, list):
            names = [f'"{v}"' for v in enum if isinstance(v, str)]
            if names:
                return " | ".join(names)
        return "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        return f"{json_schema_to_typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _one_of_property(key: str, optional: str, spec: dict, variants: list, indent: str) -> str:
    """A property whose schema is a oneOf: one variant per line (encoding.rs, property-level oneOf)."""
    out = ""
    description = spec.get("description") if isinstance(spec.get("description"), str) else None
    first = variants[0] if variants and isinstance(variants[0], dict) else {}
    skip_description = description is not None and first.get("description") == description
    described_above = False
    if description is not None and not skip_description:
        out += f"{indent}// {description}\n"
        described_above = True
    if "default" in spec:
        out += f"{indent}// {_default_comment(spec)}\n"
    out += f"{indent}{key}{optional}:\n"
    for i, variant in enumerate(variants):
        variant = variant if isinstance(variant, dict) else {}
        out += f"{indent} | "
        text = json_schema_to_typescript(variant, indent + "   ")
        if variant.get("nullable") is True and "null" not in text:
            text += " | null"
        out += text
        comments = []
        if not (i == 0 and described_above) and isinstance(variant.get("description"), str):
            if variant["description"] != description:
                comments.append(variant["description"])
        if "default" in variant:
            comments.append(_default_comment(variant))
        if comments:
            out += " // " + " ".join(comments)
        out += "\n"
    return out + f"{indent},\n"


def _function(tool: dict) -> dict:
    """An OpenAI-style tool ({"type": "function", "function": {...}}) or a bare function dict."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def render_tools_section(tools: list[dict], namespace: str = "functions") -> str:
    """`# Tools` and one namespace block (encoding.rs template_tools_section)."""
    lines = [f"## {namespace}\n", f"namespace {namespace} {{\n"]
    for tool in tools:
        fn = _function(tool)
        lines += [f"// {line}" for line in _rust_lines(fn.get("description") or "")]
        if fn.get("parameters") is not None:
            lines.append(f"type {fn['name']} = (_: {json_schema_to_typescript(fn['parameters'], '')}) => any;\n")
        else:
            lines.append(f"type {fn['name']} = () => any;\n")
    lines.append(f"}} // namespace {namespace}")
    return "# Tools\n\n" + "\n".join(lines)


def render_system_content(reasoning_effort: str | None = "medium", current_date: str | None = None,
                          model_identity: str | None = MODEL_IDENTITY, knowledge_cutoff: str | None = KNOWLEDGE_CUTOFF,
                          has_function_tools: bool = False) -> str:
    """The system message's text (§8.3): identity and dates, reasoning effort, channels."""
    top = [model_identity] if model_identity else []
    if knowledge_cutoff:
        top.append(f"Knowledge cutoff: {knowledge_cutoff}")
    if current_date:
        top.append(f"Current date: {current_date}")
    sections = ["\n".join(top)] if top else []
    if reasoning_effort:
        effort = str(reasoning_effort).lower()
        if effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                             f"not {reasoning_effort!r}")
        sections.append(f"Reasoning: {effort}")
    channels = f"# Valid channels: {', '.join(CHANNELS)}. Channel must be included for every message."
    if has_function_tools:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    sections.append(channels)
    return "\n\n".join(sections)


def render_developer_content(instructions: str | None, tools: list[dict] | None) -> str:
    """The developer message's text (§8.4): `# Instructions`, then the function namespace."""
    sections = ["# Instructions", instructions] if instructions else []
    if tools:
        sections.append(render_tools_section(tools))
    return "\n\n".join(sections)


def render_message(message: HarmonyMessage) -> str:
    """One message, as harmony renders it (encoding.rs Render<Message>). A reply's `<|return|>` is
    written back as `<|end|>`, as history should hold it (§8.2)."""
    author = (message.name or "tool") if message.role == "tool" else message.role
    if message.role != "tool" and message.name:
        author += f":{message.name}"
    header = START + author
    if message.recipient and message.recipient != "all":
        header += f" to={message.recipient}"
    if message.channel:
        header += CHANNEL + message.channel
    if message.content_type:
        header += " " + message.content_type
    end = CALL if message.role == "assistant" and message.recipient else END
    return header + MESSAGE + message.content + end


def _text(content: Any) -> str:
    """Message content as text: a string, content parts, or (for tool results) JSON."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(p.get("text", "") for p in content if p.get("type", "text") == "text")
    return _json_compact(content)


def _arguments(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else _json_compact(arguments if arguments is not None else {})


def _to_harmony(messages: Iterable[dict | HarmonyMessage]) -> tuple[list[HarmonyMessage], str | None]:
    """Chat messages → harmony messages, and the developer instructions from a leading system or
    developer message (what other formats call the system prompt)."""
    messages = list(messages)
    instructions = None
    if messages and isinstance(messages[0], dict) and messages[0].get("role") in ("system", "developer"):
        instructions = _text(messages[0].get("content"))
        messages = messages[1:]
    out: list[HarmonyMessage] = []
    last_call = None
    for m in messages:
        if isinstance(m, HarmonyMessage):
            out.append(m)
            if m.function_name:
                last_call = m.function_name
            continue
        role = m.get("role")
        if role in ("system", "developer"):
            out.append(HarmonyMessage("developer", render_developer_content(_text(m.get("content")), None)))
        elif role == "user":
            out.append(HarmonyMessage("user", _text(m.get("content"))))
        elif role == "assistant":
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k)), None)
            content = _text(m.get("content"))
            calls = m.get("tool_calls") or []
            if reasoning:
                out.append(HarmonyMessage("assistant", _text(reasoning), channel="analysis"))
            if calls:
                if content:  # text beside tool calls is a preamble, on commentary
                    out.append(HarmonyMessage("assistant", content, channel=m.get("channel") or "commentary"))
                for call in calls:
                    fn = _function(call)
                    last_call = fn["name"]
                    out.append(HarmonyMessage("assistant", _arguments(fn.get("arguments")), channel="commentary",
                                              recipient=f"functions.{fn['name']}", content_type=f"{CONSTRAIN}json"))
            elif content or not reasoning:
                out.append(HarmonyMessage("assistant", content, channel=m.get("channel") or "final"))
        elif role == "tool":
            name = m.get("name") or last_call
            if name is None:
                raise ValueError("a tool message needs a 'name', or a previous assistant tool call to answer")
            name = name if "." in name else f"functions.{name}"
            out.append(HarmonyMessage("tool", _text(m.get("content")), channel="commentary", recipient="assistant",
                                      name=name))
        else:
            raise ValueError(f"harmony has no role {role!r}; use system, developer, user, assistant or tool")
    return out, instructions


def drop_finished_analysis(messages: list[HarmonyMessage]) -> list[HarmonyMessage]:
    """Chain-of-thought retention (§8.5): analysis belongs to its turn. Once a turn has ended with a
    `final` message its analysis is dropped; the analysis of a turn still in progress (after the last
    final, e.g. around a pending tool call) is kept. This is also what gpt-oss's HF template renders."""
    last_final = max((i for i, m in enumerate(messages) if m.role == "assistant" and m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages)
            if not (i < last_final and m.role == "assistant" and m.channel == "analysis")]


def render_harmony(messages: Iterable[dict | HarmonyMessage], tools: list[dict] | None = None,
                   reasoning_effort: str | None = "medium", developer_instructions: str | None = None,
                   current_date: str | None = None, add_generation_prompt: bool = True,
                   model_identity: str | None = MODEL_IDENTITY, knowledge_cutoff: str | None = KNOWLEDGE_CUTOFF) -> str:
    """A conversation as the harmony prompt gpt-oss was trained on.

    `messages` are chat dicts (system/developer, user, assistant with `content`, `thinking` or
    `reasoning_content`, `tool_calls`; tool with `content` and the function `name`) or HarmonyMessage
    objects (rendered as they are). A leading system/developer message, or `developer_instructions`,
    becomes the developer message's `# Instructions`; `tools` (OpenAI function schemas) its
    `functions` namespace. With `add_generation_prompt` the prompt ends in `<|start|>assistant`.
    """
    body, instructions = _to_harmony(messages)
    if developer_instructions is not None:
        instructions = developer_instructions if not instructions else f"{developer_instructions}\n\n{instructions}"
    text = render_message(HarmonyMessage("system", render_system_content(
        reasoning_effort, current_date, model_identity, knowledge_cutoff, has_function_tools=bool(tools))))
    if instructions or tools:
        text += render_message(HarmonyMessage("developer", render_developer_content(instructions, tools)))
    text += "".join(render_message(m) for m in drop_finished_analysis(body))
    return text + (START + "assistant" if add_generation_prompt else "")


class HarmonyTemplate:
    """render_harmony behind the ChatTemplate interface, so callers render any model the same way."""

    source = None

    def __init__(self, current_date: str | None = None):
        self.current_date = current_date

    _OPTIONS = ("developer_instructions", "current_date", "model_identity", "knowledge_cutoff")

    def render(self, messages, add_generation_prompt: bool = True, tools: list[dict] | None = None,
               reasoning_effort: str | None = "medium", **kwargs) -> str:
        """Like ChatTemplate.render; variables meant for other templates (`enable_thinking`, ...) are
        ignored, as a Jinja template ignores variables it does not read."""
        options = {k: v for k, v in kwargs.items() if k in self._OPTIONS}
        options.setdefault("current_date", self.current_date)
        return render_harmony(messages, tools=tools, reasoning_effort=reasoning_effort,
                              add_generation_prompt=add_generation_prompt, **options)

    def __repr__(self) -> str:
        return "HarmonyTemplate()"


# -- parsing -----------------------------------------------------------------------------------------------


def parse_header(header: str, role: str | None) -> tuple[str, str | None, str | None, str | None, str | None]:
    """(role, name, recipient, channel, content_type) from a header's text (§8.6, encoding.rs
    parse_header_from_tokens). `role` is known when the prompt already wrote it (`<|start|>assistant`).
    Never raises: odd headers give a best reading."""
    channel = None
    at = header.find(CHANNEL)
    if at >= 0:
        after = header[at + len(CHANNEL):]
        stop = next((i for i, c in enumerate(after) if c.isspace() or c == "<"), len(after))
        channel = after[:stop] or None
        header = header[:at] + after[stop:]
    header = header.strip()
    if CONSTRAIN in header:  # "to=f<|constrain|>json": the content type is its own part
        header = header.replace(CONSTRAIN, " " + CONSTRAIN).strip()
    parts = header.split()
    name = None
    if role is None:
        if not parts:
            role = "assistant"
        elif parts[0] in ROLES:
            role = parts[0]
        elif ":" in parts[0] and parts[0].split(":", 1)[0] in ROLES:  # "user:alice"
            role, name = parts[0].split(":", 1)
            parts.pop(0)
        else:  # an unknown author is a tool: "functions.get_weather to=assistant"
            role, name = "tool", parts.pop(0)
    if parts and parts[0] == role:
        parts.pop(0)
    recipient = content_type = None
    if parts:
        last = parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif not parts:
            recipient = last
        else:
            content_type = last
            raw = parts.pop()
            recipient = raw[3:] if raw.startswith("to=") else raw
    return role, name, recipient, channel, content_type


def _held_back(text: str) -> int:
    """How many trailing characters might be the start of a marker split across deltas."""
    start = text.rfind("<")  # every marker has a single "<", its first character
    if start < 0 or len(text) - start >= max(map(len, MARKERS)):
        return 0
    return len(text) - start if any(m.startswith(text[start:]) for m in MARKERS) else 0


class HarmonyStreamParser:
    """Parses harmony text as it streams in (deltas from an IncrementalDetokenizer that keeps special
    tokens). `push(delta)` returns events; `finish()` closes whatever is open. Tolerates what models
    emit in practice (§12): the recipient after the channel, `<|constrain|>` glued to a word, function
    calls on `analysis`, a stop token before `<|message|>`, a missing `<|start|>`. Text it cannot place
    becomes plain content (channel None); it never raises."""

    def __init__(self, role: str | None = "assistant"):
        # `role` given: the prompt ended in `<|start|>{role}`, so the text begins inside a header
        self._state = "header" if role is not None else "start"
        self._role = role
        self._buffer = ""      # text not yet consumed
        self._header = ""
        self._current: HarmonyMessage | None = None
        self.messages: list[HarmonyMessage] = []

    # state changes ---------------------------------------------------------------------------------

    def _begin(self, message: HarmonyMessage, events: list[HarmonyEvent]) -> None:
        self._current = message
        self._state = "content"
        events.append(HarmonyEvent("start", message.role, message.channel, message.recipient, message.content_type))

    def _close(self, end: str | None, events: list[HarmonyEvent]) -> None:
        message = self._current
        message.end = end
        self.messages.append(message)
        events.append(HarmonyEvent("end", message.role, message.channel, message.recipient, message.content_type,
                                   message=message))
        self._current = None
        self._state = "start"
        self._role = None

    def _content(self, text: str, events: list[HarmonyEvent]) -> None:
        if text:
            m = self._current
            m.content += text
            events.append(HarmonyEvent("delta", m.role, m.channel, m.recipient, m.content_type, delta=text))

    def _header_done(self, events: list[HarmonyEvent]) -> None:
        role, name, recipient, channel, content_type = parse_header(self._header, self._role)
        self._header = ""
        self._begin(HarmonyMessage(role, "", channel, recipient, content_type, name), events)

    def _header_interrupted(self, marker: str, events: list[HarmonyEvent]) -> None:
        """A marker other than <|message|> ended a header. A header with a channel was a header that
        lost its content; anything else was text written where a header should be."""
        if CHANNEL in self._header:
            self._header_done(events)
        else:
            text = self._header
            self._header = ""
            if not text.strip():  # an empty reply: nothing to keep
                self._state, self._role = "start", None
                return
            self._begin(HarmonyMessage(self._role or "assistant", ""), events)
            self._content(text, events)
        if marker in STOPS:
            self._close(marker, events)
        else:
            self._close(None, events)

    # input ----------------------------------------------------------------------------------------------

    def push(self, delta: str) -> list[HarmonyEvent]:
        self._buffer += delta
        return self._consume(final=False)

    def finish(self) -> list[HarmonyEvent]:
        """End of text: emit what was held back and close an open message (its `end` is None)."""
        events = self._consume(final=True)
        if self._state == "header" and self._header.strip():
            if CHANNEL in self._header:
                self._header_done(events)
            else:
                self._begin(HarmonyMessage(self._role or "assistant", ""), events)
                self._content(self._header, events)
            self._header = ""
        if self._state == "content":
            self._close(None, events)
        return events

    def _consume(self, final: bool) -> list[HarmonyEvent]:
        events: list[HarmonyEvent] = []
        while self._buffer:
            at, marker = self._next_marker()
            if marker is None:
                keep = 0 if final else _held_back(self._buffer)
                text, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
                self._text(text, events)
                break
            self._text(self._buffer[:at], events)
            self._buffer = self._buffer[at + len(marker):]
            self._marker(marker, events)
        return events

    def _next_marker(self) -> tuple[int, str | None]:
        best, found = len(self._buffer), None
        for marker in MARKERS:
            at = self._buffer.find(marker, 0, best + len(marker))
            if 0 <= at < best:
                best, found = at, marker
        return best, found

    def _text(self, text: str, events: list[HarmonyEvent]) -> None:
        if not text:
            return
        if self._state == "header":
            self._header += text
        elif self._state == "content":
            self._content(text, events)
        elif text.strip():  # text where <|start|> should be: keep it as plain content
            self._begin(HarmonyMessage("assistant", ""), events)
            self._content(text, events)

    def _marker(self, marker: str, events: list[HarmonyEvent]) -> None:
        if self._state == "start":
            if marker == START:
                self._state, self._role, self._header = "header", None, ""
            elif marker == CHANNEL:  # a header without <|start|>assistant
                self._state, self._role, self._header = "header", "assistant", CHANNEL
            # a stray <|message|> or stop marker between messages carries nothing
        elif self._state == "header":
            if marker == MESSAGE:
                self._header_done(events)
            elif marker == CHANNEL:
                self._header += CHANNEL
            elif marker == START and not self._header.strip():
                self._role = None
            else:
                self._header_interrupted(marker, events)
                if marker == START:
                    self._state, self._role, self._header = "header", None, ""
        else:  # content
            if marker in STOPS:
                self._close(marker, events)
            elif marker == START:  # the model forgot <|end|>
                self._close(None, events)
                self._state, self._role, self._header = "header", None, ""
            elif marker == CHANNEL:  # a new header without <|end|><|start|>assistant
                role = self._current.role
                self._close(None, events)
                self._state, self._role, self._header = "header", role, CHANNEL
            else:  # <|message|> inside content is text
                self._content(marker, events)


def parse_harmony(text: str, role: str | None = "assistant") -> list[HarmonyMessage]:
    """Messages in harmony text: a completion that follows `<|start|>{role}` (the default), or, when
    the text starts with `<|start|>`, a whole rendered conversation. Never raises."""
    parser = HarmonyStreamParser(role)
    parser.push(text)
    parser.finish()
    return parser.messages


def to_chat_message(messages: Iterable[HarmonyMessage]) -> dict:
    """A parsed reply as an OpenAI-style assistant message: `reasoning_content` from analysis, `content`
    from final (or, without one, from preambles and unplaced text), `tool_calls` from every message
    addressed to a tool, on whatever channel."""
    messages = [m for m in messages if m.role == "assistant"]
    reasoning = "".join(m.content for m in messages if m.channel == "analysis" and not m.recipient)
    finals = [m.content for m in messages if m.channel == "final" and not m.recipient]
    if not finals:
        finals = [m.content for m in messages if m.channel in (None, "commentary") and not m.recipient]
    calls = []
    for m in messages:
        if m.recipient and m.recipient != "all":
            name = m.function_name or m.recipient
            calls.append({"id": f"call_{len(calls)}", "type": "function",
                          "function": {"name": name, "arguments": m.content}})
    out: dict = {"role": "assistant", "content": "".join(finals) or None}
    if reasoning:
        out["reasoning_content"] = reasoning
    if calls:
        out["tool_calls"] = calls
    return out
