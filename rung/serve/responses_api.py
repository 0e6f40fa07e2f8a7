"""``POST /v1/responses``, request side: a Responses request → the chat request that runs it.

The Responses API is chat with another shape, so rung runs it through the chat path: its ``input``
items become chat messages (``function_call`` items the assistant's ``tool_calls``,
``function_call_output`` items ``tool`` messages, ``reasoning`` items the next assistant turn's
``reasoning_content``), ``instructions`` the system message, the flat function ``tools`` chat's
nested ones, ``text.format`` chat's ``response_format`` and ``reasoning.effort`` chat's
``reasoning_effort``. ``Server.prepare_chat`` then renders the template, checks the limits
(context length, max tokens, schemas) and compiles the grammar exactly as for chat; its errors
are renamed to the Responses fields (``max_completion_tokens`` → ``max_output_tokens``).
The output side (items, events, the response object) is responses_run.py.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from rung.serve.errors import APIError, bad_request
from rung.serve.responses_schemas import ResponsesRequest
from rung.serve.schemas import ChatCompletionRequest

# OpenAI's fields rung does not serve, and what to do instead
UNSUPPORTED = {
    "background": "background responses are not supported; stream instead",
    "conversation": "conversations are not supported; continue with previous_response_id (and store: true)",
    "prompt": "stored prompt templates are not supported; send input and instructions",
    "context_management": "context_management is not supported",
    "prompt_cache_options": "prompt_cache_options is not supported (rung caches prompt prefixes by itself)",
    "moderation": "moderation is not supported",
    "image": "image settings are not supported (rung serves text only)",
    "access_programs": "access_programs is not supported",
    "background_options": "background responses are not supported",
}
# `include` values rung accepts: it returns reasoning as plain text, so there is no encrypted form to add
# reasoning.encrypted_content adds nothing (reasoning is returned as text); the logprobs of the
# output text come with its parts and delta events
INCLUDABLE = frozenset({"reasoning.encrypted_content", "message.output_text.logprobs"})
LOGPROBS = "message.output_text.logprobs"
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_EFFORT = {"xhigh": "high", "max": "high"}  # OpenAI's efforts above "high": rung's families stop at high
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


def to_chat(req: ResponsesRequest, history: list[dict] | None = None) -> tuple[ChatCompletionRequest, list[dict]]:
    """(the chat request that runs ``req``, the conversation so far without instructions: what a
    stored response keeps). ``history``: the stored conversation of previous_response_id."""
    _check_unsupported(req)
    if req.input is None:
        raise bad_request("input is required: a string or a list of items", "input")
    turn = input_messages(req.input)
    conversation = list(history or []) + turn
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    if not messages:
        raise bad_request("input holds no messages", "input")
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream}
    for field in ("temperature", "top_p", "user", "redact"):
        if getattr(req, field) is not None:
            body[field] = getattr(req, field)
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    if wants_logprobs(req):
        body["logprobs"], body["top_logprobs"] = True, req.top_logprobs or 0
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.tools:
        body["tools"] = [_tool(t, i) for i, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type != "text":
        body["response_format"] = _response_format(fmt)
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["reasoning_effort"] = _EFFORT.get(req.reasoning.effort, req.reasoning.effort)
    try:
        return ChatCompletionRequest.model_validate(body), conversation
    except ValidationError as e:  # a message the chat schema refuses: say it of the input
        first = e.errors(include_url=False)[0]
        raise bad_request(f"input: {first.get('msg')}", "input") from None


def wants_logprobs(req: ResponsesRequest) -> bool:
    """The output text's logprobs: asked with include ``message.output_text.logprobs``, or by
    asking for alternatives (``top_logprobs``)."""
    return LOGPROBS in (req.include or []) or req.top_logprobs is not None


def _check_unsupported(req: ResponsesRequest) -> None:
    for field, why in UNSUPPORTED.items():
        value = getattr(req, field)
        if value is not None and value is not False:
            raise bad_request(why, field, "unsupported_parameter")
    for i, name in enumerate(req.include or []):
        if name not in INCLUDABLE:
            raise bad_request(f"include {name!r} is not supported (rung accepts only "
                              f"{', '.join(sorted(INCLUDABLE))})", f"include.{i}", "unsupported_value")
    if req.truncation == "auto":
        raise bad_request("truncation 'auto' is not supported: rung never drops input; an input longer than the "
                          "context is refused", "truncation", "unsupported_value")
    if req.max_tool_calls is not None:
        raise bad_request("max_tool_calls is not supported", "max_tool_calls", "unsupported_parameter")


# ---- input items → chat messages ------------------------------------------------------------------


def input_messages(items: str | list[dict]) -> list[dict]:
    """``input`` as chat messages: a string is one user message; items are read in order."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    reasoning: list[str] = []  # reasoning items wait for the assistant turn they belong to

    def assistant() -> dict:
        """The assistant turn a call or reply of the model joins (a new one after anything else)."""
        if not (out and out[-1]["role"] == "assistant" and not out[-1].get("_closed")):
            out.append({"role": "assistant", "content": None})
        if reasoning:
            out[-1]["reasoning_content"] = "".join(reasoning)
            reasoning.clear()
        return out[-1]

    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"{where}.role must be one of user, assistant, system, developer, not {role!r}",
                                  f"{where}.role")
            text = _text(item.get("content"), f"{where}.content")
            if role == "assistant":
                turn = assistant()
                if turn.get("tool_calls"):  # text after the calls of a turn: a turn of its own
                    turn["_closed"] = True
                    turn = assistant()
                turn["content"] = (turn["content"] or "") + text
            else:
                out.append({"role": role, "content": text})
        elif kind == "function_call":
            call_id, name = _string(item, "call_id", where), _string(item, "name", where)
            arguments = item.get("arguments", "{}")
            if not isinstance(arguments, str):
                raise bad_request(f"{where}.arguments must be a string of JSON", f"{where}.arguments")
            assistant().setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            output = _text(item.get("output"), f"{where}.output")
            if out and out[-1]["role"] == "assistant":
                out[-1]["_closed"] = True
            out.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning.append(_text(parts, f"{where}.content"))
        elif kind == "item_reference":
            raise bad_request("item_reference is not supported: send the items themselves, or continue a stored "
                              "response with previous_response_id", f"{where}.type", "unsupported_value")
        elif kind is None:
            raise bad_request(f"{where} has neither a type nor a role", where)
        else:
            raise bad_request(f"{where}: items of type {kind!r} are not supported (rung reads message, "
                              f"function_call, function_call_output and reasoning items)", f"{where}.type",
                              "unsupported_value")
    for m in out:
        m.pop("_closed", None)
    return out


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise bad_request(f"{where}.{key} must be a non-empty string", f"{where}.{key}")
    return value


def _text(content, where: str) -> str:
    """A string, or the text of a list of text parts (input_text, output_text, ...); other parts are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise bad_request(f"{where}.{j}: content parts of type {kind!r} are not supported (text only)",
                              f"{where}.{j}.type", "unsupported_value")
    return "".join(texts)


# ---- tools, tool_choice, text.format --------------------------------------------------------------


def _tool(tool: dict, i: int) -> dict:
    """A flat Responses function tool → chat's ``{"type": "function", "function": {...}}``."""
    kind = tool.get("type")
    if kind != "function":
        raise bad_request(f"tools.{i}: the built-in tool {kind!r} is not supported by rung serve (declare function "
                          f"tools and run them yourself)", f"tools.{i}.type", "unsupported_value")
    name = tool.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.match(name):
        raise bad_request(f"tools.{i}.name must be 1 to 64 letters, digits, '_', '.' or '-'", f"tools.{i}.name")
    function = {"name": name}
    for key, types in (("description", str), ("parameters", dict), ("strict", bool)):
        value = tool.get(key)
        if value is not None and not isinstance(value, types):
            raise bad_request(f"tools.{i}.{key} must be {'an object' if types is dict else types.__name__}",
                              f"tools.{i}.{key}")
        if value is not None:
            function[key] = value
    return {"type": "function", "function": function}


def _tool_choice(choice) -> Any:
    if isinstance(choice, str):
        return choice
    kind = choice.get("type")
    if kind == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind == "function":
        raise bad_request("tool_choice of type function needs a name", "tool_choice.name")
    raise bad_request(f"tool_choice of type {kind!r} is not supported (none, auto, required or "
                      f"{{\"type\": \"function\", \"name\": ...}})", "tool_choice.type", "unsupported_value")


def _response_format(fmt) -> dict:
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise bad_request("text.format of type json_schema needs a schema", "text.format.schema")
    spec = {"name": fmt.name or "response", "schema": fmt.schema_}
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": spec}


# ---- chat's errors in the Responses fields ----------------------------------------------------------

_RENAMED = [("max_completion_tokens", "max_output_tokens"), ("max_tokens", "max_output_tokens"),
            ("response_format.json_schema.schema", "text.format.schema"), ("response_format", "text.format"),
            ("reasoning_effort", "reasoning.effort")]
_TOOL_PARAMETERS = re.compile(r"tools\.(\d+)\.function\.")


def renamed(e: APIError) -> APIError:
    """An error of the chat path, naming the Responses request's fields instead of chat's."""
    message, param = e.message, e.param
    for old, new in _RENAMED:
        message = message.replace(old, new)
        if param is not None and (param == old or param.startswith(old + ".")):
            param = new + param[len(old):]
    message = _TOOL_PARAMETERS.sub(r"tools.\1.", message)
    if param is not None:
        param = _TOOL_PARAMETERS.sub(r"tools.\1.", param)
        if param == "messages" or param.startswith("messages."):
            param = "input"
    return APIError(e.status, message, param, e.code, e.headers)
