"""The one-sided tests behind the controls' verdict (melbo.analysis.significance): exact values on small cases worked
by hand, the textbook tables, and (where scipy is installed) scipy's own tests."""

from __future__ import annotations

import math
import random

import pytest

from melbo.analysis import significance
from melbo.analysis.significance import median_below, rank_lower, share_greater


def test_fisher_exact_by_hand():
    # 2 of 2 against 0 of 2: of the C(4,2) = 6 ways to pick which two of the four carry the label, one gives the first
    # group both
    assert share_greater(2, 2, 0, 2) == pytest.approx(1 / 6)
    assert share_greater(0, 3, 3, 3) == 1.0  # "at least 0 carriers" always holds
    assert share_greater(25, 32, 0, 5) < 0.002  # the demo's 25 of 32 copies against 0 of 5 random directions


def test_sign_test_by_hand():
    assert median_below([1.0, 2.0, 3.0], 5.0) == pytest.approx(1 / 8)  # all three below: 2⁻³
    assert median_below([1.0, 9.0], 5.0) == pytest.approx(3 / 4)
    assert median_below([5.0, 5.0, 4.0], 5.0) == pytest.approx(1 / 2)  # ties left out: one value, below
    assert median_below([5.0], 5.0) == 1.0
    # equal medians are no finding: half the copies below the unsteered value, half above
    assert median_below([1.2, 1.25, 1.35, 1.4], 1.3) > 0.5


def test_rank_test_by_hand():
    # n = m = 2: U (pairs with the first lower) is 4 in one ordering of C(4,2) = 6, so p = 1/6; 3 or more in 2 of 6
    assert rank_lower([1.0, 2.0], [3.0, 4.0]) == pytest.approx(1 / 6)
    assert rank_lower([1.0, 3.5], [3.0, 4.0]) == pytest.approx(2 / 6)
    assert rank_lower([5.0, 6.0], [3.0, 4.0]) == pytest.approx(1.0)


def test_normal_approximation_beyond_the_exact_count(monkeypatch):
    rng = random.Random(0)
    a, b = [rng.gauss(0, 1) for _ in range(150)], [rng.gauss(0.2, 1) for _ in range(140)]
    assert len(a) * len(b) > significance.EXACT_PAIRS  # approximated by default
    approximate = rank_lower(a, b)
    monkeypatch.setattr(significance, "EXACT_PAIRS", len(a) * len(b))
    assert approximate == pytest.approx(rank_lower(a, b), rel=0.02)


@pytest.mark.parametrize("seed", range(5))
def test_against_scipy(seed):
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(seed)
    n, m = rng.randint(1, 40), rng.randint(1, 12)
    a, b = [rng.gauss(0, 1) for _ in range(n)], [rng.gauss(0.5, 1) for _ in range(m)]
    assert rank_lower(a, b) == pytest.approx(stats.mannwhitneyu(a, b, alternative="less", method="exact").pvalue)
    hits, other = rng.randint(0, n), rng.randint(0, m)
    table = [[hits, n - hits], [other, m - other]]
    assert share_greater(hits, n, other, m) == pytest.approx(stats.fisher_exact(table, alternative="greater").pvalue)
    below = sum(x < 0.2 for x in a)
    assert median_below(a, 0.2) == pytest.approx(stats.binomtest(below, n, 0.5, alternative="greater").pvalue)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError):
        share_greater(3, 2, 0, 1)
    with pytest.raises(ValueError):
        rank_lower([], [1.0])
    assert math.isclose(share_greater(1, 1, 1, 1), 1.0)


def test_smallest_p_is_that_of_the_most_extreme_outcome():
    """What a verdict can say with n copies and m control vectors: 1 / C(n+m, n) for the label and the rank test,
    2⁻ⁿ for the sign test; the fewest controls that reach p ≤ 0.05."""
    from melbo.analysis.significance import controls_needed, smallest_p

    assert smallest_p("share", 4, 1) == pytest.approx(1 / 5) and smallest_p("nll_random", 4, 3) == pytest.approx(1 / 35)
    assert smallest_p("nll_unsteered", 4) == pytest.approx(1 / 16) and smallest_p("nll_unsteered", 5) == pytest.approx(1 / 32)
    assert smallest_p("share", 0, 3) == 1.0
    assert [controls_needed(n) for n in (2, 3, 4, 5, 18, 19, 32)] == [None, 3, 3, 2, 2, 1, 1]
    with pytest.raises(ValueError):
        smallest_p("t-test", 4, 4)
