"""Conformance: gpt-oss harmony: analysis reasoning, calls addressed to functions.NAME. Every row of
cases.HARMONY through the streaming parser (whole, one character at a time, split at every byte) and
the chat and Responses endpoints (whole and streamed; forced rows also with tool_choice "required")."""

from runners import FormatConformance


class TestHarmony(FormatConformance):
    FORMAT = "harmony"
