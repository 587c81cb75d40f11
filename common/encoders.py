"""Fitted encoders (categorical vocabularies, numeric bucketing / standardisation,
sequences) and the decode helper that turns a stored row back into raw values.

``python -m data_prep`` fits the encoders on the TRAIN split only and writes one
JSON file per field under ``<dataset>/vocab/`` (the file name is recorded in
``schema.fields[i].encoder["file"]``)::

    {"field": "C1", "type": "vocab", "source": "C1", "transform": "",
     "min_count": 10, "tokens": ["05db9164", ...], "counts": [1234, ...],
     "oov_count": 17, "missing_count": 3, "shared_by": []}
    {"field": "I1", "type": "vocab", "transform": "bucketize", ...}    # bucketised numeric
    {"field": "price", "type": "standardize", "mean": 1.5, "std": 0.3, "count": 800}
    {"field": "click_sequence", "type": "sequence", "separator": "^", "max_len": 10,
     "keep": "last", "vocab": "adgroup_id"}           # shares adgroup_id's tokens

Categorical indices: ``0`` = padding / missing value (``PAD_INDEX``), ``1`` =
out-of-vocabulary (``OOV_INDEX``: a value seen fewer than ``min_count`` times in the
training rows, or never), ``2 + i`` = ``tokens[i]``.  Tokens are ordered by
descending training count, ties by ascending token (deterministic).

Transforms applied to a raw value before the vocabulary lookup:

``bucketize``   Criteo-style (the libFFM Kaggle winners' trick): a numeric value
                ``x > 2`` becomes the token ``"b<floor(log(x)^2)>"``, otherwise the
                token is the integer ``floor(x)`` written as ``"<int>"`` (so ``3 ->
                "b1"`` and ``1 -> "1"`` stay apart).  Missing -> index 0.
``hour_of_day`` Avazu ``hour`` (``YYMMDDHH``) -> ``"HH"`` as an integer string (``"0".."23"``).
``weekday``     Avazu ``hour`` -> day of week, ``"0"`` = Monday .. ``"6"`` = Sunday.
``libfm``       a libFM ``idx:val`` item -> ``"idx"`` (``val`` must be 1).

Sequences keep the LAST ``max_len`` items of the raw list (the most recent ones,
assuming the list is written oldest first) unless ``keep`` is ``"first"``, and
store them left-aligned, 0-padded at the end.

This module never imports torch or tensorflow.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re

import numpy as np

from common.errors import StoreError
from common.io import atomic_write_text
from common.schema import OOV_INDEX, PAD_INDEX, Schema

OOV_TOKEN = "<OOV>"     # what decoding index 1 gives
VOCAB_DIR = "vocab"

# ---------------------------------------------------------------------------------------
# transforms (raw string -> token string); raise ValueError on a malformed value
# ---------------------------------------------------------------------------------------
LOG_BUCKET = np.int64(1) << np.int64(40)    # token codes >= this are log buckets


def bucket_codes(x: np.ndarray) -> np.ndarray:
    """Vectorised Criteo bucketing of finite floats -> int64 codes (see :func:`code_token`)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.floor(x)
    big = x > 2
    with np.errstate(divide="ignore", invalid="ignore"):
        out[big] = np.floor(np.log(x[big]) ** 2)
    codes = out.astype(np.int64)
    codes[big] += LOG_BUCKET
    return codes


def code_token(code: int) -> str:
    code = int(code)
    return f"b{code - int(LOG_BUCKET)}" if code >= LOG_BUCKET else str(code)


def bucket_token(x: float) -> str:
    """Criteo bucket token of one number: ``"b<floor(log(x)^2)>"`` for x > 2, else ``str(floor(x))``."""
    x = float(x)
    if x > 2:
        return f"b{int(math.floor(math.log(x) ** 2))}"
    return str(int(math.floor(x)))


def parse_number(s: str, integer: bool = False) -> float:
    """A finite float from a raw string (``integer``: must be integral, ``"260.0"`` is fine)."""
    try:
        v = float(s)
    except ValueError:
        raise ValueError(f"{s!r} is not {'an integer' if integer else 'a number'}") from None
    if not math.isfinite(v):
        raise ValueError(f"{s!r} is not a finite number")
    if integer and v != math.floor(v):
        raise ValueError(f"{s!r} is not an integer")
    return v


_HOUR = re.compile(r"^\d{8}$")


def _avazu_hour(s: str) -> datetime.datetime:
    if not _HOUR.match(s):
        raise ValueError(f"hour {s!r} is not YYMMDDHH")
    try:
        return datetime.datetime(2000 + int(s[:2]), int(s[2:4]), int(s[4:6]), int(s[6:8]))
    except ValueError:
        raise ValueError(f"hour {s!r} is not a valid YYMMDDHH date") from None


def hour_of_day(s: str) -> str:
    return str(_avazu_hour(s).hour)


def weekday(s: str) -> str:
    return str(_avazu_hour(s).weekday())


_LIBFM = re.compile(r"^(\d+):([-+0-9.eE]+)$")


def libfm_index(s: str) -> str:
    m = _LIBFM.match(s)
    if not m:
        raise ValueError(f"libfm item {s!r} is not idx:value")
    try:
        val = float(m.group(2))
    except ValueError:
        raise ValueError(f"libfm item {s!r} is not idx:value") from None
    if val != 1.0:
        raise ValueError(f"libfm item {s!r} has value {m.group(2)}: only binary (idx:1) items are supported")
    return str(int(m.group(1)))


def _bucketize_str(s: str) -> str:
    return bucket_token(parse_number(s))


TRANSFORMS = {
    "": lambda s: s,
    "bucketize": _bucketize_str,
    "hour_of_day": hour_of_day,
    "weekday": weekday,
    "libfm": libfm_index,
}


# ---------------------------------------------------------------------------------------
# the vocabulary
# ---------------------------------------------------------------------------------------
class Vocabulary:
    """Token list with counts: index 0 = missing, 1 = OOV, ``2 + i`` = ``tokens[i]``."""

    def __init__(self, tokens, counts=None, min_count: int = 1, oov_count: int = 0, missing_count: int = 0):
        self.tokens = [str(t) for t in tokens]
        self.counts = [int(c) for c in counts] if counts is not None else [0] * len(self.tokens)
        self.min_count = int(min_count)
        self.oov_count = int(oov_count)
        self.missing_count = int(missing_count)
        self._index: dict[str, int] | None = None

    @classmethod
    def fit(cls, counts: dict, min_count: int = 1, missing_count: int = 0) -> "Vocabulary":
        """Keep tokens seen at least ``min_count`` times; order by count desc, then token."""
        kept = [(t, c) for t, c in counts.items() if c >= min_count]
        kept.sort(key=lambda tc: (-tc[1], tc[0]))
        oov = sum(c for c in counts.values() if c < min_count)
        return cls([t for t, _ in kept], [c for _, c in kept], min_count, oov, missing_count)

    @property
    def size(self) -> int:
        """Embedding rows: tokens + padding + OOV."""
        return len(self.tokens) + 2

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {t: i + 2 for i, t in enumerate(self.tokens)}
        return self._index

    def encode(self, tokens) -> np.ndarray:
        """Tokens (str, or None / "" for missing) -> int32 indices."""
        idx = self.index
        return np.array([PAD_INDEX if t is None or t == "" else idx.get(t, OOV_INDEX) for t in tokens],
                        dtype=np.int32).reshape(-1)

    def decode(self, i: int):
        i = int(i)
        if i == PAD_INDEX:
            return None
        if i == OOV_INDEX:
            return OOV_TOKEN
        if not 2 <= i < self.size:
            raise ValueError(f"index {i} is outside the vocabulary (size {self.size})")
        return self.tokens[i - 2]

    def to_dict(self) -> dict:
        return {"min_count": self.min_count, "pad_index": PAD_INDEX, "oov_index": OOV_INDEX,
                "oov_count": self.oov_count, "missing_count": self.missing_count,
                "tokens": self.tokens, "counts": self.counts}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        return cls(d["tokens"], d.get("counts"), d.get("min_count", 1), d.get("oov_count", 0),
                   d.get("missing_count", 0))


# ---------------------------------------------------------------------------------------
# per-field encoders
# ---------------------------------------------------------------------------------------
class CategoricalEncoder:
    """Raw string -> transform -> vocabulary index (categorical fields, incl. bucketised numerics)."""

    type = "vocab"

    def __init__(self, field: str, source: str, vocab: Vocabulary, transform: str = "",
                 shared_by: list | None = None):
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r}")
        self.field, self.source, self.vocab, self.transform = field, source, vocab, transform
        self.shared_by = list(shared_by or [])

    def token(self, raw):
        if raw is None or raw == "":
            return None
        return TRANSFORMS[self.transform](raw)

    def encode(self, raw_values) -> np.ndarray:
        return self.vocab.encode([self.token(r) for r in raw_values])

    def decode(self, i):
        """Index -> token (None = missing, ``OOV_TOKEN`` = out of vocabulary)."""
        return self.vocab.decode(i)

    def to_dict(self) -> dict:
        return {"field": self.field, "type": self.type, "source": self.source, "transform": self.transform,
                "shared_by": self.shared_by, **self.vocab.to_dict()}


class StandardScaler:
    """``(x - mean) / std`` with train statistics; missing -> 0 (the mean)."""

    type = "standardize"

    def __init__(self, field: str, source: str, mean: float, std: float, count: int = 0, integer: bool = False):
        self.field, self.source = field, source
        self.mean, self.std, self.count, self.integer = float(mean), float(std), int(count), bool(integer)

    @classmethod
    def fit(cls, field, source, count: int, mean: float, m2: float, integer: bool = False):
        """From the running moments of the (non-missing) training values: count, mean and
        ``m2 = sum((x - mean)^2)`` (population std; a constant field gets std 1)."""
        if count == 0:
            return cls(field, source, 0.0, 1.0, 0, integer)
        std = math.sqrt(max(m2 / count, 0.0))
        return cls(field, source, mean, std if std > 1e-12 else 1.0, count, integer)

    def transform_array(self, x: np.ndarray) -> np.ndarray:
        """float64 values (NaN = missing) -> float32 standardised (missing -> 0)."""
        out = (np.asarray(x, np.float64) - self.mean) / self.std
        out[np.isnan(out)] = 0.0
        return out.astype(np.float32)

    def encode(self, raw_values) -> np.ndarray:
        x = np.array([np.nan if r is None or r == "" else parse_number(r, self.integer) for r in raw_values],
                     dtype=np.float64)
        return self.transform_array(x)

    def decode(self, v) -> float:
        return float(v) * self.std + self.mean

    def to_dict(self) -> dict:
        return {"field": self.field, "type": self.type, "source": self.source, "mean": self.mean,
                "std": self.std, "count": self.count, "integer": self.integer}


class SequenceEncoder:
    """``"a^b^c"`` -> the last (or first) ``max_len`` items as indices, 0-padded at the end."""

    type = "sequence"

    def __init__(self, field: str, source: str, vocab: Vocabulary, vocab_field: str, separator: str,
                 max_len: int, keep: str = "last"):
        if keep not in ("last", "first"):
            raise ValueError(f"keep must be 'last' or 'first', got {keep!r}")
        self.field, self.source, self.vocab, self.vocab_field = field, source, vocab, vocab_field
        self.separator, self.max_len, self.keep = separator, int(max_len), keep

    def items(self, raw) -> list[str]:
        """The raw items that are kept (in stored order)."""
        if raw is None or raw == "":
            return []
        toks = [t for t in raw.split(self.separator) if t != ""]
        return toks[-self.max_len:] if self.keep == "last" else toks[:self.max_len]

    def encode(self, raw_values) -> np.ndarray:
        raw_values = list(raw_values)
        out = np.zeros((len(raw_values), self.max_len), np.int32)
        for r, raw in enumerate(raw_values):
            toks = self.items(raw)
            if toks:
                out[r, :len(toks)] = self.vocab.encode(toks)
        return out

    def decode(self, row) -> list:
        """Indices -> tokens, padding removed (OOV items come back as ``OOV_TOKEN``)."""
        return [self.vocab.decode(i) for i in np.asarray(row).reshape(-1) if int(i) != PAD_INDEX]

    def to_dict(self) -> dict:
        d = {"field": self.field, "type": self.type, "source": self.source, "vocab": self.vocab_field,
             "separator": self.separator, "max_len": self.max_len, "keep": self.keep}
        if self.vocab_field == self.field:      # a vocabulary of its own is stored here
            d.update(self.vocab.to_dict())
        return d


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------
def vocab_file_name(field: str, taken: set | None = None) -> str:
    """A safe, unique ``<name>.json`` for a field."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", field).strip(".") or "field"
    name, k = base, 1
    while taken is not None and name.lower() in taken:
        k += 1
        name = f"{base}_{k}"
    if taken is not None:
        taken.add(name.lower())
    return name + ".json"


def save_encoder(vocab_dir: str, file_name: str, encoder) -> None:
    atomic_write_text(os.path.join(vocab_dir, file_name), json.dumps(encoder.to_dict(), ensure_ascii=True) + "\n")


def load_encoders(dataset: str | Schema) -> dict:
    """Field name -> fitted encoder, for a dataset directory (or a loaded Schema)."""
    schema = dataset if isinstance(dataset, Schema) else Schema.load(dataset)
    vdir = os.path.join(schema.path, schema.vocab_dir)
    raw: dict[str, dict] = {}
    for f in schema.fields:
        fn = f.encoder.get("file")
        if not fn:
            raise StoreError(f"field {f.name!r} has no encoder file in schema.json", path=schema.path)
        p = os.path.join(vdir, fn)
        try:
            with open(p) as fh:
                raw[f.name] = json.load(fh)
        except (OSError, ValueError) as exc:
            raise StoreError(f"unreadable encoder file: {exc}", path=p) from None
    out: dict = {}
    vocabs: dict[str, Vocabulary] = {}
    for name, d in raw.items():
        if d["type"] == "vocab":
            vocabs[name] = Vocabulary.from_dict(d)
            out[name] = CategoricalEncoder(name, d.get("source", ""), vocabs[name], d.get("transform", ""),
                                           d.get("shared_by"))
        elif d["type"] == "standardize":
            out[name] = StandardScaler(name, d.get("source", ""), d["mean"], d["std"], d.get("count", 0),
                                       d.get("integer", False))
    for name, d in raw.items():
        if d["type"] == "sequence":
            ref = d["vocab"]
            if ref not in vocabs:
                vocabs[ref] = Vocabulary.from_dict(raw[ref]) if ref in raw and "tokens" in raw[ref] else None
            if vocabs.get(ref) is None:
                raise StoreError(f"sequence field {name!r} refers to unknown vocabulary {ref!r}", path=vdir)
            out[name] = SequenceEncoder(name, d.get("source", ""), vocabs[ref], ref, d["separator"],
                                        d["max_len"], d.get("keep", "last"))
        elif d["type"] not in ("vocab", "standardize"):
            raise StoreError(f"field {name!r}: unknown encoder type {d['type']!r}", path=vdir)
    return out


class Decoder:
    """Decode stored rows back to raw-ish values (tokens, de-standardised floats, item lists).

    >>> dec = Decoder(dataset_dir)
    >>> rows = Store(dataset_dir).read_rows("train", 0, 5)     # packed arrays
    >>> dec.decode_packed(rows)[0]        # {"C1": "05db9164", "I1": "b30", ..., "label": 0.0}
    """

    def __init__(self, dataset: str | Schema):
        self.schema = dataset if isinstance(dataset, Schema) else Schema.load(dataset)
        self.encoders = load_encoders(self.schema)

    def decode_field(self, name: str, value):
        return self.encoders[name].decode(value)

    def decode_packed(self, packed: dict) -> list[dict]:
        """Packed arrays (``cat``/``num``/``seq``/``label``) -> one dict per row, labels by name."""
        s = self.schema
        n = len(packed["label"])
        out = []
        for r in range(n):
            row = {}
            for i, f in enumerate(s.categorical):
                row[f.name] = self.encoders[f.name].decode(packed["cat"][r, i])
            for i, f in enumerate(s.numeric):
                row[f.name] = self.encoders[f.name].decode(packed["num"][r, i])
            off = 0
            for f in s.sequence:
                row[f.name] = self.encoders[f.name].decode(packed["seq"][r, off:off + f.max_len])
                off += f.max_len
            for j, lab in enumerate(s.labels):
                row[lab] = float(packed["label"][r, j])
            out.append(row)
        return out

    def decode_batch(self, batch: dict) -> list[dict]:
        """A field-dict batch (``common.batching.unpack`` output, numpy) -> one dict per row."""
        n = len(batch["label"])
        out = []
        for r in range(n):
            row = {f.name: self.encoders[f.name].decode(np.asarray(batch[f.name])[r]) for f in self.schema.fields}
            row["label"] = float(np.asarray(batch["label"])[r])
            out.append(row)
        return out


def decode_rows(dataset_dir: str, split: str, start: int, stop: int) -> list[dict]:
    """Rows ``[start, stop)`` of a split in stored order, decoded (see :class:`Decoder`)."""
    from common.batching import open_dataset

    schema, store = open_dataset(dataset_dir)
    try:
        return Decoder(schema).decode_packed(store.read_rows(split, start, stop))
    finally:
        store.close()
