"""PyTorch loader over the shared LMDB store: same rows, same order as zoo_tf.data.batches.

Each batch is a :class:`Batch` -- a plain ``{field: tensor, "label": tensor}`` dict that also
carries, as attributes, the categorical fields' global table rows and their sort
(:func:`common.batching.row_plan`), computed in the prefetch thread.  ``FeatureEmbedding``
looks rows up from ``batch.cat_rows`` and the row-sparse optimiser reuses ``batch.row_sort``
instead of sorting the gradient's indices in the step.  A plain dict (or a copy) works the
same, only without the head start.

``device="cuda"`` delivers batches already on the GPU: the prefetch thread copies each packed
batch into page-locked memory, sends it with one asynchronous copy per packed array on a side
stream, and computes the rows and their sort there (``torch.sort`` on the GPU; a numpy sort of
8192 x 39 rows would take the CPU longer than the GPU's whole training step).  The training
stream waits on an event, never on the host, so the copy and the sort overlap the previous step.
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


_TORCH_DTYPES = {"i4": torch.int32, "i8": torch.int64, "f4": torch.float32, "f8": torch.float64,
                 "u1": torch.uint8, "i2": torch.int16, "b1": torch.bool}


def _tensor(a):
    # LMDB-backed arrays are read-only views; torch wants writable memory
    return torch.from_numpy(a if a.flags.writeable else a.copy())


class Batches:
    """Iterable of ``{field: tensor, "label": tensor}`` dicts with background prefetch.

    Each ``iter()`` is one pass (epoch ``epoch``); call ``set_epoch(e)`` to change
    the shuffle order between passes, as with DistributedSampler.
    """

    def __init__(self, dataset_dir, split="train", batch_size=4096, shuffle=True, seed=0, rank=0,
                 world_size=1, drop_last=False, epoch=0, start_batch=0, prefetch=4, row_plan=True, device=None):
        self.schema, self.store = open_dataset(dataset_dir)
        self.row_plan = row_plan
        self.device = torch.device(device if device is not None else "cpu")
        self.kw = dict(split=split, batch_size=batch_size, shuffle=shuffle, seed=seed, rank=rank,
                       world_size=world_size, drop_last=drop_last)
        self.epoch, self.start_batch, self.prefetch = epoch, start_batch, prefetch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        rows = self.store.rows(self.kw["split"])
        return num_batches(rows, self.kw["batch_size"], self.kw["drop_last"]) - self.start_batch

    def _gen(self):
        offsets, key = self._offsets_and_key()
        for packed in iter_packed(self.store, epoch=self.epoch, start_batch=self.start_batch, **self.kw):
            batch = Batch(unpack(self.schema, packed, _tensor))
            if offsets is not None:
                rows, uniq, order, starts = row_plan(packed["cat"], offsets)
                batch.cat_rows, batch.row_key = torch.from_numpy(rows), key
                batch.row_sort = (torch.from_numpy(uniq), torch.from_numpy(order), torch.from_numpy(starts))
            yield batch

    def _offsets_and_key(self):
        if not (self.row_plan and self.schema.categorical):
            return None, None
        offsets = categorical_offsets(self.schema)
        return offsets, (tuple(f.name for f in self.schema.categorical), tuple(int(o) for o in offsets))

    def _gen_cuda(self):
        """(batch on the GPU, event that its copies and row sort are done) -- runs in the prefetch thread."""
        dev = self.device
        side = torch.cuda.Stream(dev)
        offsets, key = self._offsets_and_key()
        with torch.cuda.stream(side):
            offs = torch.from_numpy(offsets).to(dev) if offsets is not None else None
        for packed in iter_packed(self.store, epoch=self.epoch, start_batch=self.start_batch, **self.kw):
            with torch.cuda.stream(side):
                batch = self._cuda_batch(packed, offs, key)
                done = torch.cuda.Event()
                done.record(side)
            yield batch, done

    def _cuda_batch(self, packed, offs, key) -> Batch:
        from zoo_torch.optim import sort_runs_torch

        g = {}
        for name, a in packed.items():       # page-locked staging, then one asynchronous copy per array
            pinned = torch.empty(a.shape, dtype=_TORCH_DTYPES[a.dtype.str[1:]], pin_memory=True)
            pinned.numpy()[...] = a
            g[name] = pinned.to(self.device, non_blocking=True)
        # one transposing copy stores cat / num column-major: every field's column is then a contiguous view
        cols = {x: (t.t().contiguous().t() if x in ("cat", "num") else t) for x, t in g.items()}
        batch = Batch(unpack(self.schema, cols, contiguous=torch.Tensor.contiguous))
        if offs is not None:
            rows = g["cat"].to(torch.int64) + offs          # row-major, as the CPU loader's rows
            batch.cat_rows, batch.row_key = rows, key
            batch.row_sort = sort_runs_torch(rows.view(-1))
        return batch

    def _iter_cuda(self):
        for batch, done in prefetch(self._gen_cuda(), self.prefetch):
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            # the tensors were made on the side stream: keep the allocator from reusing their memory
            # before this stream is done with them
            for t in (*batch.values(), batch.cat_rows, *(batch.row_sort or ())):
                if t is not None:
                    t.record_stream(stream)
            yield batch

    def __iter__(self):
        if self.device.type == "cuda":
            return self._iter_cuda()
        return prefetch(self._gen(), self.prefetch)


def batches(dataset_dir, split="train", batch_size=4096, shuffle=True, seed=0, rank=0, world_size=1,
            drop_last=False, epoch=0, start_batch=0, prefetch=4, row_plan=True, device=None) -> Batches:
    """``row_plan=False``: plain batches (the step then sorts the rows itself).  ``device``: where the
    batches are delivered (default the CPU; a CUDA device: copied and row-sorted in the prefetch thread)."""
    return Batches(dataset_dir, split, batch_size, shuffle, seed, rank, world_size, drop_last, epoch,
                   start_batch, prefetch, row_plan, device)
