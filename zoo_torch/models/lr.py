"""Logistic regression -- the baseline every zoo model must beat.

    y(x) = w_0 + sum_i w_i x_i
"""
from zoo_torch.layers.embeddings import LinearPart
from zoo_torch.models.base import CTRModel


class LR(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        self.linear = LinearPart(schema)

    def forward(self, batch):
        return self.linear(batch)
