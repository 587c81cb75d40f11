"""xDeepFM (Lian et al., KDD 2018): linear + Compressed Interaction Network + DNN.

    y = sigmoid( y_linear + y_CIN + y_DNN )
    y_linear = w_0 + sum_i w_i x_i
    y_CIN    = w_cin^T [p^1; ...; p^T],   p^k_h = sum_d X^k_{h,d}
               X^k_{h,*} = sum_i sum_j W^{k,h}_{ij} (X^{k-1}_{i,*} o X^0_{j,*}),   X^0 = [e_1; ...; e_m]
    y_DNN    = MLP( [e_1; ...; e_m] )          (hidden ``mlp``, output 1)

``cin_layers`` = (H_1, ..., H_T); ``cin_split_half``: in every layer but the last, half the
feature maps go on to the next layer and the other half are pooled into the output.
An empty ``mlp`` drops the DNN, an empty ``cin_layers`` the CIN.
"""
import tensorflow as tf

from zoo_tf.layers.base import Dense
from zoo_tf.layers.blocks import MLP
from zoo_tf.layers.cin import CIN
from zoo_tf.layers.embeddings import LinearPart
from zoo_tf.models.base import CTRModel


class xDeepFM(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        c = config
        f = schema.num_fields
        self.linear = LinearPart(schema)
        self.embedding = self.make_embedding()
        self.cin = CIN(f, c.cin_layers, c.cin_split_half) if c.cin_layers else None
        self.cin_out = Dense(self.cin.out_dim, 1, use_bias=False) if c.cin_layers else None
        self.dnn = MLP(f * c.embed_size, c.mlp, c.activation, c.dropout, c.batch_norm, out_dim=1) if c.mlp else None

    def __call__(self, batch, training=False):
        e = self.embedding(batch)
        y = self.linear(batch)
        if self.cin is not None:
            y = y + tf.squeeze(self.cin_out(self.cin(e)), -1)
        if self.dnn is not None:
            y = y + tf.squeeze(self.dnn(tf.reshape(e, [-1, e.shape[1] * e.shape[2]]), training=training), -1)
        return y
