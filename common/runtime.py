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

Separately, zoo_torch puts every table of at least ``HUGE_PAGE_MIN_BYTES`` (embedding tables and
their optimiser slots) on 2 MiB transparent huge pages before first writing it
(:func:`advise_huge_pages`, Linux; also switched off by ``CTR_ZOO_PROCESS_TUNING=0``).  A
training step gathers and scatters tens of thousands of random rows of each table; with 4 KiB
pages nearly every row is a TLB miss as well as a cache miss.  Measured on the benchmark machine
(3.9M x 16 float32 tables, 44k distinct rows per step): the optimiser's gather + scatter of p, m,
v 3.1 -> 2.1 ms, the forward lookup of 160k rows 2.1 -> 1.0 ms; the whole DeepFM step 1-2 %.
TensorFlow allocates its variables itself and replaces the buffer at the first update; collapsing
them into huge pages after that (``MADV_COLLAPSE``) measured no gain, so zoo_tf does not.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

TUNE_ENV = "CTR_ZOO_PROCESS_TUNING"
MMAP_THRESHOLD = 1 << 28        # allocations up to 256 MiB come from the heap
EVAL_MMAP_THRESHOLD = 4 << 20   # ... but in evaluation (evaluation_memory) those from 4 MiB up get an mmap
TRIM_THRESHOLD = 2 ** 31 - 1    # (mallopt's largest int) never give the heap top back mid-run
# glibc mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

HUGE_PAGE_MIN_BYTES = 32 << 20  # tables from 32 MiB up get transparent huge pages
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14

_applied: dict | None = None
_LIBC: list = []                # [the C library, or None], loaded once by _libc


_SIGNATURES = {"mallopt": [ctypes.c_int, ctypes.c_int], "malloc_trim": [ctypes.c_size_t],
               "madvise": [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]}


def _libc(fn: str):
    """The C library's function ``fn`` (ctypes, with its signature), or None where it has none.
    The library is loaded once (``find_library`` may run ``ldconfig``: not on every evaluation)."""
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True))
        except OSError:
            _LIBC.append(None)
    f = getattr(_LIBC[0], fn, None)
    if f is not None:
        f.argtypes, f.restype = _SIGNATURES[fn], ctypes.c_int
    return f


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
    mallopt = _libc("mallopt")
    if mallopt is None:
        _applied = {"malloc": "default", "reason": "no glibc mallopt"}
        return dict(_applied)
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = ok and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _applied = ({"malloc": "glibc", "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
                if ok else {"malloc": "default", "reason": "mallopt refused"})
    return dict(_applied)


@contextlib.contextmanager
def evaluation_memory():
    """Context for an evaluation pass in a process that :func:`tune_malloc` tuned (else a no-op).

    The heap keeps what training freed, in holes shaped by the training step's blocks.  Evaluation
    allocates differently sized blocks that do not fit those holes, so without this the heap --
    and the process's peak resident memory -- grew by another 15-30 % during evaluation
    (PyTorch AutoInt on the benchmark data: 2.4 GB after training, 2.8-3.2 GB after evaluation).
    On entry the heap's free pages go back to the system (``malloc_trim(0)``) and blocks from
    ``EVAL_MMAP_THRESHOLD`` up get their own mmap again (freed whole on ``free``); on exit the
    training thresholds are restored.  Evaluation is forward-only, so the extra page faults
    cost little.
    """
    tuned = _applied is not None and _applied.get("malloc") == "glibc"   # so mallopt exists
    if tuned:
        trim = _libc("malloc_trim")
        if trim is not None:
            trim(0)
        _libc("mallopt")(_M_MMAP_THRESHOLD, EVAL_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if tuned:
            _libc("mallopt")(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def configure_process(malloc: bool = True) -> dict:
    """``OMP_WAIT_POLICY=PASSIVE`` (unless set) and, with ``malloc``, :func:`tune_malloc`; returns what
    was applied.  The TensorFlow entry point passes ``malloc=False``: TensorFlow gains nothing from it
    (AutoInt 4.4k vs 4.1k rows/s, DeepFM the same) and its peak memory grows by 20-25 %."""
    if _enabled():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = tune_malloc() if malloc else {"malloc": "default", "reason": "not requested"}
    out["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    return out


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Ask Linux to back ``[address, address + nbytes)`` with transparent huge pages.

    Only the whole 2 MiB pages inside the range are advised (``MADV_HUGEPAGE``), so neighbouring
    allocations are untouched.  Call it before the memory is first written: its page faults then
    map huge pages (pages already there stay as they are).  Returns whether the kernel accepted
    the advice; False (and nothing done) below ``HUGE_PAGE_MIN_BYTES``, with
    ``CTR_ZOO_PROCESS_TUNING=0``, off Linux, or without a C library.
    """
    if nbytes < HUGE_PAGE_MIN_BYTES or not _enabled() or not sys.platform.startswith("linux"):
        return False
    madvise = _libc("madvise")
    if madvise is None:
        return False
    lo = (int(address) + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    hi = (int(address) + int(nbytes)) & ~(_HUGE_PAGE - 1)
    if hi <= lo:
        return False
    return madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0
