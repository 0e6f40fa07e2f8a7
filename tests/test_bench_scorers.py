"""Every check type of rung bench, with the edge cases that trip scorers: unicode, numbers as
people write them, broken JSON, tool calls in several spellings, self-consistency votes."""

from __future__ import annotations

import re

import pytest

from rung.bench.records import CheckOutcome, Sample
from rung.bench.scorers import (extract_choice, extract_json, extract_numbers, parse_check, parse_tool_calls,
                                same_value, score_check, score_judge, score_perplexity, vote)
from rung.bench.suite import SuiteError


def score(raw: dict, text: str, choices=None, tool_calls=None, tools=None) -> CheckOutcome:
    return score_check(parse_check(raw, "test"), Sample(text=text, tool_calls=tool_calls), choices, tools)


# ---- exact / contains / regex --------------------------------------------------------------------


def test_exact_normalises_unicode_and_whitespace_but_not_case_by_default():
    assert score({"exact": "café"}, "  cafe\u0301 \n").passed  # decomposed é (e + combining acute) == composed
    assert score({"exact": "ABC"}, "ＡＢＣ").passed  # full-width letters (NFKC)
    assert score({"exact": "a b"}, "a \t\n b").passed
    assert not score({"exact": "Paris"}, "paris").passed
    assert score({"type": "exact", "value": "Paris", "ignore_case": True}, "PARIS").passed
    assert not score({"exact": "Paris"}, "Paris.").passed
    assert score({"type": "exact", "value": "Paris", "strip_punctuation": True}, "Paris.").passed


def test_contains_all_any_none_and_whole_words():
    rule = {"type": "contains", "value": ["Eiffel", "Paris"], "any": ["1889", "World's Fair"], "none": ["London"]}
    assert score(rule, "The eiffel tower in PARIS opened in 1889.").passed
    out = score(rule, "The Eiffel Tower in Paris, not London.")
    assert not out.passed and "none of" in out.detail and "contains 'London'" in out.detail
    assert out.score == pytest.approx(2 / 4)  # Eiffel and Paris present; the any-group and the none-rule fail
    assert score({"contains": "straße"}, "Die STRASSE ist lang").passed  # casefold: ß → ss
    assert score({"contains": "cat"}, "concatenate").passed
    assert not score({"type": "contains", "value": "cat", "word": True}, "concatenate").passed
    assert score({"type": "contains", "value": "cat", "word": True}, "a cat.").passed
    assert not score({"type": "contains", "value": "Paris", "ignore_case": False}, "paris").passed


def test_regex_search_full_match_and_flags():
    assert score({"regex": r"\b\d{3}-\d{4}\b"}, "call 555-1234 now").passed
    assert not score({"type": "regex", "pattern": r"\d+", "full": True}, "42 apples").passed
    assert score({"type": "regex", "pattern": r"\d+", "full": True}, " 42 ").passed
    assert score({"type": "regex", "pattern": "^yes$", "flags": "im"}, "Well\nYES\n").passed
    with pytest.raises(SuiteError, match="bad pattern"):
        parse_check({"regex": "(unclosed"}, "case 'x'")
    with pytest.raises(SuiteError, match="unknown regex flag"):
        parse_check({"type": "regex", "pattern": "a", "flags": "q"}, "case 'x'")


# ---- numbers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, numbers", [
    ("1,234.5", [1234.5]),
    ("-3", [-3.0]),
    ("\u22123 degrees", [-3.0]),  # U+2212 MINUS SIGN
    ("$1,200 and 45%", [1200.0, 45.0]),
    ("3.2e5", [320000.0]),
    ("１２３", [123.0]),  # full-width digits
    ("pages 3-4", [3.0, 4.0]),  # a range, not minus four
    ("1,2,3", [1.0, 2.0, 3.0]),  # a list, not one thousands-grouped number
    ("version 1.2.3 or v2", []),  # neither version strings nor identifiers
    ("It is 7.", [7.0]),  # the sentence's full stop is not a decimal point
    ("5kg of flour", [5.0]),
])
def test_numbers_are_read_as_written(text, numbers):
    assert extract_numbers(text) == numbers


def test_numeric_takes_the_final_answer_and_tolerances():
    assert score({"numeric": 7}, "Tom has 3 + 4 = 7 apples.").passed
    out = score({"numeric": 7}, "7 is wrong, it is 8")
    assert not out.passed and "read 8" in out.detail
    assert score({"type": "numeric", "value": 7, "pick": "first"}, "7 is wrong, it is 8").passed
    assert score({"type": "numeric", "value": 8, "pick": "any"}, "7, or maybe 8, or 9").passed
    assert score({"type": "numeric", "value": 3.14, "tolerance": 0.01}, "about 3.141").passed
    assert not score({"type": "numeric", "value": 3.14, "tolerance": 0.0001}, "about 3.141").passed
    assert score({"type": "numeric", "value": 1000, "rel_tolerance": 0.01}, "roughly 1,005").passed
    assert score({"numeric": "1,234.5"}, "The total is $1,234.50.").passed
    assert score({"numeric": -3}, "The answer is \u22123.").passed
    assert not score({"numeric": 7}, "seven").passed and "no number" in score({"numeric": 7}, "seven").detail
    with pytest.raises(SuiteError, match="must be a number"):
        parse_check({"numeric": "lots"}, "case 'x'")


# ---- multiple choice -------------------------------------------------------------------------------

CHOICES = ["Venus", "Mars", "Jupiter", "Saturn"]


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("B) Mars", "B"), ("**B**", "B"), ("Answer: B", "B"),
    ("The answer is (B).", "B"), ("I think option B is right", "B"), ("Mars", "B"), ("It is mars.", "B"),
    ("A good question! The answer is B", "B"),  # the article "A" is not a pick
    ("C. Jupiter", "C"), ("Venus or Mars", None), ("I don't know", None),
])
def test_choice_reads_the_picked_letter(text, letter):
    assert extract_choice(text, CHOICES) == letter


def test_choice_value_may_be_the_letter_or_the_option_text():
    assert score({"choice": "B"}, "B", CHOICES).passed
    assert score({"choice": "Mars"}, "(B)", CHOICES).passed
    out = score({"choice": "B"}, "C. Jupiter", CHOICES)
    assert not out.passed and out.detail == "picked C, expected B"


# ---- JSON ------------------------------------------------------------------------------------------

PERSON = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}


def test_json_finds_the_object_in_fences_or_prose():
    assert extract_json('```json\n{"a": 1}\n```') == ({"a": 1}, None)
    assert extract_json('Sure! Here it is: {"a": [1, 2]} Hope that helps.') == ({"a": [1, 2]}, None)
    assert extract_json('{"a": "ünï"}')[0] == {"a": "ünï"}
    value, error = extract_json('{"a": 1,, }')
    assert value is None and error.startswith("invalid JSON")
    assert extract_json("no braces here") == (None, "no JSON object in the answer")


def test_json_schema_and_fields():
    rule = {"type": "json", "schema": PERSON, "fields": {"name": "alice", "age": 30}}
    ok = score(rule, 'Here: {"name": "Alice", "age": 30}')
    assert ok.passed and ok.schema_valid and ok.score == 1.0
    wrong_type = score(rule, '{"name": "Alice", "age": "30"}')  # a string "30": schema fails, the field matches
    assert not wrong_type.passed and wrong_type.schema_valid is False and "schema: age" in wrong_type.detail
    wrong_field = score(rule, '{"name": "Bob", "age": 30}')
    assert not wrong_field.passed and wrong_field.schema_valid and 'name="Bob"' in wrong_field.detail
    broken = score(rule, '{"name": "Alice", "age": 30')
    assert not broken.passed and broken.schema_valid is False and "invalid JSON" in broken.detail


def test_json_fields_by_dotted_path_and_value_equality():
    rule = {"type": "json", "fields": {"order.items.0.qty": 2, "order.id": "A-1"}}
    assert score(rule, '{"order": {"id": "a-1", "items": [{"qty": 2.0}]}}').passed
    out = score(rule, '{"order": {"items": []}}')
    assert not out.passed and "order.items.0.qty missing" in out.detail and "order.id missing" in out.detail
    assert same_value(30, 30.0) and same_value("30", 30) and not same_value(True, 1) and not same_value(1, True)
    assert same_value("Ｐaris ", "paris") and not same_value(None, "x")
    with pytest.raises(SuiteError, match="not a valid JSON Schema"):
        parse_check({"type": "json", "schema": {"type": "no-such-type"}}, "case 'x'")


# ---- tool calls ------------------------------------------------------------------------------------

WEATHER = {"type": "tool_call", "name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris", "unit": "C"}}',  # unclosed, extra argument
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',  # Llama 3 spelling
    '{"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}',
    'I will call get_weather(city="Paris") now.',
])
def test_tool_call_parsed_from_text(text):
    assert score(WEATHER, text, tools=["get_weather"]).passed


def test_tool_call_from_the_api_and_what_fails():
    api = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert score(WEATHER, "", tool_calls=api).passed
    wrong_fn = score(WEATHER, "", tool_calls=[{"name": "get_time", "arguments": {}}])
    assert not wrong_fn.passed and "expected 'get_weather'" in wrong_fn.detail
    wrong_arg = score(WEATHER, "", tool_calls=[{"name": "get_weather", "arguments": {"city": "Rome"}}])
    assert not wrong_arg.passed and wrong_arg.score == 0.5
    none = score(WEATHER, "It is sunny in Paris.")
    assert not none.passed and "no tool call" in none.detail
    exact = dict(WEATHER, exact=True)
    assert not score(exact, "", tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris", "x": 1}}]).passed
    assert score({"type": "tool_call", "name": None}, "Hello! How can I help?").passed
    assert not score({"type": "tool_call", "name": None}, "", tool_calls=api).passed
    # name(...) syntax only for the case's own tools, and never evaluated
    assert parse_tool_calls('__import__("os").system("x")', ["get_weather"]) == []
    assert parse_tool_calls("get_weather(city=open('f'))", ["get_weather"]) == []



def test_tool_call_any_of_accepts_each_listed_value_and_nothing_else():
    rule = {"type": "tool_call", "name": "area", "exact": True,
            "arguments": {"base": {"any_of": [10, 10.5]}, "unit": {"any_of": ["cm", "centimetres"]}}}
    for base in (10, 10.0, 10.5):
        for unit in ("cm", "Centimetres"):
            assert score(rule, "", tool_calls=[{"name": "area", "arguments": {"base": base, "unit": unit}}]).passed
    wrong = score(rule, "", tool_calls=[{"name": "area", "arguments": {"base": 11, "unit": "cm"}}])
    assert not wrong.passed and "base=11 (expected one of [10, 10.5])" in wrong.detail
    missing = score(rule, "", tool_calls=[{"name": "area", "arguments": {"base": 10}}])
    assert not missing.passed and "unit missing" in missing.detail


def test_tool_call_optional_argument_may_be_left_out_but_not_wrong():
    rule = {"type": "tool_call", "name": "hypot", "exact": True,
            "arguments": {"x": 4, "y": 5, "z": {"any_of": [0], "optional": True}}}
    assert score(rule, "", tool_calls=[{"name": "hypot", "arguments": {"x": 4, "y": 5}}]).passed
    assert score(rule, "", tool_calls=[{"name": "hypot", "arguments": {"x": 4, "y": 5, "z": 0}}]).passed
    assert not score(rule, "", tool_calls=[{"name": "hypot", "arguments": {"x": 4, "y": 5, "z": 1}}]).passed
    assert not score(rule, "", tool_calls=[{"name": "hypot", "arguments": {"x": 4, "z": 0}}]).passed


def test_tool_call_mapping_and_list_arguments_match_key_by_key_and_item_by_item():
    # BFCL's dict and list-of-dict answers: acceptable values per key, optional keys, no extra keys
    rule = {"type": "tool_call", "name": "find", "arguments": {
        "where": {"school": {"any_of": ["Bluebird High School", "Bluebird HS"]},
                  "grade": {"any_of": [10], "optional": True}},
        "rows": [{"field": "age", "op": {"any_of": [">", "gt"]}}, {"field": "job", "op": "="}]}}

    def call(where, rows=({"field": "age", "op": "gt"}, {"field": "job", "op": "="})):
        return score(rule, "", tool_calls=[{"name": "find", "arguments": {"where": where, "rows": list(rows)}}])

    assert call({"school": "Bluebird HS"}).passed
    assert call({"school": "bluebird high school", "grade": 10}).passed
    assert not call({"school": "Bluebird HS", "grade": 11}).passed
    assert not call({"school": "Bluebird HS", "city": "X"}).passed  # a key the answer does not list
    assert not call({"grade": 10}).passed  # a key that is not optional is missing
    assert not call({"school": "Bluebird HS"}, rows=[{"field": "job", "op": "="}, {"field": "age", "op": ">"}]).passed
    assert not call({"school": "Bluebird HS"}, rows=[{"field": "age", "op": ">"}]).passed


def test_tool_call_numbers_a_billionth_apart_are_different_arguments():
    # a millisecond timestamp one second off is a relative difference of 6e-10: it was read as equal
    rule = {"type": "tool_call", "name": "report", "arguments": {"since": 1617176400000}}
    for wrong in (1617176401000, 1617176400001, 1617176401000.5):
        assert not score(rule, "", tool_calls=[{"name": "report", "arguments": {"since": wrong}}]).passed, wrong
    assert score(rule, "", tool_calls=[{"name": "report", "arguments": {"since": 1617176400000.0}}]).passed
    assert same_value(0.1 + 0.2, 0.3) and not same_value(2**60 + 1, 2**60)
    assert not same_value(10**400, 1.5) and not same_value(1.5, 10**400)  # beyond any float: unequal, no crash


@pytest.mark.parametrize("arguments, needle", [
    ({"x": {"any_of": 3}}, "'any_of' must be a non-empty list"),
    ({"x": {"any_of": []}}, "'any_of' must be a non-empty list"),
    ({"x": {"any_of": [1], "optional": "yes"}}, "'optional' must be true or false"),
    ({"x": {"any_of": [1], "other": 2}}, "takes only 'any_of' and 'optional'"),
    ({"x": {"k": [{"any_of": []}]}}, "argument 'x': 'any_of' must be a non-empty list"),
])
def test_tool_call_matchers_are_checked_when_the_suite_loads(arguments, needle):
    with pytest.raises(SuiteError, match=re.escape(needle)):
        parse_check({"type": "tool_call", "name": "f", "arguments": arguments}, "case 'x'")


def test_tool_call_expected_values_nested_too_deep_are_refused():
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(SuiteError, match="nested deeper than 32 levels"):
        parse_check({"type": "tool_call", "name": "f", "arguments": {"x": deep}}, "case 'x'")

# ---- perplexity, judge, failed requests ------------------------------------------------------------


def test_perplexity_threshold_and_unsupported():
    check = parse_check({"perplexity": 20}, "t")
    assert score_perplexity(check, 12.5).passed and score_perplexity(check, 12.5).score == 12.5
    assert not score_perplexity(check, 25.0).passed
    unsupported = score_perplexity(check, None, "no logprobs")
    assert unsupported.unsupported and unsupported.detail == "no logprobs"


def test_judge_verdicts():
    check = parse_check({"type": "judge", "rubric": "mentions Paris", "judge": "j"}, "t")
    assert score_judge(check, "PASS - it names Paris", "j").passed
    assert not score_judge(check, "Fail: no city", "j").passed
    assert not score_judge(check, "The passage is fine", "j").passed  # "passage" is not PASS
    assert "no verdict" in score_judge(check, "hmm", "j").detail


def test_a_failed_request_fails_every_check():
    out = score_check(parse_check({"contains": "x"}, "t"), Sample(error="HTTP 500"))
    assert not out.passed and "HTTP 500" in out.detail


# ---- self-consistency ------------------------------------------------------------------------------


def test_majority_vote_picks_the_most_common_answer():
    check = parse_check({"numeric": 7}, "t")
    rows = [[score_check(check, Sample(text=t))] for t in ["8", "7", "so 7", "9", "7"]]
    chosen = vote(rows, "majority")
    assert rows[chosen][0].answer == 7 and rows[chosen][0].passed
    wrong = [[score_check(check, Sample(text=t))] for t in ["8", "7", "8"]]
    assert not wrong[vote(wrong, "majority")][0].passed  # the majority is wrong: the case fails


def test_majority_ties_go_to_the_earliest_and_unreadable_answers_never_win():
    check = parse_check({"numeric": 7}, "t")
    tie = [[score_check(check, Sample(text=t))] for t in ["8", "7"]]
    assert vote(tie, "majority") == 0
    rows = [[score_check(check, Sample(text=t))] for t in ["no idea", "dunno", "7"]]
    assert vote(rows, "majority") == 2


def test_best_vote_takes_any_passing_sample():
    check = parse_check({"numeric": 7}, "t")
    rows = [[score_check(check, Sample(text=t))] for t in ["8", "9", "7"]]
    assert vote(rows, "best") == 2


def test_check_shorthand_and_errors():
    assert parse_check({"contains": "Paris"}, "t").options == {"value": "Paris"}
    assert parse_check({"json": {"type": "object"}}, "t").options == {"schema": {"type": "object"}}
    with pytest.raises(SuiteError, match="unknown check type 'fuzzy'"):
        parse_check({"type": "fuzzy"}, "t")
    with pytest.raises(SuiteError, match="unknown option"):
        parse_check({"type": "contains", "value": "x", "colour": "red"}, "t")
    with pytest.raises(SuiteError, match="needs 'type'"):
        parse_check({"value": "x"}, "t")


def test_hostile_json_in_an_answer_fails_the_case_instead_of_crashing_the_bench():
    from rung.bench.scorers import extract_json

    for answer in ['{"n": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000]:
        value, why = extract_json(answer)
        assert value is None and why
