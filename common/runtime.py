"""Process-level settings for fast CPU training (no torch / tensorflow import here).

    from common.runtime import configure_process
    configure_process()          # first thing in an entry point, before torch / tensorflow start threads

``configure_process`` does two things (``CTR_ZOO_PROCESS_TUNING=0`` skips both; an
``OMP_WAIT_POLICY`` already in the environment is kept):

1. ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning.  As fast on
   a quiet machine, and many times faster when the cores are shared (a data-loading
   thread, other jobs, several torchrun processes).
2. glibc ``malloc`` keeps large blocks: by default every allocation above a (dynamic,
   at most 32 MiB) threshold is a fresh ``mmap`` that is unmapped again on ``free``, so
   each training step pays a page fault per 4 KiB of every large activation -- the
   attention scores of AutoInt ([B, H, F, F]), the [B*F, d] projections.  Raising the
   mmap threshold (to 256 MiB) and the trim threshold serves those blocks from the heap,
   which is reused step after step.  Measured on the 2-core benchmark machine (PyTorch,
   batch 4096, ``benchmarks/train_speed.py``): AutoInt 2.2k -> 5.0k rows/s, DeepFM / DCN
   7-10 % faster.  The price: freed blocks stay in the process (the heap is not returned to
   the system until it ends), so the peak resident memory grows -- AutoInt 1.9 -> 2.7 GB.
   Blocks above 256 MiB still get their own mmap: xDeepFM's 1 GB [B*D, H*m] outer products
   (before the CIN was computed in chunks) fragmented the heap at a 1 GiB threshold (peak
   10.7 GB instead of 3.4 GB) and gained nothing.

Both only affect the current process (and its children, for the environment variable).
On a non-glibc system the malloc part is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

TUNE_ENV = "CTR_ZOO_PROCESS_TUNING"
MMAP_THRESHOLD = 1 << 28        # allocations up to 256 MiB come from the heap
TRIM_THRESHOLD = 2 ** 31 - 1    # (mallopt's largest int) never give the heap top back mid-run
# glibc mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied: dict | None = None


def _enabled() -> bool:
    return os.environ.get(TUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def tune_malloc() -> dict:
    """Raise glibc's mmap and trim thresholds (see the module docstring); idempotent.

    Returns ``{"malloc": "glibc", "mmap_threshold": ..., "trim_threshold": ...}`` when applied,
    ``{"malloc": "default", "reason": ...}`` otherwise.
    """
    global _applied
    if _applied is not None:
        return dict(_applied)
    if not _enabled():
        _applied = {"malloc": "default", "reason": f"{TUNE_ENV}=0"}
        return dict(_applied)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _applied = {"malloc": "default", "reason": "no glibc mallopt"}
        return dict(_applied)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = ok and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _applied = ({"malloc": "glibc", "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
                if ok else {"malloc": "default", "reason": "mallopt refused"})
    return dict(_applied)


def configure_process(malloc: bool = True) -> dict:
    """``OMP_WAIT_POLICY=PASSIVE`` (unless set) and, with ``malloc``, :func:`tune_malloc`; returns what
    was applied.  The TensorFlow entry point passes ``malloc=False``: TensorFlow gains nothing from it
    (AutoInt 4.4k vs 4.1k rows/s, DeepFM the same) and its peak memory grows by 20-25 %."""
    if _enabled():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = tune_malloc() if malloc else {"malloc": "default", "reason": "not requested"}
    out["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    return out
