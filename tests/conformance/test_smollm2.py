"""Conformance: SmolLM2's JSON convention (the reply is one call object or a list of them). Every row
of cases.SMOLLM2 through the streaming parser (whole, one character at a time, split at every byte)
and the chat and Responses endpoints (whole and streamed; forced rows also with tool_choice "required")."""

from runners import FormatConformance


class TestSmolLM2(FormatConformance):
    FORMAT = "smollm2"
