"""Seed statistics: is a difference between two settings beyond seed noise?

A setting is run with several seeds; its final val/loss is then a sample, summarised
by its mean, sample standard deviation and a 95 % Student-t confidence interval of
the mean. Two settings are compared by the difference of their means, with its
95 % CI and a p-value: a paired t-test when both ran the same seeds (the same seed
means the same LoRA initialisation and data order, so much of the noise cancels in
the per-seed differences), Welch's t-test otherwise. Many comparisons at once are
Holm-adjusted, and a difference counts only when its adjusted p < 0.05; one that does
not is "not shown", bounded by its CI, never "the same". The distributions are scipy's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05  # an adjusted p below it: the difference is beyond seed noise


@dataclass
class Estimate:
    """Mean of a sample and its uncertainty; ``std`` and ``ci`` are None for n < 2."""

    n: int
    mean: float
    std: float | None
    ci: tuple[float, float] | None

    @property
    def half_width(self) -> float | None:
        return None if self.ci is None else (self.ci[1] - self.ci[0]) / 2


def estimate(values: list[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean, sample standard deviation (n - 1) and the t-interval of the mean."""
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("no values to estimate from")
    mean = sum(values) / n
    if n < 2:
        return Estimate(n, mean, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df=n - 1) * std / math.sqrt(n)
    return Estimate(n, mean, std, (mean - half, mean + half))


@dataclass
class Comparison:
    """``a`` minus ``b``: the difference of means, its CI, the p-value and the test used, over
    ``n`` seeds (paired: the shared ones; Welch: the smaller sample)."""

    test: str  # "paired t" | "Welch t" | "none"
    n: int
    diff: float
    ci: tuple[float, float] | None
    p_value: float | None

    @property
    def bound(self) -> float:
        """The 95 % CI says |diff| is below this: its far end from zero."""
        return max(abs(self.ci[0]), abs(self.ci[1]))


def not_shown(c: Comparison) -> str:
    """The verdict on a difference that is not beyond noise: what the seeds rule out, no more."""
    return f"not shown at {c.n} seeds, |diff| < {c.bound:.4f}"


def compare(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE) -> Comparison:
    """Compare two settings' values keyed by seed: paired where they ran the same seeds."""
    if set(a) == set(b) and len(a) >= 2:
        return paired(list(a.values()), [b[seed] for seed in a], confidence)
    return welch(list(a.values()), list(b.values()), confidence)


def paired(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> Comparison:
    """Paired t-test on the per-seed differences a_i - b_i."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b)]
    est = estimate(diffs, confidence)
    if est.std == 0:  # identical differences: no noise to test against
        return Comparison("paired t", len(a), est.mean, (est.mean, est.mean), 0.0 if est.mean else 1.0)
    p = stats.ttest_rel(a, b).pvalue
    return Comparison("paired t", len(a), est.mean, est.ci, float(p))


def welch(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> Comparison:
    """Welch's unequal-variance t-test; the CI uses the Welch–Satterthwaite degrees of freedom."""
    from scipy import stats

    diff, n = sum(a) / len(a) - sum(b) / len(b), min(len(a), len(b))
    if n < 2:
        return Comparison("none", n, diff, None, None)
    va, vb = estimate(a).std ** 2 / len(a), estimate(b).std ** 2 / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison("Welch t", n, diff, (diff, diff), 0.0 if diff else 1.0)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df=df) * se
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return Comparison("Welch t", n, diff, (diff - half, diff + half), float(p))


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given (Holm 1979, "A simple sequentially
    rejective multiple test procedure"): the i-th smallest of m is multiplied by m − i + 1, and
    no adjusted value is below one of a smaller raw p. Rejecting where the adjusted p < 0.05
    keeps the chance of any false "differs" among the m tests below 5 %."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running_max = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running_max = max(running_max, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running_max
    return adjusted
