"""Streaming detokenization: the deltas concatenate to `tokenizer.decode(all_ids)` byte for byte, no
delta holds half a character (U+FFFD), and emitted text never changes."""

from __future__ import annotations

import pytest

from rung.text import IncrementalDetokenizer, Tokenizer
from test_text_gguf_metadata import gemma3_tokenizer, smollm2_tokenizer
from test_text_tokenizer import sentencepiece_metadata

STREAMED_TEXT = [
    "emoji 😀👍🏽 flags 🇫🇷🇯🇵 family 👨‍👩‍👧‍👦 ❤️ new 🫨🪿🫎",
    "日本語のテキスト、中文字符和한국어 문장。",
    "rare CJK 𠀋𠂢 𪚲 and runes ꙮ ᚠᛇᚻ, maths 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "accents: Ça va? Déjà vu, naïve, Straße, e\u0301 (combining), Ångström",
    "  spaces   and\n\nnewlines\t\ttabs  ",
    "mixed: hello 世界 🌍! ¿Qué tal? Привет мир.",
]

TOKENIZERS = {"smollm2": smollm2_tokenizer, "gemma3": gemma3_tokenizer,
              "sentencepiece": lambda: Tokenizer.from_gguf_metadata(sentencepiece_metadata())}


def stream(tokenizer, ids, skip_special_tokens=False) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detok.push(i) for i in ids]
    return deltas + [detok.flush()]


def assert_streams_exactly(tokenizer, ids, skip_special_tokens=False) -> None:
    deltas = stream(tokenizer, ids, skip_special_tokens)
    whole = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas).encode("utf-8") == whole.encode("utf-8")
    assert not any("\ufffd" in d for d in deltas), deltas
    emitted = ""
    for d in deltas:  # every prefix of the stream is a prefix of the final text
        emitted += d
        assert whole.startswith(emitted)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
@pytest.mark.parametrize("text", STREAMED_TEXT, ids=[f"text{i}" for i in range(len(STREAMED_TEXT))])
def test_streaming_matches_decode_byte_for_byte(name, text):
    tokenizer = TOKENIZERS[name]()
    assert_streams_exactly(tokenizer, tokenizer.encode(text, add_special_tokens=False))
    assert_streams_exactly(tokenizer, tokenizer.encode(text))  # with BOS where the model adds one


def test_streaming_exercises_split_characters():
    """The texts above do split characters across tokens: SmolLM2's byte-level pieces of emoji and
    Gemma 3's byte-fallback tokens (<0xF0> <0x9F> ...) decode to U+FFFD one at a time."""
    smol, gemma = smollm2_tokenizer(), gemma3_tokenizer()
    smol_ids = smol.encode(STREAMED_TEXT[0], add_special_tokens=False)
    assert any("\ufffd" in smol.decode([i]) for i in smol_ids)
    gemma_ids = gemma.encode(STREAMED_TEXT[2], add_special_tokens=False)
    assert sum(gemma.id_to_token(i).startswith("<0x") for i in gemma_ids) >= 12
    deltas = stream(gemma, gemma_ids)
    assert "" in deltas[:-1]  # held back while a character was unfinished


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_streaming_with_special_tokens_kept_or_skipped(name):
    tokenizer = TOKENIZERS[name]()
    turn = ("<|im_start|>user\nSalut 😀<|im_end|>\n<|im_start|>assistant\n日本🇫🇷<|im_end|>" if name == "smollm2"
            else "<start_of_turn>user\nSalut 😀<end_of_turn>\n<start_of_turn>model\n日本🇫🇷<end_of_turn>")
    ids = tokenizer.encode(turn)
    assert_streams_exactly(tokenizer, ids)
    assert_streams_exactly(tokenizer, ids, skip_special_tokens=True)


def test_sentencepiece_leading_space_and_byte_fallback():
    """A Llama-style SentencePiece decoder drops the first token's leading ▁; later ▁ stay spaces, and
    <0xC3><0xA9> become é only once both bytes are in."""
    tokenizer = TOKENIZERS["sentencepiece"]()
    ids = tokenizer.encode("the hello héllo world 日本 ü", add_special_tokens=False)
    assert tokenizer.id_to_token(ids[0]) == "▁the"
    deltas = stream(tokenizer, ids)
    assert deltas[0] == "the" and "".join(deltas) == tokenizer.decode(ids) == "the hello héllo world 日本 ü"
    assert_streams_exactly(tokenizer, ids)


def test_flush_emits_an_unfinished_character_as_decode_does():
    gemma = gemma3_tokenizer()
    ids = gemma.encode("ok 🫨", add_special_tokens=False)[:-2]  # cut inside the emoji's four bytes
    deltas = stream(gemma, ids)
    assert "\ufffd" not in "".join(deltas[:-1]) and "\ufffd" in deltas[-1]
    assert "".join(deltas) == gemma.decode(ids)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_streaming_random_ids_never_changes_emitted_text(name):
    """Arbitrary id sequences (what a sampler can produce) still stream to exactly decode()."""
    import random

    tokenizer = TOKENIZERS[name]()
    rng = random.Random(7)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(40)]
        deltas = stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids)
