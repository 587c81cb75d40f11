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
this off).  Disk, not memory: the token counts of pass 1 beyond ``count_mb`` go to
hash-partitioned scratch files there too (:class:`data_prep.columns.CountSpill`), so
memory stays bounded by that budget and the vocabulary sizes.

Threads: ``workers`` threads tokenise the blocks of a file and do the per-block work
that needs no shared state (:meth:`Prep._prework`); one thread does the rest in file
order.  In pass 2 the worker threads encode the records (:meth:`Prep._encode`) while
that thread reads them and writes the store.
"""
from __future__ import annotations

import gc
import os
import pickle
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from common.encoders import VOCAB_DIR, CategoricalEncoder, save_encoder, vocab_file_name
from common.errors import DataError, FlagError
from common.io import atomic_directory
from common.schema import Field, Schema
from common.store import DEFAULT_CHUNK_ROWS, STORE_DIR, StoreWriter, layout_for
from data_prep import plan as plans
from data_prep.columns import (CatColumn, CountSpill, KeyCounter, LabelColumn, MappedCatColumn, NumColumn,
                               SeqColumn, VocabIndex)
from data_prep.reader import SkipLog, TextTable, first_line, ordered_map
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
    count_mb: float = 16.0              # memory for the token counts of pass 1 (more goes to disk)
    workers: int = 2                    # threads that tokenise, look up and encode chunks


def _progress(total: int, desc: str, enabled):
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return None                       # (and tqdm is not even imported)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False,
                disable=(None if enabled is None else not enabled), dynamic_ncols=True)


@dataclass
class _Pre:
    """What :meth:`Prep._prework` made of a chunk in a worker thread."""
    chunk: object
    lines_before: int
    lines: int
    row0: int
    labs: list
    cats: list
    nums: list
    seqs: list
    split: np.ndarray | None
    prepped: list | None


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
        self.spill: CountSpill | None = None
        self.workers = max(1, int(opts.workers))
        self._row_shift = 0
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
                         columns=[lay.index(c) for c in self.plan.columns_used()],
                         string_cols=[lay.index(s.column) for s in self.plan.seqs])

    # ----- per chunk --------------------------------------------------------------------------
    def _prework(self, chunk, lines_before: int, lines: int, role, counting: bool):
        """The part of reading a chunk that runs in the tokenising worker threads: lookups of
        known values, the plain categorical keys, sequence items, and (pass 1) the split and
        per-chunk token counts, computed from a guess of the chunk's first row number (right
        unless earlier lines were blank or bad).  Changes no shared state: :meth:`_parse`
        finishes in file order and redoes what the guess or a changed chunk invalidates."""
        idx = self.layouts[chunk.path].index
        labs = [c.map.known_ids(chunk.keys(idx(c.spec.column))) for c in self.labels]
        cats = [c.parse(chunk, idx(c.spec.column)) if isinstance(c, CatColumn)
                else c.map.known_ids(chunk.keys(idx(c.spec.column))) for c in self.cats]
        nums = [c.map.known_ids(chunk.keys(idx(c.spec.column))) for c in self.nums]
        seqs = [c.parse(chunk, idx(c.spec.column)) for c in self.seqs]
        row0 = lines_before - self._row_shift
        split = prepped = None
        if role is not None:
            split = np.full(chunk.n, role, np.int8)
        elif not self.splitter.stratify:
            split = self.splitter.assign_at(row0, chunk.n)
        if counting and split is not None:
            prepped = self._count_prep(cats, split == TRAIN)
        return _Pre(chunk, lines_before, lines, row0, labs, cats, nums, seqs, split, prepped)

    def _count_prep(self, cats, train):
        if not train.any():
            return None
        return [c.count_prep(d, train) for c, d in zip(self.cats, cats) if isinstance(c, CatColumn)]

    def _parse(self, chunk, lay, pre=None):
        idx = lay.index
        while True:
            ok = pre is not None and pre.chunk is chunk        # the worker's results still apply
            labs = [c.parse(chunk, idx(c.spec.column), pre.labs[i] if ok else None)
                    for i, c in enumerate(self.labels)]
            cats = [(pre.cats[i] if ok else c.parse(chunk, idx(c.spec.column))) if isinstance(c, CatColumn)
                    else c.parse(chunk, idx(c.spec.column), pre.cats[i] if ok else None)
                    for i, c in enumerate(self.cats)]
            nums = [c.parse(chunk, idx(c.spec.column), pre.nums[i] if ok else None) for i, c in enumerate(self.nums)]
            seqs = pre.seqs if ok else [c.parse(chunk, idx(c.spec.column)) for c in self.seqs]
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
        return chunk, label, cats, nums, seqs, ok

    def _produce(self, desc: str):
        """Records ``(path, n, label, cats, nums, seqs, split)`` of the files in order, each
        with the per-chunk token counts of pass 1 when the worker threads made them (else None)."""
        counting = desc == "count"
        for i, (path, role) in enumerate(self.files if desc == "encode" else self.files[:1]):
            if desc == "encode" and i == 0 and self.cache_path:
                for rec in self._replay():
                    yield rec, None
                continue
            spill = None
            if counting and self.cache_path:
                spill = open(self.cache_path, "wb")
                self.skiplog.enabled = True      # this file is not read again: record its bad lines now
            table = self._table(path)
            self.splitter.reset()
            self._row_shift = 0
            bar = _progress(os.path.getsize(path), f"{desc} {os.path.basename(path)}", self.o.progress)
            rows = 0
            lay = self.layouts[path]

            def post(chunk, lines_before, lines, role=role):
                return self._prework(chunk, lines_before, lines, role, counting)
            try:
                for chunk, pre in table.chunks(bar, workers=self.workers, post=post):
                    chunk, label, cats, nums, seqs, ok = self._parse(chunk, lay, pre)
                    n = chunk.n
                    if not n:
                        continue
                    rows += n
                    prepped = None
                    if role is not None:
                        split = pre.split if ok else np.full(n, role, np.int8)
                        prepped = pre.prepped if ok else None
                    elif ok and pre.split is not None and pre.row0 == self.splitter.position():
                        split, prepped = pre.split, pre.prepped
                        self.splitter.advance(n)
                    else:
                        split = self.splitter.assign(label[:, 0], n)
                    if role is None:                 # guess the next chunks' first rows from here
                        self._row_shift = pre.lines_before + pre.lines - self.splitter.position()
                    if counting and prepped is None:
                        prepped = self._count_prep(cats, split == TRAIN)
                    rec = (path, n, label, cats, nums, seqs, split)
                    if spill is not None:
                        pickle.dump(rec, spill, protocol=5)
                    yield rec, prepped
            finally:
                if bar is not None:
                    bar.close()
                if spill is not None:
                    spill.close()
                    self.skiplog.enabled = False
            if rows == 0:
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
    def use_scratch(self, directory: str) -> None:
        """Token counts beyond ``count_mb`` go to scratch files under ``directory``."""
        self.spill = CountSpill(directory, int(self.o.count_mb * (1 << 20)))
        for c in self.counters.values():
            self.spill.register(c)

    def count(self) -> None:
        spill = self.spill
        for (_, n, label, cats, nums, seqs, split), prepped in self._produce("count"):
            if prepped is None:                      # no training rows in this chunk
                continue
            train = split == TRAIN
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
            if spill is not None and spill.maybe_spill():
                _trim_heap()                         # the counts' memory is free again

    def fit(self) -> list[Field]:
        p = self.plan
        enc = p.encoding
        vocabs, indexes = {}, {}
        min_counts = {s.name: s.min_count for s in p.cats}
        for s in p.seqs:
            min_counts.setdefault(s.vocab or s.name, s.min_count)
        if self.spill is not None:
            self.spill.reduce([min_counts[owner] for owner in self.counters])
            shutil.rmtree(self.spill.directory, ignore_errors=True)
        def fit_one(owner):
            counter = self.counters[owner]
            vocab, keys = counter.fit(min_counts[owner])
            counter.release()
            return owner, vocab, VocabIndex(vocab, enc, keys)

        with ThreadPoolExecutor(self.workers, thread_name_prefix="data_prep-fit") as ex:   # independent columns
            for owner, vocab, index in ex.map(fit_one, list(self.counters)):
                vocabs[owner], indexes[owner] = vocab, index
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
    def _records(self):
        """Pass-2 records in file order, the encoders' lookup tables brought up to date
        for each (so that :meth:`_encode` only reads shared state)."""
        for rec, _ in self._produce("encode"):
            for c in self.cats:
                if isinstance(c, MappedCatColumn):
                    c.sync()
            for c in self.nums:
                c.map.float_array()
            yield rec

    def _encode(self, rec):
        """One record -> ``[(split name, arrays)]``, rows grouped by split (file order kept
        within a split).  Runs in worker threads."""
        path, n, label, cats, nums, seqs, split = rec
        catT = np.empty((len(self.cats), n), np.int32)          # column-major while encoding
        for i, (c, d) in enumerate(zip(self.cats, cats)):
            catT[i] = c.encode(d)
        numT = np.empty((len(self.nums), n), np.float32)
        for i, (c, d) in enumerate(zip(self.nums, nums)):
            numT[i] = c.encode(d)
        seq = np.empty((n, self._seq_width), np.int32)
        off = 0
        for c, d in zip(self.seqs, seqs):
            seq[:, off:off + c.spec.max_len] = c.encode(d)
            off += c.spec.max_len
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
        return parts

    def write(self, fields: list[Field], tmp: str) -> Schema:
        o, p = self.o, self.plan
        schema = Schema(fields=fields, labels=[s.name for s in p.labels], name=os.path.basename(
            os.path.abspath(o.output)), format=o.format)
        self.skiplog.enabled = True
        split_rows = {s: 0 for s in SPLIT_NAMES}
        writer = StoreWriter(os.path.join(tmp, STORE_DIR), layout_for(schema), schema.model_hash(),
                             chunk_rows=o.chunk_rows)
        self._seq_width = sum(s.max_len for s in p.seqs)
        vdir = os.path.join(tmp, VOCAB_DIR)
        os.makedirs(vdir, exist_ok=True)
        with ThreadPoolExecutor(1, thread_name_prefix="data_prep-vocab") as vocab_writer:
            # the encoder files (each synced to disk) are written while pass 2 runs
            saved = vocab_writer.submit(lambda: [save_encoder(vdir, fn, e) for fn, e in self.encoders.items()])
            try:
                with ThreadPoolExecutor(self.workers, thread_name_prefix="data_prep-enc") as ex:
                    for parts in ordered_map(ex, self._encode, self._records(), self.workers + 1):
                        for name, arrays in parts:
                            split_rows[name] += len(arrays["label"])
                            writer.append(name, arrays)
                writer.close()
            except BaseException:
                try:
                    writer.abort()
                except Exception:  # noqa: BLE001
                    pass
                raise
            saved.result()
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
            prep.use_scratch(os.path.join(tmp, ".counts"))
            prep.count()
            _trim_heap()
            fields = prep.fit()
            _trim_heap()
            prep.write(fields, tmp)
        return Schema.load(opts.output)
    finally:
        if gc_was_enabled:
            gc.enable()


def _trim_heap() -> None:
    """glibc: hand the memory freed by the pass that just ended back to the system
    (``malloc_trim``), so that the next pass starts from what is live, not from
    wherever the previous one left the heap."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):     # not glibc
        pass


def _cache_wanted(opts: Options, files, where: str) -> bool:
    if opts.cache is not None:
        return bool(opts.cache)
    path = files[0][0]
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if fh.read(2) == b"\x1f\x8b":
            size *= 8                     # gzip: the parsed data is about the size of the raw text
    return shutil.disk_usage(where).free > 2 * size + (1 << 30)
