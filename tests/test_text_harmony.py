"""gpt-oss harmony: rendering equals docs/architectures-gpt-oss.md §8 exactly, parsing survives what
models emit (§12), round trips hold, and the model's own HF template differs only where §8.7 says."""

from __future__ import annotations

import json
import random
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import pytest

from rung.text import (ChatTemplate, HarmonyMessage, HarmonyStreamParser, HarmonyTemplate, IncrementalDetokenizer,
                       Tokenizer, chat_template_for, parse_harmony, render_harmony, to_chat_message)
from rung.text.harmony import json_schema_to_typescript, render_message
from rung.text.tokenizer import _GPT4O_SPLIT, bytes_to_unicode

GPT_OSS_TEMPLATE = (Path(__file__).parent / "fixtures" / "gpt_oss_chat_template.jinja").read_text()

# -- §8.4, verbatim --------------------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": "get_utc_time", "description": "Returns the current UTC time."}},
    {"type": "function", "function": {
        "name": "convert", "description": "Converts an amount between two currencies.",
        "parameters": {"type": "object", "properties": {
            "from": {"type": "string", "description": "ISO code to convert from"},
            "to": {"type": "string", "description": "ISO code to convert to"},
            "amount": {"type": "number"},
            "round": {"type": "boolean", "default": True}},
            "required": ["from", "to", "amount"]}}},
]
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "How much is 10 EUR in JPY?"}]

SECTION_8_4_PROMPT = """<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: 2025-08-05

Reasoning: low

# Valid channels: analysis, commentary, final. Channel must be included for every message.
Calls to these tools must go to the commentary channel: 'functions'.<|end|><|start|>developer<|message|># Instructions

Answer briefly.

# Tools

## functions

namespace functions {

// Returns the current UTC time.
type get_utc_time = () => any;

// Converts an amount between two currencies.
type convert = (_: {
// ISO code to convert from
from: string,
// ISO code to convert to
to: string,
amount: number,
round?: boolean, // default: true
}) => any;

} // namespace functions<|end|><|start|>user<|message|>How much is 10 EUR in JPY?<|end|><|start|>assistant"""

SECTION_8_4_REPLY = ('<|channel|>analysis<|message|>Need the convert tool.<|end|>'
                     '<|start|>assistant<|channel|>commentary to=functions.convert <|constrain|>json<|message|>'
                     '{"from":"EUR","to":"JPY","amount":10}<|call|>')
TOOL_RESULT = '<|start|>functions.convert to=assistant<|channel|>commentary<|message|>{"result":1712}<|end|>'

# §8.2: <|start|>{role}[ to={recipient}][<|channel|>{channel}][ {content_type}]<|message|>{content}{end}
GRAMMAR = re.compile(r"<\|start\|>(?P<role>[^\s<]+)(?: to=(?P<recipient>[^\s<]+))?"
                     r"(?:<\|channel\|>(?P<channel>[^\s<]+))?(?: (?P<ctype>(?:<\|constrain\|>)?[^\s<]+))?"
                     r"<\|message\|>(?P<content>.*?)(?P<end><\|end\|>|<\|call\|>|<\|return\|>)", re.S)


def assert_grammatical(prompt: str) -> list[re.Match]:
    """The whole prompt is a sequence of §8.2 messages (plus the `<|start|>assistant` suffix)."""
    body = prompt.removesuffix("<|start|>assistant")
    matches = list(GRAMMAR.finditer(body))
    assert "".join(m.group(0) for m in matches) == body
    for m in matches:
        assert (m["end"] == "<|call|>") == (m["role"] == "assistant" and m["recipient"] is not None)
        if m["role"] == "assistant":
            assert m["channel"] in ("analysis", "commentary", "final")
    return matches


def test_render_matches_section_8_4_prompt():
    rendered = render_harmony(CHAT, tools=TOOLS, reasoning_effort="low", current_date="2025-08-05")
    assert rendered == SECTION_8_4_PROMPT
    roles = [m["role"] for m in assert_grammatical(rendered)]
    assert roles == ["system", "developer", "user"]


def test_render_system_message_defaults():
    rendered = render_harmony([{"role": "user", "content": "Hi"}])
    assert rendered == ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                        "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n"
                        "# Valid channels: analysis, commentary, final. Channel must be included for every message."
                        "<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant")
    assert render_harmony([{"role": "user", "content": "Hi"}], developer_instructions="Be nice.").count(
        "<|start|>developer<|message|># Instructions\n\nBe nice.<|end|>") == 1
    with pytest.raises(ValueError, match="reasoning_effort"):
        render_harmony([], reasoning_effort="extreme")


def test_parse_section_8_4_reply():
    analysis, call = parse_harmony(SECTION_8_4_REPLY)
    assert analysis == HarmonyMessage("assistant", "Need the convert tool.", channel="analysis")
    assert call == HarmonyMessage("assistant", '{"from":"EUR","to":"JPY","amount":10}', channel="commentary",
                                  recipient="functions.convert", content_type="<|constrain|>json")
    assert (analysis.end, call.end, call.function_name) == ("<|end|>", "<|call|>", "convert")
    reply = to_chat_message([analysis, call])
    assert reply["reasoning_content"] == "Need the convert tool." and reply["content"] is None
    arguments = '{"from":"EUR","to":"JPY","amount":10}'
    assert reply["tool_calls"][0]["function"] == {"name": "convert", "arguments": arguments}


def test_tool_round_trip_matches_section_8_4():
    """Append the call (its analysis kept: the tool turn is unfinished), the tool result, and
    `<|start|>assistant` again."""
    reply = to_chat_message(parse_harmony(SECTION_8_4_REPLY))
    chat = CHAT + [reply, {"role": "tool", "name": "convert", "content": '{"result":1712}'}]
    rendered = render_harmony(chat, tools=TOOLS, reasoning_effort="low", current_date="2025-08-05")
    expected_tail = ('<|start|>assistant<|channel|>analysis<|message|>Need the convert tool.<|end|>'
                     '<|start|>assistant to=functions.convert<|channel|>commentary <|constrain|>json<|message|>'
                     '{"from":"EUR","to":"JPY","amount":10}<|call|>' + TOOL_RESULT + "<|start|>assistant")
    assert rendered == SECTION_8_4_PROMPT.removesuffix("<|start|>assistant") + expected_tail
    assert_grammatical(rendered)
    # a tool message may also leave out the name: it answers the last call
    assert render_harmony(chat[:-1] + [{"role": "tool", "content": '{"result":1712}'}], tools=TOOLS,
                          reasoning_effort="low", current_date="2025-08-05") == rendered


def test_final_answer_drops_the_finished_turns_analysis():
    """§8.5: once a turn ends with `final`, its analysis is dropped; a later unfinished tool turn keeps its own."""
    done = [{"role": "user", "content": "Q1"},
            {"role": "assistant", "thinking": "think 1", "content": "A1"},
            {"role": "user", "content": "Q2"}]
    rendered = render_harmony(done)
    assert "think 1" not in rendered and "<|channel|>final<|message|>A1<|end|>" in rendered
    pending = done + [{"role": "assistant", "thinking": "think 2",
                       "tool_calls": [{"function": {"name": "convert", "arguments": {"amount": 1}}}]},
                      {"role": "tool", "content": "ok"}]
    rendered = render_harmony(pending, tools=TOOLS)
    assert "think 1" not in rendered and "<|start|>assistant<|channel|>analysis<|message|>think 2<|end|>" in rendered
    assert_grammatical(rendered)
    # and once that turn ends with a final answer, its analysis goes too
    finished = pending + [{"role": "assistant", "content": "A2"}, {"role": "user", "content": "Q3"}]
    rendered = render_harmony(finished, tools=TOOLS)
    assert "think" not in rendered and '<|constrain|>json<|message|>{"amount":1}<|call|>' in rendered


CANONICAL_CALL = ('<|start|>assistant to=functions.convert<|channel|>commentary <|constrain|>json<|message|>'
                  '{"from":"EUR","to":"JPY","amount":10}<|call|>')


def test_parse_and_render_round_trip():
    """Rendered text parses back to messages that render to the same text. (The model's own form of
    the call, recipient after the channel, parses to the same message and renders canonically.)"""
    assert parse_harmony(SECTION_8_4_REPLY)[1] == parse_harmony(CANONICAL_CALL, role=None)[0]
    conversation = (SECTION_8_4_PROMPT.removesuffix("<|start|>assistant")
                    + "<|start|>assistant<|channel|>analysis<|message|>Need the convert tool.<|end|>"
                    + CANONICAL_CALL + TOOL_RESULT
                    + "<|start|>assistant<|channel|>commentary<|message|>Checking rates…<|end|>"
                    "<|start|>assistant<|channel|>final<|message|>10 EUR ≈ 1712 JPY. 😀<|end|>")
    messages = parse_harmony(conversation, role=None)
    assert [(m.role, m.name, m.channel, m.recipient) for m in messages] == [
        ("system", None, None, None), ("developer", None, None, None), ("user", None, None, None),
        ("assistant", None, "analysis", None), ("assistant", None, "commentary", "functions.convert"),
        ("tool", "functions.convert", "commentary", "assistant"), ("assistant", None, "commentary", None),
        ("assistant", None, "final", None)]
    assert "".join(render_message(m) for m in messages) == conversation
    assert parse_harmony(conversation) == messages  # a leading <|start|> works with the default role too


def test_render_parse_round_trip_of_chat_messages():
    chat = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "thinking": "call it", "content": "One moment.",
             "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}]
    rendered = render_harmony(chat, add_generation_prompt=False)
    reply = rendered[rendered.index("<|start|>assistant") + len("<|start|>assistant"):]
    back = to_chat_message(parse_harmony(reply))
    assert back["reasoning_content"] == "call it" and back["content"] == "One moment."
    assert back["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}


# -- parsing what models emit (§8.6, §12) ----------------------------------------------------------------------


@pytest.mark.parametrize("reply, expected", [
    # recipient after the channel (how the model often writes it)
    ('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>',
     dict(channel="commentary", recipient="functions.f", content_type="<|constrain|>json", content="{}")),
    # recipient after the role, <|constrain|> glued to the recipient
    ('assistant to=functions.f<|channel|>commentary<|constrain|>json<|message|>{"a":1}<|call|>',
     dict(channel="commentary", recipient="functions.f", content_type="<|constrain|>json", content='{"a":1}')),
    # glued after the channel's recipient, plain `json` content type (HF's template)
    ('<|channel|>commentary to=functions.f<|constrain|>json<|message|>{}<|call|>',
     dict(channel="commentary", recipient="functions.f", content_type="<|constrain|>json")),
    ('<|channel|>commentary to=functions.f json<|message|>{}<|call|>',
     dict(channel="commentary", recipient="functions.f", content_type="json")),
    # a function call on the analysis channel
    ('<|channel|>analysis to=functions.lookup code<|message|>{"q":"x"}<|call|>',
     dict(channel="analysis", recipient="functions.lookup", content_type="code")),
    # the model stopped before <|message|>
    ("<|channel|>final<|return|>", dict(channel="final", content="")),
    # no channel at all: plain text
    ("Just text, no markers.", dict(channel=None, content="Just text, no markers.")),
    ("Hello<|return|>", dict(channel=None, content="Hello")),
    # cut off in the middle of the content
    ("<|channel|>final<|message|>The answer is", dict(channel="final", content="The answer is")),
])
def test_parser_tolerates_what_models_emit(reply, expected):
    message = parse_harmony(reply)[-1]
    for key, value in expected.items():
        assert getattr(message, key) == value, key


def test_function_call_on_analysis_is_still_a_tool_call():
    messages = parse_harmony('<|channel|>analysis to=functions.lookup <|constrain|>json<|message|>{"q":1}<|call|>')
    assert to_chat_message(messages)["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"q":1}'}


def test_missing_start_between_messages():
    messages = parse_harmony("<|channel|>analysis<|message|>hm<|end|><|channel|>final<|message|>Yes.<|return|>")
    assert [(m.channel, m.content) for m in messages] == [("analysis", "hm"), ("final", "Yes.")]
    messages = parse_harmony("<|channel|>analysis<|message|>hm<|channel|>final<|message|>Yes.")
    assert [(m.channel, m.content, m.end) for m in messages] == [("analysis", "hm", None), ("final", "Yes.", None)]


def test_text_outside_messages_becomes_plain_content():
    messages = parse_harmony("<|channel|>final<|message|>A<|end|> stray text "
                             "<|start|>assistant<|channel|>final<|message|>B")
    assert [(m.channel, m.content) for m in messages] == [("final", "A"), (None, " stray text "), ("final", "B")]
    assert to_chat_message(messages)["content"] == "AB"


def chunkings(text: str, seed: int):
    rng = random.Random(seed)
    yield [text]
    yield list(text)  # one character at a time: every marker split
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("text", [SECTION_8_4_REPLY, "<|channel|>final<|message|>a < b <| c <|en d<|end|>",
                                  "<|channel|>commentary to=functions.f<|constrain|>json<|message|>{}<|call|>",
                                  "Plain <start> text"])
def test_streaming_equals_one_shot_parsing_for_any_chunking(text):
    expected = parse_harmony(text)
    for seed, chunks in enumerate(chunkings(text, 0)):
        parser = HarmonyStreamParser()
        events = [e for chunk in chunks for e in parser.push(chunk)] + parser.finish()
        assert parser.messages == expected, chunks
        ends = [e.message for e in events if e.kind == "end"]
        assert ends == expected
        for message in expected:  # deltas of each message concatenate to its content
            deltas = "".join(e.delta for e in events if e.kind == "delta" and e.channel == message.channel
                             and e.recipient == message.recipient)
            assert message.content in deltas


def test_streaming_events_carry_channel_and_recipient_before_content():
    parser = HarmonyStreamParser()
    events = parser.push('<|channel|>commentary to=functions.convert <|constrain|>json<|message|>{"a"')
    assert [e.kind for e in events] == ["start", "delta"]
    assert (events[0].channel, events[0].recipient, events[0].content_type) == (
        "commentary", "functions.convert", "<|constrain|>json")
    assert events[1].delta == '{"a"'
    events = parser.push(":1}<|call|>")
    assert [e.kind for e in events] == ["delta", "end"] and events[-1].message.content == '{"a":1}'


def test_parser_never_raises_on_garbage():
    rng = random.Random(3)
    pieces = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "<|constrain|>",
              "assistant", "user", "to=functions.f", " ", "final", "analysis", "json", "{}", "<", "|", "日本", "\n",
              "<|st"]
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        for role in ("assistant", None):
            messages = parse_harmony(text, role=role)
            assert all(isinstance(m, HarmonyMessage) for m in messages)
            to_chat_message(messages)


# -- the model's own chat template (HF), §8.7 ----------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "integer", "description": "Forecast days"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "note": {"type": "string", "nullable": True}},
        "required": ["city"]}}}


def test_render_matches_the_hf_template_up_to_the_documented_differences():
    """§8.7's differences, undone one by one on the HF rendering: tool-call content type as plain
    `json` (harmony: `<|constrain|>json`), arguments through tojson (harmony: as given, compact),
    tool results JSON-quoted, and a comma after `// default: ...`. Everything else is identical."""
    arguments = {"city": "Paris", "days": 2}
    chat = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Sunny.", "thinking": "dropped: the turn ended"},
            {"role": "user", "content": "And tomorrow?"},
            {"role": "assistant", "thinking": "Need the tool.",
             "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "content": '{"temp": 19, "sky": "cloudy"}'}]
    tools = [WEATHER, TOOLS[0], TOOLS[1]]
    hf = ChatTemplate(GPT_OSS_TEMPLATE, now=lambda: datetime(2025, 8, 5)).render(
        chat, tools=tools, reasoning_effort="high")
    hf = hf.replace("<|channel|>commentary json<|message|>", "<|channel|>commentary <|constrain|>json<|message|>")
    hf = hf.replace(json.dumps(arguments), json.dumps(arguments, separators=(",", ":")))
    hf = hf.replace(json.dumps(chat[-1]["content"]), chat[-1]["content"])
    hf = re.sub(r"(// default: [^\n]*),\n", r"\1\n", hf)
    ours = render_harmony(chat, tools=tools, reasoning_effort="high", current_date="2025-08-05")
    assert ours == hf
    assert "dropped" not in ours and "Need the tool." in ours
    assert_grammatical(ours)


def test_typescript_rendering_of_schemas():
    schema = {"type": "object", "properties": {
        "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        "name": {"type": "string", "default": "x", "title": "Name"},
        "n": {"type": ["integer", "string"]},
        "items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}},
                                             "required": ["id"]}},
        "any": {},
        "list": {"type": "array"},
        "opt": {"type": "number", "nullable": True, "examples": ["1", "2"]},
        "pick": {"description": "One of", "oneOf": [{"type": "string"}, {"type": "integer", "default": 3}]}},
        "required": ["unit"]}
    assert json_schema_to_typescript(schema) == (
        '{\n'
        'unit: "c" | "f", // default: c\n'
        '// Name\n//\nname?: string, // default: "x"\n'
        'n?: number | string,\n'
        'items?: {\n    id: number,\n    }[],\n'
        'any?: any,\n'
        'list?: Array<any>,\n'
        '// Examples:\n// - "1"\n// - "2"\nopt?: number | null,\n'
        '// One of\npick?:\n | string\n | number // default: 3\n,\n'
        '}')


# -- a gpt-oss folder: its tokenizer.json with harmony's special tokens ---------------------------------------------

HARMONY_SPECIALS = {199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
                    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>",
                    200012: "<|call|>", 200018: "<|endofprompt|>"}


@lru_cache(maxsize=None)
def gpt_oss_tokenizer_json() -> str:
    """tokenizer.json laid out like gpt-oss's o200k_harmony: 199,998 BPE ids (the byte alphabet, a few
    merges, then fillers), then special ids 199,998-201,087 with the harmony tokens at their real ids."""
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from tokenizers import Regex, Tokenizer as Backend
    from tokenizers.models import BPE

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab.update({f"filler{i}": i for i in range(len(vocab), 199998)})
    backend = Backend(BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_GPT4O_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(HARMONY_SPECIALS.get(i, f"<|reserved_{i}|>"), special=True)
                                for i in range(199998, 201088)])
    return backend.to_str()


@pytest.fixture(scope="module")
def gpt_oss_folder(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gpt-oss")
    (tmp_path / "tokenizer.json").write_text(gpt_oss_tokenizer_json())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}))
    (tmp_path / "chat_template.jinja").write_text(GPT_OSS_TEMPLATE)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    return tmp_path


def test_gpt_oss_folder_tokenizer(gpt_oss_folder):
    tokenizer = Tokenizer.from_hf_folder(gpt_oss_folder)
    assert tokenizer.vocab_size == 201088
    assert tokenizer.eos_token_ids == {200002, 199999, 200012}  # <|end|> (200007) ends a message, not the reply
    assert tokenizer.bos_token_id == 199998 and tokenizer.encode("the")[0] != 199998  # BOS not prepended
    assert tokenizer.chat_template == GPT_OSS_TEMPLATE
    template = chat_template_for(tokenizer)
    assert isinstance(template, HarmonyTemplate)  # rung renders harmony itself

    prompt = render_harmony(CHAT, tools=TOOLS, reasoning_effort="low", current_date="2025-08-05")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert tokenizer.decode(ids) == prompt
    assert ids[0] == 200006 and tokenizer.decode(ids[1:ids.index(200008)]) == "system"
    assert ids.count(200006) == prompt.count("<|start|>") and ids.count(200007) == prompt.count("<|end|>")
    assert tokenizer.encode_chat(CHAT, tools=TOOLS, reasoning_effort="low", current_date="2025-08-05") == ids


def test_streaming_a_gpt_oss_reply_token_by_token(gpt_oss_folder):
    tokenizer = Tokenizer.from_hf_folder(gpt_oss_folder)
    reply = SECTION_8_4_REPLY.replace("Need the convert tool.", "Need the convert tool 😀 日本.")
    ids = tokenizer.encode(reply, add_special_tokens=False)
    assert ids[-1] == 200012 and 200003 in ids  # <|call|>, <|constrain|>
    detok, parser, events = IncrementalDetokenizer(tokenizer), HarmonyStreamParser(), []
    for token_id in ids:
        events += parser.push(detok.push(token_id))
        if token_id in tokenizer.eos_token_ids:
            break
    events += parser.push(detok.flush()) + parser.finish()
    assert parser.messages == parse_harmony(reply)
    assert [e.kind for e in events if e.kind != "delta"] == ["start", "end", "start", "end"]
    analysis = "".join(e.delta for e in events if e.kind == "delta" and e.channel == "analysis")
    assert analysis == "Need the convert tool 😀 日本."
