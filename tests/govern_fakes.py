"""A real rung server (app, Server, Qwen3 template and parsers on a tiny random model) whose engine
replies are scripted: each engine request's reply is a function of its rendered prompt. The
governance tests drive it over HTTP and see every prompt the model was given."""

from __future__ import annotations

import json

from starlette.testclient import TestClient

from rung.engine.engine import Delta
from rung.serve.app import create_app
from rung.serve.server import ServeConfig, Server


def tiny_qwen3(folder):
    import transformers as tf

    from rung.text.templates import QWEN3_TEMPLATE
    from test_serve_families import tiny_folder

    return tiny_folder(folder, tf.Qwen3Config, QWEN3_TEMPLATE)


class Scripted:
    """``reply(prompt_text) -> str`` answers every engine request; ``prompts`` records them."""

    def __init__(self, server: Server, reply):
        self.server, self.reply, self.prompts = server, reply, []
        server.generate = self.generate

    async def generate(self, prepared, request_id):
        self.prompts.append(prepared.prompt_text)
        text = self.reply(prepared.prompt_text)
        ids = self.server.llm.tokenizer.encode(text, add_special_tokens=False) or [0]
        cut, at = len(text) // 2, len(ids) // 2  # two deltas: a stream sees a call split across them
        lp = (lambda part: [{t: -0.5} for t in part]) if prepared.params.logprobs is not None else (lambda part: None)
        for j in range(prepared.params.n):
            yield Delta(request_id, j, text[:cut], ids[:at], logprobs=lp(ids[:at]))
            yield Delta(request_id, j, text[cut:], ids[at:], finish_reason="stop", logprobs=lp(ids[at:]))


def served(folder, **config) -> tuple[TestClient, Server]:
    server = Server(ServeConfig(model=str(folder), served_model_name="tiny", engine=dict(num_blocks=64), **config))
    server.load()
    assert server.load_error is None, server.load_error
    return TestClient(create_app(server)), server


def call(name: str, **arguments) -> str:
    """A Hermes tool call as Qwen3 writes it."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def tool(name: str, **properties) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in properties.items()}}}}


def events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
