"""Request bodies of the OpenAI API, as strict pydantic models.

Fields are OpenAI's, plus the extras vLLM accepts (top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, stop_token_ids, chat_template_kwargs, ...), so a client written for vLLM works here.
Unknown fields are refused (``extra="forbid"``): a misspelt ``max_token`` would otherwise be ignored
without a word. Types are strict, as OpenAI's are: ``"stream": "yes"`` is a 400, not ``True``.
Ranges follow OpenAI's documentation; what the model's context allows is checked later, once the
prompt is tokenized.

``parse_body`` turns the bytes of a body into one of these requests, or into a 400 naming the field
(the JSON's nesting, lone UTF-16 surrogates and numbers that are not finite included). It is CPU work on up
to --max-request-bytes: the server runs it off the event loop.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from rung.serve.errors import bad_request, pydantic_errors

# objects and arrays inside one another in a body: what Python's json, the templates and the schema
# checks after it all walk by recursion
MAX_JSON_DEPTH = 128
# render()'s own parameters: the request's fields set them, chat_template_kwargs may not
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt", "self"})
_SURROGATE = re.compile("[\ud800-\udfff]")  # one left alone by json.loads: not text, not encodable


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    """Nested objects OpenAI may grow (tool definitions, stream options): unknown keys are ignored."""

    model_config = ConfigDict(extra="allow")


# ---- messages -------------------------------------------------------------------------------------


class ContentPart(Open):
    type: str
    text: str | None = None


class FunctionCall(Open):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # vLLM's field for a reply's reasoning, sent back in history
    reasoning: str | None = None
    refusal: str | None = None


# ---- tools and response formats -------------------------------------------------------------------


class FunctionDef(Open):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Open):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Open):
    name: str


class NamedToolChoice(Open):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Open):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Open):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# ---- the requests ---------------------------------------------------------------------------------


class SamplingFields(Strict):
    """What chat and text completions share."""

    model: str
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # rung: PII redaction of this request (true, or Presidio entity types); see rung/serve/redaction.py
    redact: StrictBool | list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v


class RagOptions(Strict):
    """rung's extension: per-request retrieval settings (`rung serve --rag INDEX`)."""

    k: int | None = Field(None, ge=1, le=32)
    max_chars: int | None = Field(None, ge=100, le=100_000)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    rag: StrictBool | RagOptions | None = None  # rung: ground in the --rag index (false: not this request)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_reserved(cls, v):
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(v or ()))
        if reserved:
            raise ValueError(f"{', '.join(reserved)} may not be set here (the request's own fields set "
                             f"{'it' if len(reserved) == 1 else 'them'})")
        return v
    # accepted for compatibility; they change nothing here
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


# ---- a body → a request ---------------------------------------------------------------------------


def parse_body(raw: bytes, schema: type[SamplingFields]) -> SamplingFields:
    """The request in ``raw``, or a 400 (invalid_request_error) naming the field. Blocking."""
    try:
        data = json.loads(raw)
    except RecursionError:  # deeper than the interpreter's stack, before MAX_JSON_DEPTH could be checked
        field = _deep_field(raw)
        raise bad_request(f"{field or 'the body'} nests more than {MAX_JSON_DEPTH} levels of objects and arrays",
                          field, "invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the body must be a JSON object, not {_json_type(data)}", code="invalid_json")
    _check_values(data)
    try:
        req = schema.model_validate(data, strict=True)
    except ValidationError as e:
        raise pydantic_errors(e, data) from None
    if getattr(req, "stream_options", None) is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    return req


# a JSON string (with the colon after it, if it is a key), or a bracket
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"\s*:?|[\[\]{}]', re.DOTALL)


def _deep_field(raw: bytes) -> str | None:
    """The top-level field holding the first value nested deeper than MAX_JSON_DEPTH, read from the
    raw body (one json.loads could not parse); None if it cannot be told."""
    depth, key = 0, None
    for token in _TOKENS.finditer(raw):
        t = token.group()
        if t in (b"[", b"{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                break
        elif t in (b"]", b"}"):
            depth -= 1
        elif depth == 1 and t.endswith(b":"):
            key = t
    else:
        return None
    try:
        field = json.loads(key.rstrip(b": \t\r\n")) if key else None
    except ValueError:
        return None
    return field if isinstance(field, str) and not _SURROGATE.search(field) else None


def _json_type(value) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _check_values(data: dict) -> None:
    """A 400 for the first value no field can hold: nesting deeper than MAX_JSON_DEPTH; a string (or
    a key) with a lone UTF-16 surrogate (``"\\ud800"``: valid JSON, but no text; tokenizers and the
    UTF-8 of every reply choke on it); a number that is not finite (Python's json reads NaN,
    Infinity and 1e999, which JSON has not)."""
    found = _first_bad(data, 0)
    if found is None:
        return
    path, why = found
    if why == "depth":  # the top-level field: the path down is as long as the limit
        raise bad_request(f"{path[0]} nests more than {MAX_JSON_DEPTH} levels of objects and arrays", path[0])
    param = ".".join(_printable(str(p)) for p in path)
    if why == "number":
        raise bad_request(f"{param}: NaN and infinite numbers are not JSON numbers", param)
    raise bad_request(f"{param}: a lone UTF-16 surrogate (\\ud800-\\udfff) is not text", param)


def _first_bad(value, depth: int) -> tuple[list, str] | None:
    """(the path to the first bad value, "depth" | "surrogate" | "number"), or None. Recursion is
    bounded by MAX_JSON_DEPTH; the work by the size of the body."""
    if isinstance(value, str):
        return ([], "surrogate") if _SURROGATE.search(value) else None
    if isinstance(value, float):
        return None if math.isfinite(value) else ([], "number")
    if not isinstance(value, (dict, list)):
        return None
    if depth >= MAX_JSON_DEPTH:
        return [], "depth"
    for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
        if isinstance(key, str) and _SURROGATE.search(key):
            return [key], "surrogate"
        found = _first_bad(item, depth + 1)
        if found is not None:
            found[0].insert(0, key)
            return found
    return None


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
