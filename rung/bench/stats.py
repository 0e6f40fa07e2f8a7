"""The statistics behind a bench verdict, in plain Python (and NumPy for the bootstrap).

rung does not depend on scipy: these few functions are small enough to write out, and
tests/test_bench_stats.py checks them against scipy and statsmodels (where installed) and against
published worked examples.

- rates: Wilson's score interval, and Clopper–Pearson's exact one (binomial tails summed in log
  space, inverted by bisection);
- cases run several times (repeats): the case is the unit; Wilson's interval on the effective
  number of cases (the binomial-equivalent count of the per-case pass rates' variance);
- paired pass/fail: the exact McNemar test (a two-sided binomial test on the discordant cases) and
  Newcombe's interval of the difference of paired proportions;
- continuous figures (latency percentiles, paired latency and perplexity): bootstrap, seeded;
- power: cases needed for a rate's lower bound to clear a threshold, and for McNemar to detect a
  paired difference (Connor 1987).
"""

from __future__ import annotations

import math
from statistics import NormalDist

MAX_CASES = 10_000_000  # power calculations answer "more than this" beyond it
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # the same data gives the same interval, run after run


def z_value(confidence: float) -> float:
    """The two-sided normal quantile: 1.96 at 0.95."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


# ---- rates ---------------------------------------------------------------------------------------


def wilson_interval(passed: float, n: float, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson's score interval of a pass rate (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it
    for small n). ``passed`` and ``n`` may be fractional: an effective count (see ``case_rate``)."""
    if n <= 0:
        return None
    z = z_value(confidence)
    p = min(1.0, max(0.0, passed / n))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if p == 0 else max(0.0, centre - half)), (1.0 if p == 1 else min(1.0, centre + half))


def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def _logsumexp(xs: list[float]) -> float:
    top = max(xs)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(x - top) for x in xs))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p), summed in log space (no overflow at large n)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, math.exp(_logsumexp([_log_pmf(i, n, p) for i in range(k + 1)])))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X ≥ k)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return min(1.0, math.exp(_logsumexp([_log_pmf(i, n, p) for i in range(k, n + 1)])))


def clopper_pearson(passed: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """The exact (Clopper–Pearson 1934) interval: the p at which each binomial tail is (1−c)/2,
    found by bisection on the binomial CDF (the beta quantile, without scipy)."""
    if n <= 0:
        return None
    alpha = (1 - confidence) / 2
    lo = 0.0 if passed == 0 else _bisect(lambda p: binom_sf(passed, n, p) - alpha)  # sf rises with p
    hi = 1.0 if passed == n else _bisect(lambda p: alpha - binom_cdf(passed, n, p))  # cdf falls with p
    return lo, hi


def _bisect(rising, lo: float = 0.0, hi: float = 1.0, steps: int = 60) -> float:
    for _ in range(steps):  # 2^-60: far below any printed digit
        mid = (lo + hi) / 2
        if rising(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def case_rate(rates: list[float], repeats: list[int], confidence: float = 0.95) -> dict:
    """A pass rate over cases when each case ran ``repeats[i]`` times and passed ``rates[i]`` of them.

    The case is the unit: the rate is the mean of the per-case rates, and its interval is Wilson's on
    the effective number of cases, n_eff = p(1−p) / Var(mean), with Var(mean) = Σ(rᵢ − p)² / n². With
    one run per case n_eff = n (the plain Wilson interval); with repeats it grows towards the number
    of runs only as far as the per-case rates vary like independent draws (a case that always passes
    or always fails counts once, however often it ran). When every case agrees (p is 0 or 1), n_eff = n.
    """
    n = len(rates)
    if n == 0:
        return {"rate": None, "ci": None, "n": 0, "n_eff": 0.0}
    p = sum(rates) / n
    var = sum((r - p) ** 2 for r in rates) / (n * n)
    runs = sum(repeats)
    n_eff = float(n) if var <= 0 or p in (0.0, 1.0) else min(float(runs), max(float(n), p * (1 - p) / var))
    return {"rate": p, "ci": wilson_interval(p * n_eff, n_eff, confidence), "n": n, "n_eff": n_eff}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. 2021 (Evaluating Large Language Models Trained on
    Code, eq. 1): 1 − C(n−c, k) / C(n, k) for n samples of which c passed. With k = n it is 1 if any passed."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ---- paired pass/fail ----------------------------------------------------------------------------


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar p-value: under 'no difference' each of the b + c discordant cases falls either
    way with probability 1/2, so p = 2·P(X ≤ min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1
    (scipy.stats.binomtest(b, b + c, 0.5).pvalue; statsmodels' mcnemar(exact=True))."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binom_cdf(min(b, c), n, 0.5))


def paired_difference_ci(a: int, b: int, c: int, d: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Newcombe's interval (method 10) of p₁ − p₂ for paired proportions, from the 2×2 table of
    cases: a both pass, b only the first, c only the second, d neither; p₁ = (a+b)/n, p₂ = (a+c)/n.

    Newcombe RG (1998), Improved confidence intervals for the difference between binomial
    proportions based on paired data, Statistics in Medicine 17:2635–2650: the Wilson intervals of
    each proportion combined with the correlation φ of the pairs (square-and-add, no continuity
    correction). Its coverage is close to nominal down to small n, unlike the Wald interval."""
    n = a + b + c + d
    if n == 0:
        return None
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, confidence)
    l2, u2 = wilson_interval(a + c, n, confidence)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denom) if denom else 0.0
    delta = p1 - p2
    lower = delta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = delta + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, lower), min(1.0, upper)


def sign_test(diffs: list[float]) -> tuple[int, int, float]:
    """(cases where the first is better, where the second is, p): the exact sign test on paired
    per-case figures, which for pass/fail per case is exactly McNemar's test."""
    b = sum(1 for x in diffs if x > 0)
    c = sum(1 for x in diffs if x < 0)
    return b, c, mcnemar_exact(b, c)


# ---- bootstrap -----------------------------------------------------------------------------------


def bootstrap_ci(values: list[float], statistic, confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """The percentile bootstrap interval of ``statistic`` (a function of a 2-D array, one resample a
    row, returning one figure per row), resampling ``values`` with replacement; seeded, so the same
    data gives the same interval."""
    import numpy as np

    xs = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if xs.size == 0:
        return None
    rng = np.random.default_rng(seed)
    rows = xs[rng.integers(0, xs.size, size=(resamples, xs.size))]  # [resamples, n]
    stats = np.sort(statistic(rows))
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def percentile_ci(values: list[float], q: float, confidence: float = 0.95) -> tuple[float, float] | None:
    """Bootstrap interval of the q-th percentile (linear interpolation, numpy's default). A
    resample never exceeds the largest value seen, so with few values the upper bound is the maximum:
    the report says so (``percentile_label``)."""
    import numpy as np

    n = sum(v is not None for v in values)
    if percentile_label(q, n) != f"p{q:g}":  # the figure is the maximum: bootstrap the maximum
        return bootstrap_ci(values, lambda rows: rows.max(axis=1), confidence)
    return bootstrap_ci(values, lambda rows: np.percentile(rows, q, axis=1), confidence)


def paired_bootstrap(first: list[float], second: list[float], confidence: float = 0.95) -> dict | None:
    """Mean of the paired differences second − first, with its bootstrap interval (cases resampled
    as pairs, so what the two share cancels)."""
    import numpy as np

    diffs = [y - x for x, y in zip(first, second) if x is not None and y is not None]
    if not diffs:
        return None
    return {"mean_difference": sum(diffs) / len(diffs), "ci": bootstrap_ci(diffs, lambda rows: rows.mean(axis=1), confidence),
            "n": len(diffs)}


def percentile_label(q: float, n: int) -> str:
    """'p95', or 'max (n=18)' when there are fewer than 100 / (100 − q) values (20 for a p95): too
    few for the percentile to be anything but their maximum."""
    if q < 100 and 0 < n < 100 / (100 - q):
        return f"max (n={n})"
    return f"p{q:g}"


# ---- power ---------------------------------------------------------------------------------------


def cases_for_lower_bound(rate: float, threshold: float, confidence: float = 0.95) -> int | None:
    """Cases needed for the Wilson lower bound to reach ``threshold`` if the rate stays at ``rate``;
    None when no number would (rate ≤ threshold) or more than MAX_CASES would."""
    if rate <= threshold:
        return None

    def clears(n: int) -> bool:
        return wilson_interval(rate * n, n, confidence)[0] >= threshold

    lo, hi = 1, 1
    while not clears(hi):  # the lower bound rises with n at a fixed rate: double, then bisect
        lo, hi = hi, hi * 2
        if hi > MAX_CASES:
            return None
    while lo < hi:
        mid = (lo + hi) // 2
        if clears(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def cases_for_paired_difference(b: int, c: int, n: int, confidence: float = 0.95, power: float = 0.8) -> int | None:
    """Cases needed for McNemar's test at level 1 − confidence to detect, with probability
    ``power``, the paired difference observed (b and c discordant of n): Connor RJ (1987), Sample size
    for testing differences in proportions for the paired-sample design, Biometrics 43:207–211,
    N = (z_α/2·√ψ + z_β·√(ψ − δ²))² / δ², with ψ = (b + c)/n and δ = (b − c)/n. None when no
    difference was observed (δ = 0)."""
    if n == 0 or b == c:
        return None
    psi, delta = (b + c) / n, (b - c) / n
    z_a, z_b = z_value(confidence), NormalDist().inv_cdf(power)
    needed = math.ceil((z_a * math.sqrt(psi) + z_b * math.sqrt(max(0.0, psi - delta * delta))) ** 2 / (delta * delta))
    return needed if needed <= MAX_CASES else None
