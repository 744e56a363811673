"""How a score responds along a slider sweep: continuity (the release's chi^2 measure) and monotonicity.

Both take the scores of one sweep, one score per alpha. A missing score (NaN, e.g. no face found by
ArcFace) makes both results NaN: a curve with a hole has no honest single number.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_scores(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size < 2:
        raise ValueError(f"{name} must be a 1-D sequence of at least 2 numbers, got shape {array.shape}")
    return array


def continuity_score(scores: Sequence[float]) -> float:
    """The release's continuity of a sweep: chi^2 / (m - 1) of the normalised scores' histogram. Lower = smoother.

    The m scores (one per alpha) are min-max normalised to [0, 1] and counted into m equal bins over
    [0, 1] (the last bin includes 1). A slider whose scores spread evenly over their range puts n/m = 1
    score in every bin: chi^2 = sum (count - n/m)^2 / (n/m) = 0. Jumps leave bins empty and pile scores
    up in others; the worst non-constant sweep (all scores but one at one end) gives m - 2.

    All-equal scores (a slider that does not move the score at all) cannot be min-max normalised; they
    are defined to normalise to 0, i.e. all n scores fall in one bin, which gives the largest possible
    value, n (= m). A flat response is no continuous control.
    """
    s = _as_scores(scores, "scores")
    if np.isnan(s).any():
        return float("nan")
    m = s.size  # one score per alpha, m bins
    normalised = unit_interval(s, s.min(), s.max()) if s.max() > s.min() else np.zeros_like(s)
    return uniformity_chi_square(normalised, bins=m) / (m - 1)


def unit_interval(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Min-max scaling by the range (low, high): low -> 0, high -> 1. The caller makes sure high != low."""
    return (values - low) / (high - low)


def uniformity_chi_square(x01: np.ndarray, bins: int) -> float:
    """Pearson's chi^2 of how the n values in [0, 1] fill `bins` equal bins (the last includes 1) against
    a uniform spread: sum over the bins of (count - n / bins)^2 / (n / bins)."""
    counts, _ = np.histogram(x01, bins=bins, range=(0.0, 1.0))
    expected = x01.size / bins
    return float(((counts - expected) ** 2 / expected).sum())


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values share the average of the ranks they span (e.g. [5, 7, 5] -> [1.5, 3, 1.5])."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts_run = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    run_of = np.cumsum(starts_run) - 1                      # index of the tie run of each sorted position
    run_start = np.flatnonzero(starts_run)                  # 0-based first position of each run
    run_end = np.append(run_start[1:], x.size)              # one past its last position
    run_rank = (run_start + run_end - 1) / 2 + 1            # mean of the 1-based ranks run_start+1 .. run_end
    ranks = np.empty_like(x)
    ranks[order] = run_rank[run_of]
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks (ties handled).

    NaN when either side is constant (the correlation is undefined) or contains NaN.
    """
    a, b = _as_scores(x, "x"), _as_scores(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    if np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def monotonicity_score(alphas: Sequence[float], scores: Sequence[float]) -> float:
    """Spearman correlation of the score with alpha over a sweep: +1 / -1 = strictly increasing / decreasing.

    The release has no such measure; continuity alone cannot tell a smooth slider from one whose
    score wanders. alpha = 1 suppresses the edit, so a good slider gives about -1 for the attribute's
    text score and for the distance to the source image.
    """
    return spearman(alphas, scores)
