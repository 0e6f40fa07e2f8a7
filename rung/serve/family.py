"""How one model family speaks tools and reasoning: prompt side and reply side.

Three families:
- ``harmony`` (gpt-oss): rung's harmony renderer; reasoning on the analysis channel; tool calls are
  messages to ``functions.NAME`` on commentary; reasoning effort low/medium/high.
- ``hermes`` (Qwen3 and any template that writes ``<tool_call>``): the template renders tools and
  tool results itself; ``<think>`` reasoning when the template knows it, switched off with
  ``enable_thinking: false``.
- ``mistral`` (a template that writes ``[TOOL_CALLS]``: Mistral, Mixtral instruct): the template
  renders tools and results; replies call tools after ``[TOOL_CALLS]`` (tools.MistralTools), a
  special token, so its replies are decoded with special tokens; tool call ids are the nine
  alphanumerics Mistral's templates insist on.
- ``json`` (templates without tools, e.g. SmolLM2, Gemma 3, and Llama 3.x, whose JSON calls with
  ``"parameters"`` and ``<|python_tag|>`` parse the same way): rung describes the tools in a system
  message and asks for one JSON object ``{"name", "arguments"}``; calls in history are written back as that
  JSON and tool results as user turns, so any template (even one that insists on alternating
  user/assistant turns) renders them.

``grammar_*`` give the Lark grammar that forces a reply into a shape (a JSON schema answer, a
required or named tool call) in the family's own syntax, reasoning allowed first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from rung.serve.reasoning import HarmonyReply, ThinkSplitter
from rung.serve.tools import HermesTools, JsonTools, MistralTools, Pipeline

TOOL_INSTRUCTIONS = """You can call the following tools. Each is a JSON object with its name, description and the JSON Schema of its arguments:
{tools}

To call a tool, reply with only a JSON object {{"name": <tool name>, "arguments": <arguments object>}} and nothing else. To answer without a tool, reply in plain text."""


@dataclass
class Family:
    name: str  # "harmony" | "hermes" | "mistral" | "json"
    thinks: bool  # the template has a <think> reasoning block (hermes only)

    # ---- prompt side ------------------------------------------------------------------------------

    def template_kwargs(self, reasoning_effort: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """chat_template_kwargs plus what reasoning_effort means for this family."""
        kwargs = dict(kwargs)
        if self.name == "harmony":
            if reasoning_effort in ("none", "minimal"):
                reasoning_effort = "low"  # gpt-oss always reasons; "low" is its least
            if reasoning_effort is not None:
                kwargs.setdefault("reasoning_effort", reasoning_effort)
        elif self.thinks and reasoning_effort is not None:
            kwargs.setdefault("enable_thinking", reasoning_effort not in ("none", "minimal"))
        return kwargs

    def thinking(self, kwargs: dict[str, Any]) -> bool:
        """Whether the reply may open with reasoning."""
        return self.name == "harmony" or (self.thinks and kwargs.get("enable_thinking", True) is not False)

    def messages(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        """OpenAI messages → what this family's template renders."""
        messages = _name_tool_results(messages)
        if self.name == "mistral":
            return _mistral_call_ids(messages)
        if self.name != "json":
            return messages
        out: list[dict] = []
        if tools:
            instructions = TOOL_INSTRUCTIONS.format(tools="\n".join(json.dumps(_function(t), ensure_ascii=False)
                                                                    for t in tools))
            if messages and messages[0]["role"] in ("system", "developer"):
                first = messages.pop(0)
                instructions = f"{first.get('content') or ''}\n\n{instructions}".lstrip()
            out.append({"role": "system", "content": instructions})
        for m in messages:
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                         for c in m["tool_calls"]]
                text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
                content = m.get("content")
                out.append({"role": "assistant", "content": f"{content}\n{text}" if content else text})
            elif m["role"] == "tool":
                result = f"Result of tool {m.get('name') or 'call'}: {m.get('content') or ''}"
                if out and out[-1]["role"] == "user" and out[-1].get("_tool_results"):
                    out[-1]["content"] += "\n" + result
                else:
                    out.append({"role": "user", "content": result, "_tool_results": True})
            elif m["role"] == "developer":
                out.append({**m, "role": "system"})
            else:
                out.append(m)
        return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]

    # ---- reply side -------------------------------------------------------------------------------

    def parser(self, tools: list[dict] | None, prompt: str | None = None, removed: Iterable[str] = ()):
        """The streaming parser of this family's replies (reasoning, content, tool calls whose
        arguments stream: rung/serve/tools.py documents its events). Only ``tools`` can be called. A
        prompt that ends inside an open ``<think>`` (thinking-only templates) starts the reply in
        reasoning."""
        names = {_function(t)["name"] for t in tools or []} | set(removed)  # a call to any other is content
        if self.name == "harmony":
            return HarmonyReply(tools=bool(names), names=names)
        stages = []
        if self.thinks:
            opened = prompt is not None and prompt.rstrip().endswith("<think>")
            stages.append(ThinkSplitter(thinking=opened))
        if names:
            stages.append(HermesTools(names) if self.name == "hermes" else MistralTools(names) if self.name == "mistral"
                          else JsonTools(names))
        return Pipeline(*stages)

    @property
    def skip_special_tokens(self) -> bool:
        """Harmony's structure is special tokens, and Mistral's [TOOL_CALLS] is one: their replies are
        decoded with them."""
        return self.name not in ("harmony", "mistral")

    # ---- grammars ---------------------------------------------------------------------------------

    def grammar_answer(self, schema: dict, thinking: bool, added: set[str] = frozenset(), opened: bool = False) -> str:
        """The reply's answer must be JSON valid under ``schema`` (reasoning may come first).
        ``added``: the tokenizer's added tokens, which a grammar names as tokens, not as text;
        ``opened``: the prompt ended inside ``<think>``, so the reply must close it first."""
        body = _json(schema)
        if self.name == "harmony":
            return _lark(f"start: analysis? final\nfinal: <|channel|> \"final\" <|message|> answer\n"
                         f"answer: {body}\n{HARMONY_ANALYSIS}")
        if self.thinks and thinking:
            return _lark(f"start: think{'' if opened else '?'} answer\nanswer: {body}\n{_think(added, opened)}")
        return _lark(f"start: answer\nanswer: {body}")

    def grammar_call(self, tools: list[dict], thinking: bool, added: set[str] = frozenset(), opened: bool = False) -> str:
        """The reply must call one of ``tools`` (one tool: that one), arguments valid under its schema."""
        fns = [_function(t) for t in tools]
        params = [fn.get("parameters") or {"type": "object"} for fn in fns]
        if self.name == "harmony":
            calls = " | ".join(f"call{i}" for i in range(len(fns)))
            rules = "\n".join(f"call{i}: <|channel|> \"commentary to=functions.{fn['name']} \" <|constrain|> \"json\" "
                              f"<|message|> args{i}\nargs{i}: {_json(p)}"
                              for i, (fn, p) in enumerate(zip(fns, params)))
            return _lark(f"start: analysis? ({calls})\n{rules}\n{HARMONY_ANALYSIS}")
        variants = [{"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": p},
                     "required": ["name", "arguments"], "additionalProperties": False} for fn, p in zip(fns, params)]
        schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
        if self.name == "json":
            return _lark(f"start: call\ncall: {_json(schema)}")
        if self.name == "mistral":  # [TOOL_CALLS] then a list of the one call
            calls = {"type": "array", "items": schema, "minItems": 1, "maxItems": 1}
            return _lark(f"start: call\ncall: {_tag('[TOOL_CALLS]', added)} body\nbody: {_json(calls)}")
        think = self.thinks and thinking
        open_, close = _tag("<tool_call>", added), _tag("</tool_call>", added)
        return _lark((f"start: think{'' if opened else '?'} call\n" if think else "start: call\n")
                     + f'call: {open_} "\\n" body "\\n" {close}\nbody: {_json(schema)}\n'
                     + (_think(added, opened) if think else ""))


def _tag(text: str, added: set[str]) -> str:
    """A tag in a Lark rule: the token itself when the vocabulary has it as one added token (then its
    text never appears byte by byte), else its text."""
    return text if text in added else json.dumps(text)


def _think(added: set[str], opened: bool = False) -> str:
    """``<think>…</think>`` then blanks (without the opening tag when the prompt wrote it). As tokens:
    the thought is any text (no token can be inside it). As text: the thought ends at the first
    ``</think>`` (llguidance's ``stop``)."""
    tokens = "<think>" in added and "</think>" in added
    open_ = "" if opened else ("<think> " if tokens else '"<think>" ')
    if tokens:
        return f'think: {open_}THOUGHT? </think> /\\s*/\nTHOUGHT: /(.|\\n)+/\n'
    return f'think: {open_}thought /\\s*/\nthought[stop="</think>"]: /(.|\\n)*/\n'


HARMONY_ANALYSIS = ('analysis: <|channel|> "analysis" <|message|> ANALYSIS? <|end|> <|start|> "assistant"\n'
                    'ANALYSIS: /(.|\\n)+/\n')


def _json(schema: dict) -> str:
    """An inline JSON schema of a Lark grammar, in rung's fixed JSON layout (structured.JSON_STYLE)."""
    from rung.serve.structured import JSON_STYLE

    return f"%json {json.dumps({**schema, 'x-guidance': {**JSON_STYLE, **schema.get('x-guidance', {})}})}"


def _lark(text: str) -> str:
    from rung.serve.structured import Grammars

    return Grammars.lark(text)


def family_for(model_type: str | None, template) -> Family:
    """The family of a model, from its config's model_type and its chat template."""
    from rung.text.harmony import HarmonyTemplate

    if isinstance(template, HarmonyTemplate):
        return Family("harmony", thinks=False)
    source = getattr(template, "source", None) or ""
    thinks = "<think>" in source or "enable_thinking" in source
    if "<tool_call>" in source:
        return Family("hermes", thinks=thinks)
    if "[TOOL_CALLS]" in source:
        return Family("mistral", thinks=False)
    return Family("json", thinks=thinks)


def _function(tool: dict) -> dict:
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments if arguments is not None else {}


def _mistral_call_ids(messages: list[dict]) -> list[dict]:
    """Mistral's templates refuse a tool call id that is not nine alphanumerics: map each id (an
    assistant's call and the tool result answering it) to one, stably within the conversation."""
    import hashlib

    def short(call_id: Any) -> Any:
        if not isinstance(call_id, str) or (len(call_id) == 9 and call_id.isalnum()):
            return call_id
        return hashlib.sha256(call_id.encode()).hexdigest()[:9]

    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "id": short(c.get("id"))} for c in m["tool_calls"]]}
        elif m["role"] == "tool" and m.get("tool_call_id"):
            m = {**m, "tool_call_id": short(m["tool_call_id"])}
        out.append(m)
    return out


def _name_tool_results(messages: list[dict]) -> list[dict]:
    """OpenAI tool results carry only ``tool_call_id``: add the called function's ``name``, which
    templates (and harmony's tool author) render."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        if m["role"] == "assistant":
            for c in m.get("tool_calls") or []:
                if c.get("id"):
                    names[c["id"]] = c["function"]["name"]
        if m["role"] == "tool" and not m.get("name") and m.get("tool_call_id") in names:
            m = {**m, "name": names[m["tool_call_id"]]}
        out.append(m)
    return out
