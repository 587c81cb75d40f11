"""Rank correlations (ties handled), for judging how well a proxy ranks architectures.

    spearman(x, y)   Pearson correlation of the average ranks (ties get their mean rank)
    kendall_tau(x, y) Kendall tau-b = (C - D) / sqrt((n0 - n1)(n0 - n2)),
                      n0 = n(n-1)/2, n1 / n2 = pairs tied in x / in y
Both return nan when a variable is constant (as scipy does).
"""
from __future__ import annotations

import math

import numpy as np


def rankdata(a) -> np.ndarray:
    """Average ranks starting at 1 (scipy.stats.rankdata(method="average"))."""
    a = np.asarray(a, np.float64).ravel()
    n = len(a)
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    ranks = np.empty(n, np.float64)
    if n == 0:
        return ranks
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], n]
    mean_rank = (starts + ends + 1) / 2.0           # positions start..end-1 -> ranks start+1..end
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def _check(x, y):
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if len(x) != len(y):
        raise ValueError(f"x and y have different lengths ({len(x)} != {len(y)})")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("rank correlations of values with NaN are undefined")
    return x, y


def pearson(x, y) -> float:
    x, y = _check(x, y)
    if len(x) < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum() / den) if den > 0 else math.nan


def spearman(x, y) -> float:
    x, y = _check(x, y)
    return pearson(rankdata(x), rankdata(y))


def kendall_tau(x, y, chunk: int = 2048) -> float:
    """Kendall tau-b, O(n^2) in row chunks (fine for the few thousand candidates of a search)."""
    x, y = _check(x, y)
    n = len(x)
    if n < 2:
        return math.nan
    s = tx = ty = 0
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        dx = np.sign(x[a:b, None] - x[None, :])
        dy = np.sign(y[a:b, None] - y[None, :])
        upper = np.arange(a, b)[:, None] < np.arange(n)[None, :]      # pairs i < j only
        s += int((dx * dy)[upper].sum())
        tx += int(((dx == 0) & upper).sum())
        ty += int(((dy == 0) & upper).sum())
    n0 = n * (n - 1) // 2
    den = math.sqrt(float(n0 - tx) * float(n0 - ty))
    return s / den if den > 0 else math.nan


kendall_tau_b = kendall_tau
