"""Conformance: Gemma 3 through rung's JSON convention (fenced or plain JSON calls). Every row of
cases.GEMMA3 through the streaming parser (whole, one character at a time, split at every byte) and
the chat and Responses endpoints (whole and streamed; forced rows also with tool_choice "required")."""

from runners import FormatConformance


class TestGemma3(FormatConformance):
    FORMAT = "gemma3"
