"""Retrieval (rung/rag): documents → passages with line ranges → a BM25 index on disk → the planted
passage at rank 1; the index's checks on load; grounded prompts; citation checks; `rung index`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from rag_corpus import write_corpus
from rung.cli import main
from rung.rag import (DocumentError, RagError, build_index, check_answer, chunk_document, cited_labels, ground,
                      load_index, read_document)
from rung.rag.index import _content_hash, _sha256


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    questions = write_corpus(root / "docs")
    index = build_index([root / "docs"], root / "docs.idx", base=root)
    return root, questions, index


def _planted(hit, q) -> bool:
    p = hit.passage
    return p.source == f"docs/{q.source}" and p.start <= q.line <= p.end


# ---- retrieval ----------------------------------------------------------------------------------


def test_the_planted_passage_is_rank_1_for_every_question(corpus):
    root, questions, _ = corpus
    index = load_index(root / "docs.idx")  # as chat and serve open it
    assert len(questions) == 20 and len(index.manifest["documents"]) == 50
    assert {Path(q.source).suffix for q in questions} == {".md", ".txt", ".html", ".jsonl"}
    misses = []
    for q in questions:
        hits = index.search(q.question, k=3)
        if not _planted(hits[0], q) or q.answer not in hits[0].passage.text:
            misses.append((q.question, [h.label for h in hits]))
    assert misses == []


def test_the_same_name_with_another_attribute_is_another_passage(corpus):
    """Every document shares the vocabulary: the device's name alone does not decide, the attribute does."""
    _, questions, index = corpus
    q = next(q for q in questions if q.question.startswith("Who designed"))
    name = q.question.split()[3]
    designed = index.search(q.question, 1)[0].passage
    warranty = index.search(f"How long is the warranty of the {name}?", 1)[0].passage
    assert designed.source == warranty.source and designed.label != warranty.label
    assert "designed by" in designed.text and "warranty of" in warranty.text


def test_a_query_sharing_no_term_retrieves_nothing(corpus):
    assert corpus[2].search("qwxyzzy plumbus", 4) == []


# ---- passages -----------------------------------------------------------------------------------


def test_passages_are_the_source_lines_their_labels_name(corpus):
    root, _, index = corpus
    for p in index.passages:
        if not p.source.endswith((".md", ".txt")):
            continue
        lines = (root / p.source).read_text(encoding="utf-8").splitlines()
        assert p.text == "\n".join(lines[p.start - 1:p.end]).strip("\n"), p.label
        assert p.label == f"{p.source}:{p.start}-{p.end}" or (p.start == p.end and p.label == f"{p.source}:{p.start}")


def test_markdown_headings_start_passages_and_name_their_section(corpus):
    _, _, index = corpus
    md = [p for p in index.passages if p.source.endswith(".md")]
    history = [p for p in md if p.section and p.section.endswith("> History")]
    assert len(history) == 20 and all(p.text.startswith("## History") for p in history)
    assert all(p.section.split(" > ")[0].split()[0].lower() == Path(p.source).stem for p in history)  # "# Name kind"


def test_html_keeps_line_numbers_and_drops_scripts_and_styles(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html><head><style>p {}</style><script>var secret = 1;</script></head>\n<body>\n"
                    "<h1>Title</h1>\n<p>First &amp; one.</p>\n\n<p>Second\nspans lines.</p>\n</body></html>\n")
    doc = read_document(page, tmp_path)
    assert doc.lines[2] == "# Title" and doc.lines[3] == "First & one." and doc.lines[5:7] == ("Second", "spans lines.")
    assert "secret" not in " ".join(doc.lines) and "p {}" not in " ".join(doc.lines)


def test_long_paragraphs_are_cut_between_lines_within_max_chars(tmp_path):
    f = tmp_path / "long.txt"
    f.write_text("\n".join(f"line {i} " + "word " * 12 for i in range(1, 41)) + "\n")
    passages = chunk_document(read_document(f, tmp_path), max_chars=200)
    assert len(passages) > 5 and all(len(p.text) <= 200 for p in passages)
    assert [p.start for p in passages] == [1] + [q.end + 1 for q in passages[:-1]] and passages[-1].end == 40


def test_jsonl_records_are_one_passage_each_and_bad_lines_are_named(tmp_path):
    f = tmp_path / "kb.jsonl"
    f.write_text('{"text": "alpha fact"}\n"beta fact"\n{"content": "gamma fact"}\n')
    assert [p.label for p in chunk_document(read_document(f, tmp_path))] == ["kb.jsonl:1", "kb.jsonl:2", "kb.jsonl:3"]
    f.write_text('{"text": "ok"}\n{"title": 3}\n')
    with pytest.raises(DocumentError, match=r"kb.jsonl: line 2: expected a string or an object with a 'text'"):
        read_document(f, tmp_path)


def test_binary_and_missing_documents_are_refused(tmp_path):
    (tmp_path / "blob.md").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DocumentError, match=r"blob.md: a binary file"):
        build_index([tmp_path / "blob.md"], tmp_path / "idx")
    with pytest.raises(DocumentError, match=r"nope: no such file or folder"):
        build_index([tmp_path / "nope"], tmp_path / "idx")


# ---- the index on disk --------------------------------------------------------------------------


def test_index_round_trip_keeps_passages_scores_and_hash(corpus, tmp_path):
    root, questions, built = corpus
    loaded = load_index(root / "docs.idx")
    assert loaded.hash == built.hash and loaded.passages == built.passages
    for q in questions[:5]:
        assert [(h.label, h.score) for h in loaded.search(q.question, 4)] == \
               [(h.label, h.score) for h in built.search(q.question, 4)]
    again = build_index([root / "docs"], tmp_path / "again.idx", base=root)
    assert again.hash == built.hash  # the same documents give the same index (the bench cache key)
    (root / "docs" / "extra.md").write_text("# Extra\n\nA new fact.\n")
    try:
        assert build_index([root / "docs"], tmp_path / "again.idx", base=root).hash != built.hash
    finally:
        (root / "docs" / "extra.md").unlink()


def test_a_changed_document_makes_the_index_stale(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("alpha\n")
    (docs / "b.md").write_text("beta\n")
    index = build_index([docs], tmp_path / "idx", base=tmp_path)
    assert index.stale() == []
    (docs / "a.md").write_text("alpha changed\n")
    (docs / "b.md").unlink()
    assert load_index(tmp_path / "idx").stale() == ["docs/a.md: changed", "docs/b.md: missing"]


def test_building_over_a_folder_that_is_not_an_index_is_refused(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("alpha\n")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    with pytest.raises(RagError, match=r"precious: exists and is not a rung index"):
        build_index([tmp_path / "docs"], tmp_path / "precious")
    assert (tmp_path / "precious" / "thesis.tex").exists()
    build_index([tmp_path / "docs"], tmp_path / "idx")
    build_index([tmp_path / "docs"], tmp_path / "idx")  # an index is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "idx", "precious"]  # no temporary left


@pytest.fixture
def copy(corpus, tmp_path):
    import shutil

    target = tmp_path / "copy.idx"
    shutil.copytree(corpus[0] / "docs.idx", target)
    return target


def _rehash(folder: Path) -> None:
    """What a hostile writer would do: make the manifest agree with edited files."""
    m = json.loads((folder / "manifest.json").read_text())
    m["files"] = {name: _sha256(folder / name) for name in m["files"]}
    m["hash"] = _content_hash(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(folder: Path, **changes) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m.update(changes)
    (folder / "manifest.json").write_text(json.dumps(m))


class _Bomb:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))  # what unpickling would run


def test_an_index_that_would_unpickle_is_refused_without_unpickling(copy, tmp_path):
    marker = tmp_path / "unpickled"
    np.save(copy / "bm25" / "data.csc.index.npy", np.array([_Bomb(marker)], dtype=object), allow_pickle=True)
    _rehash(copy)
    with pytest.raises(RagError, match=r"data.csc.index.npy: not a numpy array file rung can read"):
        load_index(copy)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "manifest.json").unlink(), r"copy.idx/manifest.json: missing: .* is not a rung index"),
    (lambda d: (d / "manifest.json").write_text("{not json"), r"manifest.json: not valid JSON"),
    (lambda d: _edit_manifest(d, format="something-else"), r"manifest.json: not a rung index manifest"),
    (lambda d: _edit_manifest(d, version=99), r"manifest.json: index format version 99; this rung reads version 1; "
                                              r"upgrade rung"),
    (lambda d: _edit_manifest(d, passages=3), r"manifest.json: its hash does not match its content"),
    (lambda d: _edit_manifest(d, files={"../../etc/passwd": "0" * 64}), r"'files' must list exactly rung's index"),
    (lambda d: (d / "passages.jsonl").write_text((d / "passages.jsonl").read_text()[:500]),
     r"passages.jsonl: sha256 differs from the manifest's"),
    (lambda d: (d / "bm25" / "vocab.index.json").unlink(), r"vocab.index.json: missing \(the manifest lists it\)"),
])
def test_a_damaged_index_is_one_line_naming_the_file(copy, damage, message):
    damage(copy)
    with pytest.raises(RagError, match=message):
        load_index(copy)


@pytest.mark.parametrize("forge, message", [
    (lambda d: np.save(d / "bm25" / "indices.csc.index.npy",
                       np.load(d / "bm25" / "indices.csc.index.npy") + 10_000), r"indices.csc.index.npy: a passage index"),
    (lambda d: np.save(d / "bm25" / "indptr.csc.index.npy", np.load(d / "bm25" / "indptr.csc.index.npy")[::-1]),
     r"indptr.csc.index.npy: the arrays do not form one sparse matrix"),
    (lambda d: (d / "bm25" / "params.index.json").write_text(json.dumps(
        {**json.loads((d / "bm25" / "params.index.json").read_text()), "corpus": "x"})), r"unexpected field 'corpus'"),
    (lambda d: (d / "passages.jsonl").write_text('{"source": "a", "start": 5, "end": 2, "text": "x"}\n'),
     r"passages.jsonl: line 1: expected source, start <= end"),
])
def test_a_forged_but_consistent_index_is_checked_before_use(copy, forge, message):
    forge(copy)
    _rehash(copy)
    with pytest.raises(RagError, match=message):
        load_index(copy)


# ---- grounding and citations --------------------------------------------------------------------


def test_ground_puts_labelled_passages_in_the_system_message(corpus):
    _, questions, index = corpus
    q = questions[0]
    messages, g = ground(index, [{"role": "user", "content": q.question}], k=3)
    assert [m["role"] for m in messages] == ["system", "user"] and messages[1]["content"] == q.question
    system = messages[0]["content"]
    assert f"[{g.hits[0].label}]\n{g.hits[0].passage.text}" in system and _planted(g.hits[0], q)
    assert "Cite the source of each fact by its label in square brackets" in system and len(g.hits) == 3
    merged, _ = ground(index, [{"role": "system", "content": "You are terse."}, {"role": "user", "content": q.question}])
    assert merged[0]["content"].startswith("You are terse.\n\nAnswer the question using only the sources below.")
    assert len(merged) == 2


def test_ground_keeps_within_max_chars_and_k(corpus):
    _, questions, index = corpus
    _, g = ground(index, [{"role": "user", "content": questions[1].question}], k=4, max_chars=150)
    assert len(g.hits) == 1 and len(g.texts[0]) <= 152  # the best passage, cut
    _, g = ground(index, [{"role": "user", "content": questions[1].question}], k=2, max_chars=10_000)
    assert len(g.hits) == 2
    unchanged, g = ground(index, [{"role": "system", "content": "hi"}])
    assert unchanged == [{"role": "system", "content": "hi"}] and g.hits == []


def test_cited_labels_reads_the_forms_models_write():
    text = ("The pressure is 918 kPa [docs/valves/a.md:13-16]. See also [docs/b.txt:4; docs/c.md:2–3] and "
            "[source: d.md:7] but not [1] or [link](x) or [a.md].")
    assert cited_labels(text) == [("docs/valves/a.md", 13, 16), ("docs/b.txt", 4, 4), ("docs/c.md", 2, 3),
                                  ("d.md", 7, 7)]


def test_check_answer_tells_real_citations_from_made_up_ones_and_finds_uncited_use(corpus):
    _, questions, index = corpus
    q = next(q for q in questions if "pressure" in q.question)
    _, g = ground(index, [{"role": "user", "content": q.question}], k=3)
    top = g.hits[0]
    cited = check_answer(f"It is {q.answer} kPa [{top.label}]. Also [docs/nowhere.md:3].", g)
    assert cited["not_in_sources"] == ["docs/nowhere.md:3"]
    assert [c["label"] for c in cited["citations"] if c["cited"]] == [top.label]
    name = Path(top.passage.source).name  # a path suffix with lines inside the passage is the same source
    assert check_answer(f"[{name}:{top.passage.end}]", g)["citations"][0]["cited"]
    uncited = check_answer(f"The maximum pressure is {q.answer} kPa.", g)
    assert [(c["label"], c["cited"], c["supported"]) for c in uncited["citations"]] == [(top.label, False, True)]
    assert check_answer("I do not know.", g)["citations"] == []


# ---- rung index ---------------------------------------------------------------------------------


def test_rung_index_builds_opens_and_queries(corpus, tmp_path, capsys, monkeypatch):
    root, questions, _ = corpus
    monkeypatch.chdir(root)
    assert main(["index", "docs", "--out", str(tmp_path / "cli.idx")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"indexed 50 documents into 210 passages: {tmp_path / 'cli.idx'} (sha256:")
    q = questions[3]
    assert main(["index", "--out", str(tmp_path / "cli.idx"), "-q", q.question, "-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{tmp_path / 'cli.idx'}: 50 documents, 210 passages, sha256:")
    assert out[2] == q.question and out[3].startswith(f"  1. [docs/{q.source}:") and len(out) == 5


def test_rung_index_errors_are_one_line(tmp_path, capsys):
    assert main(["index", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rung: error: {tmp_path / 'none'}: no such index folder") and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty"), "--out", str(tmp_path / "idx")]) == 2
    assert "no text to index in" in capsys.readouterr().err


def test_opening_a_stale_index_warns_and_names_the_document(tmp_path, capsys):
    import argparse

    from rung.commands.index import open_rag

    (tmp_path / "a.md").write_text("alpha\n")
    build_index([tmp_path / "a.md"], tmp_path / "idx", base=tmp_path)
    (tmp_path / "a.md").write_text("alpha, edited\n")
    args = argparse.Namespace(rag=str(tmp_path / "idx"), rag_k=None, rag_max_chars=None)
    assert open_rag(args) is not None and (args.rag_k, args.rag_max_chars) == (4, 3000)
    assert capsys.readouterr().err == (f"rung: warning: {tmp_path / 'idx'} is stale: a.md: changed since it was "
                                       "indexed (rebuild it with `rung index`)\n")


def test_an_answer_drawn_from_two_passages_credits_both_and_shared_phrasing_credits_none(corpus):
    _, questions, index = corpus
    q = next(q for q in questions if "warranty" in q.question and q.source.endswith(".md"))
    name = q.question.split()[-3]
    _, g = ground(index, [{"role": "user", "content": q.question}], k=4)
    warranty = next(h for h in g.hits if "warranty of" in h.passage.text and h.passage.source == f"docs/{q.source}")
    overview = index.search(f"{name} overview industrial cooling loops", 1)[0]
    g.hits, g.texts = [warranty, overview.__class__(overview.passage, 2, 1.0, 1.0)], [warranty.passage.text,
                                                                                    overview.passage.text]
    both = check_answer(f"The {name} is an industrial pump used in cooling loops and process lines. "
                        f"It carries a warranty of {q.answer} months.", g)
    assert [c["label"] for c in both["citations"] if c["supported"]] == [warranty.label, overview.label]
    _, g = ground(index, [{"role": "user", "content": q.question}], k=4)  # other devices' warranty passages
    one = check_answer(f"Every {name} carries a warranty of {q.answer} months from the date of delivery.", g)
    assert [c["source"] for c in one["citations"] if c["supported"]] == [f"docs/{q.source}"]


def test_a_follow_up_question_retrieves_with_the_previous_one_as_context(corpus):
    _, questions, index = corpus
    first = next(q for q in questions if q.question.startswith("Who designed") and q.source.endswith(".md"))
    name = first.question.split()[3]
    follow_up = "And how many months of warranty does it carry?"
    alone = index.search(follow_up, 1)[0].passage
    conversation = [{"role": "user", "content": first.question}, {"role": "assistant", "content": "Someone."},
                    {"role": "user", "content": follow_up}]
    _, g = ground(index, conversation, k=1)
    assert g.query == follow_up and g.hits[0].passage.source == f"docs/{first.source}"
    assert "warranty of" in g.hits[0].passage.text and name.lower() not in alone.source  # alone: some device
    switched = conversation + [{"role": "assistant", "content": "…"},
                               {"role": "user", "content": questions[1].question}]  # a new topic wins
    assert _planted(ground(index, switched, k=1)[1].hits[0], questions[1])
