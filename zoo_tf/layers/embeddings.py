"""Feature embeddings over ONE offset table (all categorical/sequence groups), row-sparse gradients.

Mirror of ``zoo_torch/layers/embeddings.py`` (see there for the equations).
``tf.gather`` gives ``IndexedSlices`` gradients, i.e. only touched rows.
"""
from __future__ import annotations

import tensorflow as tf

from zoo_tf.layers.base import Module
from zoo_tf.optim import register_row_plan


class FieldIndex:
    def __init__(self, schema):
        offs = schema.group_offsets()
        self.cat_names = [f.name for f in schema.categorical]
        self.num_names = [f.name for f in schema.numeric]
        self.seq_names = [f.name for f in schema.sequence]
        self.cat_offsets = tf.constant([offs[f.embedding_group] for f in schema.categorical], dtype=tf.int64)
        self.seq_offsets = [offs[f.embedding_group] for f in schema.sequence]
        self.total_rows = schema.total_vocab
        self.n_num = len(self.num_names)

    def categorical(self, batch):
        if "_rows" in batch and batch["_rows"].shape[-1] == len(self.cat_names):
            rows = batch["_rows"]       # precomputed by the loader from the same schema (zoo_tf.data PLAN_KEYS)
            register_row_plan(rows, batch["_uniq"], batch["_order"], batch["_seg"])
            return rows
        idx = tf.cast(tf.stack([batch[n] for n in self.cat_names], 1), tf.int64)
        return idx + self.cat_offsets

    def numeric(self, batch):
        return tf.cast(tf.stack([batch[n] for n in self.num_names], 1), tf.float32)


class FeatureEmbedding(Module):
    """[B, F, d] field embeddings; ``weight`` is the offset table [total_vocab, d]."""

    def __init__(self, schema, dim: int, init_std: float = 1e-4, sparse: bool = True):
        super().__init__()
        self._index = FieldIndex(schema)
        self.dim, self.sparse = dim, sparse
        self.add_param("weight", (max(self._index.total_rows, 1), dim), f"normal:{init_std}", sparse=sparse)
        if self._index.n_num:
            self.add_param("numeric", (self._index.n_num, dim), f"normal:{init_std}")
        self._lookups = []         # the looked-up rows of the last call (for the L2 penalty)

    @property
    def index(self):
        return self._index

    @property
    def last_sq_norm(self):
        """Sum of the squared rows looked up in the last call, computed on demand (None before one)."""
        if not self._lookups:
            return None
        return tf.add_n([tf.reduce_sum(tf.square(x)) for x in self._lookups])

    def lookup(self, idx):
        return tf.gather(self.weight, idx)

    def __call__(self, batch, training=False):
        parts, looked = [], []
        ix = self._index
        if ix.cat_names:
            e = self.lookup(ix.categorical(batch))
            parts.append(e)
            looked.append(e)
        if ix.n_num:
            parts.append(ix.numeric(batch)[:, :, None] * self.numeric)
        for name, off in zip(ix.seq_names, ix.seq_offsets):
            e, rows = self.pool_sequence(batch[name], off)
            parts.append(e)
            looked.append(rows)
        self._lookups = looked
        return tf.concat(parts, 1) if len(parts) > 1 else parts[0]

    def pool_sequence(self, seq, offset):
        """([B, 1, d] masked mean, [B, L, d] masked rows)."""
        seq = tf.cast(seq, tf.int64)
        mask = tf.cast(seq != 0, tf.float32)[:, :, None]
        e = self.lookup(seq + offset) * mask
        pooled = tf.reduce_sum(e, 1) / tf.maximum(tf.reduce_sum(mask, 1), 1.0)
        return pooled[:, None, :], e


class LinearPart(Module):
    """First-order term: w_0 + sum_i w[x_i] + sum_j w_j * x_j  ->  [B]."""

    def __init__(self, schema, sparse: bool = True):
        super().__init__()
        self.emb = FeatureEmbedding(schema, 1, init_std=0.0, sparse=sparse)
        self.emb._meta()["weight"]["init"] = "zeros"
        if self.emb.index.n_num:
            self.emb._meta()["numeric"]["init"] = "zeros"
        self.add_param("bias", (1,), "zeros", regularize=False)

    def __call__(self, batch, training=False):
        return tf.reduce_sum(self.emb(batch), [1, 2]) + self.bias
