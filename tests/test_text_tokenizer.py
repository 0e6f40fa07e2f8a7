"""rung's tokenizers against transformers' on the same sources.

GGUF: transformers builds the tokenizer with the class AutoTokenizer resolves for the file
(TokenizersBackend for SmolLM2's llama/gpt2 file, GemmaTokenizer for Gemma 3's; AutoTokenizer itself
spends 10-60 s re-reading the config through gguf-py, so the oracle calls those classes directly,
which is what AutoTokenizer then does). Each comparison checks the whole backend (normalizer,
pre-tokenizer, model with vocabulary and merges, decoder, post-processor, added tokens) and then ids
and decoded text on varied text.
"""

from __future__ import annotations

import json
import random

import pytest

from rung.text import Tokenizer, load_tokenizer
from rung.text.tokenizer import bytes_to_unicode
from test_text_gguf_metadata import (GEMMA3_GGUF_PARTS, gemma3_tokenizer,
                                     read_gguf_metadata, smollm2_metadata, smollm2_tokenizer,
                                     smollm2_transformers)

VARIED_TEXT = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand\r\nCRLF\n",
    "    indented\n        code\n",
    "Ça va? Déjà vu, naïve café, Straße, señor, Ångström, ŉ, ǅ",
    "e\u0301 combining, ﬁ ligature, Ａ fullwidth, \u00a0nbsp, zero\u200bwidth",
    "日本語のテキストと中文字符，还有한국어 문장。",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧‍👦 ❤️ 🫨",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }",
    "12345 3.14159 1,000,000 0x1F 2024-06-01",
    "https://example.com/path?q=a&b=c#frag",
    "ALL CAPS and MiXeD cAsE, don't won't it's we'll",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
    "a" * 300,
    "\n" * 7 + " " * 9 + "\t" * 3,
]


def special_text(tokenizer: Tokenizer) -> list[str]:
    """Text with the model's special tokens written in it, and look-alikes that are not."""
    specials = [tokenizer.id_to_token(i) for i in sorted(tokenizer.special_ids)[:12]]
    return [
        "".join(f"{s}text {i}" for i, s in enumerate(specials)),
        f"{specials[1]}{specials[1]} x{specials[0]}y",
        "<|not_special|> <fake_token> <unused99999>",
    ]


def random_text(seed: int, count: int) -> list[str]:
    """Deterministic mixtures of scripts, symbols, whitespace and emoji."""
    pool = ("abcXYZ éüñßø日本語中文한국ab😀👍🏽🇫🇷‍ \t\n  .,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`0123456789"
            "\u0301\u00a0\u200b\U0001fae8\U00020000ǅ")
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(count)]


def assert_same_backend(ours: Tokenizer, theirs) -> None:
    """The two tokenizers serialize to the same tokenizer.json (the part-by-part diff only on failure)."""
    a, b = ours.backend.to_str(), theirs.backend_tokenizer.to_str()
    if a == b:
        return
    a, b = json.loads(a), json.loads(b)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert a[part] == b[part], f"{part} differs from transformers'"
    for key in b["model"]:
        assert a["model"][key] == b["model"][key], f"model.{key} differs from transformers'"
    assert a == b


def assert_same_ids_and_text(ours: Tokenizer, theirs, texts: list[str]) -> None:
    for text in texts:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == theirs.encode(text, add_special_tokens=add), (text, add)
        for skip in (False, True):
            decoded = theirs.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == decoded, (text, skip)


def test_smollm2_gguf_tokenizer_matches_transformers():
    theirs = smollm2_transformers()
    ours = smollm2_tokenizer()
    assert_same_backend(ours, theirs)
    assert_same_ids_and_text(ours, theirs, VARIED_TEXT + special_text(ours) + random_text(0, 150))
    assert (ours.bos_token, ours.eos_token, ours.vocab_size) == (theirs.bos_token, theirs.eos_token, len(theirs))
    assert ours.chat_template == theirs.chat_template


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory):
    """The Gemma 3 GGUF as one file, its four parts concatenated in order; removed afterwards."""
    path = tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-q4_k_m.gguf"
    with open(path, "wb") as out:
        for part in GEMMA3_GGUF_PARTS:
            with open(part, "rb") as f:
                while chunk := f.read(16 << 20):
                    out.write(chunk)
    yield path
    path.unlink(missing_ok=True)


def test_gemma3_gguf_tokenizer_matches_transformers(gemma3_gguf):
    from transformers import GemmaTokenizer

    theirs = GemmaTokenizer.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name)
    ours = gemma3_tokenizer()
    assert_same_backend(ours, theirs)
    assert_same_ids_and_text(ours, theirs, VARIED_TEXT + special_text(ours) + random_text(1, 150))
    assert (ours.bos_token, ours.eos_token, ours.vocab_size) == (theirs.bos_token, theirs.eos_token, len(theirs))


def test_bos_is_added_only_where_the_model_expects_it():
    gemma, smol = gemma3_tokenizer(), smollm2_tokenizer()
    assert gemma.encode("Hi")[0] == gemma.bos_token_id == 2  # add_bos_token true in the file
    assert gemma.encode("Hi", add_special_tokens=False)[0] != 2
    assert smol.encode("Hi") == smol.encode("Hi", add_special_tokens=False)  # add_bos_token false
    assert smol.bos_token == "<|im_start|>"  # the file's BOS id 1, never prepended


def test_eos_token_ids_hold_the_end_of_turn_tokens():
    gemma, smol = gemma3_tokenizer(), smollm2_tokenizer()
    assert gemma.eos_token_ids == {gemma.token_to_id("<eos>"), gemma.token_to_id("<end_of_turn>")} == {1, 106}
    assert smol.eos_token_ids == {smol.token_to_id("<|im_end|>"), smol.token_to_id("<|endoftext|>")} == {2, 0}


def test_special_tokens_stay_whole_and_can_be_skipped():
    smol = smollm2_tokenizer()
    ids = smol.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == smol.token_to_id("<|im_start|>") and ids[-1] == smol.token_to_id("<|im_end|>")
    assert smol.is_special(ids[0]) and not smol.is_special(ids[1])
    assert smol.decode(ids, skip_special_tokens=True) == "user\nHi"
    assert smol.id_to_token(ids[0]) == "<|im_start|>"


# -- synthetic GGUF vocabularies: the SentencePiece path with merges recovered from scores ------------


def sentencepiece_metadata(architecture: str = "llama") -> dict:
    """A small SentencePiece BPE vocabulary as llama.cpp stores one: byte-fallback tokens, scored
    pieces and no merges, a control and a user-defined token."""
    if architecture.startswith("gemma"):  # Gemma's layout: <pad> <eos> <bos> <unk> <mask>
        names, bos, eos, unk = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], 2, 1, 3
    else:
        names, bos, eos, unk = ["<unk>", "<s>", "</s>"], 1, 2, 0
    tokens = [(name, 0.0, 2 if name == "<unk>" else 3) for name in names]
    tokens += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces = ["▁", "e", "h", "l", "o", "t", "w", "r", "d", "a", "n", "i", "s", "▁t", "he", "▁the", "ll", "llo", "▁h",
              "▁he", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "an", "▁an", "▁and", "in", "is", "▁is", "▁i", "▁a",
              "▁▁", "▁▁▁▁", "日", "本"]
    tokens += [(p, -float(i), 1) for i, p in enumerate(pieces)]
    tokens += [("<start_of_turn>", 0.0, 3), ("<end_of_turn>", 0.0, 3), ("<think>", 0.0, 4)]
    return {"general.architecture": architecture, "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [t for t, _, _ in tokens], "tokenizer.ggml.scores": [s for _, s, _ in tokens],
            "tokenizer.ggml.token_type": [k for _, _, k in tokens], "tokenizer.ggml.bos_token_id": bos,
            "tokenizer.ggml.eos_token_id": eos, "tokenizer.ggml.unknown_token_id": unk}


def byte_level_metadata(pre: str = "qwen2") -> dict:
    """A small byte-level BPE vocabulary with merges, ChatML control tokens and a user-defined <think>."""
    alphabet = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġa n", "Ġan d", "1 2", "Ã ©"]
    words = ["Ġt", "he", "Ġthe", "Ġa", "in", "Ġan", "Ġand", "12", "Ã©"]
    tokens = alphabet + words + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    types = [1] * (len(alphabet) + len(words)) + [3, 3, 3, 4, 4]
    return {"general.architecture": "qwen3", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": len(tokens) - 5, "tokenizer.ggml.eos_token_id": len(tokens) - 3,
            "tokenizer.ggml.padding_token_id": len(tokens) - 5, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": "{{ messages[0]['content'] }}"}


def write_gguf(path, metadata: dict) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), metadata["general.architecture"])
    writer.add_tokenizer_model(metadata["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in metadata:
        writer.add_tokenizer_pre(metadata["tokenizer.ggml.pre"])
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    if "tokenizer.ggml.scores" in metadata:
        writer.add_token_scores(metadata["tokenizer.ggml.scores"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in metadata:
        writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    for key, add in [("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unknown_token_id", writer.add_unk_token_id), ("padding_token_id", writer.add_pad_token_id),
                     ("add_bos_token", writer.add_add_bos_token)]:
        if f"tokenizer.ggml.{key}" in metadata:
            add(metadata[f"tokenizer.ggml.{key}"])
    if "tokenizer.chat_template" in metadata:
        writer.add_chat_template(metadata["tokenizer.chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


SMALL_VOCAB_TEXT = ["the hello world", " hello  and  is", "héllo 日本 wörld ü€😀", "<start_of_turn>the<think>is",
                    "", "   ", "\n\nthe", "the and in 12 é", "<|im_start|>the<|im_end|><think>and</think>"]


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_sentencepiece_gguf_without_merges_matches_transformers(tmp_path, architecture):
    from transformers import GemmaTokenizer, LlamaTokenizer

    metadata = sentencepiece_metadata(architecture)
    write_gguf(tmp_path / "sp.gguf", metadata)
    oracle = GemmaTokenizer if architecture == "gemma3" else LlamaTokenizer
    theirs = oracle.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    ours = Tokenizer.from_gguf_metadata(read_gguf_metadata(tmp_path / "sp.gguf"))
    assert_same_backend(ours, theirs)
    assert_same_ids_and_text(ours, theirs, SMALL_VOCAB_TEXT)
    assert ours.encode("the")[0] == ours.bos_token_id  # a SentencePiece file that does not say otherwise gets BOS
    assert ours.decode(ours.encode("héllo", add_special_tokens=False)) == "héllo"  # é through <0xC3><0xA9>


@pytest.mark.parametrize("pre", ["qwen2", "smollm"])  # a pre-tokenizer transformers knows, and one it does not
def test_byte_level_gguf_matches_transformers(tmp_path, pre):
    from transformers import TokenizersBackend

    write_gguf(tmp_path / "bl.gguf", byte_level_metadata(pre))
    theirs = TokenizersBackend.from_pretrained(str(tmp_path), gguf_file="bl.gguf")
    ours = Tokenizer.from_gguf_metadata(read_gguf_metadata(tmp_path / "bl.gguf"))
    assert_same_backend(ours, theirs)
    assert_same_ids_and_text(ours, theirs, SMALL_VOCAB_TEXT)
    assert ours.eos_token == "<|im_end|>" and ours.chat_template == "{{ messages[0]['content'] }}"


# -- Hugging Face folders -----------------------------------------------------------------------------


def test_hf_folder_matches_transformers(tmp_path):
    """A folder as transformers saves one (tokenizer.json, tokenizer_config.json, chat_template.jinja),
    plus a generation_config.json listing two EOS ids."""
    from transformers import AutoTokenizer

    smollm2_transformers().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_hf_folder(tmp_path)
    assert_same_backend(ours, theirs)
    assert_same_ids_and_text(ours, theirs, VARIED_TEXT[:12] + special_text(ours))
    assert ours.chat_template == theirs.chat_template == smollm2_metadata()["tokenizer.chat_template"]
    assert (ours.bos_token, ours.eos_token, ours.model_type) == ("<|im_start|>", "<|im_end|>", "llama")
    assert ours.eos_token_ids == {0, 2}
    assert load_tokenizer(tmp_path).encode("Hi there") == ours.encode("Hi there")


def test_hf_folder_bos_follows_tokenizer_json_not_add_bos_token(tmp_path):
    """transformers 5 ignores tokenizer_config's add_bos_token when tokenizer.json exists: the
    post-processor in tokenizer.json decides."""
    from transformers import AutoTokenizer

    smollm2_transformers().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    ours, theirs = Tokenizer.from_hf_folder(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.encode("Hi") == theirs.encode("Hi") == ours.encode("Hi", add_special_tokens=False)

    tokenizer_json = json.loads((tmp_path / "tokenizer.json").read_text())
    tokenizer_json["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    ours, theirs = Tokenizer.from_hf_folder(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.encode("Hi") == theirs.encode("Hi") == [1] + ours.encode("Hi", add_special_tokens=False)


def test_default_specials_missing_from_the_vocabulary_are_not_appended():
    """transformers' GemmaTokenizer appends <bos>/<eos>/<pad>/<mask> as new ids past the vocabulary
    when a file lacks them; rung keeps every id inside the model's vocabulary."""
    metadata = sentencepiece_metadata("llama")
    metadata["general.architecture"] = "gemma3"
    ours = Tokenizer.from_gguf_metadata(metadata)
    assert ours.vocab_size == len(metadata["tokenizer.ggml.tokens"])
    assert max(ours.encode("<mask><bos> the")) < ours.vocab_size


def test_load_tokenizer_takes_a_folder_or_gguf_metadata(tmp_path):
    assert load_tokenizer(sentencepiece_metadata()).encode("the") == [1, 274]
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="metadata dict"):
        load_tokenizer(tmp_path / "model.gguf")


def test_unsupported_gguf_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'bert'"):
        Tokenizer.from_gguf_metadata({**sentencepiece_metadata(), "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


def test_deepseek_v3_gguf_pre_tokenizer_splits_digits_cjk_and_punctuation_as_its_tokenizer_json():
    # llama.cpp's "deepseek-v3" pre-tokenizer (its converter writes it for DeepSeek-V3 / R1): three
    # regex splits in a row, as DeepSeek-V3's tokenizer.json has them; transformers has no mapping
    ours = Tokenizer.from_gguf_metadata(byte_level_metadata("deepseek-v3"))
    pieces = [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str("x=1234567 日本語のテキスト!abc it's")]
    decode = {v: k for k, v in bytes_to_unicode().items()}
    text = [bytes(decode[c] for c in p).decode() for p in pieces]
    # digits in threes; one run of ideographs, hiragana and katakana; punctuation that leads letters
    # stays with them; no GPT-2 contraction rule ("'s" by the punctuation-letters branch)
    assert text == ["x", "=", "123", "456", "7", " ", "日本語のテキスト", "!abc", " it", "'s"]
    # GPT-2's regex (the fallback for a name rung does not know) splits otherwise
    gpt2 = Tokenizer.from_gguf_metadata(byte_level_metadata("not-a-known-pre"))
    other = [p for p, _ in gpt2.backend.pre_tokenizer.pre_tokenize_str("x=1234567 日本語のテキスト!abc it's")]
    assert other != pieces
