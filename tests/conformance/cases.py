"""The tool-call and reasoning conformance table: crafted model outputs, per format, and what a
client must get from each (reasoning, content, calls with their arguments byte for byte).

One table for every runner: the streaming parser (whole, and split at every byte), chat completions
(whole and streamed); a Responses runner plugs in by iterating ``CASES`` the same way
(``expected_message`` is the chat view; ``Case.calls`` / ``.content`` / ``.reasoning`` the neutral one).

Each format's file (test_qwen3.py, test_harmony.py, ...) runs its rows. ``content`` is what the
parser emits (before the chat response trims the content of a reply that calls tools).
"""

from __future__ import annotations

from dataclasses import dataclass

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
    "query": {"type": "string"}, "filters": {"type": "object"}, "limit": {"type": "integer"}}}}}
TOOLS = [WEATHER, TIME, SEARCH]  # what every case declares; "delete_everything" is never declared

# arguments reused across formats, exactly as the model writes them
PARIS = '{"city": "Paris"}'
NESTED = '{"query": "rung", "filters": {"tags": ["a", "b"], "range": {"from": 1, "to": [2, {"x": null}]}}, "limit": 3}'
UNICODE = '{"city": "Zürich 東京 🚀", "note": "a \\"quote\\", \\u00e9 and a } brace"}'


@dataclass(frozen=True)
class Case:
    id: str
    output: str  # the model's decoded reply (special tokens kept where the format needs them)
    calls: tuple[tuple[str, str], ...] = ()  # (name, arguments exactly as streamed)
    content: str = ""
    reasoning: str = ""
    forced: bool = False  # also run with tool_choice "required" (the grammar-forced path)
    one_piece: bool = False  # the arguments cannot stream (a JSON string, the name after them): one piece


def qwen3_call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def harmony_call(name: str, arguments: str, end: str = "<|call|>") -> str:
    return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{arguments}{end}"


def json_call(name: str, arguments: str, key: str = "arguments") -> str:
    return f'{{"name": "{name}", "{key}": {arguments}}}'


QWEN3 = [
    Case("one_call", qwen3_call("get_weather", PARIS), (("get_weather", PARIS),), forced=True),
    Case("parallel_calls", qwen3_call("get_weather", PARIS) + "\n" + qwen3_call("get_time", "{}"),
         (("get_weather", PARIS), ("get_time", "{}"))),
    Case("nested_arguments", qwen3_call("search", NESTED), (("search", NESTED),), forced=True),
    Case("unicode_arguments", qwen3_call("get_weather", UNICODE), (("get_weather", UNICODE),)),
    Case("call_inside_prose", "Let me check that.\n" + qwen3_call("get_weather", PARIS) + "\nOne moment.",
         (("get_weather", PARIS),), content="Let me check that.\nOne moment."),
    Case("think_ends_right_before_call", "<think>\nI need the weather.\n</think>" + qwen3_call("get_weather", PARIS),
         (("get_weather", PARIS),), reasoning="\nI need the weather.\n"),
    Case("think_then_blank_then_calls", "<think>\nTwo cities.\n</think>\n\n" + qwen3_call("get_weather", PARIS)
         + "\n" + qwen3_call("get_weather", '{"city": "Lyon"}'),
         (("get_weather", PARIS), ("get_weather", '{"city": "Lyon"}')), reasoning="\nTwo cities.\n"),
    Case("arguments_as_a_json_string", '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}'
         '\n</tool_call>', (("get_weather", '{"city": "Rome"}'),), one_piece=True),
    Case("name_after_arguments", '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>',
         (("get_weather", '{"city": "Oslo"}'),), one_piece=True),
    Case("malformed_json_before_the_header", '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>',
         content='<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>'),
    Case("malformed_json_no_name", '<tool_call>\n{"arguments": {"city": "Oslo"}}\n</tool_call>',
         content='<tool_call>\n{"arguments": {"city": "Oslo"}}\n</tool_call>'),
    Case("json_broken_after_the_header",
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>',
         (("get_weather", '{"city": "Paris"\n'),)),
    Case("undeclared_tool", "Sure.\n" + qwen3_call("delete_everything", "{}"),
         content="Sure.\n" + qwen3_call("delete_everything", "{}")),
    Case("undeclared_beside_declared", qwen3_call("delete_everything", '{"all": true}') + "\n"
         + qwen3_call("get_weather", PARIS), (("get_weather", PARIS),),
         content=qwen3_call("delete_everything", '{"all": true}')),
    Case("plain_answer", "Hello! How can I help?", content="Hello! How can I help?"),
]

HARMONY = [
    Case("one_call", harmony_call("get_weather", PARIS), (("get_weather", PARIS),), forced=True),
    Case("call_cut_at_its_stop_token", harmony_call("get_weather", PARIS, end=""), (("get_weather", PARIS),)),
    Case("analysis_ends_right_before_call", "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
         + harmony_call("get_weather", PARIS), (("get_weather", PARIS),), reasoning="Need the weather."),
    Case("parallel_calls", harmony_call("get_weather", PARIS, "<|end|>") + "<|start|>assistant"
         + harmony_call("get_time", "{}"), (("get_weather", PARIS), ("get_time", "{}"))),
    Case("nested_arguments", harmony_call("search", NESTED), (("search", NESTED),), forced=True),
    Case("unicode_arguments", harmony_call("get_weather", UNICODE), (("get_weather", UNICODE),)),
    Case("call_inside_prose", "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant"
         + harmony_call("get_weather", PARIS), (("get_weather", PARIS),), content="Let me check."),
    Case("recipient_before_channel", "<|start|>assistant to=functions.get_weather<|channel|>commentary "
         '<|constrain|>json<|message|>{"city": "Oslo"}<|call|>', (("get_weather", '{"city": "Oslo"}'),)),
    Case("final_answer", "<|channel|>analysis<|message|>Simple.<|end|><|start|>assistant<|channel|>final<|message|>"
         "Hi there!<|return|>", content="Hi there!", reasoning="Simple."),
    # harmony frames a call by its message, not by JSON: the arguments are the message's text as written
    Case("malformed_json", harmony_call("get_weather", '{"city": Paris'), (("get_weather", '{"city": Paris'),)),
    Case("undeclared_tool", harmony_call("delete_everything", '{"all": true}'), content='{"all": true}'),
]

LLAMA3 = [
    Case("plain_json", json_call("get_weather", PARIS, "parameters"), (("get_weather", PARIS),), forced=True),
    Case("python_tag", "<|python_tag|>" + json_call("get_weather", PARIS, "parameters"), (("get_weather", PARIS),)),
    Case("parallel_calls_semicolon", "<|python_tag|>" + json_call("get_weather", PARIS, "parameters") + "; "
         + json_call("get_time", "{}", "parameters"), (("get_weather", PARIS), ("get_time", "{}"))),
    Case("nested_arguments", json_call("search", NESTED, "parameters"), (("search", NESTED),)),
    Case("unicode_arguments", "<|python_tag|>" + json_call("get_weather", UNICODE, "parameters"),
         (("get_weather", UNICODE),)),
    Case("call_inside_prose", "Let me look that up. <|python_tag|>" + json_call("get_weather", PARIS, "parameters"),
         (("get_weather", PARIS),), content="Let me look that up. "),
    Case("malformed_json", "<|python_tag|>{name: get_weather, parameters: {}}",
         content="<|python_tag|>{name: get_weather, parameters: {}}"),
    Case("undeclared_tool", "<|python_tag|>" + json_call("delete_everything", "{}", "parameters"),
         content="<|python_tag|>" + json_call("delete_everything", "{}", "parameters")),
    Case("json_answer_not_a_call", '{"answer": 42}', content='{"answer": 42}'),
    Case("plain_answer", "It is sunny in Paris.", content="It is sunny in Paris."),
]

GEMMA3 = [
    Case("fenced_call", "```json\n" + json_call("get_weather", PARIS) + "\n```", (("get_weather", PARIS),)),
    Case("plain_call", json_call("get_weather", PARIS), (("get_weather", PARIS),), forced=True),
    Case("parallel_calls_list", "```json\n[" + json_call("get_weather", PARIS) + ", " + json_call("get_time", "{}")
         + "]\n```", (("get_weather", PARIS), ("get_time", "{}"))),
    Case("nested_arguments", json_call("search", NESTED), (("search", NESTED),)),
    Case("unicode_arguments", json_call("get_weather", UNICODE), (("get_weather", UNICODE),)),
    # the JSON convention is a reply that is only calls: a call written inside prose is prose
    Case("call_inside_prose", "I would call " + json_call("get_weather", PARIS) + " now.",
         content="I would call " + json_call("get_weather", PARIS) + " now."),
    Case("malformed_json", '```json\n{"name": "get_weather" "arguments": {}}\n```',
         content='```json\n{"name": "get_weather" "arguments": {}}\n```'),
    Case("undeclared_tool", json_call("delete_everything", "{}"), content=json_call("delete_everything", "{}")),
    Case("plain_answer", "The weather is fine.", content="The weather is fine."),
]

SMOLLM2 = [
    Case("one_call", json_call("get_weather", PARIS), (("get_weather", PARIS),), forced=True),
    Case("leading_blank", "\n  " + json_call("get_weather", PARIS) + "\n", (("get_weather", PARIS),)),
    Case("parallel_calls_list", "[" + json_call("get_weather", PARIS) + ",\n " + json_call("get_time", "{}") + "]",
         (("get_weather", PARIS), ("get_time", "{}"))),
    Case("nested_arguments", json_call("search", NESTED), (("search", NESTED),), forced=True),
    Case("unicode_arguments", json_call("get_weather", UNICODE), (("get_weather", UNICODE),)),
    Case("arguments_before_name", '{"arguments": {"city": "Oslo"}, "name": "get_weather"}',
         (("get_weather", '{"city": "Oslo"}'),), one_piece=True),
    Case("call_inside_prose", "Sure: " + json_call("get_weather", PARIS),
         content="Sure: " + json_call("get_weather", PARIS)),
    Case("malformed_json", '{"name": "get_weather", "arguments": {"city": "Paris"}} trailing',
         (("get_weather", PARIS),), content=" trailing"),
    Case("not_json_at_all", '{name: "get_weather"}', content='{name: "get_weather"}'),
    Case("undeclared_tool", json_call("delete_everything", '{"all": true}'),
         content=json_call("delete_everything", '{"all": true}')),
    Case("json_answer_not_a_call", '[1, 2, 3]', content='[1, 2, 3]'),
]

CASES = {"qwen3": QWEN3, "harmony": HARMONY, "llama3": LLAMA3, "gemma3": GEMMA3, "smollm2": SMOLLM2}


def expected_message(case: Case) -> dict:
    """The chat completion's message for a case: content trimmed (None when empty) beside calls."""
    content = case.content.strip() if case.calls else case.content
    return {"content": content or (None if case.calls else ""),
            "reasoning_content": case.reasoning or None,
            "tool_calls": [(name, args) for name, args in case.calls] or None,
            "finish_reason": "tool_calls" if case.calls else "stop"}
