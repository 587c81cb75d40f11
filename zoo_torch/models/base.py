"""Base class of every zoo model: schema + config in, logits [B] out, one L2 penalty definition."""
from __future__ import annotations

from zoo_torch.layers.base import Module
from zoo_torch.layers.embeddings import FeatureEmbedding


class CTRModel(Module):
    def __init__(self, schema, config):
        super().__init__()
        self.schema = schema
        self.config = config

    def make_embedding(self, dim: int | None = None) -> FeatureEmbedding:
        c = self.config
        return FeatureEmbedding(self.schema, dim or c.embed_size, init_std=c.embedding_init_std)

    def penalty(self, batch_size: int):
        """l2 * sum ||W||^2 over regularised dense parameters
        + l2_embedding * (sum of squared embedding rows looked up in the last forward) / batch_size."""
        c = self.config
        total = 0.0
        if c.l2:
            for p in self.parameters():
                if p.zoo_regularize and not p.zoo_sparse:
                    total = total + c.l2 * (p * p).sum()
        if c.l2_embedding:
            for m in self.modules():
                if isinstance(m, FeatureEmbedding) and m.last_sq_norm is not None:
                    total = total + c.l2_embedding * m.last_sq_norm / batch_size
        return total
