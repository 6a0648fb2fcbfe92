"""Seed statistics (stats.py) against values computed by hand and scipy's own intervals."""

import math

import pytest
from scipy import stats as scipy_stats

from loralab.stats import compare, estimate, holm, not_shown, paired, welch


def test_estimate_mean_sample_std_and_t_interval():
    est = estimate([1.0, 2.0, 3.0, 4.0, 5.0])
    assert est.n == 5 and est.mean == 3.0
    assert est.std == pytest.approx(math.sqrt(2.5))  # Σ(x - 3)² / (n - 1) = 10 / 4
    t = 2.7764451051977987  # t(0.975, df=4), from tables
    half = t * math.sqrt(2.5) / math.sqrt(5)
    assert est.ci == pytest.approx((3 - half, 3 + half))


def test_one_value_has_no_uncertainty_estimate():
    est = estimate([2.5])
    assert (est.n, est.mean, est.std, est.ci, est.half_width) == (1, 2.5, None, None, None)


def test_paired_comparison_by_hand():
    a, b = [2.0, 2.1, 2.3], [1.9, 2.05, 2.2]  # per-seed differences 0.10, 0.05, 0.10
    c = paired(a, b)
    mean, std = 0.25 / 3, math.sqrt(((0.1 - 0.25 / 3) ** 2 * 2 + (0.05 - 0.25 / 3) ** 2) / 2)
    half = 4.302652729911275 * std / math.sqrt(3)  # t(0.975, df=2)
    assert c.test == "paired t" and c.diff == pytest.approx(mean)
    assert c.ci == pytest.approx((mean - half, mean + half))
    # t = 5 exactly; with 2 degrees of freedom the t CDF is 1/2 + t / (2 sqrt(2 + t²))
    assert c.p_value == pytest.approx(2 * (0.5 - 5 / (2 * math.sqrt(27))))
    assert c.n == 3 and c.bound == pytest.approx(mean + half)


def test_welch_comparison_matches_scipy_and_the_satterthwaite_formula():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0]
    c = welch(a, b)
    reference = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert c.test == "Welch t" and c.diff == -3.0 and c.n == 3  # the smaller sample
    assert c.ci == pytest.approx(tuple(reference.confidence_interval(0.95)))
    assert c.p_value == pytest.approx(reference.pvalue)
    va, vb = 1 / 3, (20 / 3) / 4  # s²/n of each sample
    assert reference.df == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 3))


def test_compare_pairs_only_when_the_seeds_match():
    a, b = {1: 2.0, 2: 2.1, 3: 2.3}, {1: 1.9, 2: 2.05, 3: 2.2}
    assert compare(a, b).test == "paired t"
    assert compare(a, {1: 1.9, 2: 2.05, 4: 2.2}).test == "Welch t"
    assert compare({1: 2.0}, {1: 1.0}).ci is None  # one seed each: no test


def test_no_claim_when_the_interval_includes_zero():
    noisy = paired([2.0, 2.2, 1.9], [2.1, 2.0, 2.05])  # differences -0.1, 0.2, -0.15: mean -1/60
    assert noisy.ci[0] < 0 < noisy.ci[1] and noisy.p_value > 0.05
    # the verdict bounds the difference by the CI's far end from zero, never "the same"
    assert not_shown(noisy) == f"not shown at 3 seeds, |diff| < {max(-noisy.ci[0], noisy.ci[1]):.4f}"
    assert noisy.bound == pytest.approx(-noisy.ci[0])  # mean < 0: the lower end is the farther


def test_holm_adjusts_by_hand():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> kept monotone: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1, and a raw p that is already the largest keeps the running maximum
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.02, 0.02, 0.2]) == pytest.approx([0.06, 0.06, 0.2])
    assert holm([0.04]) == [0.04] and holm([]) == []
