"""DeepModel -- the MLP recommender of AutoLossGen (SIGIR'22).

    h_0 = [e_1; e_2; ...; e_F]                                   (all field embeddings, concatenated)
    h_l = Dropout( ReLU( BN( h_{l-1} W_l + b_l ) ) ),  l = 1, 2   (widths 64, 16)
    y   = h_2 w_o + b_o                                          (logit)

On ml100k01-1-5 the fields are exactly the user and the item, as in the paper.
"""
from zoo_torch.layers.blocks import MLP
from zoo_torch.models.base import CTRModel


class DeepModel(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        c = config
        self.embedding = self.make_embedding()
        self.dnn = MLP(schema.num_fields * c.embed_size, c.mlp, c.activation, c.dropout, c.batch_norm, out_dim=1)

    def forward(self, batch):
        return self.dnn(self.embedding(batch).flatten(1)).squeeze(-1)
