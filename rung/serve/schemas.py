"""Request bodies of the OpenAI API, as strict pydantic models.

Fields are OpenAI's, plus the extras vLLM accepts (top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, stop_token_ids, chat_template_kwargs, ...), so a client written for vLLM works here.
Unknown fields are refused (``extra="forbid"``): a misspelt ``max_token`` would otherwise be ignored
without a word. Ranges follow OpenAI's documentation; what the model's context allows is checked
later, once the prompt is tokenized.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator


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
