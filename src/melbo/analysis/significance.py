"""One-sided tests behind the controls' verdict: is a difference between the copies and a control more than the
spread over vectors? Exact and pure (no scipy, no random draws), so a verdict is the same on every machine.

* :func:`share_greater` — Fisher's exact test: more of the copies carry a label than of a control's vectors;
* :func:`rank_lower` — the Mann–Whitney rank test: the copies' values tend lower than a control's;
* :func:`median_below` — the sign test: the copies' median lies below one fixed value (the unsteered model's).

Each returns a p-value; the spread they account for is over vectors (which copies and which random directions were
drawn), not over prompts: the prompts are the eval's own.
"""

from __future__ import annotations

import math

LEVEL = 0.05  # a difference counts when a test gives p at most this


def share_greater(hits: int, total: int, other_hits: int, other_total: int) -> float:
    """p of seeing ``hits`` of ``total`` or more, given ``hits + other_hits`` carriers among both groups drawn at random
    (the hypergeometric upper tail): small when the first group carries the label more often than the second."""
    _check_counts(hits, total, other_hits, other_total)
    carriers, everyone = hits + other_hits, total + other_total
    ways = math.comb(everyone, total)
    upper = sum(math.comb(carriers, k) * math.comb(everyone - carriers, total - k) for k in range(hits, min(carriers, total) + 1))
    return upper / ways


def rank_lower(values: list[float], others: list[float]) -> float:
    """p of as many or more (value, other) pairs with the value lower if both groups came from one distribution (the
    Mann–Whitney test; a tie counts a half): small when ``values`` tend lower than ``others``. Exact up to
    ``EXACT_PAIRS`` pairs, the normal approximation beyond."""
    if not values or not others:
        raise ValueError("rank_lower needs values in both groups")
    u = sum((a < b) + 0.5 * (a == b) for a in values for b in others)
    n, m = len(values), len(others)
    if n * m > EXACT_PAIRS:
        mean, sd = n * m / 2, math.sqrt(n * m * (n + m + 1) / 12)
        return 0.5 * math.erfc((u - 0.5 - mean) / (sd * math.sqrt(2)))
    counts = _u_counts(min(n, m), max(n, m))
    return sum(counts[math.ceil(u):]) / math.comb(n + m, n)


EXACT_PAIRS = 20_000


def median_below(values: list[float], point: float) -> float:
    """p of at least this many of ``values`` lying below ``point`` if their median were ``point`` (the sign test; values
    equal to ``point`` are left out): small when the median of ``values`` is below ``point``."""
    below = sum(v < point for v in values)
    n = below + sum(v > point for v in values)
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(below, n + 1)) / 2**n


def smallest_p(comparison: str, n: int, m: int = 1) -> float:
    """The smallest p a comparison can give with ``n`` copies and ``m`` control vectors: that of the most extreme
    outcome (every copy carries the label and no control vector does; every copy's value below every control's, or
    below the fixed point). Above :data:`LEVEL`, no outcome counts as a difference: too few vectors to tell.
    ``comparison``: ``share`` (:func:`share_greater`), ``nll_random`` (:func:`rank_lower`) or ``nll_unsteered``
    (:func:`median_below`, which has no ``m``)."""
    if n < 1 or m < 1:
        return 1.0
    if comparison == "share":
        return share_greater(n, n, 0, m)
    if comparison == "nll_random":
        return rank_lower([0.0] * n, [1.0] * m)
    if comparison == "nll_unsteered":
        return median_below([0.0] * n, 1.0)
    raise ValueError(f"no comparison {comparison!r}")


def controls_needed(n: int) -> int | None:
    """The fewest control vectors with which :func:`share_greater` and :func:`rank_lower` can reach :data:`LEVEL`
    against ``n`` copies (None when even ``n`` of them cannot: 1 / C(2n, n) > LEVEL, i.e. n ≤ 2)."""
    return next((m for m in range(1, n + 1) if smallest_p("share", n, m) <= LEVEL), None)


def _u_counts(n: int, m: int) -> list[int]:
    """How many orderings of ``n`` + ``m`` untied values give each Mann–Whitney U = 0 … n·m: the coefficients of the
    Gaussian binomial [n+m choose n]_q, built as the product over i of (1 − q^(m+i)) / (1 − q^i), whole at every step."""
    coeffs = [1] + [0] * (n * m)
    for i in range(1, n + 1):
        for k in range(n * m, m + i - 1, -1):  # × (1 − q^(m+i))
            coeffs[k] -= coeffs[k - m - i]
        for k in range(i, n * m + 1):  # ÷ (1 − q^i) = × Σ q^(ij)
            coeffs[k] += coeffs[k - i]
    return coeffs


def _check_counts(*counts: int) -> None:
    hits, total, other_hits, other_total = counts
    if not (0 <= hits <= total and 0 <= other_hits <= other_total) or total == 0 or other_total == 0:
        raise ValueError(f"share_greater needs 0 ≤ hits ≤ total and non-empty groups, got {counts}")
