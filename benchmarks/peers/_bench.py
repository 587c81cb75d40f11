"""Measurement helpers shared by every benchmark child process (ours and the peers').

Standard library + numpy only: this file is imported both by ``benchmarks/train_speed.py``
(the repository's interpreter) and by the peer runners (the peers' virtualenv), so the
timing, the windows, the memory figure and the metrics are computed by the same code
for everybody.

Timing protocol (identical for all runners)
-------------------------------------------
One epoch over the training split, batch after batch.  ``StepTimer`` takes a
wall-clock stamp (``time.perf_counter``) after the steps that close a window; a
window is ``window`` consecutive steps after ``warmup`` steps, and its throughput
is ``rows trained in the window / wall time of the window`` (data feeding
included).  The reported figure is the median over ``windows`` windows.  On an
asynchronous device the runner passes a ``sync`` callable that the timer calls
only at window boundaries, so steps still pipeline inside a window.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np


# ----------------------------------------------------------------------------------------------
# windows
def plan_windows(num_steps: int, warmup: int, window: int, windows: int) -> dict:
    """Fit ``warmup + windows * window`` into ``num_steps``: shrink the window, then the warm-up and windows."""
    warmup, window, windows = max(0, int(warmup)), max(1, int(window)), max(1, int(windows))
    requested = dict(warmup=warmup, window=window, windows=windows)
    if warmup + window * windows > num_steps:
        window = max(1, (num_steps - warmup) // windows)
        if warmup + window * windows > num_steps:     # too short even for 1-step windows: keep half as warm-up
            warmup = min(warmup, num_steps // 2)
            windows = max(1, min(windows, num_steps - warmup))
            window = max(1, (num_steps - warmup) // windows)
    plan = dict(warmup=warmup, window=window, windows=windows, steps_per_epoch=int(num_steps))
    if plan["warmup"] != requested["warmup"] or plan["window"] != requested["window"] \
            or plan["windows"] != requested["windows"]:
        plan["adjusted_from"] = requested
    return plan


class StepTimer:
    """Stamps the wall clock at window boundaries; ``step_done(rows)`` after every training step."""

    def __init__(self, plan: dict, sync=None):
        self.plan = plan
        w, s, n = plan["warmup"], plan["window"], plan["windows"]
        # index (0-based) of the step after which a boundary stamp is taken
        self.bounds = [w - 1 + k * s for k in range(n + 1)]
        self._bound_set = set(self.bounds)
        self.sync = sync
        self.stamps: dict[int, float] = {}
        self.rows: list[int] = []
        self.t_start = time.perf_counter()
        self.t_end = None

    def step_done(self, rows: int) -> None:
        i = len(self.rows)
        self.rows.append(int(rows))
        if i in self._bound_set:
            if self.sync is not None:
                self.sync()
            self.stamps[i] = time.perf_counter()

    def begin(self) -> None:
        """Call right before the first step (stamps the 'step -1' boundary when warmup is 0)."""
        if self.sync is not None:
            self.sync()
        self.t_start = time.perf_counter()
        self.stamps[-1] = self.t_start

    def end(self) -> None:
        if self.sync is not None:
            self.sync()
        self.t_end = time.perf_counter()

    def summary(self) -> dict:
        rows_cum = np.concatenate([[0], np.cumsum(self.rows, dtype=np.int64)])
        out = []
        for a, b in zip(self.bounds[:-1], self.bounds[1:]):
            if a not in self.stamps or b not in self.stamps:
                continue
            rows = int(rows_cum[b + 1] - rows_cum[a + 1])
            dt = self.stamps[b] - self.stamps[a]
            out.append(dict(steps=b - a, rows=rows, seconds=dt, rows_per_s=rows / dt if dt > 0 else float("nan")))
        rates = [w["rows_per_s"] for w in out]
        total_t = (self.t_end or time.perf_counter()) - self.t_start
        res = dict(
            windows=out,
            rows_per_s=statistics.median(rates) if rates else float("nan"),
            rows_per_s_min=min(rates) if rates else float("nan"),
            rows_per_s_max=max(rates) if rates else float("nan"),
            steps=len(self.rows),
            train_rows=int(rows_cum[-1]),
            epoch_seconds=total_t,
            epoch_rows_per_s=(int(rows_cum[-1]) / total_t) if total_t > 0 else float("nan"),
        )
        if len(rates) < self.plan["windows"]:
            res["incomplete"] = f"only {len(rates)} of {self.plan['windows']} windows completed"
        return res


def run_epoch(rows: int, batch_size: int, spec: dict, step, sync=None):
    """Train one epoch of ``rows`` in-memory rows: ``step(lo, hi)`` trains on rows ``[lo, hi)``.

    Returns ``(timing summary, plan)``; the loop body is exactly one call of ``step``.
    """
    n = num_steps(rows, batch_size)
    plan = plan_windows(n, spec["warmup"], spec["window"], spec["windows"])
    timer = StepTimer(plan, sync)
    timer.begin()
    for i in range(n):
        lo = i * batch_size
        hi = min(rows, lo + batch_size)
        step(lo, hi)
        timer.step_done(hi - lo)
    timer.end()
    return timer.summary(), plan


# ----------------------------------------------------------------------------------------------
# memory
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return float("nan")


# ----------------------------------------------------------------------------------------------
# metrics (the same implementation for every runner)
def auc(labels, scores) -> float:
    """Exact tie-aware ROC AUC (Mann-Whitney), numpy only; nan with one class."""
    y = np.asarray(labels, np.float64).reshape(-1) > 0.5
    s = np.asarray(scores, np.float64).reshape(-1)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(s).any():
        return float("nan")
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    bounds = np.r_[starts, y.size]
    pos_cum = np.r_[0, np.cumsum(y, dtype=np.int64)]
    pos_in = np.diff(pos_cum[bounds]).astype(np.float64)
    neg_in = np.diff(bounds) - pos_in
    neg_below = np.r_[0, np.cumsum(neg_in)[:-1]]
    return float(np.dot(pos_in, neg_below + 0.5 * neg_in) / (float(n_pos) * float(n_neg)))


def logloss(labels, probs, eps: float = 1e-7) -> float:
    y = np.asarray(labels, np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, np.float64).reshape(-1), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def valid_metrics(labels, probs) -> dict:
    probs = np.asarray(probs, np.float64).reshape(-1)
    return dict(valid_auc=auc(labels, probs), valid_logloss=logloss(labels, probs), valid_rows=int(probs.size),
                valid_mean_prob=float(probs.mean()) if probs.size else float("nan"))


# ----------------------------------------------------------------------------------------------
# data exported for the peers (see train_speed.export_numpy)
def load_arrays(npy_dir: str, split: str):
    """``(cat int32 [N, F], label float32 [N])`` of a split, fully loaded in memory."""
    cat = np.load(os.path.join(npy_dir, f"{split}_cat.npy"))
    label = np.load(os.path.join(npy_dir, f"{split}_label.npy"))
    return np.ascontiguousarray(cat), np.ascontiguousarray(label)


def num_steps(rows: int, batch_size: int) -> int:
    return int(math.ceil(rows / batch_size))


# ----------------------------------------------------------------------------------------------
# spec / result files
def read_spec(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def write_result(path: str, result: dict) -> None:
    result.setdefault("peak_rss_mb", peak_rss_mb())
    result.setdefault("python", platform.python_version())
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def run_child(main, spec_path: str, result_path: str) -> int:
    """Run ``main(spec) -> result dict``; on failure write the error into the result file."""
    spec = read_spec(spec_path)
    t0 = time.perf_counter()
    try:
        result = main(spec)
        result["status"] = result.get("status", "ok")
    except Exception as exc:  # reported in the results instead of a number
        import traceback

        tb = traceback.format_exc()
        sys.stderr.write(tb)
        result = dict(status="error", error=f"{type(exc).__name__}: {exc}", traceback=tb[-4000:])
    result["wall_seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = peak_rss_mb()
    write_result(result_path, result)
    return 0 if result["status"] == "ok" else 1
