"""Sampling and stop strings: the properties servers' users rely on."""

from __future__ import annotations

import pytest
import torch

from rung.engine.sampler import NoTokenError, apply_penalties, filtered_probs, next_token_probs, sample
from rung.engine.sampling_params import SamplingParams, SamplingParamsError
from rung.engine.stops import StopStrings

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0, 0.0])


def draws(params, n=400, seed=0, logits=LOGITS):
    g = torch.Generator().manual_seed(seed)
    return [sample(logits, params, g).token for _ in range(n)]


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0)).token == 4


def test_seed_makes_draws_reproducible_and_seeds_differ():
    p = SamplingParams(temperature=1.0)
    assert draws(p, seed=3) == draws(p, seed=3)
    assert draws(p, seed=3) != draws(p, seed=4)


def test_top_k_one_is_greedy_and_top_k_limits_support():
    assert set(draws(SamplingParams(top_k=1))) == {4}
    assert set(draws(SamplingParams(top_k=2))) == {0, 4}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.softmax(LOGITS, -1)  # token 4: 0.60, token 0: 0.22, token 1: 0.08 ...
    assert probs[4] < 0.7 < probs[4] + probs[0]
    assert set(draws(SamplingParams(top_p=0.7))) == {0, 4}
    kept = filtered_probs(LOGITS, SamplingParams(top_p=0.5))
    assert kept[4] == 1.0 and kept.sum() == pytest.approx(1.0)


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.softmax(LOGITS, -1)
    support = set(draws(SamplingParams(min_p=0.2)))
    assert support == {i for i in range(6) if probs[i] >= 0.2 * probs.max()}


def test_temperature_sharpens_and_flattens():
    sharp = filtered_probs(LOGITS, SamplingParams(temperature=0.25))
    flat = filtered_probs(LOGITS, SamplingParams(temperature=2.0))
    assert sharp[4] > torch.softmax(LOGITS, -1)[4] > flat[4]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    out = apply_penalties(LOGITS, SamplingParams(repetition_penalty=2.0), prompt=[0], output=[3])
    assert out[0] == 1.0 and out[3] == -2.0 and out[4] == 3.0


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(LOGITS, p, prompt=[1], output=[4, 4, 2])
    assert out[4] == pytest.approx(3.0 - 0.5 - 0.5) and out[2] == pytest.approx(0.5 - 0.75) and out[1] == 1.0


def test_banned_tokens_are_never_drawn():
    assert 4 in draws(SamplingParams(), n=200)  # the favourite without the ban
    g = torch.Generator().manual_seed(0)
    assert all(sample(LOGITS, SamplingParams(), g, banned=[4]).token != 4 for _ in range(200))


def test_logprobs_are_of_the_raw_distribution():
    s = sample(LOGITS, SamplingParams(temperature=0, logprobs=2))
    ref = torch.log_softmax(LOGITS, -1)
    assert s.logprob == pytest.approx(ref[4].item())
    assert set(s.top_logprobs) == {4, 0}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(n=0), dict(max_tokens=0),
                                 dict(presence_penalty=3), dict(logprobs=21)])
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError, match="SamplingParams"):
        SamplingParams(**bad)


ABSURD = [("repetition_penalty", 1e-38), ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")),
          ("repetition_penalty", 1e6), ("temperature", float("nan")), ("temperature", 1e9), ("temperature", float("inf")),
          ("top_p", 1.5), ("top_p", float("nan")), ("min_p", -0.1), ("presence_penalty", float("-inf")),
          ("frequency_penalty", 2.5), ("n", 10**9), ("n", 2.0), ("top_k", 1.5), ("max_tokens", -1),
          ("min_tokens", 20), ("logprobs", 10**6), ("logprobs", True), ("seed", 2**64), ("stop", ["x"] * 10_000),
          ("stop", ["x" * 10**6]), ("stop", [3]), ("stop_token_ids", list(range(10**5))), ("stop_token_ids", [-1])]


@pytest.mark.parametrize("field, value", ABSURD, ids=[f"{f}={str(v)[:12]}" for f, v in ABSURD])
def test_absurd_sampling_params_are_refused_naming_the_field(field, value):
    with pytest.raises(SamplingParamsError, match=f"^SamplingParams: {field} ") as info:
        SamplingParams(**{"max_tokens": 16, field: value})
    assert info.value.param == field and isinstance(info.value, ValueError)


def test_sampling_params_changed_after_construction_are_checked_again():
    params = SamplingParams()
    params.repetition_penalty = 1e-38
    with pytest.raises(SamplingParamsError, match="repetition_penalty must be in \\[0.01, 10\\], got 1e-38"):
        params.verify()


def test_the_bounds_keep_the_values_people_use():
    SamplingParams(temperature=2.0, top_p=1.0, top_k=-1, min_p=1.0, repetition_penalty=0.5, presence_penalty=-2,
                   frequency_penalty=2, max_tokens=None, n=128, logprobs=20, seed=-(2**63), stop=["s"] * 16)
    assert SamplingParams(repetition_penalty=1.3, top_k=-1, stop="x").top_k == 0


NAN, INF = float("nan"), float("inf")


def test_nan_logits_are_never_drawn_and_a_row_of_nan_fails_alone():
    logits = torch.tensor([NAN, 1.0, NAN, 2.0])
    assert set(draws(SamplingParams(temperature=1.0), n=200, logits=logits)) == {1, 3}
    assert sample(logits, SamplingParams(temperature=0)).token == 3  # argmax alone would pick the NaN
    for row in (torch.full((4,), NAN), torch.full((4,), -INF), torch.tensor([NAN, -INF, NAN, -INF])):
        for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9)):
            with pytest.raises(NoTokenError, match="every logit is -inf or NaN"):
                sample(row, params)


def test_infinite_logits_share_the_draw_and_their_logprobs_stay_finite():
    logits = torch.tensor([INF, 1.0, INF, NAN, -INF])
    assert set(draws(SamplingParams(temperature=1.0), n=200, logits=logits)) == {0, 2}
    s = sample(logits, SamplingParams(temperature=1.0, logprobs=5), torch.Generator().manual_seed(0))
    assert s.token in (0, 2) and s.logprob == pytest.approx(-0.6931, abs=1e-4)
    assert all(v == v and abs(v) < float("inf") for v in s.top_logprobs.values())  # JSON has no NaN or inf


def test_tiny_temperature_and_the_smallest_repetition_penalty_do_not_overflow():
    logits = torch.tensor([3e36, 2.9e36, -1e30, 0.0])
    probs = next_token_probs(logits, SamplingParams(temperature=1e-5, repetition_penalty=0.01), prompt=[0, 1])
    assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)
    assert probs[0].item() == pytest.approx(1.0)


def test_stop_string_across_token_boundaries_is_never_emitted():
    s = StopStrings(["lo W"])
    released = [s.push("Hel"), s.push("lo"), s.push(" Wor"), s.push("ld")]
    assert "".join(released) == "Hel" and s.stopped and s.hit == "lo W"


def test_text_is_held_back_only_while_a_stop_could_still_start():
    s = StopStrings(["</end>"])
    assert s.push("abc<") == ""  # '<' and the 4 characters before could begin '</end>'
    assert s.push("/x more text") == "abc</x more"  # the last 5 characters stay held
    assert s.flush() == " text"


def test_earliest_stop_wins_and_include_stop_keeps_it():
    s = StopStrings(["B", "AB"], include_stop=True)
    assert s.push("xxAB yy") == "xxAB" and s.hit == "AB"


def test_a_draw_follows_the_weights_and_never_picks_a_zero():
    """Inverse transform sampling against the cumulative sum: frequencies pass a chi-square test
    against the weights, zero weights are never drawn, weights need not sum to 1."""
    from rung.engine.sampler import draw

    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 2.5, 0.0])  # unnormalised, zeros inside and at the ends
    g = torch.Generator().manual_seed(5)
    counts = torch.bincount(torch.tensor([draw(weights, g) for _ in range(20_000)]), minlength=8)
    assert counts[weights == 0].sum() == 0
    kept = weights > 0
    expected = weights[kept] / weights.sum() * counts.sum()
    statistic = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert statistic < 16.27  # chi-square with 3 degrees of freedom: p > 0.001
    with pytest.raises(NoTokenError):
        draw(torch.zeros(4), g)


def test_a_draw_at_the_top_of_the_unit_interval_lands_on_the_last_positive_weight(monkeypatch):
    from rung.engine.sampler import draw

    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(1.0, dtype=torch.float64))  # past any real draw
    assert draw(torch.tensor([0.2, 0.7, 0.1, 0.0, 0.0])) == 2


def test_top_p_searched_among_the_largest_first_keeps_what_a_whole_sort_keeps():
    """nucleus() looks among the largest NUCLEUS_FIRST probabilities first (a whole-vocabulary sort
    costs milliseconds a row): the kept tokens and their probabilities equal the whole sort's, for
    peaked and flat distributions alike (flat ones widen the search up to the whole sort)."""
    from rung.engine.sampler import nucleus

    def by_whole_sort(probs, top_p):
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        return probs.scatter(0, order[drop], 0.0)

    g = torch.Generator().manual_seed(9)
    for scale in (0.05, 1.0, 3.0, 10.0):  # from nearly flat (a whole sort) to peaked (256 candidates)
        for _ in range(5):
            probs = torch.softmax(torch.randn(5000, generator=g) * scale, 0)
            for top_p in (0.1, 0.5, 0.9, 0.95, 0.999):
                assert torch.equal(nucleus(probs, top_p), by_whole_sort(probs, top_p)), (scale, top_p)
