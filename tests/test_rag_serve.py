"""`--rag` end to end with the real SmolLM2-135M: `rung serve --rag INDEX` (a server process on
localhost, driven by raw HTTP and the openai client) and `rung chat --rag INDEX --once`.

What the 135M model does by itself, greedy, on these questions: it answers from the passage in its
system message (the planted number or name), in a sentence, and does not write the `[source:lines]`
label back. The citations in a reply therefore come from retrieval plus the deterministic check of
rung.rag.cite: the planted passage is marked ``supported`` by what the answer repeats of it.
"""

from __future__ import annotations

import http.client
import json

import openai
import pytest

from rag_corpus import write_corpus
from rung.rag import build_index
from serve_helpers import rung_serve

MODEL = "smollm2-135m"
# questions SmolLM2-135M answers from the passage (greedy): a designer, two pressures
PICKED = ("Who designed the Feytobel valve?", "What is the maximum operating pressure of the Vexlioix valve?",
          "What is the maximum operating pressure of the Goldunon relay?")


class Grounded:
    def __init__(self, root, questions, port, proc, log_path):
        self.root, self.port, self.proc, self.log_path = root, port, proc, log_path
        self.questions = {q.question: q for q in questions}
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)

    def post(self, body: dict) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, data

    def prompts(self) -> list[str]:
        return [json.loads(line).get("prompt") or "" for line in self.log_path.read_text().splitlines()
                if line.startswith("{")]


@pytest.fixture(scope="module")
def grounded(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag-serve")
    questions = write_corpus(root / "docs")
    build_index([root / "docs"], root / "docs.idx", base=root)
    log_path = root / "serve.log"
    args = ["-m", MODEL, "--threads", "1", "--kv-cache-mb", "64", "--rag", str(root / "docs.idx"), "--rag-k", "2",
            "--log-prompts"]
    with rung_serve(args, log_path, "rung serve --rag to load", cwd=root) as (port, proc):
        yield Grounded(root, questions, port, proc, log_path)


def _is_planted(item: dict, q) -> bool:
    return item["source"] == f"docs/{q.source}" and item["lines"][0] <= q.line <= item["lines"][1]


@pytest.mark.parametrize("question", PICKED)
def test_served_answers_are_grounded_in_the_planted_passage_and_cite_it(grounded, question):
    q = grounded.questions[question]
    status, raw = grounded.post({"model": MODEL, "messages": [{"role": "user", "content": question}],
                                 "max_tokens": 40, "temperature": 0})
    assert status == 200, raw
    body = json.loads(raw)
    rag = body["rung"]["rag"]
    assert len(rag["sources"]) == 2 and _is_planted(rag["sources"][0], q) and rag["query"] == question
    top = rag["sources"][0]
    # the prompt the model read holds the planted passage under its label
    prompt = grounded.prompts()[-1]
    assert f"[{top['label']}]\n{top['text']}" in prompt and "Cite the source of each fact" in prompt
    answer = body["choices"][0]["message"]["content"]
    assert q.answer in answer  # the model answers from the passage
    citations = body["choices"][0]["rung"]["citations"]
    assert [c["label"] for c in citations if c["supported"]] == [top["label"]], (answer, citations)
    assert all(_is_planted(c, q) for c in citations if c["supported"])


def test_openai_clients_read_grounded_replies_and_can_set_k_or_turn_it_off(grounded):
    question = PICKED[1]
    r = grounded.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                max_tokens=8, temperature=0, extra_body={"rag": {"k": 1}})
    assert r.choices[0].message.content and len(r.model_extra["rung"]["rag"]["sources"]) == 1
    r = grounded.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                max_tokens=8, temperature=0, extra_body={"rag": False})
    assert "rung" not in (r.model_extra or {}) and "Sources:" not in grounded.prompts()[-1]
    status, raw = grounded.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "rag": {"k": 99}})
    assert status == 400 and json.loads(raw)["error"]["param"].startswith("rag")


def test_a_streamed_reply_sends_the_sources_first_and_the_citations_last(grounded):
    q = grounded.questions[PICKED[2]]
    status, raw = grounded.post({"model": MODEL, "messages": [{"role": "user", "content": q.question}],
                                 "max_tokens": 40, "temperature": 0, "stream": True})
    assert status == 200
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert _is_planted(chunks[0]["rung"]["rag"]["sources"][0], q)
    assert all("rung" not in c for c in chunks[1:-1] if c["choices"] and not c["choices"][0]["finish_reason"])
    last = chunks[-1]["choices"][0]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert last["finish_reason"] and q.answer in text
    assert [c["label"] for c in last["rung"]["citations"] if c["supported"]] == \
           [chunks[0]["rung"]["rag"]["sources"][0]["label"]]


def test_rung_chat_rag_prints_the_sources_after_the_answer(grounded, capsys, monkeypatch):
    from rung.cli import main

    monkeypatch.chdir(grounded.root)
    q = grounded.questions[PICKED[0]]
    assert main(["chat", "-m", MODEL, "--rag", "docs.idx", "--rag-k", "2", "--once", q.question,
                 "--max-tokens", "40"]) == 0
    out = capsys.readouterr().out
    answer, _, sources = out.partition("\n\nsources:\n")
    assert q.answer in answer
    first = sources.splitlines()[0]
    assert first.startswith(f"  [1] docs/{q.source}:") and first.endswith("(used)")
