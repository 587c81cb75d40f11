"""Per-column work of the two passes: parse a chunk, count on train rows, fit, encode.

Plain categorical columns never leave numpy: their values are uint64 keys (see
``data_prep.reader``), counted per chunk with ``np.unique`` and merged by a stable sort
in pass 1 (within a memory budget, beyond which the counts go to disk in hash
partitions: :class:`CountSpill`), and looked up in a uint64 hash table of the fitted
vocabulary in pass 2 (:class:`KeyTable`, vectorised open addressing).  Columns whose
raw values must be parsed (labels, numbers, Avazu hours, libFM items, bucketised
numerics) go through a :class:`ValueMap`: each *distinct* raw value is parsed once in
Python and cached, rows only index into the cache.  Nothing is kept per row.
"""
from __future__ import annotations

import math
import os
import pickle
import zlib
from collections import Counter

import numpy as np

from common.encoders import (TRANSFORMS, CategoricalEncoder, SequenceEncoder, StandardScaler, Vocabulary,
                             bucket_token, parse_number)
from common.schema import OOV_INDEX, PAD_INDEX
from data_prep.reader import key_strings, string_keys

_COMPACT_MIN = 1 << 16
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)        # Fibonacci hashing: the top bits of key * this
_PART_MUL = np.uint64(0xD6E8FEB86659FD93)        # another odd multiplier, for spill partitions


class KeyTable:
    """Unique uint64 keys -> their positions, or ``values[position]``; ``lookup`` gives
    ``default`` for unknown keys (no value may equal ``default``).

    An open-addressing hash table (linear probing, load <= 1/4) built and probed with
    whole-array numpy operations: a lookup is a handful of vectorised passes (hash,
    gather, compare; the few keys that meet another key in their home slot take more
    rounds), with no Python work per key.  Probe runs continue into a tail past the
    last home slot instead of wrapping; the table always ends with an empty slot."""

    def __init__(self, keys: np.ndarray, values: np.ndarray | None = None, default: int = -1):
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        n = len(keys)
        bits = max(4, (4 * n - 1).bit_length())
        self._shift = np.uint64(64 - bits)
        self.default = default
        size = (1 << bits) + 16
        self._keys = np.zeros(size, np.uint64)
        self._pos = np.full(size, -1, np.int32 if n < 2**31 else np.int64)
        pend = np.arange(n)
        h = self._home(keys)
        while len(pend):
            if int(h.max()) >= len(self._pos) - 1:         # keep an empty slot at the end
                grow = int(h.max()) - len(self._pos) + 17
                self._keys = np.concatenate([self._keys, np.zeros(grow, np.uint64)])
                self._pos = np.concatenate([self._pos, np.full(grow, -1, self._pos.dtype)])
            k = keys[pend]
            occ = self._pos[h] >= 0
            dup = occ & (self._keys[h] == k)              # a repeated key: the first one stays
            free = np.flatnonzero(~occ)
            _, first = np.unique(h[free], return_index=True)
            win = free[first]                             # the first claimant of each free slot
            self._keys[h[win]] = k[win]
            self._pos[h[win]] = pend[win]
            stay = ~dup
            stay[win] = False
            h = h + (occ & ~dup)                          # losers of a free slot retry that slot
            pend, h = pend[stay], h[stay]
        occupied = self._pos >= 0
        if values is None:
            self._val = np.where(occupied, self._pos, default).astype(self._pos.dtype)
        else:
            values = np.asarray(values)
            self._val = np.full(len(self._pos), default, values.dtype)
            self._val[occupied] = values[self._pos[occupied]]

    def _home(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            h = np.multiply(keys, _HASH_MUL)
        h >>= self._shift
        return h.view(np.int64)                           # < 2**bits: the same numbers as intp

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        h = self._home(keys)
        out = self._val[h]
        miss = np.flatnonzero(self._keys[h] != keys)      # empty slots hold key 0 and the default
        if len(miss):
            out[miss] = self.default
            hm = h[miss]
            live = self._pos[hm] >= 0                     # another key sits there: probe on
            miss, hm = miss[live], hm[live]
            q = keys[miss]
            while len(miss):
                hm = hm + 1
                hit = self._keys[hm] == q
                out[miss[hit]] = self._val[hm[hit]]
                go = ~hit & (self._pos[hm] >= 0)
                miss, hm, q = miss[go], hm[go], q[go]
        return out


def unique_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and their (int64) counts (``np.unique`` with fewer passes)."""
    a = np.sort(keys)
    flag = np.empty(len(a) + 1, bool)
    flag[0] = flag[-1] = True
    np.not_equal(a[1:], a[:-1], out=flag[1:-1])
    idx = np.flatnonzero(flag)
    return a[idx[:-1]], np.diff(idx)


def merge_counts(runs: list) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(keys, counts)`` runs -> one sorted run with the counts of equal keys added.

    A stable sort of concatenated sorted runs is a merge (timsort), cheaper than hashing."""
    runs = [r for r in runs if len(r[0])]
    if not runs:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    if len(runs) == 1:
        return runs[0]
    ks = np.concatenate([u for u, _ in runs])
    cs = np.concatenate([c for _, c in runs])
    o = np.argsort(ks, kind="stable")
    ks = ks[o]
    cs = cs[o]
    del o
    start = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]]))
    return ks[start], np.add.reduceat(cs, start).astype(np.int64, copy=False)


class CountSpill:
    """Bounds the memory of the token counters: past ``budget`` entries in all counters
    together, every counter's counts go to ``parts`` scratch files by a hash of the token,
    and the counters start empty again.  Fitting then merges the partitions a few at a
    time, as many as the budget holds (a token's counts all land in one partition; a
    partition that alone is too big is split again by further bits of the hash), so
    memory stays bounded by the budget and the kept vocabularies, whatever the number of
    distinct tokens in the file.  The result is exactly that of counting in memory."""

    ENTRY_BYTES = 16            # a counted key: uint64 key + int64 count
    STRING_ENTRY = 8            # a string token counts as this many key entries
    BITS = 6                    # hash bits per level of partitioning

    def __init__(self, directory: str, budget_bytes: int, parts: int = 64):
        self.directory = directory
        self.budget = max(int(budget_bytes) // self.ENTRY_BYTES, 1 << 12)
        self.parts = parts
        self.spills = 0
        self.counters: list[KeyCounter] = []

    def register(self, counter: "KeyCounter") -> None:
        counter.spill_id = len(self.counters)
        self.counters.append(counter)

    def entries(self) -> int:
        return sum(c.entries() for c in self.counters)

    def maybe_spill(self) -> bool:
        if self.entries() > self.budget:
            self.spill()
            return True
        return False

    def _path(self, p: int) -> str:
        return os.path.join(self.directory, f"part{p:03d}")

    def spill(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        files = [open(self._path(p), "ab") for p in range(self.parts)]
        try:
            for c in self.counters:                        # one at a time: little memory on top
                self._write(files, [(c.spill_id, c.take_counts() + (c.take_strings(),))], 0)
        finally:
            for f in files:
                f.close()
        self.spills += 1

    def _part(self, keys: np.ndarray, level: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            h = keys * _PART_MUL
        h >>= np.uint64(64 - self.BITS * (level + 1))
        h &= np.uint64(self.parts - 1)
        return h.astype(np.uint8)

    def _str_part(self, t: str, level: int) -> int:
        return (zlib.crc32(t.encode("utf-8", "surrogateescape")) >> (self.BITS * level)) % self.parts

    def _write(self, files: list, recs: list, level: int) -> None:
        """Append ``(counter id, (keys, counts, strings))`` to the partition files (open
        binary files): one pickled list of ``(counter id, keys, counts, strings)`` per file."""
        P = len(files)
        out: list[list] = [[] for _ in range(P)]
        for cid, (keys, cnts, strs) in recs:
            if len(keys):
                part = self._part(keys, level)
                o = np.argsort(part, kind="stable")            # radix sort; stays sorted by key within a part
                keys, cnts = keys[o], cnts[o]
                bounds = np.concatenate([[0], np.cumsum(np.bincount(part, minlength=P))]).tolist()
                for p in range(P):
                    if bounds[p + 1] > bounds[p]:
                        out[p].append((cid, keys[bounds[p]:bounds[p + 1]], cnts[bounds[p]:bounds[p + 1]], None))
            if strs:
                by_part: list[dict] = [{} for _ in range(P)]
                for t, n in strs.items():
                    by_part[self._str_part(t, level)][t] = n
                for p, d in enumerate(by_part):
                    if d:
                        out[p].append((cid, None, None, d))
        for fh, items in zip(files, out):
            if items:
                pickle.dump(items, fh, protocol=5)

    @staticmethod
    def _records(path: str):
        with open(path, "rb") as fh:
            while True:
                try:
                    yield from pickle.load(fh)
                except EOFError:
                    return

    def _size(self, path: str) -> int:
        """About the entries in a partition file."""
        return os.path.getsize(path) // self.ENTRY_BYTES if os.path.exists(path) else 0

    def reduce(self, min_counts: list[int]) -> None:
        """Merge the partitions; each counter keeps only its tokens seen ``min_count`` times
        (see :meth:`KeyCounter.fit`) plus the total count of the others."""
        if self.spills == 0:
            return
        self.spill()                                       # what is still in memory
        for c in self.counters:
            c.spilled = True
        self._reduce_files([self._path(p) for p in range(self.parts)], min_counts, 0)

    def _reduce_files(self, paths: list[str], min_counts: list[int], level: int) -> None:
        group: list[str] = []
        size = 0
        for path in paths + [None]:
            n = self._size(path) if path is not None else 0
            if group and (path is None or size + n > self.budget):
                self._merge(group, min_counts)
                group, size = [], 0
            if path is None or not n:
                continue
            if n > 2 * self.budget and level < 3:          # one partition too big: split it further
                subs = [f"{path}.{q:03d}" for q in range(self.parts)]
                files = [open(sub, "ab") for sub in subs]
                try:
                    for cid, k, c, d in self._records(path):
                        self._write(files, [(cid, (k if k is not None else np.zeros(0, np.uint64),
                                                   c if c is not None else np.zeros(0, np.int64), d or {}))],
                                    level + 1)
                finally:
                    for f in files:
                        f.close()
                os.unlink(path)
                self._reduce_files(subs, min_counts, level + 1)
                continue
            group.append(path)
            size += n

    def _merge(self, paths: list[str], min_counts: list[int]) -> None:
        runs: dict[int, list] = {}
        strs: dict[int, dict] = {}
        for path in paths:
            for cid, k, n, d in self._records(path):
                if k is not None:
                    runs.setdefault(cid, []).append((k, n))
                else:
                    s = strs.setdefault(cid, {})
                    for t, v in d.items():
                        s[t] = s.get(t, 0) + v
            os.unlink(path)
        for cid, c in enumerate(self.counters):
            if cid in runs or cid in strs:
                c.absorb(merge_counts(runs.pop(cid, [])), strs.pop(cid, {}), min_counts[cid])


class KeyCounter:
    """Token counts on training rows: uint64 keys (vectorised) plus a dict of other tokens."""

    def __init__(self, encoding: str):
        self.encoding = encoding
        self.keys = np.zeros(0, np.uint64)
        self.cnts = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_n = 0
        self.strs: dict[str, int] = {}
        self.missing = 0
        self.spill_id = -1
        self.spilled = False                 # counts were reduced through a CountSpill
        self._kept: list = []                # after a spill: kept (keys, counts) runs
        self._kept_strs: dict[str, int] = {}
        self._oov = 0

    def entries(self) -> int:
        return len(self.keys) + self._pending_n + CountSpill.STRING_ENTRY * len(self.strs)

    def add_keys(self, keys: np.ndarray) -> None:
        if len(keys):
            self.add_counts(*unique_counts(keys))

    def add_counts(self, uniq: np.ndarray, cnt: np.ndarray) -> None:
        """Counts of sorted unique keys (see :func:`unique_counts`)."""
        if not len(uniq):
            return
        self._pending.append((uniq, cnt))
        self._pending_n += len(uniq)
        if self._pending_n > max(_COMPACT_MIN, len(self.keys)):     # memory ~ 2x the distinct keys
            self._compact()

    def add_strings(self, tokens) -> None:
        d = self.strs
        for t in tokens:
            d[t] = d.get(t, 0) + 1

    def add_string_counts(self, counts: dict) -> None:
        d = self.strs
        for t, c in counts.items():
            d[t] = d.get(t, 0) + int(c)

    def _compact(self) -> None:
        """Merge the pending (sorted) per-chunk counts into ``keys``/``cnts`` (sorted by key)."""
        if not self._pending:
            return
        runs = [(self.keys, self.cnts)] + self._pending
        self._pending, self._pending_n = [], 0
        self.keys, self.cnts = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        self.keys, self.cnts = merge_counts(runs)

    def take_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """All key counts (sorted by key), short string tokens included; the counter keeps none."""
        self._short_strings_to_keys()
        self._compact()
        out = (self.keys, self.cnts)
        self.keys, self.cnts = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        return out

    def take_strings(self) -> dict:
        out, self.strs = self.strs, {}
        return out

    def _short_strings_to_keys(self) -> None:
        """String tokens (sequence items) of at most 8 bytes join the key counts; only the
        longer ones stay strings."""
        if not self.strs:
            return
        toks = list(self.strs)
        keys, short = string_keys(toks, self.encoding)
        cnt = np.fromiter(self.strs.values(), dtype=np.int64, count=len(toks))
        if short.any():
            k, c = keys[short], cnt[short]
            o = np.argsort(k, kind="stable")
            self._pending.append((k[o], c[o]))
            self._pending_n += len(k)
        self.strs = {t: c for t, c, sh in zip(toks, cnt.tolist(), short.tolist()) if not sh}

    def absorb(self, run: tuple[np.ndarray, np.ndarray], strs: dict, min_count: int) -> None:
        """One partition's complete counts: keep the tokens seen ``min_count`` times."""
        keys, cnts = run
        if len(keys) and keys[0] == 0:                     # key 0 = empty field (sorted first)
            self.missing += int(cnts[0])
            keys, cnts = keys[1:], cnts[1:]
        keep = cnts >= min_count
        self._oov += int(cnts[~keep].sum())
        if keep.any():
            self._kept.append((keys[keep], cnts[keep]))
        for t, c in strs.items():
            if c >= min_count:
                self._kept_strs[t] = c
            else:
                self._oov += c

    def _reduced(self, min_count: int):
        """(kept keys, their counts, kept long string tokens, oov count); missing counted."""
        if self.spilled:
            keys, cnts = merge_counts(self._kept)
            long_kept, oov = self._kept_strs, self._oov
            self._kept, self._kept_strs = [], {}
            return keys, cnts, long_kept, oov
        self._short_strings_to_keys()
        self._compact()
        long = self.strs
        nz = self.keys != 0
        self.missing += int(self.cnts[~nz].sum())
        keys, cnts = self.keys[nz], self.cnts[nz]
        keep = cnts >= min_count
        oov = int(cnts[~keep].sum()) + sum(c for c in long.values() if c < min_count)
        return keys[keep], cnts[keep], {t: c for t, c in long.items() if c >= min_count}, oov

    def fit(self, min_count: int) -> tuple[Vocabulary, np.ndarray]:
        """The vocabulary (count desc, then token) and the uint64 key of each token (0 = long token)."""
        keys, cnts, long_kept, oov = self._reduced(min_count)
        # order: count desc, then token; big-endian key order is the byte order of the strings
        order = np.lexsort((keys.byteswap(), -cnts))
        keys, cnts = keys[order], cnts[order]
        tokens = key_strings(keys, self.encoding)
        c_list = cnts.tolist()
        # byte order is string order for ASCII (and UTF-8); check the ties otherwise
        ties_ok = not (keys & np.uint64(0x8080808080808080)).any() or \
            all(a < b for a, b, ca, cb in zip(tokens, tokens[1:], c_list, c_list[1:]) if ca == cb)
        if long_kept or not ties_ok:       # rare: fall back to sorting the strings themselves
            v = Vocabulary.fit({**dict(zip(tokens, c_list)), **long_kept}, min_count, self.missing)
            v.oov_count = oov
            k2, short = string_keys(v.tokens, self.encoding)
            return v, np.where(short, k2, np.uint64(0))
        return Vocabulary(tokens, c_list, min_count, oov, self.missing), keys

    def release(self) -> None:
        """Free the counts once the vocabulary is fitted."""
        self.keys, self.cnts, self.strs, self._pending = np.zeros(0, np.uint64), np.zeros(0, np.int64), {}, []
        self._kept, self._kept_strs = [], {}


class VocabIndex:
    """Fast lookup of raw keys / tokens in a fitted vocabulary."""

    def __init__(self, vocab: Vocabulary, encoding: str, keys: np.ndarray | None = None):
        self.vocab = vocab
        if keys is None:
            keys, short = string_keys(vocab.tokens, encoding)
        else:
            short = keys != 0
        idx = np.flatnonzero(short)
        k = keys[idx]
        _, first = np.unique(k, return_index=True)          # guard against duplicate keys
        first.sort()
        # key 0 (empty field) -> PAD; unknown keys -> OOV
        self.index = KeyTable(np.append(k[first], np.uint64(0)),
                              np.append((idx[first] + 2).astype(np.int32), np.int32(PAD_INDEX)), OOV_INDEX)
        self._tok_index = None

    @property
    def tok_index(self) -> dict:
        if self._tok_index is None:
            self._tok_index = self.vocab.index
        return self._tok_index

    def lookup_keys(self, keys: np.ndarray) -> np.ndarray:
        return self.index.lookup(keys)

    def lookup_tokens(self, tokens) -> np.ndarray:
        if not len(tokens):
            return np.zeros(0, np.int32)
        get = self.tok_index.get
        return np.fromiter((get(t, OOV_INDEX) for t in tokens), dtype=np.int32, count=len(tokens))


class ValueMap:
    """Distinct raw value -> parsed result (cached); rows become ids into the cache (-1 = missing).

    Known keys sit in a :class:`KeyTable` (one vectorised lookup per chunk); only values
    never seen before are decoded and parsed in Python."""

    def __init__(self, fn):
        self.fn = fn
        self.values: list = []
        self.errors: dict[int, str] = {}
        self._err_arr = np.zeros(0, bool)
        self._floats = np.full(1, np.nan)
        self._idx_keys = np.zeros(1, np.uint64)            # key 0 = empty field -> id -1
        self._idx_ids = np.array([-1], np.int32)
        # known key -> id (-2: unknown); replaced as a whole, so a reference taken by another
        # thread stays consistent
        self._snap = KeyTable(self._idx_keys, self._idx_ids, -2)
        self._pending: dict[int, int] = {}
        self._long: dict[str, int] = {}

    def float_array(self) -> np.ndarray:
        """Values as float64 (errors NaN) with one extra NaN at the end, so ``[-1]`` = missing."""
        if len(self._floats) != len(self.values) + 1:
            self._floats = np.array([np.nan if v is None else v for v in self.values] + [np.nan], np.float64)
        return self._floats

    def _add(self, text: str) -> int:
        i = len(self.values)
        try:
            self.values.append(self.fn(text))
        except ValueError as exc:
            self.values.append(None)
            self.errors[i] = str(exc)
        return i

    def _reindex(self) -> None:
        pk = np.fromiter(self._pending.keys(), dtype=np.uint64, count=len(self._pending))
        pi = np.fromiter(self._pending.values(), dtype=np.int32, count=len(self._pending))
        self._idx_keys = np.concatenate([self._idx_keys, pk])
        self._idx_ids = np.concatenate([self._idx_ids, pi])
        self._snap = KeyTable(self._idx_keys, self._idx_ids, -2)
        self._pending = {}

    def known_ids(self, keys: np.ndarray) -> tuple:
        """Ids of the keys already indexed (-2 = not yet): thread-safe, no state changes.
        Finish with :meth:`row_ids` (``pre=`` this result) in file order."""
        snap = self._snap
        return snap, snap.lookup(keys)

    def row_ids(self, chunk, j: int, pre: tuple | None = None) -> np.ndarray:
        """int32 id of each row's value (-1 = empty); new values are parsed and added."""
        keys = chunk.keys(j)
        if pre is None:
            pre = self.known_ids(keys)
        snap, ids = pre
        unk = np.flatnonzero(ids == -2)
        if len(unk) and snap is not self._snap:           # indexed since that lookup
            ids[unk] = self._snap.lookup(keys[unk])
            unk = unk[ids[unk] == -2]
        if len(unk):
            uniq, codes = np.unique(keys[unk], return_inverse=True)
            ul = uniq.tolist()
            get = self._pending.get
            uid = np.array([get(k, -2) for k in ul], dtype=np.int32)
            new = np.flatnonzero(uid == -2)
            if len(new):
                for p, t in zip(new.tolist(), key_strings(uniq[new], chunk.encoding)):
                    uid[p] = self._pending[ul[p]] = self._add(t)
            ids[unk] = uid[codes.reshape(-1)]
            # index the new values once that is cheaper than this path (or amortised: the table grows by 1/4)
            if len(unk) > len(self._idx_keys) or len(self._pending) > len(self._idx_keys) // 4:
                self._reindex()
        rows = chunk.long_rows(j)
        if rows is not None:
            get = self._long.get
            for r, t in zip(rows.tolist(), chunk.strings(j, rows.tolist())):
                i = get(t)
                if i is None:
                    i = self._long[t] = self._add(t)
                ids[r] = i
        return ids

    def error_array(self) -> np.ndarray:
        if len(self._err_arr) != len(self.values):
            a = np.zeros(len(self.values), bool)
            if self.errors:
                a[list(self.errors)] = True
            self._err_arr = a
        return self._err_arr

    def bad_rows(self, ids: np.ndarray) -> np.ndarray:
        if not self.errors:
            return np.zeros(0, np.int64)
        err = self.error_array()
        return np.flatnonzero((ids >= 0) & err[np.maximum(ids, 0)])


# ----------------------------------------------------------------------------------------------
# column processors: parse(chunk) -> data; bad(data) -> [(rows, reason_of_row)]; count; fit; encode
# ----------------------------------------------------------------------------------------------
class LabelColumn:
    def __init__(self, spec):
        self.spec = spec
        kind = spec.kind

        def parse(s: str) -> float:
            if kind == "map":
                if s not in spec.mapping:
                    raise ValueError(f"label {s!r} is not one of {', '.join(map(repr, spec.mapping))}")
                return float(spec.mapping[s])
            try:
                v = float(s)
            except ValueError:
                raise ValueError(f"label {s!r} is not a number") from None
            if kind == "threshold":
                if not math.isfinite(v):
                    raise ValueError(f"label {s!r} is not a finite number")
                return 1.0 if v > spec.threshold else 0.0
            if kind == "sign":
                if v not in (-1.0, 0.0, 1.0):
                    raise ValueError(f"label {s!r} is not -1, 0 or 1")
                return 1.0 if v > 0 else 0.0
            if v not in (0.0, 1.0):
                raise ValueError(f"label {s!r} is not 0 or 1")
            return v

        self.map = ValueMap(parse)

    def parse(self, chunk, j, pre=None):
        return self.map.row_ids(chunk, j, pre)

    def bad(self, ids):
        out = []
        rows = self.map.bad_rows(ids)
        if len(rows):
            out.append((rows, lambda r: f"column {self.spec.column!r}: {self.map.errors[int(ids[r])]}"))
        miss = np.flatnonzero(ids < 0)
        if len(miss):
            out.append((miss, lambda r: f"column {self.spec.column!r}: empty label"))
        return out

    def values(self, ids) -> np.ndarray:
        return self.map.float_array()[ids].astype(np.float32)


class CatColumn:
    """A plain categorical column (the raw string is the token)."""

    def __init__(self, spec, counter: KeyCounter):
        self.spec, self.counter = spec, counter
        self.index: VocabIndex | None = None

    def parse(self, chunk, j):
        keys = chunk.keys(j)
        long_rows = chunk.long_rows(j)
        long_strs = chunk.strings(j, long_rows.tolist()) if long_rows is not None else None
        return keys, long_rows, long_strs

    def bad(self, data):
        return []

    def count_prep(self, data, train: np.ndarray):
        """The thread-safe part of counting (no shared state touched)."""
        keys, long_rows, long_strs = data
        longs = None
        if long_rows is not None:
            tr = train[long_rows]
            longs = [s for s, t in zip(long_strs, tr.tolist()) if t]
            train = train.copy()
            train[long_rows] = False
        return unique_counts(keys[train]), longs   # key 0 (missing) is counted too, dropped when fitting

    def count_merge(self, prepped) -> None:
        (uniq, cnt), longs = prepped
        self.counter.add_counts(uniq, cnt)
        if longs:
            self.counter.add_strings(longs)

    def count(self, data, train: np.ndarray) -> None:
        self.count_merge(self.count_prep(data, train))

    def encode(self, data) -> np.ndarray:
        keys, long_rows, long_strs = data
        out = self.index.lookup_keys(keys)
        if long_rows is not None:
            out[long_rows] = self.index.lookup_tokens(long_strs)
        return out


class MappedCatColumn:
    """A categorical field whose token is computed from the raw value (bucketize, hours, libfm)."""

    def __init__(self, spec, encoding: str):
        self.spec = spec
        if spec.transform == "bucketize":
            fn = (lambda s, i=spec.integer: bucket_token(parse_number(s, i)))
        else:
            fn = TRANSFORMS[spec.transform]
        self.map = ValueMap(fn)
        self.counts = np.zeros(0, np.int64)
        self.missing = 0
        self.vocab: Vocabulary | None = None
        self._lut = np.array([PAD_INDEX], np.int32)
        self._lut_n = 0

    def parse(self, chunk, j, pre=None):
        return self.map.row_ids(chunk, j, pre)

    def bad(self, ids):
        rows = self.map.bad_rows(ids)
        if not len(rows):
            return []
        return [(rows, lambda r: f"column {self.spec.column!r}: {self.map.errors[int(ids[r])]}")]

    def count(self, ids, train):
        c = np.bincount(ids[train] + 1)              # [0]: missing (id -1)
        self.missing += int(c[0])
        c = c[1:]
        if len(self.counts) < len(c):
            self.counts = np.concatenate([self.counts, np.zeros(len(c) - len(self.counts), np.int64)])
        self.counts[:len(c)] += c

    def fit(self) -> Vocabulary:
        by_tok: dict[str, int] = {}
        for tok, c in zip(self.map.values, self.counts.tolist()):
            if c and tok is not None:
                by_tok[tok] = by_tok.get(tok, 0) + c
        self.vocab = Vocabulary.fit(by_tok, self.spec.min_count, self.missing)
        return self.vocab

    def sync(self) -> None:
        """Extend the raw-id -> index table to the values seen so far (not thread-safe)."""
        nv = len(self.map.values)
        if self._lut_n != nv:
            idx = self.vocab.index
            new = [OOV_INDEX if t is None else idx.get(t, OOV_INDEX) for t in self.map.values[self._lut_n:]]
            self._lut = np.concatenate([self._lut[:self._lut_n], np.array(new, np.int32),
                                        np.array([PAD_INDEX], np.int32)])     # [-1] -> missing
            self._lut_n = nv

    def encode(self, ids) -> np.ndarray:
        """Indices of raw-value ids; :meth:`sync` first when values were added since."""
        return self._lut[ids]

    def encoder(self) -> CategoricalEncoder:
        return CategoricalEncoder(self.spec.name, self.spec.column, self.vocab, self.spec.transform)


class NumColumn:
    """A standardised numeric field."""

    def __init__(self, spec):
        self.spec = spec
        self.map = ValueMap(lambda s, i=spec.integer: parse_number(s, i))
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.scaler: StandardScaler | None = None

    def parse(self, chunk, j, pre=None):
        return self.map.row_ids(chunk, j, pre)

    def bad(self, ids):
        rows = self.map.bad_rows(ids)
        if not len(rows):
            return []
        return [(rows, lambda r: f"column {self.spec.column!r}: {self.map.errors[int(ids[r])]}")]

    def floats(self, ids) -> np.ndarray:
        return self.map.float_array()[ids]

    def count(self, ids, train):
        x = self.floats(ids[train])
        x = x[~np.isnan(x)]
        m = len(x)
        if not m:
            return
        mu = float(x.mean())
        m2 = float(((x - mu) ** 2).sum())
        n = self.n + m
        d = mu - self.mean
        self.mean += d * m / n
        self.m2 += m2 + d * d * self.n * m / n
        self.n = n

    def fit(self) -> StandardScaler:
        self.scaler = StandardScaler.fit(self.spec.name, self.spec.column, self.n, self.mean, self.m2,
                                         self.spec.integer)
        return self.scaler

    def encode(self, ids) -> np.ndarray:
        return self.scaler.transform_array(self.floats(ids))


class SeqColumn:
    """A separator-joined list of items -> ``max_len`` indices (last items kept, 0-padded at the end)."""

    def __init__(self, spec, counter: KeyCounter):
        self.spec, self.counter = spec, counter
        self.index: VocabIndex | None = None

    def parse(self, chunk, j):
        sp = self.spec
        strs = chunk.strings(j)
        items = []
        for s in strs:
            toks = [t for t in s.split(sp.separator) if t] if s else []
            items.append(toks[-sp.max_len:] if sp.keep == "last" else toks[:sp.max_len])
        return items

    def bad(self, items):
        return []

    def count(self, items, train):
        flat = [t for row, tr in zip(items, train.tolist()) if tr for t in row]
        if flat:
            self.counter.add_string_counts(Counter(flat))

    def encode(self, items) -> np.ndarray:
        n, L = len(items), self.spec.max_len
        out = np.zeros((n, L), np.int32)
        lens = np.array([len(r) for r in items], dtype=np.int64)
        if lens.sum():
            flat = [t for row in items for t in row]
            rows = np.repeat(np.arange(n), lens)
            pos = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
            out[rows, pos] = self.index.lookup_tokens(flat)
        return out

    def encoder(self, vocab: Vocabulary, vocab_field: str) -> SequenceEncoder:
        sp = self.spec
        return SequenceEncoder(sp.name, sp.column, vocab, vocab_field, sp.separator, sp.max_len, sp.keep)
