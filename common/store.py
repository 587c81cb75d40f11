"""The chunked LMDB store that both backends read, batch for batch alike.

Layout (one LMDB environment, ``<dataset>/store/``)::

    b"__meta__"             JSON: format version, schema hash, array layout,
                            per split: rows, rows per chunk, crc32 per chunk
    b"<split>/<%08d chunk>"  one chunk: the arrays of ``layout`` for n rows,
                            concatenated row-major (C order), little endian

Rows are stored a few thousand per key as contiguous arrays (single-row keys
stream 10-70x slower).  Arrays of a chunk (``layout``)::

    cat    int32   [n, n_categorical]     encoded categorical fields
    num    float32 [n, n_numeric]         numeric fields
    seq    int32   [n, sum(max_len)]      sequence fields, concatenated
    label  float32 [n, n_labels]
    prob   float32 [n, 1]                 (synthetic data) the true click probability

The store is written into a temporary directory by the caller and renamed into
place when complete (see :func:`common.io.atomic_directory`).  Readers open it
read-only; every chunk's checksum and the format version are verified when the
store is opened, and a failure names the chunk.
"""
from __future__ import annotations

import json
import os
import threading
import zlib
from dataclasses import dataclass

import numpy as np

from common.errors import StoreError

FORMAT_VERSION = 1
META_KEY = b"__meta__"
STORE_DIR = "store"
DEFAULT_CHUNK_ROWS = 4096
SYNC_BYTES = 32 << 20          # StoreWriter: push committed data to disk in the background every 32 MiB
SPLITS = ("train", "valid", "test")


def _lmdb():
    import lmdb  # imported lazily so `common` stays importable without it

    return lmdb


def chunk_key(split: str, i: int) -> bytes:
    return f"{split}/{i:08d}".encode()


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: str      # numpy dtype string, e.g. "<i4", "<f4"
    width: int      # columns per row

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize * self.width


def layout_for(schema, with_prob: bool = False) -> list[ArraySpec]:
    """The array layout of a schema's rows."""
    lay = [
        ArraySpec("cat", "<i4", len(schema.categorical)),
        ArraySpec("num", "<f4", len(schema.numeric)),
        ArraySpec("seq", "<i4", sum(f.max_len for f in schema.sequence)),
        ArraySpec("label", "<f4", len(schema.labels)),
    ]
    if with_prob:
        lay.append(ArraySpec("prob", "<f4", 1))
    return lay


def encode_chunk(layout: list[ArraySpec], arrays: dict, n: int) -> bytes:
    parts = []
    for spec in layout:
        a = np.ascontiguousarray(arrays[spec.name], dtype=spec.dtype).reshape(n, spec.width)
        parts.append(a.tobytes())
    return b"".join(parts)


def decode_chunk(layout: list[ArraySpec], buf, n: int) -> dict:
    out, off = {}, 0
    for spec in layout:
        size = n * spec.itemsize
        out[spec.name] = np.frombuffer(buf, dtype=spec.dtype, count=n * spec.width, offset=off).reshape(n, spec.width)
        off += size
    return out


class StoreWriter:
    """Append rows per split; they are cut into chunks of ``chunk_rows`` rows.

    Rows are copied once, into a per-split staging buffer laid out as a stored chunk;
    a full buffer is checksummed and put into LMDB as it is.  The write transaction is
    committed every ``commit_bytes``: LMDB keeps a transaction's dirty pages in memory
    until the commit, and small transactions (about one chunk) reuse the same memory
    instead of allocating and faulting in fresh pages (several times faster to write,
    and memory stays flat)."""

    def __init__(self, path: str, layout: list[ArraySpec], schema_hash: str,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, map_size: int = 1 << 40, commit_bytes: int = 1 << 20):
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.layout = list(layout)
        self.schema_hash = schema_hash
        self.chunk_rows = int(chunk_rows)
        self.commit_bytes = int(commit_bytes)
        self.env = _lmdb().open(path, map_size=map_size, subdir=True, sync=False, metasync=False,
                                readahead=False, writemap=False, max_dbs=0)
        self.splits: dict[str, dict] = {}
        self._stage: dict[str, tuple[np.ndarray, dict]] = {}
        self._fill: dict[str, int] = {}
        self._txn = self.env.begin(write=True)
        self._dirty = 0
        # committed data is pushed to disk in the background now and then, so that the
        # final sync in close() has little left to wait for
        self._fd = os.open(os.path.join(path, "data.mdb"), os.O_RDONLY)
        self._unsynced = 0
        self._syncer: threading.Thread | None = None

    def _staging(self, split: str):
        st = self._stage.get(split)
        if st is None:
            n = self.chunk_rows
            raw = np.empty(n * sum(s.itemsize for s in self.layout), np.uint8)
            views, off = {}, 0
            for s in self.layout:
                size = n * s.itemsize
                views[s.name] = raw[off:off + size].view(s.dtype).reshape(n, s.width)
                off += size
            st = self._stage[split] = (raw, views)
            self._fill[split] = 0
        return st

    def append(self, split: str, arrays: dict) -> None:
        n = len(arrays["label"])
        if n == 0:
            return
        arrays = {s.name: np.asarray(arrays[s.name]).reshape(n, s.width) for s in self.layout}
        raw, views = self._staging(split)
        at = 0
        while at < n:
            fill = self._fill[split]
            k = min(n - at, self.chunk_rows - fill)
            for s in self.layout:
                views[s.name][fill:fill + k] = arrays[s.name][at:at + k]
            at += k
            self._fill[split] = fill + k
            if fill + k == self.chunk_rows:
                self._put(split, raw, self.chunk_rows)
                self._fill[split] = 0

    def _put(self, split: str, buf, n: int) -> None:
        info = self.splits.setdefault(split, {"rows": 0, "chunk_rows": [], "crc32": []})
        i = len(info["chunk_rows"])
        self._txn.put(chunk_key(split, i), buf)
        info["rows"] += n
        info["chunk_rows"].append(n)
        info["crc32"].append(zlib.crc32(buf))
        self._dirty += len(buf)
        if self._dirty >= self.commit_bytes:
            self._txn.commit()
            self._txn = self.env.begin(write=True)
            self._unsynced += self._dirty
            self._dirty = 0
            if self._unsynced >= SYNC_BYTES and (self._syncer is None or not self._syncer.is_alive()):
                self._unsynced = 0
                self._syncer = threading.Thread(target=_fdatasync, args=(self._fd,), daemon=True,
                                                name="store-sync")
                self._syncer.start()

    def close(self, extra_meta: dict | None = None) -> dict:
        for split, (raw, views) in self._stage.items():
            n = self._fill[split]
            if n:                      # the last, partial chunk of a split
                self._put(split, encode_chunk(self.layout, {k: v[:n] for k, v in views.items()}, n), n)
                self._fill[split] = 0
        self._stage = {}
        for split in SPLITS:  # every split is present, possibly empty
            self.splits.setdefault(split, {"rows": 0, "chunk_rows": [], "crc32": []})
        meta = {
            "format": "ctr-zoo-lmdb",
            "format_version": FORMAT_VERSION,
            "schema_hash": self.schema_hash,
            "layout": [[s.name, s.dtype, s.width] for s in self.layout],
            "splits": self.splits,
            **(extra_meta or {}),
        }
        self._txn.put(META_KEY, json.dumps(meta).encode())
        self._txn.commit()
        self._stop_syncer()
        self.env.sync(True)
        self.env.close()
        return meta

    def _stop_syncer(self) -> None:
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        """Give up (on an error): close without writing the metadata."""
        self._stop_syncer()
        self.env.close()


def _fdatasync(fd: int) -> None:
    try:
        getattr(os, "fdatasync", os.fsync)(fd)
    except OSError:          # the final sync in close() reports real problems
        pass


_VERIFIED: dict[tuple, bool] = {}
_ENVS: dict[str, tuple[tuple, object]] = {}


def _open_env(path: str):
    """One shared read-only environment per store file and process.

    LMDB refuses to open the same environment twice in one process, so every
    Store (and every loader) of the same dataset shares it.  A store replaced on
    disk (new inode / mtime) gets a fresh environment.
    """
    lmdb = _lmdb()
    real = os.path.realpath(path)
    st = os.stat(os.path.join(real, "data.mdb"))
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _ENVS.get(real)
    if hit is not None and hit[0] == key:
        return hit[1]
    if hit is not None:
        try:
            hit[1].close()
        except lmdb.Error:
            pass
    env = lmdb.open(real, readonly=True, lock=False, subdir=True, readahead=False, max_readers=512)
    _ENVS[real] = (key, env)
    return env


class Store:
    """Read-only access to a dataset's LMDB store: O(1) chunk access by index."""

    def __init__(self, dataset_dir: str, verify: bool = True, schema_hash: str | None = None):
        path = os.path.join(dataset_dir, STORE_DIR)
        self.path = path
        if not os.path.exists(os.path.join(path, "data.mdb")):
            raise StoreError("no LMDB store (store/data.mdb missing): not a dataset directory", path=dataset_dir)
        lmdb = _lmdb()
        try:
            self.env = _open_env(path)
            with self.env.begin(buffers=False) as txn:
                raw = txn.get(META_KEY)
        except lmdb.Error as exc:
            raise StoreError(f"not a readable LMDB store: {exc}", path=path) from None
        if raw is None:
            raise StoreError("LMDB store has no metadata key: written by another program", path=path)
        try:
            meta = json.loads(raw)
        except ValueError:
            raise StoreError("LMDB store metadata is not JSON: written by another program", path=path) from None
        if not isinstance(meta, dict) or meta.get("format") != "ctr-zoo-lmdb":
            raise StoreError("LMDB store was written by another program (format tag missing)", path=path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"LMDB store format version {meta.get('format_version')} is not supported "
                             f"(this library reads version {FORMAT_VERSION})", path=path)
        if schema_hash is not None and meta.get("schema_hash") != schema_hash:
            raise StoreError("LMDB store does not belong to this schema.json (schema hash differs)", path=path)
        self.meta = meta
        self.layout = [ArraySpec(n, d, w) for n, d, w in meta["layout"]]
        self._offsets = {s: np.concatenate([[0], np.cumsum(info["chunk_rows"])]).astype(np.int64)
                         for s, info in meta["splits"].items()}
        if verify:
            self.verify()

    # ------------------------------------------------------------------
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def rows(self, split: str) -> int:
        return int(self._info(split)["rows"])

    def num_chunks(self, split: str) -> int:
        return len(self._info(split)["chunk_rows"])

    def chunk_rows(self, split: str) -> list[int]:
        return list(self._info(split)["chunk_rows"])

    def _info(self, split: str) -> dict:
        try:
            return self.meta["splits"][split]
        except KeyError:
            raise StoreError(f"split {split!r} is not in this store (has: {', '.join(self.meta['splits'])})",
                             path=self.path) from None

    def verify(self) -> None:
        """Check every chunk's presence, size and crc32; raise StoreError naming the first bad chunk."""
        st = os.stat(os.path.join(self.path, "data.mdb"))
        key = (os.path.realpath(self.path), st.st_mtime_ns, st.st_size)
        if _VERIFIED.get(key):
            return
        row_bytes = sum(s.itemsize for s in self.layout)
        with self.env.begin(buffers=True) as txn:
            for split, info in self.meta["splits"].items():
                for i, (n, crc) in enumerate(zip(info["chunk_rows"], info["crc32"])):
                    buf = txn.get(chunk_key(split, i))
                    where = f"chunk {split}/{i:08d}"
                    if buf is None:
                        raise StoreError(f"{where} is missing (truncated store)", path=self.path)
                    if len(buf) != n * row_bytes:
                        raise StoreError(f"{where} has {len(buf)} bytes, expected {n * row_bytes}", path=self.path)
                    if zlib.crc32(buf) != crc:
                        raise StoreError(f"{where} fails its checksum (corrupt store)", path=self.path)
        _VERIFIED[key] = True

    def chunk(self, split: str, i: int) -> dict:
        """The arrays of chunk ``i`` of ``split`` (read-only numpy arrays)."""
        n = self._info(split)["chunk_rows"][i]
        with self.env.begin(buffers=False) as txn:
            buf = txn.get(chunk_key(split, i))
        if buf is None:
            raise StoreError(f"chunk {split}/{i:08d} is missing", path=self.path)
        return decode_chunk(self.layout, buf, n)

    def read_rows(self, split: str, start: int, stop: int) -> dict:
        """Rows ``[start, stop)`` of a split in stored order (concatenated across chunks)."""
        offs = self._offsets[split]
        first = int(np.searchsorted(offs, start, side="right") - 1)
        parts = []
        i = first
        while i < len(offs) - 1 and offs[i] < stop:
            c = self.chunk(split, i)
            lo, hi = max(start - offs[i], 0), min(stop - offs[i], offs[i + 1] - offs[i])
            parts.append({k: v[lo:hi] for k, v in c.items()})
            i += 1
        return {s.name: np.concatenate([p[s.name] for p in parts]) if parts else
                np.zeros((0, s.width), s.dtype) for s in self.layout}

    def close(self) -> None:
        """Environments are shared per process (see _open_env); nothing to release per Store."""
