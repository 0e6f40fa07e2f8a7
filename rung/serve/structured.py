"""Structured output enforced while decoding, through llguidance.

A request's grammar (a JSON schema, or a Lark grammar with inline ``%json`` for formats that wrap
the JSON in tags or harmony headers) is compiled and checked once, when the request arrives; a bad
one is a 400 before anything runs. Each sample then gets its own copy of the matcher
(``SamplingParams.constraint`` is a factory the engine calls once per sample), and the engine's
sampler asks it for the mask of allowed next tokens at every step, so n > 1 samples, preemption
and continuous batching keep their own grammar state.
"""

from __future__ import annotations

import json
from typing import Any

import torch

# compact but readable JSON, one fixed form: with free whitespace a small model can loop on blanks
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile, with its first error."""


class Grammars:
    """The model's tokenizer as llguidance sees it (built once, ~1 s), and grammars compiled for it."""

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.eos = sorted(tokenizer.eos_token_ids)
        # the Rust tokenizer's own JSON, added and special tokens included (what llguidance.hf does)
        self.tokenizer = _ll_tokenizer(llguidance, tokenizer.backend.to_str(), vocab_size, self.eos,
                                       tokenizer.eos_token_id)
        # llguidance treats every added token as a token grammars name (`<think>`), never as its text
        self.added = frozenset(t.content for t in tokenizer.backend.get_added_tokens_decoder().values())

    @staticmethod
    def json_schema(schema: dict[str, Any]) -> str:
        import llguidance

        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        except (ValueError, TypeError) as e:
            raise GrammarError(str(e)) from None

    @staticmethod
    def lark(text: str) -> str:
        import llguidance

        return llguidance.LLMatcher.grammar_from_lark(text)

    def compile(self, grammar: str) -> "ConstraintFactory":
        """Check ``grammar`` and return the per-sample constraint factory (GrammarError if invalid)."""
        llg = self._llg
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise GrammarError(messages[0] if messages else "the grammar does not compile")
        matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return ConstraintFactory(matcher, self.vocab_size, self.eos)


def _ll_tokenizer(llguidance, tokenizer_json: str, vocab_size: int, eos: list[int], primary: int | None):
    """llguidance's tokenizer with every EOS id (1.7 and later); llguidance before 1.7 takes one
    id (a list is a TypeError), so it gets the tokenizer's own EOS, and ``Constraint`` allows the
    other EOS ids wherever it allows that one."""
    try:
        return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
    except TypeError:
        one = primary if primary in eos else (eos[0] if eos else None)
        return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=one)


class ConstraintFactory:
    """``SamplingParams.constraint``: a fresh grammar state per sample."""

    def __init__(self, matcher, vocab_size: int, eos: list[int]):
        self.matcher, self.vocab_size, self.eos = matcher, vocab_size, eos

    def __call__(self) -> "Constraint":
        return Constraint(self.matcher.deep_copy(), self.vocab_size, self.eos)


class Constraint:
    """One sample's grammar state. ``allowed(output_ids)`` first feeds the matcher the tokens it has
    not seen, then returns the [vocab] bool mask of tokens that keep the output in the grammar
    (EOS once it is complete)."""

    def __init__(self, matcher, vocab_size: int, eos: list[int]):
        from llguidance.torch import allocate_token_bitmask

        self.matcher, self.vocab_size, self.eos = matcher, vocab_size, eos
        self.consumed = 0
        self._bitmask = allocate_token_bitmask(1, vocab_size)  # [1, ceil(vocab / 32)] int32

    def allowed(self, output_ids: list[int]) -> torch.Tensor:
        from llguidance.torch import fill_next_token_bitmask

        if len(output_ids) < self.consumed:  # never expected: the engine only appends
            self.matcher.rollback(self.consumed - len(output_ids))
            self.consumed = len(output_ids)
        if len(output_ids) > self.consumed:
            self.matcher.consume_tokens(output_ids[self.consumed:])
            self.consumed = len(output_ids)
        if self.matcher.is_error():  # a token the grammar refused (cannot happen under the mask): end it
            return self._only_eos()
        fill_next_token_bitmask(self.matcher, self._bitmask)
        # bit j of word w allows token 32 * w + j
        mask = ((self._bitmask[0, :, None] >> _SHIFTS) & 1).reshape(-1)[: self.vocab_size].bool()
        if self.eos and bool(mask[self.eos].any()):  # llguidance < 1.7 knows one EOS id: an end allows every one
            mask[self.eos] = True
        return mask if bool(mask.any()) else self._only_eos()

    def _only_eos(self) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self.eos] = True
        return mask


def check_json_schema(schema: Any, param: str) -> None:
    """Raise GrammarError when ``schema`` is not a valid JSON Schema (per its own $schema draft,
    2020-12 when it names none)."""
    from jsonschema import exceptions, validators

    if not isinstance(schema, dict):
        raise GrammarError(f"{param} must be a JSON object, not {type(schema).__name__}")
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise GrammarError(f"{param} is not a valid JSON Schema: {e.message}" + (f" (at {where})" if where else ""))


def json_text(value: Any) -> str:
    """JSON as the grammar writes it (for tests and history rendering)."""
    return json.dumps(value, ensure_ascii=False, separators=(JSON_STYLE["item_separator"], JSON_STYLE["key_separator"]))
