"""Grammar-constrained decoding: llguidance's mask applied in the engine's sampler, one grammar state
per sample; and the family grammars (JSON answers, required tool calls) accept exactly their
family's syntax."""

from __future__ import annotations

import json

import jsonschema
import pytest

from rung.engine.engine import Engine, EngineConfig
from rung.engine.sampling_params import SamplingParams
from rung.serve.family import Family
from rung.serve.structured import GrammarError, Grammars, check_json_schema

SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["kind", "ok", "n"], "additionalProperties": False}


def constrained(grammars, schema, **kw):
    factory = grammars.compile(Family("json", False).grammar_answer(schema, thinking=False))
    return SamplingParams(max_tokens=80, constraint=factory, **kw)


def texts(engine, requests):
    seqs = engine.run(requests)
    return [[engine.tokenizer.decode(s.output_ids, skip_special_tokens=True) for s in seqs[rid]] for rid in seqs]


@pytest.mark.parametrize("speculative", [None, "ngram"])
def test_every_sample_of_a_batch_follows_its_grammar(llama, speculative):
    model, tokenizer = llama
    grammars = Grammars(tokenizer, model.config.vocab_size)
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=256, speculative=speculative))
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = texts(Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=256)), [([5, 6, 7, 8], free)])[0]
    requests = [([5, 6, 7, 8], constrained(grammars, SCHEMA, n=3, temperature=1.0, seed=1)),
                ([5, 6, 7, 8], free),  # unconstrained, in the same batch: no mask leaks into it
                ([9, 10, 11], constrained(grammars, {"type": "array", "items": {"type": "boolean"}, "minItems": 1,
                                                     "maxItems": 3}, temperature=0))]
    out = texts(engine, requests)
    assert len(out[0]) == 3
    for text in out[0]:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert out[1] == alone
    value = json.loads(out[2][0])
    assert isinstance(value, list) and 1 <= len(value) <= 3 and all(isinstance(v, bool) for v in value)
    assert all(sum(engine.free_blocks()) == 256 * len(engine.pool.groups) for _ in [0])


def test_invalid_json_schemas_are_refused_with_the_reason():
    for bad, words in [({"type": "objectz"}, "not a valid JSON Schema"), ({"properties": 3}, "not a valid JSON Schema"),
                       ({"required": "name"}, "not a valid JSON Schema"), ([1], "must be a JSON object")]:
        with pytest.raises(GrammarError, match=words):
            check_json_schema(bad, "schema")
    check_json_schema(SCHEMA, "schema")


def test_a_schema_the_grammar_engine_cannot_satisfy_is_refused(llama):
    model, tokenizer = llama
    grammars = Grammars(tokenizer, model.config.vocab_size)
    with pytest.raises(GrammarError):
        grammars.compile(Family("json", False).grammar_answer(
            {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]}, thinking=False))


# ---- family grammars on a vocabulary with Qwen3's and harmony's tokens ----------------------------------


@pytest.fixture(scope="module")
def chat_vocab():
    return make_chat_vocab()


def make_chat_vocab(harmony: bool = True):
    """A byte-level BPE with Qwen3's tags (added, not special) and harmony's special tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tokenizers import AddedToken

    from rung.text.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ['{"name": "get_weather", "arguments": {"city": "Paris"}}', "I should call the tool first.",
              "analysis commentary final functions json assistant"]
    backend.train_from_iterator(corpus * 10, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t in ("<think>", "</think>", "<tool_call>", "</tool_call>")])
    backend.add_special_tokens(["<|im_end|>", "<|im_start|>"] + (["<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                                "<|constrain|>", "<|return|>", "<|call|>"] if harmony else []))
    tokenizer = Tokenizer(backend, eos_token="<|im_end|>")
    return tokenizer, Grammars(tokenizer, tokenizer.vocab_size)


def accepts(chat_vocab, grammar: str, text: str) -> bool:
    import llguidance

    tokenizer, grammars = chat_vocab
    assert {"<think>", "<tool_call>", "<|channel|>"} <= grammars.added
    matcher = llguidance.LLMatcher(grammars.tokenizer, grammar, log_level=0)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return matcher.consume_tokens(ids) and matcher.is_accepting() and not matcher.is_error()


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}


def test_qwen3_answer_grammar_allows_thinking_first_only_when_on(chat_vocab):
    qwen3 = Family("hermes", thinks=True)
    added = chat_vocab[1].added
    on, off = qwen3.grammar_answer(CITY, True, added), qwen3.grammar_answer(CITY, False, added)
    answer = '{"city": "Paris"}'
    thought = "<think>\nI should answer in JSON.\n</think>\n\n" + answer
    assert accepts(chat_vocab, on, thought) and accepts(chat_vocab, on, answer)
    assert accepts(chat_vocab, off, answer) and not accepts(chat_vocab, off, thought)
    assert not accepts(chat_vocab, on, '{"town": "Paris"}')


def test_a_think_block_the_prompt_opened_must_be_closed_first(chat_vocab):
    added = chat_vocab[1].added
    grammar = Family("hermes", thinks=True).grammar_answer(CITY, True, added, opened=True)
    assert accepts(chat_vocab, grammar, 'Short thought.\n</think>\n\n{"city": "Paris"}')
    assert not accepts(chat_vocab, grammar, '{"city": "Paris"}')


def test_qwen3_required_tool_call_grammar(chat_vocab):
    grammar = Family("hermes", thinks=True).grammar_call([WEATHER], True, chat_vocab[1].added)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert accepts(chat_vocab, grammar, call)
    assert accepts(chat_vocab, grammar, "<think>\nI should call the tool first.\n</think>\n\n" + call)
    assert not accepts(chat_vocab, grammar, '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>')
    assert not accepts(chat_vocab, grammar, "Paris is sunny.")


def test_harmony_grammars(chat_vocab):
    harmony = Family("harmony", thinks=False)
    analysis = "<|channel|>analysis<|message|>I should call the tool first.<|end|><|start|>assistant"
    call = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
    grammar = harmony.grammar_call([WEATHER], thinking=True)
    assert accepts(chat_vocab, grammar, analysis + call) and accepts(chat_vocab, grammar, call)
    assert not accepts(chat_vocab, grammar, "<|channel|>final<|message|>sunny")
    answer = harmony.grammar_answer(CITY, thinking=True)
    assert accepts(chat_vocab, answer, analysis + '<|channel|>final<|message|>{"city": "Paris"}')
    assert not accepts(chat_vocab, answer, '<|channel|>final<|message|>{"city": 3}')


def test_json_convention_call_grammar_forces_a_named_tool(chat_vocab):
    grammar = Family("json", False).grammar_call([WEATHER], thinking=False)
    assert accepts(chat_vocab, grammar, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert not accepts(chat_vocab, grammar, '{"name": "get_time", "arguments": {}}')
