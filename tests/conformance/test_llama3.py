"""Conformance: Llama 3.x JSON tool calls: <|python_tag|> and the plain JSON form ("parameters"). Every
row of cases.LLAMA3 through the streaming parser (whole, one character at a time, split at every
byte) and the chat and Responses endpoints (whole and streamed; forced rows also with tool_choice "required")."""

from runners import FormatConformance


class TestLlama3(FormatConformance):
    FORMAT = "llama3"
