"""The two-pass preparation: raw files -> fitted encoders -> dataset directory.

pass 1  read the training rows (the train file, or the rows of the single input that
        the seeded split sends to train), validate every row, count tokens / moments;
fit     vocabularies (``min_count``), standardisation statistics;
pass 2  read every file again, validate, assign splits, encode, and append to the
        LMDB store.

Everything happens inside ``atomic_directory(output)``: the dataset appears complete
or not at all.  Pass 1 also spills its parsed chunks of the input it reads (uint64
keys / value ids, labels, split ids: about the size of the raw text) to a scratch
file in that temporary directory, and pass 2 replays them instead of parsing that
text a second time (``cache=False`` / ``--no_cache``, or too little free disk, turns
this off).  Disk, not memory: memory stays bounded by the vocabulary sizes.
"""
from __future__ import annotations

import gc
import os
import pickle
import shutil
import sys
from dataclasses import dataclass

import numpy as np

from common.encoders import VOCAB_DIR, CategoricalEncoder, save_encoder, vocab_file_name
from common.errors import DataError, FlagError
from common.io import atomic_directory
from common.schema import Field, Schema
from common.store import DEFAULT_CHUNK_ROWS, STORE_DIR, StoreWriter, layout_for
from data_prep import plan as plans
from data_prep.columns import (CatColumn, KeyCounter, LabelColumn, MappedCatColumn, NumColumn, SeqColumn,
                               VocabIndex)
from data_prep.reader import SkipLog, TextTable, first_line, prefetch
from data_prep.split import SPLIT_NAMES, TEST, TRAIN, VALID, Splitter


@dataclass
class Options:
    format: str
    input: str | None
    output: str
    valid: str | None = None
    test: str | None = None
    spec: str | None = None
    min_count: int | None = None
    split: tuple = (0.8, 0.1, 0.1)
    seed: int = 0
    rows: int | None = None
    on_bad_line: str = "error"
    stratify: bool = False
    numeric: str | None = None
    block_mb: float = 4.0
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    overwrite: bool = False
    progress: bool | None = None        # None: only on a terminal
    base_ctr: float = 0.25
    cache: bool | None = None           # spill pass 1 to disk for pass 2 (None: if the disk has room)


def _progress(total: int, desc: str, enabled):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False,
                disable=(None if enabled is None else not enabled), dynamic_ncols=True)


class Prep:
    def __init__(self, opts: Options):
        self.o = opts
        self.skiplog = SkipLog()
        self.skiplog.enabled = False
        self.plan = self._plan()
        p = self.plan
        enc = p.encoding
        # processors
        self.labels = [LabelColumn(s) for s in p.labels]
        self.counters: dict[str, KeyCounter] = {}
        self.cats = []
        for s in p.cats:
            if s.transform:
                self.cats.append(MappedCatColumn(s, enc))
            else:
                self.counters[s.name] = KeyCounter(enc)
                self.cats.append(CatColumn(s, self.counters[s.name]))
        self.nums = [NumColumn(s) for s in p.nums]
        self.seqs = []
        for s in p.seqs:
            owner = s.vocab or s.name
            if owner not in self.counters:
                self.counters[owner] = KeyCounter(enc)
            self.seqs.append(SeqColumn(s, self.counters[owner]))
        self.files = self._files()
        self.cache_path: str | None = None
        self.layouts = {path: p.layout(path) for path, _ in self.files}
        self.splitter = Splitter(opts.split, opts.seed, opts.stratify)

    # ----- setup ------------------------------------------------------------------------------
    def _plan(self):
        o = self.o
        if o.format == "criteo":
            return plans.criteo_plan(o.numeric or "bucketize", o.min_count)
        if o.format == "avazu":
            return plans.avazu_plan(o.input, o.min_count)
        if o.format == "libfm":
            return plans.libfm_plan(o.input, o.min_count)
        if o.format == "csv":
            if not o.spec:
                raise FlagError("spec", "--format csv needs --spec SPEC.json (see `python -m data_prep --help`)")
            return plans.csv_plan(o.spec, o.numeric, o.min_count)
        raise FlagError("format", f"unknown format {o.format!r}")

    def _files(self):
        o = self.o
        if o.valid or o.test:
            files = [(o.input, TRAIN)]
            if o.valid:
                files.append((o.valid, VALID))
            if o.test:
                files.append((o.test, TEST))
        else:
            files = [(o.input, None)]
        for path, _ in files:
            text, _ = first_line(path)
            if text is None:
                raise DataError("empty file (no data rows)", path=path, line=1)
        return files

    def _table(self, path: str) -> TextTable:
        lay = self.layouts[path]
        block = max(int(self.o.block_mb * (1 << 20)), 1 << 16)
        return TextTable(path, lay.delimiter, len(lay.names), lay.header, lay.quotechar, lay.encoding, block,
                         self.o.rows, self.o.on_bad_line, self.skiplog,
                         columns=[lay.index(c) for c in self.plan.columns_used()])

    # ----- per chunk --------------------------------------------------------------------------
    def _parse(self, chunk, lay):
        idx = lay.index
        while True:
            labs = [c.parse(chunk, idx(c.spec.column)) for c in self.labels]
            cats = [c.parse(chunk, idx(c.spec.column)) for c in self.cats]
            nums = [c.parse(chunk, idx(c.spec.column)) for c in self.nums]
            seqs = [c.parse(chunk, idx(c.spec.column)) for c in self.seqs]
            bad = []
            for cols, data in ((self.labels, labs), (self.cats, cats), (self.nums, nums), (self.seqs, seqs)):
                for c, d in zip(cols, data):
                    bad += c.bad(d)
            if not bad:
                break
            if self.o.on_bad_line == "error":
                rows, reason = min(bad, key=lambda b: int(b[0][0]))
                r = int(rows[0])
                raise DataError(reason(r), path=chunk.path, line=int(chunk.lines[r]))
            first_reason: dict[int, str] = {}
            for rows, reason in sorted(bad, key=lambda b: int(b[0][0])):
                for r in rows.tolist():
                    if r not in first_reason:
                        first_reason[r] = reason(r)
            for r in sorted(first_reason):
                self.skiplog.add(chunk.path, int(chunk.lines[r]), first_reason[r])
            keep = np.ones(chunk.n, bool)
            keep[list(first_reason)] = False
            chunk = chunk.take(np.flatnonzero(keep))
        label = np.stack([c.values(d) for c, d in zip(self.labels, labs)], 1) if labs else None
        return chunk, label, cats, nums, seqs

    def _produce(self, desc: str):
        for i, (path, role) in enumerate(self.files if desc == "encode" else self.files[:1]):
            if desc == "encode" and i == 0 and self.cache_path:
                yield from self._replay()
                continue
            spill = None
            if desc == "count" and self.cache_path:
                spill = open(self.cache_path, "wb")
                self.skiplog.enabled = True      # this file is not read again: record its bad lines now
            table = self._table(path)
            self.splitter.reset()
            bar = _progress(os.path.getsize(path), f"{desc} {os.path.basename(path)}", self.o.progress)
            rows = 0
            try:
                for chunk in table.chunks(bar):
                    chunk, label, cats, nums, seqs = self._parse(chunk, self.layouts[path])
                    n = chunk.n
                    if not n:
                        continue
                    rows += n
                    split = self.splitter.assign(label[:, 0], n) if role is None else np.full(n, role, np.int8)
                    rec = (path, n, label, cats, nums, seqs, split)
                    if spill is not None:
                        pickle.dump(rec, spill, protocol=5)
                    yield rec
            finally:
                if bar is not None:
                    bar.close()
                if spill is not None:
                    spill.close()
                    self.skiplog.enabled = False
            if rows == 0:
                lay = self.layouts[path]
                what = "no data rows after the header" if lay.header else "no data rows"
                if self.skiplog.count or self.o.on_bad_line == "skip":
                    what = "no usable data rows (every line was skipped)"
                raise DataError(what, path=path, line=2 if lay.header else 1)

    def _replay(self):
        """Pass 2 over the first file: the records pass 1 spilled."""
        bar = _progress(os.path.getsize(self.cache_path), f"encode {os.path.basename(self.files[0][0])}",
                        self.o.progress)
        at = 0
        try:
            with open(self.cache_path, "rb") as fh:
                while True:
                    try:
                        rec = pickle.load(fh)
                    except EOFError:
                        break
                    if bar is not None:
                        now = fh.tell()
                        bar.update(now - at)
                        at = now
                    yield rec
        finally:
            if bar is not None:
                bar.close()
        os.unlink(self.cache_path)

    # ----- pass 1 -----------------------------------------------------------------------------
    def _count_stage(self):
        """Pass-1 records plus the per-chunk unique/count work of the categorical columns
        (done in the background thread; merging into the counters stays in the caller)."""
        for rec in self._produce("count"):
            train = rec[6] == TRAIN
            prepped = [c.count_prep(d, train) for c, d in zip(self.cats, rec[3])
                       if isinstance(c, CatColumn)] if train.any() else None
            yield rec, train, prepped

    def count(self) -> None:
        for (_, n, label, cats, nums, seqs, split), train, prepped in prefetch(self._count_stage()):
            if prepped is None:
                continue
            it = iter(prepped)
            for c, d in zip(self.cats, cats):
                if isinstance(c, CatColumn):
                    c.count_merge(next(it))
                else:
                    c.count(d, train)
            for c, d in zip(self.nums, nums):
                c.count(d, train)
            for c, d in zip(self.seqs, seqs):
                c.count(d, train)

    def fit(self) -> list[Field]:
        p = self.plan
        enc = p.encoding
        vocabs, indexes = {}, {}
        min_counts = {s.name: s.min_count for s in p.cats}
        for s in p.seqs:
            min_counts.setdefault(s.vocab or s.name, s.min_count)
        for owner, counter in self.counters.items():
            vocabs[owner], keys = counter.fit(min_counts[owner])
            counter.release()
            indexes[owner] = VocabIndex(vocabs[owner], enc, keys)
        self.encoders, fields, taken = {}, [], set()
        shared = {}
        for s in p.seqs:
            if s.vocab:
                shared.setdefault(s.vocab, []).append(s.name)
        for c in self.cats:
            s = c.spec
            if isinstance(c, CatColumn):
                c.index = indexes[s.name]
                e = CategoricalEncoder(s.name, s.column, vocabs[s.name], "", shared.get(s.name))
            else:
                c.fit()
                e = c.encoder()
            fn = vocab_file_name(s.name, taken)
            self.encoders[fn] = e
            fields.append(Field(s.name, "categorical", vocab_size=e.vocab.size, source=s.column,
                                encoder={"type": "vocab", "transform": s.transform, "min_count": s.min_count,
                                         "file": fn}))
        for c in self.nums:
            e = c.fit()
            fn = vocab_file_name(c.spec.name, taken)
            self.encoders[fn] = e
            fields.append(Field(c.spec.name, "numeric", source=c.spec.column,
                                encoder={"type": "standardize", "mean": e.mean, "std": e.std, "file": fn}))
        for c in self.seqs:
            s = c.spec
            owner = s.vocab or s.name
            c.index = indexes[owner]
            e = c.encoder(vocabs[owner], owner)
            fn = vocab_file_name(s.name, taken)
            self.encoders[fn] = e
            fields.append(Field(s.name, "sequence", vocab_size=vocabs[owner].size, embedding_group=owner,
                                max_len=s.max_len, source=s.column,
                                encoder={"type": "sequence", "separator": s.separator, "keep": s.keep,
                                         "vocab": owner, "min_count": min_counts[owner], "file": fn}))
        return fields

    # ----- pass 2 -----------------------------------------------------------------------------
    def _encode_stage(self):
        """Pass-2 records encoded into the store's arrays, rows grouped by split
        (in the background thread; the caller only appends them to the store)."""
        n_cat, n_num = len(self.cats), len(self.nums)
        seq_w = sum(s.max_len for s in self.plan.seqs)
        for path, n, label, cats, nums, seqs, split in self._produce("encode"):
            catT = np.empty((n_cat, n), np.int32)          # column-major while encoding
            for i, (c, d) in enumerate(zip(self.cats, cats)):
                catT[i] = c.encode(d)
            numT = np.empty((n_num, n), np.float32)
            for i, (c, d) in enumerate(zip(self.nums, nums)):
                numT[i] = c.encode(d)
            seq = np.empty((n, seq_w), np.int32)
            off = 0
            for c, d in zip(self.seqs, seqs):
                seq[:, off:off + c.spec.max_len] = c.encode(d)
                off += c.spec.max_len
            # group rows by split (file order kept within a split) while transposing to rows
            counts = np.bincount(split, minlength=3)
            if counts.max() == n:
                cat, num = np.ascontiguousarray(catT.T), np.ascontiguousarray(numT.T)
            else:
                order = np.argsort(split, kind="stable")
                cat, num, seq, label = catT.T[order], numT.T[order], seq[order], label[order]
            arrays = {"cat": cat, "num": num, "seq": seq, "label": label}
            parts, lo = [], 0
            for sid, name in enumerate(SPLIT_NAMES):
                k = int(counts[sid])
                if k:
                    parts.append((name, {a: v[lo:lo + k] for a, v in arrays.items()}))
                    lo += k
            yield parts

    def write(self, fields: list[Field], tmp: str) -> Schema:
        o, p = self.o, self.plan
        schema = Schema(fields=fields, labels=[s.name for s in p.labels], name=os.path.basename(
            os.path.abspath(o.output)), format=o.format)
        self.skiplog.enabled = True
        split_rows = {s: 0 for s in SPLIT_NAMES}
        writer = StoreWriter(os.path.join(tmp, STORE_DIR), layout_for(schema), schema.model_hash(),
                             chunk_rows=o.chunk_rows)
        try:
            for parts in prefetch(self._encode_stage()):
                for name, arrays in parts:
                    split_rows[name] += len(arrays["label"])
                    writer.append(name, arrays)
            writer.close()
        except BaseException:
            try:
                writer.env.close()
            except Exception:  # noqa: BLE001
                pass
            raise
        vdir = os.path.join(tmp, VOCAB_DIR)
        os.makedirs(vdir, exist_ok=True)
        for fn, e in self.encoders.items():
            save_encoder(vdir, fn, e)
        schema.splits = split_rows
        schema.skipped_lines = self.skiplog.to_dict()
        schema.settings = self.settings()
        schema.extra = {"files": {p_: (SPLIT_NAMES[r] if r is not None else "split") for p_, r in self.files}}
        schema.save(tmp)
        return schema

    def settings(self) -> dict:
        o = self.o
        return {"format": o.format, "input": o.input, "valid": o.valid, "test": o.test, "spec": o.spec,
                "min_count": o.min_count, "split": list(o.split) if not (o.valid or o.test) else None,
                "seed": o.seed, "stratify": o.stratify, "rows": o.rows, "on_bad_line": o.on_bad_line,
                "numeric": o.numeric, "block_mb": o.block_mb, "chunk_rows": o.chunk_rows,
                "plan": self.plan.settings()}


def prepare(opts: Options) -> Schema:
    """Run both passes; return the loaded schema of the new dataset."""
    if os.path.exists(opts.output) and not opts.overwrite:
        raise FlagError("output", f"{opts.output} already exists (pass --overwrite to replace it)")
    if opts.format == "synthetic":
        from common.synthetic import write_synthetic  # written separately; imported only here

        progress = sys.stderr.isatty() if opts.progress is None else bool(opts.progress)
        out = write_synthetic(opts.output, rows=opts.rows or 100_000, seed=opts.seed, split=tuple(opts.split),
                              base_ctr=opts.base_ctr, progress=progress, overwrite=opts.overwrite)
        return out if isinstance(out, Schema) else Schema.load(opts.output)
    # the cyclic garbage collector would walk the (large, long-lived) vocabularies again and
    # again for nothing: this code makes no reference cycles worth collecting
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        prep = Prep(opts)
        with atomic_directory(opts.output, overwrite=opts.overwrite) as tmp:
            prep.cache_path = os.path.join(tmp, ".pass1.cache") if _cache_wanted(opts, prep.files, tmp) else None
            prep.count()
            fields = prep.fit()
            prep.write(fields, tmp)
        return Schema.load(opts.output)
    finally:
        if gc_was_enabled:
            gc.enable()


def _cache_wanted(opts: Options, files, where: str) -> bool:
    if opts.cache is not None:
        return bool(opts.cache)
    path = files[0][0]
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if fh.read(2) == b"\x1f\x8b":
            size *= 8                     # gzip: the parsed data is about the size of the raw text
    return shutil.disk_usage(where).free > 2 * size + (1 << 30)
