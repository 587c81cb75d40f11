"""Backend-free batch iteration over a :class:`common.store.Store`.

Both ``zoo_torch.data.batches`` and ``zoo_tf.data.batches`` are thin wrappers
around :func:`iter_packed`, so for the same arguments they yield exactly the
same rows in the same order.

Order of one epoch (``shuffle=True``): ``rng = default_rng([seed, epoch])``;
the chunk order is ``rng.permutation(n_chunks)`` and then, chunk by chunk in
that order, the rows of each chunk are permuted by ``rng.permutation(rows)``.
Without shuffling, rows come in stored order.

Distributed sharding: the epoch's row stream is cut into GLOBAL batches of
``batch_size`` rows; rank ``r`` of ``world_size`` takes rows
``[r*b/W, (r+1)*b/W)`` of every global batch (``batch_size`` must be divisible
by ``world_size``).  The parts are disjoint, cover the data, and have equal
length; a final partial global batch of ``b`` rows is padded by repeating its
first rows up to a multiple of ``W`` (the DistributedSampler convention), or
dropped with ``drop_last``.  Averaging the W equal-size shard gradients equals
the gradient of the global batch, which makes DDP / MirroredStrategy training
equal to single-device training with the same global batch.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from common.errors import UserError
from common.schema import Schema
from common.store import Store

SPLIT_NAMES = ("train", "valid", "test")


def epoch_plan(store: Store, split: str, shuffle: bool, seed: int, epoch: int):
    """List of (chunk index, row permutation or None) in iteration order."""
    sizes = store.chunk_rows(split)
    if not shuffle:
        return [(i, None) for i in range(len(sizes))]
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)])
    order = rng.permutation(len(sizes))
    return [(int(i), rng.permutation(sizes[i])) for i in order]


def num_batches(rows: int, batch_size: int, drop_last: bool) -> int:
    return rows // batch_size if drop_last else -(-rows // batch_size)


def iter_packed(store: Store, split: str, batch_size: int, shuffle: bool = True, seed: int = 0,
                epoch: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                start_batch: int = 0, arrays: tuple[str, ...] | None = None):
    """Yield packed batches: dicts ``{"cat", "num", "seq", "label", ...}`` of numpy arrays.

    ``start_batch`` skips the first batches of the epoch (for exact resume)
    without reading the chunks they came from.
    """
    if split not in SPLIT_NAMES:
        raise UserError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size % world_size:
        raise UserError(f"global batch_size {batch_size} is not divisible by world_size {world_size}")
    names = tuple(s.name for s in store.layout) if arrays is None else tuple(arrays)
    plan = epoch_plan(store, split, shuffle, seed, epoch)
    sizes = store.chunk_rows(split)
    per = batch_size // world_size
    lo, hi = rank * per, (rank + 1) * per

    # skip whole chunks that lie before the resume point
    skip_rows = start_batch * batch_size
    k = 0
    while k < len(plan) and skip_rows >= sizes[plan[k][0]]:
        skip_rows -= sizes[plan[k][0]]
        k += 1

    buf: list[dict] = []
    buf_rows = 0

    def take(n):
        nonlocal buf, buf_rows
        out, got = [], 0
        while got < n:
            a = buf[0]
            m = len(a["label"])
            if got + m <= n:
                out.append(a)
                buf.pop(0)
                got += m
            else:
                r = n - got
                out.append({x: v[:r] for x, v in a.items()})
                buf[0] = {x: v[r:] for x, v in a.items()}
                got = n
        buf_rows -= n
        if len(out) == 1:
            return out[0]
        return {x: np.concatenate([o[x] for o in out]) for x in names}

    def shard(b):
        n = len(b["label"])
        if world_size == 1:
            return b
        if n < batch_size:  # final partial global batch: pad to a multiple of W
            m = -(-n // world_size)
            idx = np.arange(m * world_size) % n
            b = {x: v[idx] for x, v in b.items()}
            return {x: v[rank * m:(rank + 1) * m] for x, v in b.items()}
        return {x: v[lo:hi] for x, v in b.items()}

    for ci, perm in plan[k:]:
        c = store.chunk(split, ci)
        if perm is not None:
            if skip_rows:
                perm = perm[skip_rows:]
            c = {x: c[x][perm] for x in names}
        else:
            c = {x: c[x][skip_rows:] for x in names}
        skip_rows = 0
        buf.append(c)
        buf_rows += len(c["label"])
        while buf_rows >= batch_size:
            yield shard(take(batch_size))
    if buf_rows and not drop_last:
        yield shard(take(buf_rows))


def field_slices(schema: Schema) -> dict[str, tuple[str, object]]:
    """Field name -> (packed array name, column index or slice)."""
    out: dict[str, tuple[str, object]] = {}
    for i, f in enumerate(schema.categorical):
        out[f.name] = ("cat", i)
    for i, f in enumerate(schema.numeric):
        out[f.name] = ("num", i)
    off = 0
    for f in schema.sequence:
        out[f.name] = ("seq", slice(off, off + f.max_len))
        off += f.max_len
    return out


def unpack(schema: Schema, packed: dict, convert=lambda a: a, contiguous=np.ascontiguousarray) -> dict:
    """Packed arrays -> ``{field name: array, "label": [b] float32}`` via ``convert(contiguous(column))``.

    Categorical fields are int32 ``[b]``, numeric float32 ``[b]``, sequence
    int32 ``[b, max_len]``.  ``prob`` (synthetic true probability) is passed
    through when present.  ``packed`` may hold tensors (zoo_torch's GPU loader
    passes GPU tensors with ``contiguous=torch.Tensor.contiguous``).
    """
    out = {}
    for name, (arr, idx) in field_slices(schema).items():
        out[name] = convert(contiguous(packed[arr][:, idx]))
    out["label"] = convert(contiguous(packed["label"][:, 0]))
    if "prob" in packed:
        out["prob"] = convert(contiguous(packed["prob"][:, 0]))
    return out


def categorical_offsets(schema: Schema) -> np.ndarray:
    """int64 ``[C]``: the offset of each categorical field's embedding group in the one offset table."""
    offs = schema.group_offsets()
    return np.array([offs[f.embedding_group] for f in schema.categorical], dtype=np.int64)


def row_plan(cat: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The global table rows of a batch's categorical fields and their sort, computed ahead of the step.

    ``cat`` int ``[b, C]`` (the packed categorical ids), ``offsets`` int64 ``[C]``.  Returns
    ``(rows [b, C] int64 = cat + offsets, uniq, order, starts)`` where, over ``flat = rows.ravel()``,
    ``order`` sorts ``flat``, ``uniq`` are its distinct values (ascending) and ``starts[k]`` is the
    position in ``flat[order]`` where the run of ``uniq[k]`` begins -- exactly what a row-sparse
    optimiser needs to sum duplicate rows' gradients (``zoo_torch.optim``).  The loaders compute it in
    their prefetch thread, so the sort is off the training step's critical path.
    """
    rows = np.add(cat, offsets, dtype=np.int64)
    return (rows, *sort_runs(rows.ravel()))


def sort_runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(uniq, order, starts)`` of a 1-D integer array: ``order`` is its stable sort (equal values keep
    their positions' order), ``uniq`` are its distinct values ascending, ``starts[k]`` is where the run
    of ``uniq[k]`` begins in ``flat[order]``.  Shared by :func:`row_plan` and zoo_torch's optimiser
    (sparse-gradient dedup).

    When value range and positions fit 63 bits together (table rows always do), each element is
    packed as ``(value - min) << bits | position`` and the int64 keys are sorted by value with
    numpy's vectorised sort (about twice as fast as ``argsort`` here); both halves are unpacked
    from the sorted keys.  Otherwise ``argsort(kind="stable")`` gives the same result.
    """
    n = flat.size
    if n == 0:
        z = np.zeros(0, np.int64)
        return z, z, z
    lo, hi = int(flat.min()), int(flat.max())
    bits = max(1, (n - 1).bit_length())
    if (hi - lo) >> (63 - bits) == 0:
        keys = np.subtract(flat, lo, dtype=np.int64)
        keys <<= bits
        keys |= np.arange(n, dtype=np.int64)
        keys.sort()
        order = keys & ((1 << bits) - 1)
        keys >>= bits                      # the sorted values, minus lo
        srt = keys
    else:
        order = np.argsort(flat, kind="stable")
        srt, lo = flat[order], 0
    flag = np.empty(n, dtype=bool)
    flag[0] = True
    np.not_equal(srt[1:], srt[:-1], out=flag[1:])
    starts = np.flatnonzero(flag)
    uniq = srt[starts]
    if lo:
        uniq += lo
    return uniq.astype(flat.dtype, copy=False), order, starts


def segment_ids(starts: np.ndarray, n: int) -> np.ndarray:
    """int32 ``[n]``: for each position of the sorted rows, the index of its distinct row (from ``starts``)."""
    seg = np.zeros(n, dtype=np.int32)
    if starts.size > 1:
        seg[starts[1:]] = 1
    return np.cumsum(seg, dtype=np.int32)


def open_dataset(dataset_dir: str, verify: bool = True) -> tuple[Schema, Store]:
    schema = Schema.load(dataset_dir)
    store = Store(dataset_dir, verify=verify, schema_hash=schema.model_hash())
    return schema, store


def iter_numpy_batches(dataset_dir: str, split: str, batch_size: int, shuffle: bool = True, seed: int = 0,
                       rank: int = 0, world_size: int = 1, drop_last: bool = False, epoch: int = 0,
                       start_batch: int = 0):
    """Field-dict batches as numpy arrays (what both backends convert to tensors)."""
    schema, store = open_dataset(dataset_dir)
    for packed in iter_packed(store, split, batch_size, shuffle, seed, epoch, rank, world_size, drop_last,
                              start_batch):
        yield unpack(schema, packed)


def prefetch(iterable: Iterable, depth: int = 4):
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead (exceptions are re-raised here)."""
    import queue
    import threading

    if depth <= 0:
        yield from iterable
        return
    q: queue.Queue = queue.Queue(depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for x in iterable:
                if stop.is_set():
                    return
                q.put(x)
            q.put(done)
        except BaseException as exc:  # forwarded to the consumer
            q.put(exc)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.01)


