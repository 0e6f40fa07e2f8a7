"""Mistral's tool calls: ``[TOOL_CALLS]`` then a JSON list (v0.3) or ``NAME[ARGS]{...}`` (v11),
parsed however the reply is chunked; the family chosen from the template; ids the template accepts;
and the fallback templates of issue 21's families."""

from __future__ import annotations

import json

import pytest

from rung.serve.family import family_for
from rung.serve.tools import MistralTools
from rung.text.chat import ChatTemplate, chat_template_for
from rung.text.templates import MISTRAL_TEMPLATE

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def parse(reply: str, size: int, names=frozenset({"get_weather", "add"})):
    tools = MistralTools(set(names))
    events = []
    for i in range(0, len(reply), size):
        events += tools.push(reply[i:i + size])
    events += tools.finish()
    content = "".join(e.text for e in events if e.kind == "content")
    calls = [(e.call.name, json.loads(e.call.arguments)) for e in events if e.kind == "tool_call"]
    return content, calls


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_mistral_v03_tool_call_list_is_parsed_in_any_chunking(size):
    reply = 'Let me check. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
            '{"name": "add", "arguments": {"a": 1, "b": 2}}]'
    content, calls = parse(reply, size)
    assert content == "Let me check. "
    assert calls == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_mistral_v11_name_args_calls_are_parsed(size):
    reply = '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]add[ARGS]{"a": 2, "b": 3}'
    assert parse(reply, size) == ("", [("get_weather", {"city": "Oslo"}), ("add", {"a": 2, "b": 3})])


@pytest.mark.parametrize("reply", [
    "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": ",  # cut off mid-JSON
    "[TOOL_CALLS] [{\"name\": \"unknown_tool\", \"arguments\": {}}]",  # a tool that was not offered
    "[TOOL_CALLS]get_weather{\"city\": 1}",  # no [ARGS]
])
def test_mistral_calls_that_do_not_parse_stay_content(reply):
    assert parse(reply, 2) == (reply, [])


def test_text_without_tool_calls_streams_as_content_holding_only_a_possible_marker():
    tools = MistralTools({"get_weather"})
    assert [e.text for e in tools.push("The answer is [TOOL")] == ["The answer is "]  # "[TOOL" may begin the marker
    assert [e.text for e in tools.push("S] of it")] == ["[TOOLS] of it"]
    assert tools.finish() == []


def test_a_template_with_tool_calls_is_the_mistral_family_decoded_with_special_tokens():
    family = family_for("mistral", ChatTemplate(MISTRAL_TEMPLATE))
    assert family.name == "mistral" and not family.skip_special_tokens and not family.thinks
    assert isinstance(family.parser(TOOLS).stages[-1], MistralTools)


def test_mistral_call_ids_become_nine_alphanumerics_the_template_accepts():
    family = family_for("mistral", ChatTemplate(MISTRAL_TEMPLATE))
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_0123456789abcdef01234567", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": "18C"}]
    out = family.messages(messages, TOOLS)
    call_id = out[1]["tool_calls"][0]["id"]
    assert len(call_id) == 9 and call_id.isalnum() and out[2]["tool_call_id"] == call_id
    text = ChatTemplate(MISTRAL_TEMPLATE, special_tokens={"bos_token": "<s>", "eos_token": "</s>"}).render(
        out, add_generation_prompt=True, tools=TOOLS)
    assert text.startswith("<s>[AVAILABLE_TOOLS] [") and "[INST] Weather in Paris?[/INST]" in text
    assert f'"id": "{call_id}"' in text and f'"call_id": "{call_id}"' in text and "[TOOL_RESULTS]" in text


def test_mistral_grammar_forces_a_tool_calls_list():
    family = family_for("mistral", ChatTemplate(MISTRAL_TEMPLATE))
    grammar = family.grammar_call(TOOLS, thinking=False)
    assert '"[TOOL_CALLS]"' in grammar and '"maxItems": 1' in grammar


@pytest.mark.parametrize("model_type,needle", [
    ("mistral", "[INST] hi[/INST]"), ("mixtral", "[INST] hi[/INST]"), ("phi3", "<|user|>\nhi<|end|>\n<|assistant|>\n"),
    ("olmo2", "<|user|>\nhi\n<|assistant|>\n"), ("gemma2", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"),
])
def test_families_without_a_shipped_template_get_their_own_format(model_type, needle):
    text = chat_template_for(model_type).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert needle in text
