"""Evaluation metrics in numpy only (no torch/tensorflow): AUC, logloss, and a streaming accumulator.

    auc(labels, scores)            exact ROC AUC, ties counted as 1/2 (rank based, O(n log n))
    logloss(labels, probs)         mean binary cross-entropy of probabilities (clipped to [eps, 1-eps])
    logloss_from_logits(labels, z) the same from logits, computed without under/overflow
    sigmoid(z)                     numerically stable logistic function
    MetricAccumulator              collects (label, score) batch by batch, then computes all metrics

``auc`` returns ``nan`` when only one class is present (the AUC is undefined);
scikit-learn raises in that case.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["auc", "logloss", "logloss_from_logits", "sigmoid", "MetricAccumulator", "evaluate"]


def _flat(a, dtype=np.float64) -> np.ndarray:
    return np.asarray(a, dtype=dtype).reshape(-1)


def sigmoid(z):
    """1 / (1 + exp(-z)) without overflow for large |z|; float64 for python/float64 input."""
    z = np.asarray(z)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out if out.ndim else out[()]


def auc(labels, scores) -> float:
    """Area under the ROC curve, exact and tie-aware.

    Equals the Mann-Whitney statistic ``P(s+ > s-) + 0.5 * P(s+ == s-)`` over
    all (positive, negative) pairs.  Labels are binarised with ``> 0.5``.
    Returns ``nan`` if all labels are of one class.
    """
    y = _flat(labels) > 0.5
    s = _flat(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    # tie groups of equal scores: [starts[k], starts[k+1])
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    pos_cum = np.r_[0, np.cumsum(y_sorted, dtype=np.int64)]
    bounds = np.r_[starts, y.size]
    pos_in = np.diff(pos_cum[bounds])                      # positives per group
    cnt = np.diff(bounds)
    neg_in = cnt - pos_in                                  # negatives per group
    neg_below = np.r_[0, np.cumsum(neg_in, dtype=np.int64)[:-1]]
    # each positive beats the negatives below its group and half-ties those inside it
    num = float(np.dot(pos_in.astype(np.float64), neg_below + 0.5 * neg_in))
    return num / (float(n_pos) * float(n_neg))


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy ``-[y log p + (1-y) log(1-p)]`` with ``p`` clipped to ``[eps, 1-eps]``."""
    y = _flat(labels)
    p = np.clip(_flat(probs), eps, 1.0 - eps)
    if y.shape != p.shape:
        raise ValueError(f"labels and probs differ in length: {y.shape[0]} vs {p.shape[0]}")
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def logloss_from_logits(labels, logits) -> float:
    """Mean binary cross-entropy from logits: ``mean(softplus(z) - y z)`` (no clipping needed)."""
    y = _flat(labels)
    z = _flat(logits)
    if y.shape != z.shape:
        raise ValueError(f"labels and logits differ in length: {y.shape[0]} vs {z.shape[0]}")
    if y.size == 0:
        return float("nan")
    softplus = np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))
    return float(np.mean(softplus - y * z))


class MetricAccumulator:
    """Collect predictions batch by batch; ``result()`` gives AUC, logloss and calibration figures.

        acc = MetricAccumulator(from_logits=True)
        for batch in loader:
            acc.update(batch["label"], model(batch))
        acc.result()   # {"auc", "logloss", "rows", "ctr", "mean_pred"}

    Inputs may be numpy arrays, lists, or anything with ``.numpy()`` (eager tensors)
    or ``.detach().cpu().numpy()`` (torch tensors): they are converted here so callers
    from either backend can pass their tensors directly.
    """

    def __init__(self, from_logits: bool = False):
        self.from_logits = from_logits
        self._labels: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []

    @staticmethod
    def _to_numpy(a) -> np.ndarray:
        if hasattr(a, "detach"):
            a = a.detach().cpu()
        if hasattr(a, "numpy"):
            a = a.numpy()
        return np.asarray(a, dtype=np.float64).reshape(-1)

    def update(self, labels, scores) -> None:
        y, s = self._to_numpy(labels), self._to_numpy(scores)
        if y.shape != s.shape:
            raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
        self._labels.append(y)
        self._scores.append(s)

    def reset(self) -> None:
        self._labels, self._scores = [], []

    @property
    def rows(self) -> int:
        return int(sum(a.size for a in self._labels))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All labels and scores (logits if ``from_logits``) collected so far."""
        if not self._labels:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(self._labels), np.concatenate(self._scores)

    def result(self) -> dict:
        y, s = self.arrays()
        if y.size == 0:
            return {"auc": math.nan, "logloss": math.nan, "rows": 0, "ctr": math.nan, "mean_pred": math.nan}
        p = sigmoid(s) if self.from_logits else s
        ll = logloss_from_logits(y, s) if self.from_logits else logloss(y, p)
        return {"auc": auc(y, s), "logloss": ll, "rows": int(y.size), "ctr": float(y.mean()),
                "mean_pred": float(np.mean(p))}


def evaluate(labels, probs) -> dict:
    """AUC, logloss, rows, ctr and mean prediction of one set of probabilities."""
    acc = MetricAccumulator()
    acc.update(labels, probs)
    return acc.result()
