"""Compressed Interaction Network (xDeepFM, Lian et al., KDD 2018).

With X^0 = [e_1; ...; e_m] the [m, D] field embeddings and H_k feature maps in layer k:

    X^k_{h,*} = sum_{i=1..H_{k-1}} sum_{j=1..m} W^{k,h}_{ij} (X^{k-1}_{i,*} o X^0_{j,*}) + b^{k,h}
    p^k_h     = sum_{d=1..D} X^k_{h,d}                                   (sum pooling)
    output    = [p^1; p^2; ...; p^T]                                     [B, sum_k |p^k|]

W^k is the 1x1 "conv1d" kernel ``layers.{k-1}.kernel`` [H_{k-1} m, H_k] with input channel
c = i*m + j (a Dense over the channels); b^k is ``layers.{k-1}.bias``, as in the reference
implementations.  The activation is the identity (the paper's equation, and the best CIN
activation in its experiments).  ``split_half`` (all layers but the last): the first
floor(H_k/2) feature maps feed layer k+1, the other H_k - floor(H_k/2) are sum-pooled into
the output; without it every map does both.

Computed channels-last, [B, D, H]: Z = (X^{k-1}[:, :, :, None] * X^0[:, :, None, :]) is
[B, D, H_{k-1} m] and X^k = Z @ W^k -- one outer product and one matmul per layer.
"""
from __future__ import annotations

import torch
from torch import nn

from zoo_torch.layers.base import Dense, Module


class CIN(Module):
    """[B, m, D] field embeddings -> [B, out_dim] sum-pooled CIN feature maps."""

    def __init__(self, num_fields: int, layer_sizes=(200, 200, 200), split_half: bool = True):
        super().__init__()
        self.layer_sizes = [int(h) for h in layer_sizes]
        if not self.layer_sizes:
            raise ValueError("CIN needs at least one layer")
        self.split_half = split_half
        self.layers = nn.ModuleList()
        self.next_maps, self.pool_from, self.out_dim = [], [], 0
        prev = num_fields
        for k, h in enumerate(self.layer_sizes):
            self.layers.append(Dense(prev * num_fields, h))
            split = split_half and k < len(self.layer_sizes) - 1
            if split and h < 2:
                raise ValueError(f"CIN layer {k} has {h} feature map(s): too few to split in half")
            prev = h // 2 if split else h                            # maps [0, prev) feed layer k+1
            self.next_maps.append(prev)
            self.pool_from.append(prev if split else 0)              # maps [pool_from, h) are pooled
            self.out_dim += h - self.pool_from[-1]

    def forward(self, e):
        x0 = e.transpose(1, 2)                                       # [B, D, m]
        x, pooled = x0, []
        for k, layer in enumerate(self.layers):
            z = (x.unsqueeze(-1) * x0.unsqueeze(-2)).flatten(2)      # [B, D, H_{k-1} m], c = i*m + j
            xk = layer(z)                                            # [B, D, H_k]
            pooled.append(xk[..., self.pool_from[k]:].sum(1))        # [B, H_k - pool_from]
            x = xk[..., :self.next_maps[k]]
        return torch.cat(pooled, -1)
