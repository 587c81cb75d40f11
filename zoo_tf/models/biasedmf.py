"""BiasedMF -- matrix factorisation with biases (Koren et al. 2009), a recommender of AutoLossGen (SIGIR'22).

    y(u, i) = <e_u, e_i> + b_u + b_i + g          (logit; the probability is sigmoid(y))

Mirror of ``zoo_torch/models/biasedmf.py``: user and item are the schema's
FIRST TWO categorical fields; other fields are ignored.
"""
import tensorflow as tf

from common.schema import Schema
from zoo_tf.layers.embeddings import FeatureEmbedding, LinearPart
from zoo_tf.models.base import CTRModel


def user_item_schema(schema) -> Schema:
    """The sub-schema of the first two categorical fields (user, item)."""
    cat = schema.categorical
    if len(cat) < 2:
        raise ValueError(f"{schema.name or 'this schema'} needs two categorical fields (user, item); "
                         f"it has {len(cat)}")
    return Schema(fields=list(cat[:2]), labels=list(schema.labels), name=schema.name, format=schema.format)


class BiasedMF(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        ui = user_item_schema(schema)
        self.embedding = FeatureEmbedding(ui, config.embed_size, init_std=config.embedding_init_std)
        self.linear = LinearPart(ui)

    def __call__(self, batch, training=False):
        e = self.embedding(batch)                       # [B, 2, d]
        return tf.reduce_sum(e[:, 0] * e[:, 1], -1) + self.linear(batch)
