"""Deep & Cross Network (Wang et al., ADKDD 2017).

    x_0     = [e_1; e_2; ...; e_F]                       (D = F * embed_size)
    cross:  x_{l+1} = x_0 x_l^T w_l + b_l + x_l,         l = 0 .. cross_layers-1
    deep:   h_{l+1} = relu(W_l h_l + b_l),               h_0 = x_0   (hidden ``mlp``)
    y       = w_logit^T [x_L; h_L] + b_logit

Cross and deep networks run in parallel on the same x_0; ``mlp=()`` leaves the cross network alone.
"""
import torch

from zoo_torch.layers.base import Dense
from zoo_torch.layers.blocks import MLP
from zoo_torch.layers.cross import CrossNet
from zoo_torch.models.base import CTRModel


class DCN(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        c = config
        dim = schema.num_fields * c.embed_size
        self.embedding = self.make_embedding()
        self.cross = CrossNet(dim, c.cross_layers)
        self.dnn = MLP(dim, c.mlp, c.activation, c.dropout, c.batch_norm) if c.mlp else None
        self.output = Dense(dim + (self.dnn.out_dim if self.dnn is not None else 0), 1)

    def forward(self, batch):
        x0 = self.embedding(batch).flatten(1)
        parts = [self.cross(x0)] + ([self.dnn(x0)] if self.dnn is not None else [])
        return self.output(torch.cat(parts, 1) if len(parts) > 1 else parts[0]).squeeze(-1)
