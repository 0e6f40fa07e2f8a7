"""Runners of the conformance table (cases.py): the streaming parser, whole and split at every byte
boundary; and the real chat endpoint (app, Server, Run, the format's template and family) of a server
whose engine replies with a case's scripted text, in small deltas. No model is loaded: the server
holds a real tokenizer (for the template's prompt and the grammar of forced calls) and a scripted
engine in its place.

A Responses runner takes the same ``scripted_server`` and the same rows (``CASES``)."""

from __future__ import annotations

import codecs
import functools
import json
from types import SimpleNamespace

from rung.engine.engine import Delta
from rung.serve.family import Family, family_for
from rung.serve.tools import Reply

from cases import TOOLS, Case, expected_message

# a Llama 3.x chat layout (the template's tool rendering is not what is tested here)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def template_for(fmt: str):
    from rung.text.chat import ChatTemplate
    from rung.text.harmony import HarmonyTemplate
    from rung.text.templates import CHATML_TEMPLATE, GEMMA3_TEMPLATE, QWEN3_TEMPLATE

    return {"qwen3": lambda: ChatTemplate(QWEN3_TEMPLATE),
            "harmony": lambda: HarmonyTemplate(current_date="2026-01-01"),
            "llama3": lambda: ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>"),
            "gemma3": lambda: ChatTemplate(GEMMA3_TEMPLATE, bos_token="<bos>"),
            "smollm2": lambda: ChatTemplate(CHATML_TEMPLATE)}[fmt]()


MODEL_TYPES = {"qwen3": "qwen3", "harmony": "gpt_oss", "llama3": "llama", "gemma3": "gemma3_text", "smollm2": "llama"}


@functools.lru_cache(maxsize=None)
def family(fmt: str) -> Family:
    """The family the server picks for the format's template (its real detection)."""
    return family_for(MODEL_TYPES[fmt], template_for(fmt))


# ---- the parser ------------------------------------------------------------------------------------


def parse(fmt: str, chunks: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
    """(reasoning, content, [(name, arguments)]) of a reply fed in ``chunks``; the arguments are the
    concatenation of the call's streamed pieces, which must equal ``call.arguments`` at its end."""
    parser = family(fmt).parser(TOOLS)
    events = [e for c in chunks for e in parser.push(c)] + parser.finish()
    pieces: dict[int, list[str]] = {}
    order: list = []
    for e in events:
        if e.kind == "call_start":
            assert all(e.call is not c for c in order), "a call started twice"
            order.append(e.call)
            pieces[id(e.call)] = []
        elif e.kind == "call_args":
            assert order and e.call is order[-1], "argument pieces of a call that is not the open one"
            pieces[id(e.call)].append(e.text)
    reply = Reply().add(events)
    for call in reply.calls:
        assert "".join(pieces[id(call)]) == call.arguments, "streamed pieces differ from the call's arguments"
    return ("".join(reply.reasoning), "".join(reply.content),
            [(c.name, "".join(pieces[id(c)])) for c in reply.calls])


def byte_splits(text: str):
    """The text cut in two at every byte boundary, each half decoded as a detokenizer streams UTF-8
    (a character cut in two waits for its last byte)."""
    data = text.encode("utf-8")
    for at in range(len(data) + 1):
        decoder = codecs.getincrementaldecoder("utf-8")()
        yield [decoder.decode(data[:at]), decoder.decode(data[at:], final=True)]


def check_parser(fmt: str, case: Case) -> None:
    want = (case.reasoning, case.content, list(case.calls))
    assert parse(fmt, [case.output]) == want
    assert parse(fmt, list(case.output)) == want  # one character at a time
    for chunks in byte_splits(case.output):
        assert parse(fmt, chunks) == want, f"split {chunks!r}"


# ---- the chat endpoint -------------------------------------------------------------------------------


class ScriptedEngine:
    """Stands in for the engine: every request's reply is ``script``, sent in deltas of ``piece`` characters."""

    def __init__(self, server, piece: int = 3):
        self.script, self.piece, self.requests = "", piece, []
        self.error = None
        server.generate = self.generate
        server.engine = self

    async def generate(self, prepared, request_id):
        self.requests.append(prepared)
        text = self.script
        parts = [text[i:i + self.piece] for i in range(0, len(text), self.piece)] or [""]
        for j in range(prepared.params.n):
            for k, part in enumerate(parts):
                yield Delta(request_id, j, part, [0], finish_reason="stop" if k == len(parts) - 1 else None)

    def stats(self) -> dict:
        return {}

    def shutdown(self) -> None:
        pass


def scripted_server(fmt: str):
    """(TestClient, ScriptedEngine) of a real app serving ``fmt``'s template and family."""
    from starlette.testclient import TestClient

    from rung.serve.app import create_app
    from rung.serve.server import ServeConfig, Server

    from test_serve_structured import make_chat_vocab

    tokenizer, grammars = make_chat_vocab()
    server = Server(ServeConfig(model=fmt, served_model_name="scripted"))
    server.llm = SimpleNamespace(tokenizer=tokenizer, max_model_len=8192, config=SimpleNamespace(
        vocab_size=tokenizer.vocab_size, model_type=MODEL_TYPES[fmt]),
        engine=SimpleNamespace(pool=SimpleNamespace(block_size=16, num_blocks=4096, groups=[0])))
    server.template = template_for(fmt)
    server.family = family_for(MODEL_TYPES[fmt], server.template)
    server.grammars = grammars
    engine = ScriptedEngine(server)
    server.loaded.set()
    return TestClient(create_app(server)), engine


def chat_body(case: Case, stream: bool, forced: bool = False) -> dict:
    return {"model": "scripted", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS,
            "tool_choice": "required" if forced else "auto", "max_tokens": 500, "stream": stream}


def check_chat_whole(client, engine, case: Case, forced: bool = False) -> None:
    engine.script = case.output
    r = client.post("/v1/chat/completions", json=chat_body(case, False, forced))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    message = choice["message"]
    got = {"content": message["content"], "reasoning_content": message.get("reasoning_content"),
           "tool_calls": [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
           if message.get("tool_calls") else None, "finish_reason": choice["finish_reason"]}
    assert got == expected_message(case)
    assert all(c["id"] and c["type"] == "function" for c in message.get("tool_calls") or [])


def stream_events(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def check_chat_streamed(client, engine, case: Case, forced: bool = False) -> None:
    """The streamed deltas add up to the whole reply; a call's first delta has its index, id, type
    and name, the next ones only argument pieces; a call whose arguments are longer than one engine
    delta arrives in more than one piece."""
    engine.script = case.output
    chunks = stream_events(client, chat_body(case, True, forced))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    calls: dict[int, dict] = {}
    pieces: dict[int, int] = {}
    for d in deltas:
        for tc in d.get("tool_calls") or []:
            i = tc["index"]
            if i not in calls:
                assert tc["id"] and tc["type"] == "function" and tc["function"]["name"], tc
                assert tc["function"]["arguments"] == "", "the first delta carries no arguments yet"
                calls[i] = {"name": tc["function"]["name"], "arguments": ""}
                pieces[i] = 0
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}, tc
                calls[i]["arguments"] += tc["function"]["arguments"]
                pieces[i] += 1
    assert sorted(calls) == list(range(len(calls)))
    want = expected_message(case)
    got_calls = [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] or None
    assert got_calls == want["tool_calls"]
    assert (content.strip() if case.calls else content) == (want["content"] or "")
    assert (reasoning or None) == want["reasoning_content"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == [want["finish_reason"]]
    for i, (name, arguments) in enumerate(case.calls):
        if len(arguments) > 2 * engine.piece and not case.one_piece:
            assert pieces[i] > 1, f"call {i}'s arguments came in {pieces[i]} piece(s)"


# ---- the Responses endpoint ----------------------------------------------------------------------


def responses_body(case: Case, stream: bool, forced: bool = False) -> dict:
    tools = [{"type": "function", **t["function"]} for t in TOOLS]  # Responses' flat tool shape
    return {"model": "scripted", "input": "Weather in Paris?", "tools": tools,
            "tool_choice": "required" if forced else "auto", "max_output_tokens": 500, "stream": stream}


def _items_view(output: list[dict]) -> tuple[str, str, list[tuple[str, str]]]:
    """(reasoning, content, [(name, arguments)]) of a Responses object's output items."""
    reasoning = "".join(part["text"] for item in output if item["type"] == "reasoning"
                        for part in item.get("content", []) + item.get("summary", []))
    content = "".join(part["text"] for item in output if item["type"] == "message"
                      for part in item["content"] if part["type"] == "output_text")
    calls = [(item["name"], item["arguments"]) for item in output if item["type"] == "function_call"]
    assert all(item["call_id"] for item in output if item["type"] == "function_call")
    return reasoning, content, calls


def _want(case: Case) -> tuple[str, str, list[tuple[str, str]]]:
    return case.reasoning, (case.content.strip() if case.calls else case.content), list(case.calls)


def check_responses_whole(client, engine, case: Case, forced: bool = False) -> None:
    engine.script = case.output
    r = client.post("/v1/responses", json=responses_body(case, False, forced))
    assert r.status_code == 200, r.text
    reasoning, content, calls = _items_view(r.json()["output"])
    assert (reasoning, content.strip() if case.calls else content, calls) == _want(case)


def check_responses_streamed(client, engine, case: Case, forced: bool = False) -> None:
    """The streamed events: every call's argument deltas join to its .done arguments and to the
    final object's; the final object is the whole reply; a long call arrives in several deltas."""
    engine.script = case.output
    with client.stream("POST", "/v1/responses", json=responses_body(case, True, forced)) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    deltas: dict[str, list[str]] = {}
    done: dict[str, str] = {}
    for e in events:
        if e["type"] == "response.function_call_arguments.delta":
            deltas.setdefault(e["item_id"], []).append(e["delta"])
        elif e["type"] == "response.function_call_arguments.done":
            done[e["item_id"]] = e["arguments"]
    assert {k: "".join(v) for k, v in deltas.items()} == {k: v for k, v in done.items() if v}
    final = events[-1]["response"]["output"]
    reasoning, content, calls = _items_view(final)
    assert (reasoning, content.strip() if case.calls else content, calls) == _want(case)
    assert [done[item["id"]] for item in final if item["type"] == "function_call"] == [a for _, a in case.calls]
    for (name, arguments), item in zip(case.calls, [i for i in final if i["type"] == "function_call"]):
        if len(arguments) > 2 * engine.piece and not case.one_piece:
            assert len(deltas[item["id"]]) > 1, f"{name}'s arguments came in {len(deltas[item['id']])} piece(s)"


# ---- one format's suite ---------------------------------------------------------------------------


class FormatConformance:
    """Every row of ``cases.CASES[FORMAT]`` (``case``; forced rows as ``forced_case``, conftest.py)
    through the parser and the chat and Responses endpoints of one scripted server. A format's test
    file subclasses it and names its FORMAT."""

    FORMAT: str  # its scripted server is the ``chat`` fixture (conftest.py)

    def test_parse_is_the_same_split_at_every_byte(self, case):
        check_parser(self.FORMAT, case)

    def test_chat_whole_reply(self, chat, case):
        check_chat_whole(*chat, case)

    def test_chat_stream_adds_up_to_the_whole_reply(self, chat, case):
        check_chat_streamed(*chat, case)

    def test_forced_call_streams_its_arguments(self, chat, forced_case):
        check_chat_whole(*chat, forced_case, forced=True)
        check_chat_streamed(*chat, forced_case, forced=True)

    def test_responses_whole_reply(self, chat, case):
        check_responses_whole(*chat, case)

    def test_responses_stream_adds_up_to_the_whole_reply(self, chat, case):
        check_responses_streamed(*chat, case)
