"""Per-column work of the two passes: parse a chunk, count on train rows, fit, encode.

Plain categorical columns never leave numpy: their values are uint64 keys (see
``data_prep.reader``), counted per chunk with ``np.unique`` and merged by a stable sort
in pass 1, and looked up in a uint64 hash table of the fitted vocabulary in pass 2.
Columns whose raw values must be parsed (labels, numbers, Avazu hours, libFM items,
bucketised numerics) go through a :class:`ValueMap`: each *distinct* raw value is
parsed once in Python and cached, rows only index into the cache.  Memory is
bounded by the number of distinct values, never by the number of rows.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from common.encoders import (TRANSFORMS, CategoricalEncoder, SequenceEncoder, StandardScaler, Vocabulary,
                             bucket_token, parse_number)
from common.schema import OOV_INDEX, PAD_INDEX
from data_prep.reader import key_strings, string_keys

_COMPACT_MIN = 1 << 16

try:  # pandas' uint64 hash table: the engine behind Index.get_indexer, without its per-call overhead
    from pandas._libs.hashtable import UInt64HashTable as _U64Table
except ImportError:  # pragma: no cover - fall back to the public API
    _U64Table = None


class KeyTable:
    """Unique uint64 keys -> their positions; ``lookup`` gives -1 for unknown keys."""

    def __init__(self, keys: np.ndarray):
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        if _U64Table is not None:
            self._t = _U64Table(max(len(keys), 8))
            self._t.map_locations(keys)
        else:
            self._t = None
            self._idx = pd.Index(keys)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        if self._t is not None:
            return self._t.lookup(keys)
        return self._idx.get_indexer(keys)


def unique_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and their counts."""
    uniq, cnt = np.unique(keys, return_counts=True)
    return uniq, cnt.astype(np.int64)


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
        """Merge the pending (sorted) per-chunk counts into ``keys``/``cnts`` (sorted by key).

        A stable sort of concatenated sorted runs is a merge (timsort), cheaper than hashing."""
        if not self._pending:
            return
        ks = np.concatenate([self.keys] + [u for u, _ in self._pending])
        cs = np.concatenate([self.cnts] + [c for _, c in self._pending])
        self._pending, self._pending_n = [], 0
        if not len(ks):
            return
        o = np.argsort(ks, kind="stable")
        ks, cs = ks[o], cs[o]
        start = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]]))
        self.keys = ks[start]
        self.cnts = np.add.reduceat(cs, start).astype(np.int64)

    def fit(self, min_count: int) -> tuple[Vocabulary, np.ndarray]:
        """The vocabulary (count desc, then token) and the uint64 key of each token (0 = long token)."""
        long: dict[str, int] = {}
        if self.strs:   # short string tokens (sequence items) join the key counts, long ones stay strings
            toks = list(self.strs)
            keys, short = string_keys(toks, self.encoding)
            cnt = np.fromiter(self.strs.values(), dtype=np.int64, count=len(toks))
            self._pending.append((keys[short], cnt[short]))
            long = {t: c for t, c, sh in zip(toks, cnt.tolist(), short.tolist()) if not sh}
        self._compact()
        nz = self.keys != 0
        self.missing += int(self.cnts[~nz].sum())
        keys, cnts = self.keys[nz], self.cnts[nz]
        keep = cnts >= min_count
        oov = int(cnts[~keep].sum()) + sum(c for c in long.values() if c < min_count)
        keys, cnts = keys[keep], cnts[keep]
        # order: count desc, then token; big-endian key order is the byte order of the strings
        order = np.lexsort((keys.byteswap(), -cnts))
        keys, cnts = keys[order], cnts[order]
        tokens = key_strings(keys, self.encoding)
        long_kept = {t: c for t, c in long.items() if c >= min_count}
        c_list = cnts.tolist()
        ties_ok = all(a < b for a, b, ca, cb in zip(tokens, tokens[1:], c_list, c_list[1:]) if ca == cb)
        if long_kept or not ties_ok:       # rare: fall back to sorting the strings themselves
            v = Vocabulary.fit({**dict(zip(tokens, c_list)), **long_kept}, min_count, self.missing)
            v.oov_count = oov
            k2, short = string_keys(v.tokens, self.encoding)
            return v, np.where(short, k2, np.uint64(0))
        return Vocabulary(tokens, c_list, min_count, oov, self.missing), keys

    def release(self) -> None:
        """Free the counts once the vocabulary is fitted."""
        self.keys, self.cnts, self.strs, self._pending = np.zeros(0, np.uint64), np.zeros(0, np.int64), {}, []


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
        # key 0 (empty field) -> PAD; unknown keys (-1) -> OOV
        self.index = KeyTable(np.append(k[first], np.uint64(0)))
        self.vidx = np.concatenate([(idx[first] + 2).astype(np.int32), np.array([PAD_INDEX, OOV_INDEX], np.int32)])
        self._tok_index = None

    @property
    def tok_index(self) -> pd.Index:
        if self._tok_index is None:
            self._tok_index = pd.Index(self.vocab.tokens, dtype=object)
        return self._tok_index

    def lookup_keys(self, keys: np.ndarray) -> np.ndarray:
        return self.vidx[self.index.lookup(keys)]

    def lookup_tokens(self, tokens) -> np.ndarray:
        if not len(tokens):
            return np.zeros(0, np.int32)
        pos = self.tok_index.get_indexer(pd.Index(tokens, dtype=object))
        return np.where(pos >= 0, pos + 2, OOV_INDEX).astype(np.int32)


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
        self._idx_ids = np.array([-1], np.int64)
        self._index = KeyTable(self._idx_keys)
        self._lut = np.array([-1, -2], np.int64)            # [-1] (unknown key) -> -2
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
        pi = np.fromiter(self._pending.values(), dtype=np.int64, count=len(self._pending))
        self._idx_keys = np.concatenate([self._idx_keys, pk])
        self._idx_ids = np.concatenate([self._idx_ids, pi])
        self._index = KeyTable(self._idx_keys)
        self._lut = np.append(self._idx_ids, np.int64(-2))
        self._pending = {}

    def row_ids(self, chunk, j: int) -> np.ndarray:
        keys = chunk.keys(j)
        ids = self._lut[self._index.lookup(keys)]
        unk = np.flatnonzero(ids == -2)
        if len(unk):
            codes, uniq = pd.factorize(keys[unk])
            ul = uniq.tolist()
            get = self._pending.get
            uid = np.array([get(k, -2) for k in ul], dtype=np.int64)
            new = np.flatnonzero(uid == -2)
            if len(new):
                for p, t in zip(new.tolist(), key_strings(uniq[new], chunk.encoding)):
                    uid[p] = self._pending[ul[p]] = self._add(t)
            ids[unk] = uid[codes]
            if len(self._pending) > max(256, len(self._idx_keys) // 4):
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

    def parse(self, chunk, j):
        return self.map.row_ids(chunk, j).astype(np.int32)

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

    def parse(self, chunk, j):
        return self.map.row_ids(chunk, j).astype(np.int32)

    def bad(self, ids):
        rows = self.map.bad_rows(ids)
        if not len(rows):
            return []
        return [(rows, lambda r: f"column {self.spec.column!r}: {self.map.errors[int(ids[r])]}")]

    def count(self, ids, train):
        t = ids[train]
        self.missing += int((t < 0).sum())
        c = np.bincount(t[t >= 0], minlength=len(self.map.values))
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

    def encode(self, ids) -> np.ndarray:
        nv = len(self.map.values)
        if self._lut_n != nv:        # extend the raw-id -> index table for values first seen now
            idx = self.vocab.index
            new = [OOV_INDEX if t is None else idx.get(t, OOV_INDEX) for t in self.map.values[self._lut_n:]]
            self._lut = np.concatenate([self._lut[:self._lut_n], np.array(new, np.int32),
                                        np.array([PAD_INDEX], np.int32)])     # [-1] -> missing
            self._lut_n = nv
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

    def parse(self, chunk, j):
        return self.map.row_ids(chunk, j).astype(np.int32)

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
            self.counter.add_string_counts(pd.Series(flat, dtype=object).value_counts().to_dict())

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
