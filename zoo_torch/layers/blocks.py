"""MLP block: [Dense -> (BatchNorm) -> activation -> (Dropout)] x len(hidden), optional output layer."""
from __future__ import annotations

import torch
from torch import nn

from zoo_torch.layers.base import BatchNorm, Dense, Dropout, Module, activation


class MLP(Module):
    def __init__(self, in_dim: int, hidden=(400, 400, 400), act: str = "relu", dropout: float = 0.0,
                 batch_norm: bool = False, out_dim: int | None = None):
        super().__init__()
        self.act = activation(act)
        # ReLU in place on the fresh Dense / BatchNorm output (neither needs it for its backward)
        self._act_ = torch.relu_ if act == "relu" else None
        dims = [in_dim, *hidden]
        self.layers = nn.ModuleList(Dense(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(BatchNorm(b) for b in hidden) if batch_norm else None
        self.drop = Dropout(dropout)
        self.out = Dense(dims[-1], out_dim) if out_dim else None
        self.out_dim = out_dim or dims[-1]

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = self.drop(self._act_(x) if self._act_ is not None else self.act(x))
        return self.out(x) if self.out is not None else x
