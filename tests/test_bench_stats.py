"""rung/bench/stats.py against scipy and statsmodels (when installed: rung does not depend on them),
against figures computed with them (scipy 1.17.1, statsmodels 0.15.0) and against published worked
examples."""

from __future__ import annotations

import math

import pytest

from rung.bench.stats import (binom_cdf, bootstrap_ci, case_rate, cases_for_lower_bound, cases_for_paired_difference,
                              clopper_pearson, mcnemar_exact, paired_bootstrap, paired_difference_ci, pass_at_k,
                              percentile_ci, percentile_label, wilson_interval)

# (b, c) → scipy.stats.binomtest(b, b + c, 0.5).pvalue == statsmodels mcnemar([[., b], [c, .]], exact=True).pvalue
MCNEMAR = {(1, 0): 1.0, (0, 6): 0.03125, (3, 9): 0.14599609375, (12, 2): 0.012939453125,
           (40, 25): 0.08168153394154003, (7, 7): 1.0, (0, 0): 1.0}
# (k, n, confidence) → statsmodels proportion_confint(k, n, 1 - confidence, "wilson" / "beta")
WILSON = {(9, 18, 0.95): (0.29031021505169974, 0.7096897849483003), (10, 18, 0.95): (0.33716415642042774, 0.7544048187299437),
          (81, 263, 0.95): (0.2552885198782742, 0.36620957698280004), (1, 1, 0.95): (0.20654931437723745, 1.0),
          (0, 5, 0.95): (0.0, 0.43448246478317487), (9, 18, 0.9): (0.31926013888724436, 0.6807398611127556)}
EXACT = {(9, 18, 0.95): (0.26019058289509706, 0.7398094171049029), (10, 18, 0.95): (0.3075716589986827, 0.7846984926126321),
         (81, 263, 0.95): (0.25273674558504267, 0.36762192260134746), (0, 5, 0.95): (0.0, 0.5218237501049814),
         (5, 5, 0.95): (0.47817624989501856, 1.0), (9, 18, 0.8): (0.32884578714288026, 0.6711542128571197)}


def test_exact_mcnemar_matches_scipy_binomtest():
    for (b, c), p in MCNEMAR.items():
        assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)
    scipy = pytest.importorskip("scipy.stats")
    for b, c in [(2, 11), (30, 45), (0, 1), (200, 170)]:
        assert mcnemar_exact(b, c) == pytest.approx(scipy.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_wilson_and_clopper_pearson_match_statsmodels():
    for (k, n, conf), (lo, hi) in WILSON.items():
        got = wilson_interval(k, n, conf)
        assert got[0] == pytest.approx(lo, abs=1e-12) and got[1] == pytest.approx(hi, abs=1e-12)
    for (k, n, conf), (lo, hi) in EXACT.items():
        got = clopper_pearson(k, n, conf)
        assert got[0] == pytest.approx(lo, abs=1e-9) and got[1] == pytest.approx(hi, abs=1e-9)
    assert wilson_interval(0, 0) is None and clopper_pearson(0, 0) is None
    scipy = pytest.importorskip("scipy.stats")
    for k, n in [(3, 7), (50, 51), (400, 1000)]:
        w, e = scipy.binomtest(k, n).proportion_ci(0.95, "wilson"), scipy.binomtest(k, n).proportion_ci(0.95, "exact")
        assert wilson_interval(k, n) == pytest.approx((w.low, w.high), abs=1e-12)
        assert clopper_pearson(k, n) == pytest.approx((e.low, e.high), abs=1e-9)


def test_binomial_tail_in_log_space_does_not_overflow():
    from fractions import Fraction

    exact = Fraction(1, 2) + Fraction(math.comb(10000, 5000), 2**10001)  # symmetric: half, plus half the middle term
    assert binom_cdf(5000, 10000, 0.5) == pytest.approx(float(exact), rel=1e-9)
    assert binom_cdf(-1, 10, 0.3) == 0.0 and binom_cdf(10, 10, 0.3) == 1.0


def test_newcombe_paired_interval_matches_the_published_example():
    """Newcombe (1998), Statistics in Medicine 17:2635–2650, Table II, example (a): 36 pairs both
    positive, 12 only the first, 2 only the second, none neither: method 10 gives +0.0569 to +0.3404."""
    lo, hi = paired_difference_ci(36, 12, 2, 0)
    assert lo == pytest.approx(0.0569, abs=5e-5) and hi == pytest.approx(0.3404, abs=5e-5)
    # the difference swaps sign with the columns, and the interval holds it
    lo2, hi2 = paired_difference_ci(36, 2, 12, 0)
    assert (lo2, hi2) == pytest.approx((-hi, -lo))
    lo, hi = paired_difference_ci(9, 0, 1, 8)  # the starter run's int4 / int8: one case apart of 18
    assert lo < -1 / 18 < hi and lo > -0.4 and hi > 0


def test_power_calculations():
    # Connor (1987): ψ = δ = 1/18: (1.96·√ψ + 0.8416·√(ψ − δ²))² / δ² = 138.7 → 139 cases
    psi = delta = 1 / 18
    by_hand = (1.959964 * math.sqrt(psi) + 0.841621 * math.sqrt(psi - delta**2)) ** 2 / delta**2
    assert cases_for_paired_difference(1, 0, 18) == math.ceil(by_hand) == 139
    assert cases_for_paired_difference(3, 3, 18) is None  # no difference observed: none to detect
    for rate, threshold in [(0.9, 0.8), (10 / 18, 0.55), (0.7, 0.5)]:
        n = cases_for_lower_bound(rate, threshold)
        assert wilson_interval(rate * n, n)[0] >= threshold > wilson_interval(rate * (n - 1), n - 1)[0]
    assert cases_for_lower_bound(0.5, 0.55) is None and cases_for_lower_bound(0.5500001, 0.55) is None  # > 10M


def test_case_rate_takes_repeats_into_account():
    """The case is the unit: cases that always pass or always fail add nothing by being run again;
    per-case rates that vary like independent draws count up to every run."""
    steady = case_rate([1.0] * 12 + [0.0] * 8, [4] * 20)
    once = case_rate([1.0] * 12 + [0.0] * 8, [1] * 20)
    assert steady["ci"] == once["ci"] == wilson_interval(12, 20) and steady["n_eff"] == 20
    mixed = case_rate([0.5, 0.75, 0.5, 0.25] * 5, [4] * 20)
    assert 20 < mixed["n_eff"] <= 80 and mixed["rate"] == 0.5
    assert case_rate([], [])["ci"] is None


def test_pass_at_k_is_chens_unbiased_estimator():
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0  # n = k: any passed
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3) and pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))


def test_bootstrap_is_seeded_and_a_p95_of_few_values_is_their_maximum():
    xs = [float(i) for i in range(100)]
    assert percentile_ci(xs, 95) == percentile_ci(xs, 95)  # the same data, the same interval
    lo, hi = percentile_ci(xs, 95)
    assert lo < 94.05 < hi <= 99
    assert percentile_label(95, 19) == "max (n=19)" and percentile_label(95, 20) == "p95"
    assert percentile_ci([1.0, 2.0, 9.0], 95)[1] == 9.0
    d = paired_bootstrap([1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0])
    assert d["mean_difference"] == 1.0 and d["ci"] == (1.0, 1.0) and d["n"] == 4
    assert bootstrap_ci([], lambda rows: rows.mean(axis=1)) is None
