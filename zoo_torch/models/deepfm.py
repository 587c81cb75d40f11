"""DeepFM (Guo et al., IJCAI 2017): FM and a DNN over the same shared embeddings.

    y = sigmoid( y_FM + y_DNN )
    y_FM  = w_0 + sum_i w_i x_i + sum_{i<j} <e_i, e_j>
    y_DNN = MLP( [e_1; e_2; ...; e_F] )         (hidden 400-400-400, output 1)
"""
from zoo_torch.layers.blocks import MLP
from zoo_torch.layers.embeddings import LinearPart
from zoo_torch.layers.interactions import FMInteraction
from zoo_torch.models.base import CTRModel


class DeepFM(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        c = config
        self.linear = LinearPart(schema)
        self.embedding = self.make_embedding()
        self.fm = FMInteraction()
        self.dnn = MLP(schema.num_fields * c.embed_size, c.mlp, c.activation, c.dropout, c.batch_norm, out_dim=1)

    def forward(self, batch):
        y_lin, e = self.linear(batch), self.embedding(batch)   # the table lookups first: under torch.compile
        y_fm, e = self.fm.share(e)            # the DNN reads the same e (FM gradient folded into its own)
        return y_lin + y_fm + self.dnn(e.flatten(1)).squeeze(-1)   # ... all that follows is one fused graph
