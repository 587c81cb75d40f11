"""Base class of every zoo model: schema + config in, logits [B] out, one L2 penalty definition."""
from __future__ import annotations

import tensorflow as tf

from zoo_tf.layers.base import Module
from zoo_tf.layers.embeddings import FeatureEmbedding


class CTRModel(Module):
    def __init__(self, schema, config):
        super().__init__()
        self._schema = schema
        self._config = config

    @property
    def schema(self):
        return self._schema

    @property
    def config(self):
        return self._config

    def make_embedding(self, dim: int | None = None) -> FeatureEmbedding:
        c = self._config
        return FeatureEmbedding(self._schema, dim or c.embed_size, init_std=c.embedding_init_std)

    def penalty(self, batch_size):
        """Same definition as zoo_torch.models.base.CTRModel.penalty."""
        c = self._config
        total = 0.0
        if c.l2:
            for _, owner, attr in self.zoo_named():
                meta = owner._meta()[attr]
                if meta["regularize"] and not meta["sparse"] and not meta["state"]:
                    v = getattr(owner, attr)
                    total = total + c.l2 * tf.reduce_sum(v * v)
        if c.l2_embedding:
            for _, m in self.zoo_modules():
                if isinstance(m, FeatureEmbedding) and m.last_sq_norm is not None:
                    total = total + c.l2_embedding * m.last_sq_norm / tf.cast(batch_size, tf.float32)
        return total
