"""Pearson's chi-square goodness-of-fit test, self-contained (scipy is not a dependency)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def chi_square_p(observed: Tensor, expected_probs: Tensor) -> float:
    """observed [K] counts, expected_probs [K] (sum 1) -> the p-value of the fit.

    Categories of probability 0 must be unobserved (else p = 0) and add no degree of freedom."""
    observed, expected_probs = observed.double(), expected_probs.double()
    possible = expected_probs > 0
    if observed[~possible].sum() > 0:
        return 0.0
    expected = expected_probs[possible] * observed.sum()
    statistic = float(((observed[possible] - expected) ** 2 / expected).sum())
    return chi2_sf(statistic, int(possible.sum()) - 1)


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, x/2)."""
    a, x = df / 2.0, x / 2.0
    if x <= 0.0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:  # series for P(a, x)
        term = total = 1.0 / a
        n = a
        while abs(term) > 1e-17 * abs(total):
            n += 1.0
            term *= x / n
            total += term
        return 1.0 - total * math.exp(log_front)
    # continued fraction for Q(a, x) (modified Lentz)
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return math.exp(log_front) * h
