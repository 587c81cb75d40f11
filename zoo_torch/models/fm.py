"""Factorization Machine (Rendle, ICDM 2010).

    y(x) = w_0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j
         = w_0 + sum_i w_i x_i + 1/2 sum_k [ (sum_i v_ik x_i)^2 - sum_i v_ik^2 x_i^2 ]
"""
from zoo_torch.layers.embeddings import LinearPart
from zoo_torch.layers.interactions import FMInteraction
from zoo_torch.models.base import CTRModel


class FM(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        self.linear = LinearPart(schema)
        self.embedding = self.make_embedding()
        self.fm = FMInteraction()

    def forward(self, batch):
        return self.linear(batch) + self.fm(self.embedding(batch))
