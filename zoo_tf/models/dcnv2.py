"""DCN-V2 (Wang et al., WWW 2021): matrix cross network, optionally low-rank / mixture of experts.

    x_0     = [e_1; e_2; ...; e_F]                                   (D = F * embed_size)
    cross:  x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l                    low_rank = 0      (eq. 1)
            x_{l+1} = x_0 ⊙ (U_l (V_l^T x_l) + b_l) + x_l            low_rank = r > 0  (eq. 3)
            x_{l+1} = sum_i G_i(x_l) E_i(x_l) + x_l                  num_experts = K > 1 (eq. 4)
              E_i(x) = x_0 ⊙ (U_i tanh(C_i tanh(V_i^T x)) + b_l),  G_i(x) = softmax_i(g_i^T x)
    deep:   h = MLP(.)                                               (hidden ``mlp``, relu)
    stacked:  y = w_logit^T MLP(x_L) + b_logit
    parallel: y = w_logit^T [x_L; MLP(x_0)] + b_logit

``mlp=()`` leaves the cross network alone.
"""
import tensorflow as tf

from zoo_tf.layers.base import Dense
from zoo_tf.layers.blocks import MLP
from zoo_tf.layers.cross import CrossNetMix, CrossNetV2
from zoo_tf.models.base import CTRModel

STRUCTURES = ("parallel", "stacked")


def check_config(c) -> None:
    if c.structure not in STRUCTURES:
        raise ValueError(f"DCNv2 structure must be one of {STRUCTURES}, got {c.structure!r}")
    if c.low_rank < 0 or c.num_experts < 1 or c.cross_layers < 0:
        raise ValueError("DCNv2 needs low_rank >= 0, num_experts >= 1, cross_layers >= 0; "
                         f"got {c.low_rank}, {c.num_experts}, {c.cross_layers}")
    if c.num_experts > 1 and not c.low_rank:
        raise ValueError("DCNv2 num_experts > 1 (mixture of low-rank experts) needs low_rank > 0")


class DCNv2(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        c = config
        check_config(c)
        dim = schema.num_fields * c.embed_size
        self.embedding = self.make_embedding()
        if c.num_experts > 1:
            self.cross = CrossNetMix(dim, c.cross_layers, c.low_rank, c.num_experts)
        else:
            self.cross = CrossNetV2(dim, c.cross_layers, c.low_rank)
        self.dnn = MLP(dim, c.mlp, c.activation, c.dropout, c.batch_norm) if c.mlp else None
        deep = self.dnn.out_dim if self.dnn is not None else 0
        self.output = Dense(deep if c.structure == "stacked" and deep else dim + deep, 1)

    def __call__(self, batch, training=False):
        x0 = tf.reshape(self.embedding(batch), [-1, self.schema.num_fields * self.config.embed_size])
        x = self.cross(x0)
        if self.dnn is not None and self.config.structure == "stacked":
            x = self.dnn(x, training=training)
        elif self.dnn is not None:
            x = tf.concat([x, self.dnn(x0, training=training)], 1)
        return tf.squeeze(self.output(x), -1)
