"""Field-aware Factorization Machine (Juan et al., RecSys 2016).

    y(x) = w_0 + sum_i w_i x_i + sum_{i<j} <v_{i,f_j}, v_{j,f_i}> x_i x_j

Each field i has one latent vector v_{i,f} per other field f (``embed_size`` = d, 4 by
default); the pair (i, j) uses the vector of i meant for j's field and vice versa.
"""
from zoo_tf.layers.embeddings import LinearPart
from zoo_tf.layers.field_aware import FFMInteraction, FieldAwareEmbedding
from zoo_tf.models.base import CTRModel


class FFM(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        c = config
        self.linear = LinearPart(schema)
        self.embedding = FieldAwareEmbedding(schema, c.embed_size, init_std=c.embedding_init_std)
        self.ffm = FFMInteraction(schema.num_fields)

    def __call__(self, batch, training=False):
        return self.linear(batch) + self.ffm(self.embedding(batch))
