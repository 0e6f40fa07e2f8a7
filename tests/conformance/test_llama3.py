"""Conformance: Llama 3.x JSON tool calls: <|python_tag|> and the plain JSON form ("parameters"). Every
row of cases.LLAMA3 through the streaming parser (whole, one character at a time, split at every
byte) and the chat endpoint (whole and streamed; forced rows also with tool_choice "required")."""

from __future__ import annotations

import pytest

from cases import LLAMA3
from runners import (check_chat_streamed, check_chat_whole, check_parser, check_responses_streamed,
                     check_responses_whole, scripted_server)

FORMAT = "llama3"
ROWS = pytest.mark.parametrize("case", LLAMA3, ids=[c.id for c in LLAMA3])


@pytest.fixture(scope="module")
def chat():
    client, engine = scripted_server(FORMAT)
    with client:
        yield client, engine


@ROWS
def test_llama3_parse_is_the_same_split_at_every_byte(case):
    check_parser(FORMAT, case)


@ROWS
def test_llama3_chat_whole_reply(chat, case):
    check_chat_whole(*chat, case)


@ROWS
def test_llama3_chat_stream_adds_up_to_the_whole_reply(chat, case):
    check_chat_streamed(*chat, case)


@pytest.mark.parametrize("case", [c for c in LLAMA3 if c.forced], ids=[c.id for c in LLAMA3 if c.forced])
def test_llama3_forced_call_streams_its_arguments(chat, case):
    check_chat_whole(*chat, case, forced=True)
    check_chat_streamed(*chat, case, forced=True)


@ROWS
def test_llama3_responses_whole_reply(chat, case):
    check_responses_whole(*chat, case)


@ROWS
def test_llama3_responses_stream_adds_up_to_the_whole_reply(chat, case):
    check_responses_streamed(*chat, case)
