"""Summary statistics for benchmark tables: mean ± std, paired differences with a confidence interval.

Pure Python (no SciPy at run time): Student's t quantiles come from the regularized incomplete beta function by
bisection; the bootstrap is a seeded percentile bootstrap over the paired differences.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PairedDifference", "holm", "mean_std", "paired_difference", "t_cdf", "t_quantile"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the incomplete beta function (modified Lentz), as in Numerical Recipes §6.4.
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t (e.g. ``t_quantile(0.975, 2) = 4.3027``), by bisection on `t_cdf`."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of paired differences (method - baseline, same split and seed) with a confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    method: str  # "t" (paired t) or "bootstrap"
    p: float = math.nan  # two-sided p-value of "no difference" (paired t, or the bootstrap's sign fraction)

    @property
    def above_zero(self) -> bool:
        """The whole interval is above zero: the method beats the baseline at this confidence."""
        return self.low > 0.0

    @property
    def below_zero(self) -> bool:
        return self.high < 0.0


def paired_difference(method: Sequence[float], baseline: Sequence[float], confidence: float = 0.95,
                      ci: str = "t", resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """Paired difference of two equally long series (one value per seed) with a two-sided confidence interval.

    Args:
        method: The method's values, seed by seed.
        baseline: The baseline's values on the same splits and seeds.
        confidence: Coverage of the interval.
        ci: ``"t"``: mean ± t_{(1+c)/2, n-1} s / sqrt(n) (assumes roughly normal differences); ``"bootstrap"``:
            percentile interval of the mean over ``resamples`` resamples of the differences (seeded).
        resamples: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        The `PairedDifference`; with one pair the interval is unbounded (``-inf, inf``).
    """
    if len(method) != len(baseline):
        raise ValueError(f"paired series differ in length: {len(method)} vs {len(baseline)}")
    if not method:
        raise ValueError("paired_difference of no pairs")
    if ci not in ("t", "bootstrap"):
        raise ValueError(f"ci must be 't' or 'bootstrap', got {ci!r}")
    diffs = [m - b for m, b in zip(method, baseline)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return PairedDifference(mean, -math.inf, math.inf, n, ci)
    if ci == "t":
        se = statistics.stdev(diffs) / math.sqrt(n)
        half = t_quantile(0.5 + confidence / 2.0, n - 1) * se
        p = (0.0 if mean != 0 else 1.0) if se == 0 else 2.0 * (1.0 - t_cdf(abs(mean) / se, n - 1))
        return PairedDifference(mean, mean - half, mean + half, n, ci, p)
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(resamples))
    alpha = (1.0 - confidence) / 2.0
    low = means[max(0, math.floor(alpha * resamples))]
    high = means[min(resamples - 1, math.ceil((1.0 - alpha) * resamples) - 1)]
    p = min(1.0, 2.0 * min(sum(m <= 0 for m in means), sum(m >= 0 for m in means)) / resamples)
    return PairedDifference(mean, low, high, n, ci, p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (controls the family-wise error rate).

    Sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))`` (``m`` tests; ranks from 1);
    NaN entries are left out of the family and stay NaN. A cell of a benchmark compares every method with the same
    baseline: with 14 methods at 95 % about 0.7 intervals exclude zero by chance alone, which this corrects for.
    """
    present = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(present)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
