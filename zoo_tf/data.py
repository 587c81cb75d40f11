"""TensorFlow loader over the shared LMDB store: same rows, same order as zoo_torch.data.batches.

The batches are cut by ``common.batching.iter_packed`` in numpy (exactly as for
PyTorch) and handed to ``tf.data`` as the store's few packed arrays (``cat [B, n_cat]``,
``num``, ``seq``, ``label``, ``prob``), several batches per generator step, not one
tensor per field per batch: each ``Dataset.from_generator`` step costs about a
millisecond of Python.  Inside the tf.data graph the group is split back into batches
(``unbatch``) and the per-field columns are cut out (``tf.unstack`` / slices in a
``map``) into the usual ``{field: tensor, "label": tensor}`` dict.

``row_plan=True`` adds, per batch, the categorical fields' global table rows and their
sort (:func:`common.batching.row_plan`), computed in the tf.data threads:
``"_rows"`` [B, C] int64, ``"_uniq"`` [U] int64, ``"_order"`` [B C] int64, ``"_seg"``
[B C] int32 (:data:`PLAN_KEYS`).  ``FeatureEmbedding`` then looks rows up from
``_rows`` and the row-sparse optimiser sums duplicate rows with them instead of running
``tf.unique`` in the step (``zoo_tf.step.TrainStep`` picks the signature by the keys).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from common.batching import categorical_offsets, iter_packed, open_dataset, row_plan, segment_ids

PLAN_KEYS = ("_rows", "_uniq", "_order", "_seg")


def element_spec(schema, with_prob: bool = False, with_plan: bool = False) -> dict:
    spec = {}
    for f in schema.categorical:
        spec[f.name] = tf.TensorSpec([None], tf.int32)
    for f in schema.numeric:
        spec[f.name] = tf.TensorSpec([None], tf.float32)
    for f in schema.sequence:
        spec[f.name] = tf.TensorSpec([None, f.max_len], tf.int32)
    spec["label"] = tf.TensorSpec([None], tf.float32)
    if with_prob:
        spec["prob"] = tf.TensorSpec([None], tf.float32)
    if with_plan and schema.categorical:
        spec.update(plan_spec(len(schema.categorical)))
    return spec


def plan_spec(num_categorical: int) -> dict:
    return {"_rows": tf.TensorSpec([None, num_categorical], tf.int64), "_uniq": tf.TensorSpec([None], tf.int64),
            "_order": tf.TensorSpec([None], tf.int64), "_seg": tf.TensorSpec([None], tf.int32)}


def numpy_plan(cat: np.ndarray, offsets: np.ndarray) -> dict:
    """The :data:`PLAN_KEYS` arrays of one batch's packed categorical ids ``cat`` [B, C]."""
    rows, uniq, order, starts = row_plan(cat, offsets)
    return {"_rows": rows, "_uniq": uniq, "_order": order.astype(np.int64, copy=False),
            "_seg": segment_ids(starts, order.size)}


def _planner(schema):
    """A tf.data map adding the row plan (numpy sort inside ``tf.numpy_function``)."""
    offsets = categorical_offsets(schema)
    c = len(offsets)

    def plan(cat):
        p = numpy_plan(cat, offsets)
        return p["_rows"], p["_uniq"], p["_order"], p["_seg"]

    def fn(batch):
        cat = tf.stack([batch[f.name] for f in schema.categorical], 1)
        rows, uniq, order, seg = tf.numpy_function(plan, [cat], [tf.int64, tf.int64, tf.int64, tf.int32],
                                                   stateful=False)
        out = dict(batch)
        out["_rows"] = tf.ensure_shape(rows, [None, c])
        out["_uniq"] = tf.ensure_shape(uniq, [None])
        out["_order"] = tf.ensure_shape(order, [None])
        out["_seg"] = tf.ensure_shape(seg, [None])
        return out

    return fn


def _unpacker(schema, names):
    """A graph function: the packed arrays of one batch -> the field dict (the order and
    dtypes of ``common.batching.unpack``)."""
    cats = [f.name for f in schema.categorical]
    nums = [f.name for f in schema.numeric]
    seqs = [(f.name, f.max_len) for f in schema.sequence]

    def fn(*arrays):
        a = dict(zip(names, arrays))
        out = {}
        if cats:
            for name, col in zip(cats, tf.unstack(a["cat"], num=len(cats), axis=1)):
                out[name] = col
        if nums:
            for name, col in zip(nums, tf.unstack(a["num"], num=len(nums), axis=1)):
                out[name] = col
        off = 0
        for name, width in seqs:
            out[name] = a["seq"][:, off:off + width]
            off += width
        out["label"] = a["label"][:, 0]
        if "prob" in a:
            out["prob"] = a["prob"][:, 0]
        return out

    return fn


def _groups(batches, names, group: int):
    """Runs of up to ``group`` consecutive batches of one size, as ``[k, size, width]``
    arrays (one per name)."""
    buf: list = []

    def flush():
        size = len(buf[0]["label"])
        if len(buf) == 1:
            out = tuple(buf[0][n].reshape(1, size, -1) for n in names)
        else:
            out = tuple(np.concatenate([b[n] for b in buf]).reshape(len(buf), size, -1) for n in names)
        buf.clear()
        return out

    for b in batches:
        if buf and (len(b["label"]) != len(buf[0]["label"]) or len(buf) == group):
            yield flush()
        buf.append(b)
    if buf:
        yield flush()


def batches(dataset_dir, split="train", batch_size=4096, shuffle=True, seed=0, rank=0, world_size=1,
            drop_last=False, epoch=0, start_batch=0, prefetch=4, group=8, row_plan=False) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``{field: tensor, "label": tensor}`` dicts, with prefetch
    (and the :data:`PLAN_KEYS` with ``row_plan=True``).

    Each iteration of the dataset is one pass in the order of ``epoch``.  The generator
    hands over ``group`` batches per step (a ``from_generator`` step costs about a
    millisecond of Python); ``unbatch`` splits them again.
    """
    schema, store = open_dataset(dataset_dir)
    layout = [s for s in store.layout if s.width]     # zero-width arrays carry no field
    names = [s.name for s in layout]

    def gen():
        yield from _groups(iter_packed(store, split, batch_size, shuffle, seed, epoch, rank, world_size, drop_last,
                                       start_batch, arrays=tuple(names)), names, max(1, int(group)))

    signature = tuple(tf.TensorSpec([None, None, s.width], tf.as_dtype(np.dtype(s.dtype).newbyteorder("=")))
                      for s in layout)
    ds = tf.data.Dataset.from_generator(gen, output_signature=signature).unbatch()
    ds = ds.map(_unpacker(schema, names), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if row_plan and schema.categorical:
        ds = ds.map(_planner(schema), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(prefetch) if prefetch else ds
