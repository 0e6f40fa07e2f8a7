"""SmolLM2-135M as the verifier (a second model asked "Is the ANSWER supported by the SOURCES?",
scored P(yes) / (P(yes) + P(no)) from one forward pass), on crafted supported/unsupported pairs.

Measured (fp32, CPU): supported 0.588 / 0.379 / 0.451 / 0.302 / 0.420 vs unsupported 0.538 / 0.354 /
0.389 / 0.279 / 0.369. The 135M model ranks the supported answer higher in every pair, but by 0.02
to 0.06, and its level moves with the question by more than that: no one threshold separates them.
These tests hold it to what it does, the direction within a pair and a threshold set for one pair."""

from __future__ import annotations

import pytest

from govern_fakes import Scripted, served, tiny_qwen3
from rung.serve.governance import Verification

PAIRS = [  # (question, source, supported answer, unsupported answer)
    ("When was the Eiffel Tower completed?", "The Eiffel Tower in Paris was completed in 1889.",
     "It was completed in 1889.", "It was completed in 1925."),
    ("What colour is the sky on Mars?", "On Mars the sky is butterscotch during the day and blue at sunset.",
     "The Martian sky is butterscotch by day.", "The Martian sky is bright green by day."),
    ("Who wrote the report?", "The report was written by Maria Lopez, the head of finance.",
     "Maria Lopez wrote the report.", "John Smith wrote the report."),
    ("What is the capital of Australia?", "Canberra is the capital city of Australia.", "Canberra.", "Sydney."),
    ("How many legs does a spider have?", "Spiders have eight legs.", "A spider has eight legs.",
     "Spiders are mammals that live in the ocean."),
]


@pytest.fixture(scope="module")
def verifier():
    from rung.govern.verify import ModelVerifier, load_verifier

    v = load_verifier("smollm2-135m")
    assert isinstance(v, ModelVerifier) and v.yes and v.no
    return v


@pytest.fixture(scope="module")
def scores(verifier):
    return [(verifier.score(q, good, [source]), verifier.score(q, bad, [source])) for q, source, good, bad in PAIRS]


def test_smollm2_scores_the_supported_answer_of_each_pair_higher(scores):
    for (question, *_), (yes, no) in zip(PAIRS, scores):
        assert 0 < no < yes < 1, (question, yes, no)


def test_smollm2_verifier_in_the_server_refuses_the_unsupported_answer(verifier, scores, tmp_path):
    question, source, good, bad = PAIRS[0]
    threshold = sum(scores[0]) / 2  # between this pair's two scores (the same forward, so the same numbers)
    client, server = served(tiny_qwen3(tmp_path))
    server.verification = Verification(verifier, threshold, "refuse")
    messages = [{"role": "system", "content": source}, {"role": "user", "content": question}]
    try:
        for answer, finish in ((good, "stop"), (bad, "content_filter")):
            Scripted(server, lambda prompt, a=answer: a)
            r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 30})
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == finish, choice
            assert (choice["message"]["content"] == answer) is (finish == "stop")
    finally:
        server.shutdown()
