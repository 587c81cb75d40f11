"""DeepModel -- the MLP recommender of AutoLossGen (SIGIR'22).

    h_0 = [e_1; e_2; ...; e_F]                                   (all field embeddings, concatenated)
    h_l = Dropout( ReLU( BN( h_{l-1} W_l + b_l ) ) ),  l = 1, 2   (widths 64, 16)
    y   = h_2 w_o + b_o                                          (logit)

Mirror of ``zoo_torch/models/deepmodel.py``.
"""
import tensorflow as tf

from zoo_tf.layers.blocks import MLP
from zoo_tf.models.base import CTRModel


class DeepModel(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        c = config
        self.embedding = self.make_embedding()
        self.dnn = MLP(schema.num_fields * c.embed_size, c.mlp, c.activation, c.dropout, c.batch_norm, out_dim=1)

    def __call__(self, batch, training=False):
        e = self.embedding(batch)
        flat = tf.reshape(e, [-1, e.shape[1] * e.shape[2]])
        return tf.squeeze(self.dnn(flat, training=training), -1)
