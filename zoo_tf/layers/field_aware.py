"""Field-aware embeddings and the field-aware pairwise term of FFM (Juan et al., RecSys 2016).

Mirror of ``zoo_torch/layers/field_aware.py`` (see there for the equations): one offset table
``[total_vocab, F*d]``; ``tf.gather`` gives row-sparse ``IndexedSlices`` gradients.

FFMInteraction:  sum_{i<j} <v_{i,f_j}, v_{j,f_i}> = sum_{i<j} <V[:, i, j], V[:, j, i]>.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from zoo_tf.layers.base import Module
from zoo_tf.layers.embeddings import FeatureEmbedding


class FieldAwareEmbedding(FeatureEmbedding):
    """[B, F, F, d] field-aware embeddings: out[:, i, f] = v_{i,f}."""

    def __init__(self, schema, dim: int, init_std: float = 1e-4, sparse: bool = True):
        super().__init__(schema, schema.num_fields * dim, init_std=init_std, sparse=sparse)
        self.num_fields, self.field_dim = schema.num_fields, dim

    def __call__(self, batch, training=False):
        e = super().__call__(batch, training=training)                # [B, F, F*d]
        return tf.reshape(e, [-1, self.num_fields, self.num_fields, self.field_dim])


class FFMInteraction(Module):
    """[B, F, F, d] -> [B]: sum_{i<j} <V[:, i, j], V[:, j, i]>, one gather of the F(F-1)/2 pairs."""

    def __init__(self, num_fields: int):
        super().__init__()
        self.num_fields = num_fields
        i, j = np.triu_indices(num_fields, 1)
        self._ij = tf.constant(i * num_fields + j, dtype=tf.int64)        # flat index of v_{i,f_j}
        self._ji = tf.constant(j * num_fields + i, dtype=tf.int64)        # flat index of v_{j,f_i}

    def __call__(self, v, training=False):
        v = tf.reshape(v, [-1, self.num_fields * self.num_fields, v.shape[-1]])
        return tf.reduce_sum(tf.gather(v, self._ij, axis=1) * tf.gather(v, self._ji, axis=1), [1, 2])
