"""Feature embeddings over ONE offset table (all categorical/sequence groups), row-sparse gradients.

For a batch with F fields (categorical, numeric, sequence, in schema order):

    e_i = E[offset(g_i) + x_i]                    categorical field i (table group g_i)
    e_i = x_i * v_i                               numeric field i (scalar times a learned vector)
    e_i = mean_{t: s_it != 0} E[offset(g_i) + s_it]   sequence field i (masked mean pooling)

``FeatureEmbedding`` returns ``[B, F, d]``; ``LinearPart`` is the first-order term
``w_0 + sum_i w[x_i]`` (numeric: ``w_i * x_i``) with the same layout and d = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo_torch.layers.base import ConstIndex, Module
from zoo_torch.optim import publish_row_sort


class FieldIndex:
    """Turns a batch dict into global row indices of the offset table."""

    def __init__(self, schema):
        offs = schema.group_offsets()
        self.cat_names = [f.name for f in schema.categorical]
        self.num_names = [f.name for f in schema.numeric]
        self.seq_names = [f.name for f in schema.sequence]
        self.cat_offsets = ConstIndex([offs[f.embedding_group] for f in schema.categorical])
        self.row_key = (tuple(self.cat_names), tuple(int(o) for o in self.cat_offsets.cpu))
        self.seq_offsets = [offs[f.embedding_group] for f in schema.sequence]
        self.total_rows = schema.total_vocab
        self.n_num = len(self.num_names)

    def categorical(self, batch):
        rows = getattr(batch, "cat_rows", None)       # precomputed by zoo_torch.data (same values)
        if rows is not None and batch.row_key == self.row_key and rows.device == batch[self.cat_names[0]].device:
            publish_row_sort(rows, batch.row_sort)
            return rows
        idx = torch.stack([batch[n] for n in self.cat_names], 1).to(torch.int64)
        return idx + self.cat_offsets.on(idx.device)

    def numeric(self, batch):
        return torch.stack([batch[n] for n in self.num_names], 1).to(torch.float32)


class FeatureEmbedding(Module):
    """[B, F, d] field embeddings; ``weight`` is the offset table [total_vocab, d] (sparse grads)."""

    # runs eagerly inside a torch.compile'd model (zoo_torch.step.CompiledForward): the lookups'
    # row-sparse gradients and the loader's row plan (publish_row_sort) are what the optimiser uses
    eager_under_compile = True

    def __init__(self, schema, dim: int, init_std: float = 1e-4, sparse: bool = True):
        super().__init__()
        self.index = FieldIndex(schema)
        self.dim, self.sparse = dim, sparse
        self.add_param("weight", (max(self.index.total_rows, 1), dim), f"normal:{init_std}", sparse=sparse)
        if self.index.n_num:
            self.add_param("numeric", (self.index.n_num, dim), f"normal:{init_std}")
        self._lookups = []         # the looked-up rows of the last forward (for the L2 penalty)

    def lookup(self, idx):
        return F.embedding(idx, self.weight, sparse=self.sparse)

    @property
    def last_sq_norm(self):
        """Sum of the squared embedding rows looked up in the last forward (computed on demand, so a
        model without embedding L2 never pays for it); None before the first forward."""
        if not self._lookups:
            return None
        return sum(torch.linalg.vector_norm(x).square() for x in self._lookups)

    def forward(self, batch):
        parts, looked = [], []
        if self.index.cat_names:
            e = self.lookup(self.index.categorical(batch))
            parts.append(e)
            looked.append(e)
        if self.index.n_num:
            parts.append(self.index.numeric(batch).unsqueeze(-1) * self.numeric)
        for name, off in zip(self.index.seq_names, self.index.seq_offsets):
            e, rows = self.pool_sequence(batch[name], off)
            parts.append(e)
            looked.append(rows)
        self._lookups = looked
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def pool_sequence(self, seq, offset):
        """([B, 1, d] masked mean, [B, L, d] masked rows)."""
        seq = seq.to(torch.int64)
        mask = (seq != 0).to(torch.float32).unsqueeze(-1)            # [B, L, 1]
        e = self.lookup(seq + offset) * mask                          # [B, L, d]
        pooled = e.sum(1) / mask.sum(1).clamp(min=1.0)
        return pooled.unsqueeze(1), e


class LinearPart(Module):
    """First-order term: w_0 + sum_i w[x_i] + sum_j w_j * x_j  ->  [B]."""

    def __init__(self, schema, sparse: bool = True):
        super().__init__()
        self.emb = FeatureEmbedding(schema, 1, init_std=0.0, sparse=sparse)
        self.emb.weight.zoo_init = "zeros"
        if self.emb.index.n_num:
            self.emb.numeric.zoo_init = "zeros"
        self.add_param("bias", (1,), "zeros", regularize=False)

    def forward(self, batch):
        return self.emb(batch).sum((1, 2)) + self.bias
