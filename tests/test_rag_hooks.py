"""`--rag` in bench and serve without a model: grounded bench runs (scripted candidates), their cache
keys, a suite's `rag:` key; the server's per-request options and reply fields."""

from __future__ import annotations

import re

import pytest

from bench_fakes import Scripted
from rag_corpus import write_corpus
from rung.bench.cache import ResultCache
from rung.bench.run import BenchSettings, run_bench
from rung.bench.suite import SuiteError, load_suite, suite_from_dict
from rung.rag import build_index


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag-hooks")
    questions = write_corpus(root / "docs")
    return root, questions, build_index([root / "docs"], root / "docs.idx", base=root)


def _reader(req) -> str:
    """A candidate that answers only from a source it was given: the number or name after the fact's words."""
    system = req.messages[0]["content"] if req.messages[0]["role"] == "system" else ""
    label = re.search(r"^\[([^\]]+)\]$", system, re.M)
    question = req.messages[-1]["content"]
    name = re.search(r"the (\w+) (?:valve|pump|turbine|relay|sensor)\b", question).group(1)
    pattern = {"designed": rf"{name} \w+ was designed by \w+ (\w+)", "pressure": rf"pressure of the {name} \w+ is (\d+)",
               "warranty": rf"{name} \w+ carries a warranty of (\d+)", "seals": rf"{name} \w+ should be replaced every (\d+)"}
    m = next((re.search(p, system) for word, p in pattern.items() if word in question), None)
    return f"{m.group(1)} [{label.group(1)}]" if m else "I do not know."


def _suite(questions, **extra):
    return suite_from_dict({"name": "grounded", **extra,
                            "cases": [{"id": f"q{i}", "prompt": q.question, "expect": {"contains": q.answer}}
                                      for i, q in enumerate(questions)]})


def test_bench_rag_grounds_every_case_and_is_cached_apart(corpus, tmp_path):
    _, questions, index = corpus
    suite = _suite(questions)
    cache = ResultCache(tmp_path)
    plain = Scripted("reader", {f"q{i}": _reader for i in range(len(questions))})
    [ungrounded] = run_bench([plain], suite, BenchSettings(isolate=False), cache)
    assert sum(c.passed for c in ungrounded.cases) == 0 and "rag" not in ungrounded.settings
    grounded_model = Scripted("reader", {f"q{i}": _reader for i in range(len(questions))})
    settings = BenchSettings(isolate=False, rag=index, rag_k=2)
    [grounded] = run_bench([grounded_model], suite, settings, cache)
    assert grounded_model.generated == len(questions)  # not the ungrounded run's cache entry
    assert all(c.passed for c in grounded.cases)
    assert grounded.settings["rag"] == {"index": index.hash, "k": 2, "max_chars": 3000}
    first = grounded_model.requests[0].messages
    assert first[0]["role"] == "system" and f"[docs/{questions[0].source}:" in first[0]["content"]
    assert first[1] == {"role": "user", "content": questions[0].question}
    again = Scripted("reader", {})
    [cached] = run_bench([again], suite, BenchSettings(isolate=False, rag=index, rag_k=2), cache)
    assert cached.cached and again.generated == 0
    [other_k] = run_bench([again], suite, BenchSettings(isolate=False, rag=index, rag_k=3), cache)
    assert not other_k.cached  # k changes what the model reads: another key


def test_a_suite_rag_key_names_an_index_beside_the_suite(corpus, tmp_path):
    root, questions, index = corpus
    suite_file = root / "suite.yaml"
    suite_file.write_text("name: s\nrag: {index: docs.idx, k: 1}\ncases:\n"
                          f"  - {{id: a, prompt: '{questions[1].question}', expect: {{contains: '{questions[1].answer}'}}}}\n")
    suite = load_suite(suite_file)
    assert suite.rag == {"index": str(root / "docs.idx"), "k": 1}
    model = Scripted("reader", {"a": _reader})
    [run] = run_bench([model], suite, BenchSettings(isolate=False))
    assert run.cases[0].passed and run.settings["rag"]["index"] == index.hash and run.settings["rag"]["k"] == 1
    for bad in ("rag: {path: x}", "rag: {index: x, k: 0}", "rag: [x]"):
        with pytest.raises(SuiteError, match=r"'rag' is an index path or \{index: PATH, k: N, max_chars: N\}"):
            suite_file.write_text(f"{bad}\ncases: [{{prompt: hi, expect: {{contains: x}}}}]\n")
            load_suite(suite_file)


def test_bench_cli_rag_with_a_missing_index_is_one_line(tmp_path, capsys):
    from rung.cli import main

    suite = tmp_path / "s.yaml"
    suite.write_text("cases: [{prompt: hi, expect: {contains: x}}]\n")
    assert main(["bench", str(suite), "-m", "smollm2-135m", "--rag", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == f"rung: error: {tmp_path / 'none'}: no such index folder (build one with " \
                                      f"`rung index DOCS --out {tmp_path / 'none'}`)\n"


# ---- serve: per-request options -------------------------------------------------------------------


class _Server:
    def __init__(self, index, k=4, max_chars=3000):
        from rung.serve.server import ServeConfig

        self.config = ServeConfig(rag=index, rag_k=k, rag_max_chars=max_chars)


def _request(**fields):
    from rung.serve.schemas import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                                 **fields})


def test_serve_grounds_unless_a_request_says_no_and_takes_its_k(corpus):
    from rung.serve.errors import APIError
    from rung.serve.grounding import ground_chat

    _, questions, index = corpus
    messages = [{"role": "user", "content": questions[2].question}]
    sent, g = ground_chat(_Server(index), _request(), messages)
    assert len(g.hits) == 4 and sent[0]["role"] == "system" and g.hits[0].label in sent[0]["content"]
    assert ground_chat(_Server(index), _request(rag=False), messages) == (messages, None)
    _, g = ground_chat(_Server(index), _request(rag={"k": 1, "max_chars": 5000}), messages)
    assert len(g.hits) == 1 and g.max_chars == 5000
    assert ground_chat(_Server(None), _request(), messages) == (messages, None)
    with pytest.raises(APIError, match="this server has no retrieval index"):
        ground_chat(_Server(None), _request(rag=True), messages)


@pytest.mark.parametrize("rag", [{"k": 0}, {"k": 2, "top": 1}, {"max_chars": 10}, "yes"])
def test_serve_refuses_bad_rag_options(rag):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _request(rag=rag)


def test_reply_fields_carry_sources_and_each_answers_citations(corpus):
    from types import SimpleNamespace

    from rung.serve.grounding import add_rung, choice_fields, reply_fields
    from rung.serve.server import ServeConfig  # noqa: F401  (the server module imports grounding: no cycle)

    _, questions, index = corpus
    q = questions[5]
    from rung.rag import ground

    _, g = ground(index, [{"role": "user", "content": q.question}], k=2)
    prepared = SimpleNamespace(grounding=g)
    top = reply_fields([prepared])["rag"]
    assert top["index"] == index.hash and top["sources"][0]["label"] == g.hits[0].label
    assert top["sources"][0]["text"] == g.hits[0].passage.text and top["query"] == q.question
    choice = SimpleNamespace(content=[f"It is {q.answer} kPa", f" [{g.hits[0].label}] [x.md:1]"])
    fields = choice_fields(prepared, choice)
    assert fields["citations"][0]["label"] == g.hits[0].label and fields["citations"][0]["cited"]
    assert fields["not_in_sources"] == ["x.md:1"]
    body = add_rung({"index": 0, "rung": {"verifier": {"score": 1.0}}}, fields)
    assert set(body["rung"]) == {"verifier", "citations", "not_in_sources"}  # merged with what others put there
    assert reply_fields([SimpleNamespace(grounding=None)]) == {} and choice_fields(SimpleNamespace(), choice) == {}
