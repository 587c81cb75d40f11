"""The dataset schema: the one contract between the data layer and the models.

A dataset directory written by ``python -m data_prep`` holds::

    schema.json      this file's content (versioned)
    store/           the LMDB store (see common.store)
    vocab/           fitted encoders (one JSON per field)
    truth.json       (synthetic data only) Bayes-optimal metrics per split

Every model in both backends is built from a :class:`Schema` alone, so the same
``schema.json`` gives the same architecture in PyTorch and TensorFlow.

Field kinds
-----------
``categorical``  one int index per row, in ``[0, vocab_size)``; 0 = padding/missing,
                 1 = out-of-vocabulary, ``2..`` = fitted vocabulary.
``numeric``      one float per row (standardised or raw); models embed it as
                 ``x * e_field`` (scalar times a learned vector).
``sequence``     ``max_len`` int indices per row, 0-padded at the end; may share the
                 embedding table of a categorical field via ``embedding_group``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from common.errors import StoreError
from common.io import atomic_write_text

SCHEMA_VERSION = 1
SCHEMA_FILE = "schema.json"
KINDS = ("categorical", "numeric", "sequence")
PAD_INDEX = 0
OOV_INDEX = 1


@dataclass
class Field:
    name: str
    kind: str
    vocab_size: int = 0            # categorical / sequence: number of embedding rows
    embedding_group: str = ""      # fields with the same group share one table
    max_len: int = 0               # sequence only
    source: str = ""               # raw column it came from
    encoder: dict = field(default_factory=dict)   # encoder settings (min_count, bucketing, mean/std ...)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name!r}: unknown kind {self.kind!r} (expected one of {KINDS})")
        if not self.embedding_group:
            self.embedding_group = self.name
        if self.kind == "sequence" and self.max_len <= 0:
            raise ValueError(f"sequence field {self.name!r} needs max_len > 0")


@dataclass
class Schema:
    fields: list[Field]
    labels: list[str] = field(default_factory=lambda: ["label"])
    splits: dict[str, int] = field(default_factory=dict)       # split -> rows
    name: str = ""
    format: str = ""
    version: int = SCHEMA_VERSION
    settings: dict[str, Any] = field(default_factory=dict)     # CLI / encoder settings used
    vocab_dir: str = "vocab"
    skipped_lines: dict[str, Any] = field(default_factory=dict)  # {"count": n, "first": [...]}
    extra: dict[str, Any] = field(default_factory=dict)
    path: str = field(default="", compare=False, repr=False)     # dataset dir it was loaded from

    # ----- field views -------------------------------------------------------------
    def by_kind(self, kind: str) -> list[Field]:
        return [f for f in self.fields if f.kind == kind]

    @property
    def categorical(self) -> list[Field]:
        return self.by_kind("categorical")

    @property
    def numeric(self) -> list[Field]:
        return self.by_kind("numeric")

    @property
    def sequence(self) -> list[Field]:
        return self.by_kind("sequence")

    @property
    def feature_names(self) -> list[str]:
        """Fields in model order: categorical, then numeric, then sequence."""
        return [f.name for f in self.categorical + self.numeric + self.sequence]

    @property
    def num_fields(self) -> int:
        """Number of embedded feature fields a model sees (one vector per field)."""
        return len(self.fields)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no field {name!r} in schema (fields: {', '.join(f.name for f in self.fields)})")

    def embedding_groups(self) -> dict[str, int]:
        """Embedding table name -> rows, for categorical and sequence fields, in field order."""
        groups: dict[str, int] = {}
        for f in self.categorical + self.sequence:
            g = f.embedding_group
            groups[g] = max(groups.get(g, 0), f.vocab_size)
        return groups

    def group_offsets(self) -> dict[str, int]:
        """Offset of every embedding group inside one concatenated table."""
        offs, total = {}, 0
        for g, rows in self.embedding_groups().items():
            offs[g] = total
            total += rows
        return offs

    @property
    def total_vocab(self) -> int:
        return sum(self.embedding_groups().values())

    # ----- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path", None)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Schema":
        d = dict(d)
        d.pop("path", None)
        fields = [Field(**f) for f in d.pop("fields")]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(fields=fields, **{k: v for k, v in d.items() if k in known})

    def model_hash(self) -> str:
        """Hash of what fixes a model's architecture (fields, kinds, sizes)."""
        key = [(f.name, f.kind, f.vocab_size, f.embedding_group, f.max_len) for f in self.fields]
        return hashlib.sha1(json.dumps([key, self.labels]).encode()).hexdigest()[:16]

    def save(self, dataset_dir: str) -> None:
        atomic_write_text(os.path.join(dataset_dir, SCHEMA_FILE), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, dataset_dir: str) -> "Schema":
        p = os.path.join(dataset_dir, SCHEMA_FILE)
        if not os.path.isdir(dataset_dir):
            raise StoreError("not a directory (expected a dataset from `python -m data_prep`)", path=dataset_dir)
        if not os.path.exists(p):
            raise StoreError("no schema.json: not a dataset directory from `python -m data_prep`", path=dataset_dir)
        try:
            with open(p) as fh:
                d = json.load(fh)
        except (OSError, ValueError) as exc:
            raise StoreError(f"unreadable schema: {exc}", path=p) from None
        if not isinstance(d, dict) or d.get("version") != SCHEMA_VERSION:
            got = d.get("version") if isinstance(d, dict) else None
            raise StoreError(f"schema version {got!r} is not supported (expected {SCHEMA_VERSION})", path=p)
        try:
            s = cls.from_dict(d)
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreError(f"malformed schema: {exc}", path=p) from None
        s.path = dataset_dir
        return s
