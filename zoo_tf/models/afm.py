"""Attentional Factorization Machine (Xiao et al., IJCAI 2017).

    y(x) = w_0 + sum_i w_i x_i + p^T sum_{i<j} a_ij (v_i (.) v_j) x_i x_j
    a'_ij = h^T ReLU( W (v_i (.) v_j) x_i x_j + b ),      a_ij = exp(a'_ij) / sum_{i<j} exp(a'_ij)

e_i = v_i x_i are the field embeddings ([B, F, d], numeric fields x_i v_i, sequences mean-pooled),
W [d, A] with A = ``attention_size``, h [A, 1], p [d, 1]; ``attention_dropout`` is the dropout on the
attention-pooled interaction vector (see zoo_tf/layers/attention.py).
"""
from zoo_tf.layers.attention import AttentionalPooling
from zoo_tf.layers.embeddings import LinearPart
from zoo_tf.models.base import CTRModel


class AFM(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        c = config
        self.linear = LinearPart(schema)
        self.embedding = self.make_embedding()
        self.afm = AttentionalPooling(schema.num_fields, c.embed_size, c.attention_size, c.attention_dropout)

    def __call__(self, batch, training=False):
        return self.linear(batch) + self.afm(self.embedding(batch), training=training)
