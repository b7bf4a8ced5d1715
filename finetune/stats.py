"""Statistics shared by ``finetune bench`` and the scripts in ``benchmarks/``: mean +- sample std and the paired
Student-t interval that every comparison in the project reports (exact t quantile, no SciPy needed).

Example:
    >>> from finetune.stats import mean_std, paired_t_interval
    >>> mean_std([0.90, 0.92])
    (0.91, 0.014142135623730963)
    >>> round(paired_t_interval([0.92, 0.93, 0.95], [0.90, 0.92, 0.93])['mean'], 4)
    0.0167
"""
from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ['mean_std', 'student_t_ppf', 'paired_t_interval', 'median_interval']


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value, NaN for none).

    Example:
        >>> mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
    """
    n = len(values)
    if n == 0:
        return float('nan'), float('nan')
    mean = sum(values) / n
    if n == 1:
        return float(mean), 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return float(mean), math.sqrt(var)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def _student_t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def student_t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t distribution (no SciPy needed; bisection on the exact CDF).

    Example:
        >>> round(student_t_ppf(0.975, 4), 3)
        2.776
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f'q must be in (0, 1), got {q}')
    if df <= 0:
        raise ValueError(f'df must be positive, got {df}')
    if q < 0.5:
        return -student_t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while _student_t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_t_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Paired difference ``a - b`` with a Student-t confidence interval for its mean.

    Pairs are matched by position (same seed / same split). With fewer than two pairs the interval is
    undefined (NaN, written as null in JSON).

    Returns:
        dict with ``mean``, ``std`` (sample), ``n``, ``ci_low``, ``ci_high``, ``confidence`` and ``verdict``:
        ``'higher'`` / ``'lower'`` when the interval excludes 0, else ``'no significant difference'``.

    Example:
        >>> r = paired_t_interval([0.80, 0.82, 0.81], [0.70, 0.71, 0.72])
        >>> r['verdict'], round(r['mean'], 3)
        ('higher', 0.1)
    """
    if len(a) != len(b):
        raise ValueError(f'paired samples need equal lengths, got {len(a)} and {len(b)}')
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    mean, std = mean_std(diffs)
    if n < 2:
        lo = hi = float('nan')
    else:
        half = student_t_ppf(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
        lo, hi = mean - half, mean + half
    if n >= 2 and lo > 0:
        verdict = 'higher'
    elif n >= 2 and hi < 0:
        verdict = 'lower'
    else:
        verdict = 'no significant difference'
    return {'mean': mean, 'std': std, 'n': n, 'ci_low': lo, 'ci_high': hi, 'confidence': confidence,
            'verdict': verdict, 'diffs': diffs}


def median_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """The median with a distribution-free confidence interval: two order statistics chosen from the binomial
    distribution (sign-test interval), so no normality is assumed; noisy timings have heavy tails. The values must
    still be independent draws: rounds timed one after another on a machine whose load drifts are only
    approximately that.

    The interval covers the true median with probability at least ``confidence``; it is NaN (null in JSON) when
    there are too few values for any pair of order statistics to reach it (fewer than 6 at 95 %).

    Returns:
        dict with ``median``, ``ci_low``, ``ci_high``, ``n``, ``confidence`` and ``coverage`` (the interval's
        exact binomial coverage, at least ``confidence`` when defined).

    Example:
        >>> r = median_interval([0.01 * i for i in range(1, 21)])
        >>> round(r['median'], 3), round(r['ci_low'], 2), round(r['ci_high'], 2)
        (0.105, 0.06, 0.15)
    """
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        raise ValueError('median_interval needs at least one value')
    mid = n // 2
    median = xs[mid] if n % 2 else 0.5 * (xs[mid - 1] + xs[mid])

    # the largest k with P(B < k) <= alpha/2, B ~ Binomial(n, 1/2): then [x_(k), x_(n-k+1)] (1-based) has
    # coverage 1 - 2 P(B < k) >= confidence. Exact integers: 2**n overflows a float beyond n = 1023.
    alpha, total = 1.0 - confidence, 2 ** n
    k, below = 0, 0  # below = 2**n * P(B < k)
    while k + 1 <= n // 2 and (below + math.comb(n, k)) / total <= alpha / 2.0:
        below += math.comb(n, k)
        k += 1
    if k == 0:
        lo = hi = coverage = float('nan')
    else:
        lo, hi, coverage = xs[k - 1], xs[n - k], 1.0 - (2 * below) / total
    return {'median': median, 'ci_low': lo, 'ci_high': hi, 'n': n, 'confidence': confidence, 'coverage': coverage}
