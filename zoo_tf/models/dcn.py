"""Deep & Cross Network (Wang et al., ADKDD 2017).

    x_0     = [e_1; e_2; ...; e_F]                       (D = F * embed_size)
    cross:  x_{l+1} = x_0 x_l^T w_l + b_l + x_l,         l = 0 .. cross_layers-1
    deep:   h_{l+1} = relu(W_l h_l + b_l),               h_0 = x_0   (hidden ``mlp``)
    y       = w_logit^T [x_L; h_L] + b_logit

Cross and deep networks run in parallel on the same x_0; ``mlp=()`` leaves the cross network alone.
"""
import tensorflow as tf

from zoo_tf.layers.base import Dense
from zoo_tf.layers.blocks import MLP
from zoo_tf.layers.cross import CrossNet
from zoo_tf.models.base import CTRModel


class DCN(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        c = config
        dim = schema.num_fields * c.embed_size
        self.embedding = self.make_embedding()
        self.cross = CrossNet(dim, c.cross_layers)
        self.dnn = MLP(dim, c.mlp, c.activation, c.dropout, c.batch_norm) if c.mlp else None
        self.output = Dense(dim + (self.dnn.out_dim if self.dnn is not None else 0), 1)

    def __call__(self, batch, training=False):
        x0 = tf.reshape(self.embedding(batch), [-1, self.schema.num_fields * self.config.embed_size])
        parts = [self.cross(x0)] + ([self.dnn(x0, training=training)] if self.dnn is not None else [])
        return tf.squeeze(self.output(tf.concat(parts, 1) if len(parts) > 1 else parts[0]), -1)
