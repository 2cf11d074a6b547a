"""Two-sided confidence intervals from counts, bootstrap draws and jackknife values.

Each function returns ``(low, high)``; ``level`` is the nominal coverage (0.95 unless given). Which
interval the analysis uses for which estimate, and the coverage each reached in seeded simulations
of the shapes users have (few prompts, k samples each, rare toxic texts), is in docs/analysis.md
("Intervals") and tested in tests/test_analysis.py. The references:

- Wilson score interval: E. B. Wilson (1927); its coverage for small counts: Brown, Cai & DasGupta,
  "Interval estimation for a binomial proportion", Statistical Science 16 (2001).
- Effective sample size of a clustered proportion: Korn & Graubard, "Confidence intervals for
  proportions with small expected number of positive counts estimated from survey data", Survey
  Methodology 24 (1998): n / design effect, the design effect never below 1.
- BCa: Efron (1987); DiCiccio & Efron, "Bootstrap confidence intervals", Statistical Science 11
  (1996), the acceleration from the jackknife (as scipy.stats.bootstrap's BCa).
- Expanded percentile: Hesterberg, "What teachers should know about the bootstrap", The American
  Statistician 69 (2015): the percentile interval at the tail probabilities
  Phi(sqrt(n / (n - 1)) t_{n-1, alpha}), for small n.
- Augmented bootstrap: the adjustment of Agresti & Coull, "Approximate is better than 'exact' for
  interval estimation of binomial proportions", The American Statistician 52 (1998): add z^2/2 ~ 2
  observations at each bound, here of a mean of values in [0, 1].
- Jackknife-t: the delete-one-group jackknife variance with t_{G-1} quantiles, the small-sample
  cluster-robust interval (e.g. Cameron & Miller, "A practitioner's guide to cluster-robust
  inference", J. Human Resources 50 (2015), sections VI.B-C).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

NAN2 = (math.nan, math.nan)


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def t_quantile(df: float, level: float = 0.95) -> float:
    """The two-sided `level` quantile of Student's t with `df` (> 0, not necessarily whole) degrees
    of freedom; NaN otherwise."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df)) if df > 0 else math.nan


def wilson(successes: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for the proportion successes / n; both may be effective (non-integer)
    counts. (NaN, NaN) for n <= 0."""
    if not n > 0:
        return NAN2
    z = _z(level)
    p = min(max(successes / n, 0.0), 1.0)
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    low = 0.0 if p == 0 else max(0.0, centre - half)  # exactly 0 (1) at no (all) successes
    return low, 1.0 if p == 1 else min(1.0, centre + half)


def effective_n(num: np.ndarray, den: np.ndarray, level: float = 0.95) -> float:
    """Korn & Graubard's effective sample size of the ratio p = sum(num) / sum(den), with the G
    groups (entries) as the sampling units and n = sum(den) rows: n / deff, where deff = the groups'
    robust variance of p over the binomial variance p (1 - p) / n, never below 1 (n when p is 0 or
    1: no variance to estimate, as theirs), times their degrees-of-freedom factor
    (t_{n-1} / t_{G-1})^2, which shrinks it when there are few groups. 0 (no interval) with fewer
    than 2 groups: one group's rows say nothing about the spread between groups."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    g, rows = int(np.count_nonzero(den)), float(den.sum())
    if not rows > 0 or g < 2:
        return 0.0
    p = float(num.sum()) / rows
    deff = 1.0
    if 0 < p < 1:
        var = g / (g - 1) * float(((num - p * den) ** 2).sum()) / rows**2
        deff = max(1.0, var / (p * (1 - p) / rows))
    df_factor = (t_quantile(rows - 1, level) / t_quantile(g - 1, level)) ** 2 if rows > 1 else 1.0
    return rows / deff * df_factor


def _finite(samples: np.ndarray) -> np.ndarray:
    s = np.asarray(samples, dtype=float)
    return s[np.isfinite(s)]


def percentile(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of the finite bootstrap draws (NaN, NaN without any)."""
    s = _finite(samples)
    if not len(s):
        return NAN2
    lo, hi = np.percentile(s, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def expanded_percentile(samples: np.ndarray, n: int, level: float = 0.95) -> tuple[float, float]:
    """Hesterberg's expanded percentile interval for a statistic of n independent units: the
    bootstrap draws' quantiles at Phi(+-sqrt(n / (n - 1)) t_{n-1}), wider than the plain percentile
    interval for small n and equal to it as n grows."""
    s = _finite(samples)
    if not len(s) or n < 2:
        return NAN2
    q = NormalDist().cdf(math.sqrt(n / (n - 1)) * t_quantile(n - 1, level))
    lo, hi = np.percentile(s, [100 * (1 - q), 100 * q])
    return float(lo), float(hi)


def bca(
    samples: np.ndarray,
    estimate: float,
    jackknife: np.ndarray,
    level: float = 0.95,
    expand: int | None = None,
) -> tuple[float, float]:
    """The bias-corrected and accelerated interval: the draws' quantiles at Phi(z0 + (z0 + z) /
    (1 - a (z0 + z))), z0 from the share of draws below the estimate (ties count half), the
    acceleration a from the jackknife values (leave one unit out). With draws that all equal the
    estimate it is the percentile interval. `expand` = n units: z is Hesterberg's expanded quantile
    sqrt(n / (n - 1)) t_{n-1} instead of the normal one (wider for few units). Where 1 - a (z0 + z)
    <= 0 (past the pole of the formula) the limit is the extreme draw on that side."""
    s = _finite(samples)
    jk = _finite(jackknife)
    if not len(s) or not math.isfinite(estimate) or (expand is not None and expand < 2):
        return NAN2
    b = len(s)
    share = (np.count_nonzero(s < estimate) + 0.5 * np.count_nonzero(s == estimate)) / b
    z0 = NormalDist().inv_cdf(min(max(share, 0.5 / b), 1 - 0.5 / b))
    u = jk.mean() - jk if len(jk) else np.zeros(1)
    den = 6.0 * float((u**2).sum()) ** 1.5
    a = float((u**3).sum()) / den if den > 0 else 0.0
    z = _z(level) if expand is None else math.sqrt(expand / (expand - 1)) * t_quantile(expand - 1, level)
    tails = []
    for zz, end in ((-z, 0.0), (z, 100.0)):
        shifted = z0 + zz
        tails.append(100 * NormalDist().cdf(z0 + shifted / (1 - a * shifted)) if 1 - a * shifted > 0 else end)
    lo, hi = np.percentile(s, tails)
    return float(lo), float(hi)


def jackknife_t(
    estimate: float, jackknife: np.ndarray, level: float = 0.95, df: float | None = None
) -> tuple[float, float]:
    """estimate +- t_df sqrt(jackknife variance) over G leave-one-group-out values, the jackknife
    variance being (G - 1) / G sum (theta_(i) - mean)^2; df = G - 1 unless given (e.g. the
    effective number of groups - 1 when their sizes differ)."""
    jk = _finite(jackknife)
    g = len(jk)
    if g < 2 or not math.isfinite(estimate):
        return NAN2
    df = g - 1 if df is None else df
    half = t_quantile(df, level) * math.sqrt((g - 1) / g * float(((jk - jk.mean()) ** 2).sum()))
    return estimate - half, estimate + half


def mover(
    first: tuple[float, float, float], second: tuple[float, float, float], r: float = 0.0
) -> tuple[float, float]:
    """The interval of a difference first - second from each estimate's own interval, (estimate,
    low, high) each, and the correlation r of the two estimates: the method of variance estimates
    recovery (MOVER; Newcombe 1998 for proportions, Zou & Donner 2008 in general). It keeps the
    asymmetry, and the behaviour at rare events, of the two intervals it is built from.
    (NaN, NaN) when either interval is NaN."""
    (t1, l1, u1), (t2, l2, u2) = first, second
    if any(math.isnan(v) for v in (t1, l1, u1, t2, l2, u2)):
        return NAN2
    r = 0.0 if math.isnan(r) else min(max(r, -1.0), 1.0)
    d = t1 - t2
    a, b = t1 - l1, u2 - t2  # the distances to the limits that make the difference small
    lo = d - math.sqrt(max(a * a + b * b - 2 * r * a * b, 0.0))
    a, b = u1 - t1, t2 - l2  # ... and large
    hi = d + math.sqrt(max(a * a + b * b - 2 * r * a * b, 0.0))
    return lo, hi
