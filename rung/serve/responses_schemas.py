"""The body of ``POST /v1/responses``, as a strict pydantic model (rung/serve/schemas.py's rules:
unknown fields refused, strict types, OpenAI's ranges).

``input`` items and ``tools`` are kept as plain objects here and read one by one by
responses_api.py, which names the item and the field it refuses (``input.2.type``); OpenAI adds
item types often, and a clear "not supported" beats a union's wall of pydantic errors. Fields
OpenAI has but rung does not serve (``conversation``, ``prompt``, ``background: true``, ...) are
accepted by the schema so the refusal can say what they are (``unsupported``), not "unknown field".
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field, StrictBool

from rung.serve.schemas import Open, Strict


class JsonSchemaText(Open):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(Open):
    format: JsonSchemaText | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint to OpenAI's models; nothing here


class ReasoningConfig(Open):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # rung returns the reasoning text, no summary
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(Strict):
    model: str
    input: Union[str, list[dict[str, Any]], None] = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    previous_response_id: str | None = None
    store: bool | None = None  # rung keeps a response only when asked (stateless by default)
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: rung sends no obfuscation field
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncation: Literal["auto", "disabled"] | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    redact: StrictBool | list[str] | None = None  # rung: PII redaction of this request, as for chat
    # accepted, changing nothing here: routing and caching hints of OpenAI's service
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    # OpenAI's, refused with a reason (responses_api.UNSUPPORTED)
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
    prompt_cache_options: Any = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None
    background_options: Any = None
