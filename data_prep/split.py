"""Reproducible train/valid/test assignment of rows without holding it in memory.

Rows are numbered ``k = 0, 1, 2, ...`` in file order (well-formed data rows only;
with ``stratify`` the numbering is per label class).  They are cut into blocks of
``B`` consecutive rows, ``B`` the smallest block in which the split fractions are
whole numbers of rows (``0.8,0.1,0.1 -> B = 10``: 8 train, 1 valid, 1 test).  Inside
block ``b`` the slots are shuffled by a hash of ``(seed, class, b, slot)``, so the
split of row ``k`` is a pure function of ``(seed, class, k)``: both passes over the
file agree, the proportions are exact in every complete block (a random split
stratified by position, and by label with ``stratify``), and nothing per row is
kept in memory.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_IDS = {"train": TRAIN, "valid": VALID, "test": TEST}
SPLIT_NAMES = ("train", "valid", "test")

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_G = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (vectorised, wrapping uint64 arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def block_layout(fractions, max_block: int = 1000) -> tuple[int, tuple[int, int, int]]:
    """(B, rows per split in a block of B)."""
    fr = [float(f) for f in fractions]
    for B in range(1, max_block + 1):
        counts = [f * B for f in fr]
        if all(abs(c - round(c)) < 1e-6 for c in counts):
            c = [int(round(x)) for x in counts]
            if sum(c) == B:
                return B, tuple(c)
    B = max_block
    exact = [Fraction(f).limit_denominator(10**6) * B for f in fr]
    c = [int(x) for x in exact]
    for i in sorted(range(3), key=lambda i: -(exact[i] - c[i]))[:B - sum(c)]:
        c[i] += 1
    return B, tuple(c)


class Splitter:
    def __init__(self, fractions=(0.8, 0.1, 0.1), seed: int = 0, stratify: bool = False):
        self.fractions = tuple(float(f) for f in fractions)
        self.seed = int(seed)
        self.stratify = bool(stratify)
        self.B, self.per_block = block_layout(self.fractions)
        # slot rank -> split
        self._slot_split = np.repeat(np.array([TRAIN, VALID, TEST], np.int8), self.per_block)
        self.reset()

    def reset(self) -> None:
        self.counters: dict[int, int] = {}

    def position(self) -> int:
        """Rows assigned so far (unstratified)."""
        return self.counters.get(0, 0)

    def advance(self, n: int) -> None:
        """Count ``n`` rows whose splits were computed with :meth:`assign_at`."""
        self.counters[0] = self.counters.get(0, 0) + n

    def assign_at(self, k0: int, m: int) -> np.ndarray:
        """Split ids of rows ``k0 .. k0 + m - 1`` (unstratified), changing nothing."""
        if m == 0:
            return np.zeros(0, np.int8)
        return self._table(0, k0, m)

    def _assign_class(self, cls: int, m: int) -> np.ndarray:
        k0 = self.counters.get(cls, 0)
        self.counters[cls] = k0 + m
        return self._table(cls, k0, m)

    def _table(self, cls: int, k0: int, m: int) -> np.ndarray:
        B = self.B
        b0, b1 = k0 // B, (k0 + m - 1) // B
        blocks = np.arange(b0, b1 + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            base = mix64(np.uint64(self.seed & 0xFFFFFFFFFFFFFFFF) * _G + np.uint64(cls & 0xFFFFFFFF))
            h = mix64(base ^ mix64(blocks * _G)[:, None] + np.arange(B, dtype=np.uint64)[None, :])
        rank = np.argsort(np.argsort(h, axis=1, kind="stable"), axis=1, kind="stable")   # slot -> rank
        table = self._slot_split[rank]                                                  # [blocks, B]
        k = np.arange(k0, k0 + m, dtype=np.int64)
        return table[k // B - b0, k % B]

    def assign(self, labels: np.ndarray | None, n: int) -> np.ndarray:
        """Split ids (0 train, 1 valid, 2 test) of the next ``n`` rows."""
        if n == 0:
            return np.zeros(0, np.int8)
        if not self.stratify or labels is None:
            return self._assign_class(0, n)
        cls = np.asarray(labels).astype(np.int64)
        out = np.empty(n, np.int8)
        for c in np.unique(cls).tolist():
            idx = np.flatnonzero(cls == c)
            out[idx] = self._assign_class(int(c) + 1, len(idx))
        return out
