"""Field-aware embeddings and the field-aware pairwise term of FFM (Juan et al., RecSys 2016).

Every feature has one latent vector per *target* field: v_{i,f} in R^d, f = 1..F.  All of
them live in ONE offset table ``[total_vocab, F*d]`` (row = a feature, columns = its F
field-aware vectors), so a lookup stays row-sparse exactly as in layers/embeddings.py:

    V[:, i, f] = v_{i,f}     = E[offset(g_i) + x_i].reshape(F, d)[f]           categorical field i
                             = x_i * n_i.reshape(F, d)[f]                       numeric field i
                             = mean_{t: s_it != 0} E[offset(g_i) + s_it].reshape(F, d)[f]   sequence i

FFMInteraction:  sum_{i<j} <v_{i,f_j}, v_{j,f_i}> = sum_{i<j} <V[:, i, j], V[:, j, i]>.
"""
from __future__ import annotations

import numpy as np

from zoo_torch.layers.base import ConstIndex, Module
from zoo_torch.layers.embeddings import FeatureEmbedding


class FieldAwareEmbedding(FeatureEmbedding):
    """[B, F, F, d] field-aware embeddings: out[:, i, f] = v_{i,f}.

    ``weight`` is the offset table [total_vocab, F*d] (sparse grads), ``numeric`` is [n_num, F*d];
    a FeatureEmbedding of width F*d, so pooling, sparse lookups and the L2 term are shared.
    """

    def __init__(self, schema, dim: int, init_std: float = 1e-4, sparse: bool = True):
        super().__init__(schema, schema.num_fields * dim, init_std=init_std, sparse=sparse)
        self.num_fields, self.field_dim = schema.num_fields, dim

    def forward(self, batch):
        e = super().forward(batch)                                    # [B, F, F*d]
        return e.reshape(-1, self.num_fields, self.num_fields, self.field_dim)


class FFMInteraction(Module):
    """[B, F, F, d] -> [B]: sum_{i<j} <V[:, i, j], V[:, j, i]>, one gather of the F(F-1)/2 pairs."""

    def __init__(self, num_fields: int):
        super().__init__()
        self.num_fields = num_fields
        i, j = np.triu_indices(num_fields, 1)
        self.ij = ConstIndex(i * num_fields + j)      # flat index of v_{i,f_j}
        self.ji = ConstIndex(j * num_fields + i)      # flat index of v_{j,f_i}

    def forward(self, v):
        v = v.reshape(v.shape[0], self.num_fields * self.num_fields, v.shape[-1])
        return (v.index_select(1, self.ij.on(v.device)) * v.index_select(1, self.ji.on(v.device))).sum((1, 2))
