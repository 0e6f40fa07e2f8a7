"""Reply parsing per family, on crafted model output: Qwen3 <think> and <tool_call>, gpt-oss
harmony, SmolLM2's JSON convention. Streamed in every split gives the same result as whole, and
malformed output falls back to content instead of raising."""

from __future__ import annotations

import json

import pytest

from rung.serve.family import Family, family_for
from rung.serve.reasoning import HarmonyReply, ThinkSplitter
from rung.serve.tools import HermesTools, JsonTools, Pipeline, Reply

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def run(parser, chunks):
    events = []
    for c in chunks:
        events += parser.push(c)
    events += parser.finish()
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    content = "".join(e.text for e in events if e.kind == "content")
    calls = [(c.name, json.loads(c.arguments)) for c in Reply().add(events).calls]
    return reasoning, content, calls


def splits(text):
    """The text whole, one character at a time, and in chunks of 3 and 7."""
    yield [text]
    yield list(text)
    for size in (3, 7):
        yield [text[i:i + size] for i in range(0, len(text), size)]


def all_splits_agree(make, text):
    results = [run(make(), chunks) for chunks in splits(text)]
    assert all(r == results[0] for r in results), results
    return results[0]


QWEN3 = Family("hermes", thinks=True)


def qwen3_parser():
    return QWEN3.parser([WEATHER])


def test_qwen3_reasoning_and_answer_are_split_in_every_streaming_split():
    text = "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?"
    assert all_splits_agree(qwen3_parser, text) == ("\nThe user greets me.\n", "Hello! How can I help?", [])


def test_qwen3_tool_calls_after_reasoning_are_parsed():
    text = ('<think>\nI need the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
            '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>')
    reasoning, content, calls = all_splits_agree(qwen3_parser, text)
    assert reasoning == "\nI need the weather.\n"
    assert content == ""
    assert calls == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon"})]


def test_qwen3_with_thinking_off_is_all_content():
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>'
    reasoning, content, calls = all_splits_agree(qwen3_parser, text)
    assert (reasoning, content.strip(), calls) == ("", "Sure.", [("get_weather", {"city": "Rome"})])


@pytest.mark.parametrize("text", [
    '<tool_call>\n["not", "a", "call"]\n</tool_call>',
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call',
    '</think> stray closing tag <think>',
])
def test_malformed_qwen3_tool_calls_stay_content(text):
    reasoning, content, calls = all_splits_agree(qwen3_parser, text)
    assert calls == [] and reasoning == ""
    assert content == text


@pytest.mark.parametrize("text, arguments", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>', '{"city": \n'),  # closed early
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', '{"city": "Par'),  # cut off by max_tokens
])
def test_a_call_broken_after_its_header_stays_a_call_with_its_arguments_as_written(text, arguments):
    # once the header names a declared tool the call is committed (its arguments already streamed)
    results = {repr(r) for r in (run_raw(qwen3_parser(), chunks) for chunks in splits(text))}
    assert results == {repr(("", "", [("get_weather", arguments)]))}


def run_raw(parser, chunks):
    events = [e for c in chunks for e in parser.push(c)] + parser.finish()
    reply = Reply().add(events)
    return "".join(reply.reasoning), "".join(reply.content), [(c.name, c.arguments) for c in reply.calls]


def test_unterminated_tool_call_with_whole_json_is_a_call():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert all_splits_agree(qwen3_parser, text)[2] == [("get_weather", {"city": "Oslo"})]


def test_a_prompt_that_opens_the_think_block_starts_the_reply_in_reasoning():
    make = lambda: QWEN3.parser(None, prompt="<|im_start|>assistant\n<think>\n")  # noqa: E731
    assert all_splits_agree(make, "Hmm, a greeting.\n</think>\n\nHello!") == ("Hmm, a greeting.\n", "Hello!", [])


def test_unterminated_reasoning_is_reasoning():
    assert all_splits_agree(qwen3_parser, "<think>\nStill thinking about")[:2] == ("\nStill thinking about", "")


HARMONY = ("<|channel|>analysis<|message|>User wants weather. Call the tool.<|end|>"
           "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
           '{"city": "Tokyo"}')


def test_harmony_analysis_is_reasoning_and_a_commentary_call_is_a_tool_call():
    # the reply ended on <|call|>, a stop token the engine keeps out of the text
    assert all_splits_agree(lambda: HarmonyReply(tools=True), HARMONY) == (
        "User wants weather. Call the tool.", "", [("get_weather", {"city": "Tokyo"})])


def test_harmony_final_answer_is_content():
    text = "<|channel|>analysis<|message|>Simple.<|end|><|start|>assistant<|channel|>final<|message|>Hi there!"
    assert all_splits_agree(lambda: HarmonyReply(tools=True), text) == ("Simple.", "Hi there!", [])


@pytest.mark.parametrize("text", ["just text without any header", "<|channel|>final", "<|message|><|end|>x",
                                  "<|start|><|start|>assistant<|channel|>"])
def test_malformed_harmony_never_raises(text):
    reasoning, content, calls = all_splits_agree(lambda: HarmonyReply(tools=True), text)
    assert calls == []
    if "<|" not in text:
        assert content == text


def test_json_convention_whole_reply_object_is_a_call():
    make = lambda: Family("json", False).parser([WEATHER, TIME])  # noqa: E731
    text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert all_splits_agree(make, text) == ("", "", [("get_weather", {"city": "Paris"})])
    fenced = '```json\n[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]\n```'
    assert all_splits_agree(make, fenced)[2] == [("get_time", {}), ("get_weather", {"city": "Rome"})]


@pytest.mark.parametrize("text", [
    '{"name": "unknown_tool", "arguments": {}}',  # not offered: an answer that happens to be JSON
    '{"name": "Bob", "age": 3}',
    "The weather is sunny.",
    '[1, 2, 3]',
])
def test_json_convention_anything_else_is_content(text):
    assert all_splits_agree(lambda: JsonTools({"get_weather", "get_time"}), text) == ("", text, [])


def test_plain_text_streams_at_once_while_json_is_held():
    plain = JsonTools({"get_weather"})
    assert plain.push("Hello") and plain.push(" world")
    held = JsonTools({"get_weather"})
    assert held.push('  {"name"') == [] and held.push(': "x", "argu') == []


def test_hermes_tags_split_across_chunks_are_held_not_leaked():
    p = HermesTools()
    out = p.push("Hi <tool_")
    assert "".join(e.text for e in out) == "Hi"  # the blank before a tag waits: it goes if a call follows
    out = p.push('call>{"name": "f", "arguments": {}}</tool_call>')
    assert [e.call.name for e in out if e.kind == "call_start"] == ["f"]


def test_think_tag_split_across_chunks():
    p = Pipeline(ThinkSplitter())
    assert p.push("<th") == []
    events = p.push("ink>abc</thi") + p.push("nk>\n\nanswer") + p.finish()
    assert [(e.kind, e.text) for e in events] == [("reasoning", "abc"), ("content", "answer")]


# ---- prompt side ------------------------------------------------------------------------------------


def test_family_is_read_from_the_template():
    from rung.text.chat import ChatTemplate
    from rung.text.harmony import HarmonyTemplate
    from rung.text.templates import CHATML_TEMPLATE, QWEN3_TEMPLATE

    assert family_for("qwen3", ChatTemplate(QWEN3_TEMPLATE)) == Family("hermes", thinks=True)
    assert family_for("llama", ChatTemplate(CHATML_TEMPLATE)) == Family("json", thinks=False)
    assert family_for("gpt_oss", HarmonyTemplate()).name == "harmony"


def test_reasoning_effort_switches():
    assert QWEN3.template_kwargs("none", {}) == {"enable_thinking": False}
    assert QWEN3.template_kwargs("none", {"enable_thinking": True}) == {"enable_thinking": True}  # explicit wins
    assert not QWEN3.thinking({"enable_thinking": False}) and QWEN3.thinking({})
    assert Family("harmony", False).template_kwargs("high", {}) == {"reasoning_effort": "high"}
    assert Family("json", False).template_kwargs("high", {}) == {}


def test_tool_round_trip_renders_in_qwen3_template():
    from rung.text.chat import ChatTemplate
    from rung.text.templates import QWEN3_TEMPLATE

    messages = QWEN3.messages(ROUND_TRIP, [WEATHER])
    text = ChatTemplate(QWEN3_TEMPLATE).render(messages, tools=[WEATHER])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>" in text
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]  # the tools are described in the system turn


def test_tool_round_trip_renders_in_harmony():
    from rung.text.harmony import HarmonyTemplate

    messages = Family("harmony", False).messages(ROUND_TRIP, [WEATHER])
    text = HarmonyTemplate(current_date="2025-01-01").render(messages, tools=[WEATHER])
    # harmony renders the recipient after the role (the model often writes it after the channel)
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>'
            '{"city": "Paris"}<|call|>') in text
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 21}<|end|>' in text
    assert "type get_weather = (_: {" in text


def test_tool_round_trip_json_convention_renders_in_a_strict_alternating_template():
    from rung.text.chat import ChatTemplate
    from rung.text.templates import GEMMA3_TEMPLATE

    messages = Family("json", False).messages(ROUND_TRIP, [WEATHER])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert json.loads(messages[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert messages[3]["content"] == 'Result of tool get_weather: {"temp": 21}'
    assert "get_weather" in messages[0]["content"] and '"name": <tool name>' in messages[0]["content"]
    text = ChatTemplate(GEMMA3_TEMPLATE, bos_token="<bos>").render(messages)  # raises unless roles alternate
    assert "Result of tool get_weather" in text


ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]


@pytest.mark.parametrize("make, text", [
    (qwen3_parser, '<tool_call>\n{"name": "rm_rf", "arguments": {"path": "/"}}\n</tool_call>'),
    (lambda: HarmonyReply(names={"get_weather"}),
     '<|channel|>commentary to=functions.rm_rf <|constrain|>json<|message|>{"path": "/"}'),
    (lambda: JsonTools({"get_weather"}), '<|python_tag|>{"name": "rm_rf", "parameters": {"path": "/"}}'),
])
def test_a_call_to_a_tool_the_request_did_not_declare_is_content(make, text):
    reasoning, content, calls = all_splits_agree(make, text)
    assert calls == [] and '"/"' in content


def test_a_streamed_call_sends_its_arguments_in_pieces_that_add_up():
    parser = qwen3_parser()
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call>'
    events = [e for i in range(0, len(text), 4) for e in parser.push(text[i:i + 4])] + parser.finish()
    kinds = [e.kind for e in events]
    assert kinds[0] == "call_start" and kinds[-1] == "call_end" and kinds.count("call_args") > 3
    assert events[0].call.name == "get_weather" and events[0].call.id
    assert "".join(e.text for e in events if e.kind == "call_args") == '{"city": "Paris", "days": [1, 2]}'


def test_parsers_end_on_shuffled_tag_fragments_within_a_time_bound():
    # fragments of every format's tags and JSON, shuffled: each parser must end (no loop re-reading
    # what it held), never raise, and lose no call text it did not place
    from hostile import run_bounded

    code = """
import random
from rung.serve.family import Family
TOOLS = [{"type": "function", "function": {"name": "f"}}]
PARTS = ['<tool_call>', '</tool_call>', '<|python_tag|>', '```json\\n', '```', '<think>', '</think>', '{', '}', '[',
         ']', '"name"', '"f"', '"g"', ':', ',', ';', '"arguments"', '"parameters"', ' ', '\\n', '"', '\\\\', 'x',
         '<|channel|>', '<|message|>', '<|end|>', '<|start|>', 'commentary to=functions.f ', '<|call|>', 'analysis']
rng = random.Random(0)
for family in (Family("hermes", True), Family("json", False), Family("harmony", False)):
    for _ in range(300):
        text = "".join(rng.choice(PARTS) for _ in range(rng.randint(1, 40)))
        parser = family.parser(TOOLS)
        cut = rng.randint(0, len(text))
        events = parser.push(text[:cut]) + parser.push(text[cut:]) + parser.finish()
        assert all(e.kind in ("content", "reasoning", "call_start", "call_args", "call_end") for e in events)
print("ok")
"""
    assert run_bounded(code, seconds=60, catch=False).assert_ok().strip() == "ok"
