"""Compressed Interaction Network (xDeepFM, Lian et al., KDD 2018).

Mirror of ``zoo_torch/layers/cin.py`` (see there for the details):

    X^k_{h,*} = sum_{i=1..H_{k-1}} sum_{j=1..m} W^{k,h}_{ij} (X^{k-1}_{i,*} o X^0_{j,*}) + b^{k,h}
    output    = [p^1; ...; p^T],  p^k_h = sum_d X^k_{h,d}     (split_half: half the maps are pooled)

W^k = ``layers.{k-1}.kernel`` [H_{k-1} m, H_k] (input channel c = i*m + j), computed channels-last.
TensorFlow's own gradient is kept: the recomputing backward of zoo_torch's ``_CINMap``, written
with ``tf.custom_gradient``, measured slower and bigger here (xDeepFM 721 vs 761 rows/s, peak
7.8 vs 6.8 GB, ``benchmarks/train_speed.py --models xDeepFM --rows 60000``).
"""
from __future__ import annotations

import tensorflow as tf

from zoo_tf.layers.base import Dense, Module


class CIN(Module):
    """[B, m, D] field embeddings -> [B, out_dim] sum-pooled CIN feature maps."""

    def __init__(self, num_fields: int, layer_sizes=(200, 200, 200), split_half: bool = True):
        super().__init__()
        self.layer_sizes = [int(h) for h in layer_sizes]
        if not self.layer_sizes:
            raise ValueError("CIN needs at least one layer")
        self.split_half = split_half
        self.layers = []
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

    def __call__(self, e, training=False):
        x0 = tf.transpose(e, [0, 2, 1])                              # [B, D, m]
        x, pooled = x0, []
        for k, layer in enumerate(self.layers):
            z = x[:, :, :, None] * x0[:, :, None, :]                 # [B, D, H_{k-1}, m]
            z = tf.reshape(z, [-1, z.shape[1], z.shape[2] * z.shape[3]])   # c = i*m + j
            xk = layer(z)                                            # [B, D, H_k]
            pooled.append(tf.reduce_sum(xk[..., self.pool_from[k]:], 1))   # [B, H_k - pool_from]
            x = xk[..., :self.next_maps[k]]
        return tf.concat(pooled, -1)
