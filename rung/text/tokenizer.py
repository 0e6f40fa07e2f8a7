"""Tokenizer: a `tokenizers.Tokenizer` plus what a model expects around it (BOS, stop tokens, chat template).

Two sources:
- a Hugging Face folder: `tokenizer.json` (the tokenizers library's own file), with the BOS/EOS and
  chat-template facts spread over tokenizer_config.json, special_tokens_map.json,
  generation_config.json and chat_template.jinja;
- a GGUF file's metadata: llama.cpp stores the vocabulary, merges, scores, token types and special
  ids, but no tokenizer.json. We rebuild the tokenizer transformers builds from the same keys
  (transformers/integrations/gguf/gguf_tokenizer_mapping.py and the GPT2Tokenizer / LlamaTokenizer /
  GemmaTokenizer classes it hands them to), so the ids equal
  `AutoTokenizer.from_pretrained(folder, gguf_file=...)`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

# llama.cpp's token types (gguf-py's TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn in the chat formats rung knows. A model stops on its EOS and on these, when its
# vocabulary has them as added tokens. Harmony's `<|end|>` is deliberately absent: it ends one message
# of a reply, not the reply (gpt-oss stops on `<|return|>` and `<|call|>`).
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|return|>", "<|call|>",
                      "<|endoftext|>")

# Pre-tokenizer splits transformers applies for a GGUF `tokenizer.ggml.pre` (gguf_tokenizer_mapping.py,
# GGUF_PRE_TOKENIZER_SPLITS). Any other value keeps the class's own pre-tokenizer (GPT-2's regex for
# byte-level vocabularies).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek-V3 / R1 (llama.cpp's "deepseek-v3"): three splits in a row, as its tokenizer.json states them
# (transformers' GGUF mapping has no entry for it): digits in threes, CJK runs, then the rest
_DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",  # CJK ideographs 一-龥, hiragana, katakana
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
GGUF_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
    "deepseek-v3": _DEEPSEEK_V3_SPLITS,
}

_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


class Tokenizer:
    """A `tokenizers.Tokenizer` with the model's special-token facts. Build it with `from_hf_folder`
    or `from_gguf_metadata`; `encode` adds BOS only when the model expects it."""

    def __init__(self, backend: Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None, eos_token_ids: Iterable[int] = (),
                 chat_template: str | None = None, model_type: str | None = None, source: str = ""):
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.chat_template = chat_template
        self.model_type = model_type
        self.source = source
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self._added_ids = frozenset(added)
        stops = {i for i in eos_token_ids if i is not None}
        if eos_token is not None and (eos_id := backend.token_to_id(eos_token)) is not None:
            stops.add(eos_id)
        for token in END_OF_TURN_TOKENS:
            token_id = backend.token_to_id(token)
            if token_id is not None and token_id in self._added_ids:
                stops.add(token_id)
        self._eos_token_ids = frozenset(stops)
        self._guard = None

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> "Tokenizer":
        return _from_hf_folder(Path(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> "Tokenizer":
        return _from_gguf_metadata(metadata)

    # -- encoding -----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`, the model's post-processor adds BOS (and EOS)
        exactly when the model expects them; special tokens written in the text stay whole."""
        # encode_batch, not encode: the same ids, but it lets go of the GIL while it works, so a
        # megabyte prompt tokenized on a server's worker thread does not stop its event loop
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
                    **kwargs) -> list[int]:
        """Render `messages` with the model's chat template and encode the result (rung.text.chat's
        encode_chat: special tokens come from the template only, never from the messages)."""
        from rung.text.chat import chat_template_for, encode_chat

        return encode_chat(self, chat_template_for(self), messages, add_generation_prompt, tools, **kwargs)[1]

    @property
    def special_token_guard(self):
        """Keeps special-token strings in user text from becoming control tokens (rung.text.user_text)."""
        if self._guard is None:
            from rung.text.user_text import SpecialTokenGuard

            self._guard = SpecialTokenGuard(self.backend, self._special_ids)
        return self._guard

    # -- vocabulary ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id generation stops on: the EOS, generation_config's EOS list, and the end-of-turn
        tokens of the model's chat format (`<|im_end|>`, `<end_of_turn>`, `<|return|>`, `<|call|>`, ...)."""
        return self._eos_token_ids

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, as chat templates see them (`bos_token`, ...)."""
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                 "pad_token": self.pad_token}
        return {k: v for k, v in named.items() if v is not None}

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source or 'in memory'}, vocab={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, stops={sorted(self.eos_token_ids)})")


# -- Hugging Face folders -----------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _folder_chat_template(path: Path, config: dict) -> str | None:
    """transformers' order: chat_template.jinja beside the tokenizer wins over tokenizer_config's field."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _from_hf_folder(path: Path) -> Tokenizer:
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (rung reads the tokenizers library's file; "
                                f"sentencepiece .model or tiktoken files alone are not supported)")
    try:
        backend = Backend.from_file(str(tokenizer_file))
    except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
        raise ValueError(f"{tokenizer_file}: cannot be read by the tokenizers library ({e})") from None
    config = _read_json(path / "tokenizer_config.json")
    special_map = _read_json(path / "special_tokens_map.json")
    generation = _read_json(path / "generation_config.json")
    model_config = _read_json(path / "config.json")

    named = {name: _token_content(config.get(name, special_map.get(name)))
             for name in ("bos_token", "eos_token", "unk_token", "pad_token")}

    # tokens tokenizer_config declares that tokenizer.json lacks (transformers adds them the same way)
    have = {tok.content for tok in backend.get_added_tokens_decoder().values()}
    for index, entry in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
        if entry.get("content") not in have:
            token = AddedToken(entry["content"], single_word=entry.get("single_word", False),
                               lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                               normalized=entry.get("normalized", not entry.get("special", False)),
                               special=entry.get("special", False))
            (backend.add_special_tokens if token.special else backend.add_tokens)([token])
    _add_named_special_tokens(backend, named.values())

    # tokenizer.json's post-processor decides BOS/EOS: transformers 5 drops tokenizer_config's
    # add_bos_token / add_eos_token when a tokenizer.json exists (PreTrainedTokenizerBase._from_pretrained)
    if backend.post_processor is None:
        _set_bos_eos_processor(backend, named["bos_token"], named["eos_token"], False, False)

    return Tokenizer(backend, **named, eos_token_ids=_ids(generation.get("eos_token_id")),
                     chat_template=_folder_chat_template(path, config),
                     model_type=model_config.get("model_type"), source=str(path))


# -- GGUF metadata --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters, in which byte-level vocabularies are spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges a SentencePiece BPE vocabulary implies, best first: every split of a token into two
    tokens, ordered by the merged token's score, then by longer left part, then longer right part.

    Same list as transformers' `generate_merges(vocab, vocab_scores)` (tokenization_utils_base.py).
    It also orders each token's splits by the ids of their parts before its final stable sort, but
    that cannot matter: two splits of one token differ in the length of their left part.

    A cut is only sliced where both halves have the length of some vocabulary entry: slicing every cut
    is quadratic in a token's length, and one crafted token of a million characters took minutes.
    """
    lengths = {len(t) for t in vocab}
    merges = []
    append = merges.append
    for merged, score in scores.items():
        n = len(merged)
        for cut in range(1, n):
            if cut in lengths and n - cut in lengths:
                left = merged[:cut]
                if left in vocab:
                    right = merged[cut:]
                    if right in vocab:
                        append((score, cut, n - cut, left, right))
    merges.sort(key=itemgetter(0, 1, 2), reverse=True)  # stable: ties keep the vocabulary's order
    return [(m[3], m[4]) for m in merges]


def _metadata_field(metadata: dict, key: str, required: bool = False):
    value = metadata.get(key)
    if required and value is None:
        raise ValueError(f"GGUF metadata has no {key!r}; cannot build a tokenizer without it")
    return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_array(metadata: dict, key: str, kind: str, ok, n: int | None) -> None:
    """`key`, when present, is a list of `n` items that each pass `ok`."""
    value = metadata.get(key)
    if value is None:
        return
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"GGUF metadata: {key!r} must be an array of {kind}, not {type(value).__name__}")
    if n is not None and len(value) != n:
        raise ValueError(f"GGUF metadata: {key!r} has {len(value)} entries for {n} tokens")
    for i, item in enumerate(value):
        if not ok(item):
            raise ValueError(f"GGUF metadata: {key!r}[{i}] must be {kind}, not {type(item).__name__}")


def check_tokenizer_metadata(metadata: dict) -> None:
    """Every tokenizer key rung reads has the type and length llama.cpp writes, so a malformed file is
    one line naming its key rather than a TypeError deep in the tokenizers library."""
    model = _metadata_field(metadata, "tokenizer.ggml.model", required=True)
    if not isinstance(model, str):
        raise ValueError(f"GGUF metadata: 'tokenizer.ggml.model' must be a string, not {type(model).__name__}")
    _metadata_field(metadata, "tokenizer.ggml.tokens", required=True)
    _check_array(metadata, "tokenizer.ggml.tokens", "strings", lambda t: isinstance(t, str), None)
    n = len(metadata["tokenizer.ggml.tokens"])
    if n == 0:
        raise ValueError("GGUF metadata: 'tokenizer.ggml.tokens' is empty")
    _check_array(metadata, "tokenizer.ggml.scores", "numbers",
                 lambda s: isinstance(s, (int, float)) and not isinstance(s, bool), n)
    _check_array(metadata, "tokenizer.ggml.token_type", "integers", _is_int, n)
    _check_array(metadata, "tokenizer.ggml.merges", "strings 'left right'",
                 lambda m: isinstance(m, str) and m.find(" ", 1) > 0, None)
    for key in ("bos_token_id", "eos_token_id"):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not (_is_int(token_id) and 0 <= token_id < n):
            raise ValueError(f"GGUF metadata: 'tokenizer.ggml.{key}' is {token_id!r}, not a token id "
                             f"in [0, {n})")
    for key in ("unknown_token_id", "padding_token_id"):  # out of range: absent, as transformers reads it
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not _is_int(token_id):
            raise ValueError(f"GGUF metadata: 'tokenizer.ggml.{key}' must be an integer, not {type(token_id).__name__}")
    for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"):
        if metadata.get(key) is not None and not isinstance(metadata[key], (bool, int)):
            raise ValueError(f"GGUF metadata: {key!r} must be a boolean, not {type(metadata[key]).__name__}")
    for key in ("tokenizer.ggml.pre", "tokenizer.chat_template", "general.architecture", "general.name"):
        if metadata.get(key) is not None and not isinstance(metadata[key], str):
            raise ValueError(f"GGUF metadata: {key!r} must be a string, not {type(metadata[key]).__name__}")


def _file_merges(metadata: dict, vocab: dict[str, int]) -> list[tuple[str, str]] | None:
    """`tokenizer.ggml.merges` as pairs: each entry splits at its first space after the first character
    (llama.cpp's llm_tokenizer_bpe: a merge's left part may itself start with a space). Both parts and
    their merge must be tokens: the tokenizers library panics on a merge whose result is not."""
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = []
    for i, m in enumerate(merges):
        cut = m.find(" ", 1)
        left, right = m[:cut], m[cut + 1:]
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise ValueError(f"GGUF metadata: 'tokenizer.ggml.merges'[{i}] ({m!r}) merges tokens that are not "
                             f"all in 'tokenizer.ggml.tokens'")
        pairs.append((left, right))
    return pairs


def _byte_level_bpe(tokens: list[str], metadata: dict) -> Backend:
    """GPT2Tokenizer's shape: byte-level BPE, GPT-2's regex, byte-level decoder."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # a token spelled outside the byte alphabet (a llama.cpp control token such as "<|im_start|>" is
    # fine, it is ASCII) is respelled byte by byte, as transformers does
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = _file_merges(metadata, vocab)
    if merges is None:
        raise ValueError("GGUF metadata: a byte-level ('gpt2') vocabulary needs 'tokenizer.ggml.merges'")
    backend = Backend(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                          end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # GPT2Tokenizer's own default specials; added when the vocabulary has them (transformers would
    # append a missing one as a new id past the model's vocabulary, which we do not)
    _add_named_special_tokens(backend, ["<|endoftext|>"])
    return backend


def _sentencepiece_bpe(tokens: list[str], metadata: dict, *, gemma: bool, scores: dict | None = None) -> Backend:
    """LlamaTokenizer's shape (Metaspace, byte fallback, strip one leading space when decoding) or
    GemmaTokenizer's (spaces become ▁ in a normalizer, no prefix space). Merges come from the file,
    or are recovered from the scores."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _file_merges(metadata, vocab)
    if merges is None:
        if scores is None:
            file_scores = _metadata_field(metadata, "tokenizer.ggml.scores", required=True)
            scores = dict(zip(tokens, file_scores))
        merges = generate_merges(vocab, scores)
    if gemma:
        backend = Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None,
                              byte_fallback=True))
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        defaults = ["<bos>", "<eos>", "<unk>", "<pad>", "<mask>"]
    else:
        backend = Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        # transformers' LlamaTokenizer: add_prefix_space=True, legacy=False → prepend "▁" to the first
        # word only
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(content=" ", left=1, right=0)])
        defaults = ["<s>", "</s>", "<unk>"]
    _add_named_special_tokens(backend, defaults)
    return backend


def _gemma_tokens(tokens: list[str]) -> list[str]:
    """Gemma files store a token of spaces as real spaces; GemmaTokenizer looks spaces up as ▁."""
    return ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]


def _build_gguf_backend(metadata: dict, tokens: list[str]) -> tuple[Backend, bool]:
    """The backend for `tokenizer.ggml.model`, and whether it is byte-level."""
    model = _metadata_field(metadata, "tokenizer.ggml.model", required=True)
    architecture = metadata.get("general.architecture", "")
    if model == "gpt2":
        return _byte_level_bpe(tokens, metadata), True
    if model == "llama" and architecture in _GEMMA_ARCHS:
        # Gemma files list no merges and their scores do not follow the merge order; the order of the
        # tokens in the file does (transformers' gemma_tokenizer)
        respelled = _gemma_tokens(tokens)
        positions = {t: -i for i, t in enumerate(respelled)}
        return _sentencepiece_bpe(respelled, metadata, gemma=True, scores=positions), False
    if model == "llama" and architecture == "phi3":
        backend = _sentencepiece_bpe(tokens, metadata, gemma=False)
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
        return backend, False
    if model == "llama":
        return _sentencepiece_bpe(tokens, metadata, gemma=False), False
    if model == "gemma4":
        return _sentencepiece_bpe(tokens, metadata, gemma=True), False
    raise ValueError(f"GGUF metadata: tokenizer.ggml.model {model!r} is not supported; rung builds 'gpt2' "
                     f"(byte-level BPE) and 'llama'/'gemma4' (SentencePiece BPE) vocabularies")


def _from_gguf_metadata(metadata: dict[str, Any]) -> Tokenizer:
    check_tokenizer_metadata(metadata)
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = list(metadata.get("tokenizer.ggml.token_type") or ())
    backend, byte_level = _build_gguf_backend(metadata, tokens)

    # transformers' add_gguf_special_tokens: CONTROL tokens become special added tokens (in a
    # byte-level vocabulary only those spelled in the byte alphabet; others are llama.cpp mislabels),
    # USER_DEFINED tokens found in the vocabulary become plain added tokens, so both stay whole
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
               if kind == CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user_defined = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
                    if kind == USER_DEFINED and t in vocab]
    if user_defined:
        backend.add_tokens(user_defined)

    split = GGUF_PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
    if split is not None:
        splits = (split,) if isinstance(split, str) else split
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            *(pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in splits),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    def named(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    bos, eos = named("bos_token_id"), named("eos_token_id")
    unk, pad = named("unknown_token_id"), named("padding_token_id")
    _add_named_special_tokens(backend, [bos, eos, unk, pad])

    model = metadata["tokenizer.ggml.model"]
    add_bos = metadata.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        add_bos = model == "llama"
    if model == "gemma4":
        add_bos = False  # its chat template writes <bos> (transformers follows the reference, not llama.cpp)
    _set_bos_eos_processor(backend, bos, eos, bool(add_bos), bool(metadata.get("tokenizer.ggml.add_eos_token", False)))

    name = metadata.get("general.name")
    return Tokenizer(backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
                     chat_template=metadata.get("tokenizer.chat_template"),
                     model_type=metadata.get("general.architecture"),
                     source=f"GGUF {name}" if name else "GGUF metadata")


# -- shared helpers ---------------------------------------------------------------------------------------


def _add_named_special_tokens(backend: Backend, names: Iterable[str | None]) -> None:
    """Make the named tokens special added tokens, when the vocabulary has them and they are not
    added already (transformers adds a class's default specials the same way)."""
    have = {tok.content for tok in backend.get_added_tokens_decoder().values()}
    new = []
    for name in names:
        if name is not None and name not in have and backend.token_to_id(name) is not None:
            new.append(AddedToken(name, normalized=False, special=True))
            have.add(name)
    if new:
        backend.add_special_tokens(new)


def _set_bos_eos_processor(backend: Backend, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> None:
    """transformers' TokenizersBackend.update_post_processor: BOS/EOS around each sequence as configured."""
    bos_id = backend.token_to_id(bos) if bos is not None else None
    eos_id = backend.token_to_id(eos) if eos is not None else None
    add_bos = add_bos and bos_id is not None
    add_eos = add_eos and eos_id is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
