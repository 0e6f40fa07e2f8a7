"""Conformance: Qwen3 <tool_call> JSON blocks, <think> reasoning. Every row of cases.QWEN3 through the
streaming parser (whole, one character at a time, split at every byte) and the chat and Responses endpoints (whole
and streamed; forced rows also with tool_choice "required")."""

from runners import FormatConformance


class TestQwen3(FormatConformance):
    FORMAT = "qwen3"
