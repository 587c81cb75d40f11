"""DeepFM (Guo et al., IJCAI 2017): FM and a DNN over the same shared embeddings.

    y = sigmoid( y_FM + y_DNN )
    y_FM  = w_0 + sum_i w_i x_i + sum_{i<j} <e_i, e_j>
    y_DNN = MLP( [e_1; e_2; ...; e_F] )         (hidden 400-400-400, output 1)
"""
import tensorflow as tf

from zoo_tf.layers.blocks import MLP
from zoo_tf.layers.embeddings import LinearPart
from zoo_tf.layers.interactions import FMInteraction
from zoo_tf.models.base import CTRModel


class DeepFM(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        c = config
        self.linear = LinearPart(schema)
        self.embedding = self.make_embedding()
        self.fm = FMInteraction()
        self.dnn = MLP(schema.num_fields * c.embed_size, c.mlp, c.activation, c.dropout, c.batch_norm, out_dim=1)

    def __call__(self, batch, training=False):
        e = self.embedding(batch)
        y_fm, e = self.fm.share(e)            # the DNN reads the same e
        flat = tf.reshape(e, [-1, e.shape[1] * e.shape[2]])
        return self.linear(batch) + y_fm + tf.squeeze(self.dnn(flat, training=training), -1)
