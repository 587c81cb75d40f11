"""PyTorch loader over the shared LMDB store: same rows, same order as zoo_tf.data.batches.

Each batch is a :class:`Batch` -- a plain ``{field: tensor, "label": tensor}`` dict that also
carries, as attributes, the categorical fields' global table rows and their sort
(:func:`common.batching.row_plan`), computed in the prefetch thread.  ``FeatureEmbedding``
looks rows up from ``batch.cat_rows`` and the row-sparse optimiser reuses ``batch.row_sort``
instead of sorting the gradient's indices in the step.  A plain dict (or a copy) works the
same, only without the head start.
"""
from __future__ import annotations

import torch

from common.batching import categorical_offsets, iter_packed, num_batches, open_dataset, prefetch, row_plan, unpack


class Batch(dict):
    """A batch dict with the precomputed ``cat_rows`` [b, C] int64 and ``row_sort`` (uniq, order, starts);
    ``row_key`` = (categorical field names, their table offsets) says which table layout they are for."""

    cat_rows = None
    row_sort = None
    row_key = None


def _tensor(a):
    # LMDB-backed arrays are read-only views; torch wants writable memory
    return torch.from_numpy(a if a.flags.writeable else a.copy())


class Batches:
    """Iterable of ``{field: tensor, "label": tensor}`` dicts with background prefetch.

    Each ``iter()`` is one pass (epoch ``epoch``); call ``set_epoch(e)`` to change
    the shuffle order between passes, as with DistributedSampler.
    """

    def __init__(self, dataset_dir, split="train", batch_size=4096, shuffle=True, seed=0, rank=0,
                 world_size=1, drop_last=False, epoch=0, start_batch=0, prefetch=4, row_plan=True):
        self.schema, self.store = open_dataset(dataset_dir)
        self.row_plan = row_plan
        self.kw = dict(split=split, batch_size=batch_size, shuffle=shuffle, seed=seed, rank=rank,
                       world_size=world_size, drop_last=drop_last)
        self.epoch, self.start_batch, self.prefetch = epoch, start_batch, prefetch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        rows = self.store.rows(self.kw["split"])
        return num_batches(rows, self.kw["batch_size"], self.kw["drop_last"]) - self.start_batch

    def _gen(self):
        offsets = categorical_offsets(self.schema) if self.row_plan and self.schema.categorical else None
        key = (tuple(f.name for f in self.schema.categorical), tuple(int(o) for o in offsets)) \
            if offsets is not None else None
        for packed in iter_packed(self.store, epoch=self.epoch, start_batch=self.start_batch, **self.kw):
            batch = Batch(unpack(self.schema, packed, _tensor))
            if offsets is not None:
                rows, uniq, order, starts = row_plan(packed["cat"], offsets)
                batch.cat_rows, batch.row_key = torch.from_numpy(rows), key
                batch.row_sort = (torch.from_numpy(uniq), torch.from_numpy(order), torch.from_numpy(starts))
            yield batch

    def __iter__(self):
        return prefetch(self._gen(), self.prefetch)


def batches(dataset_dir, split="train", batch_size=4096, shuffle=True, seed=0, rank=0, world_size=1,
            drop_last=False, epoch=0, start_batch=0, prefetch=4, row_plan=True) -> Batches:
    """``row_plan=False``: plain batches (the step then sorts the rows itself)."""
    return Batches(dataset_dir, split, batch_size, shuffle, seed, rank, world_size, drop_last, epoch,
                   start_batch, prefetch, row_plan)
