"""Feature-interaction layers (mirror of zoo_torch/layers/interactions.py).

FMInteraction:  sum_{i<j} <e_i, e_j> = 1/2 * sum_k [ (sum_i e_ik)^2 - sum_i e_ik^2 ]
"""
from __future__ import annotations

import tensorflow as tf

from zoo_tf.layers.base import Module


class FMInteraction(Module):
    """[B, F, d] -> [B] second-order FM term (or [B, d] with ``reduce_sum=False``)."""

    def __init__(self, reduce_sum: bool = True):
        super().__init__()
        self.reduce_sum = reduce_sum

    def __call__(self, e, training=False):
        s = tf.reduce_sum(e, 1)
        out = 0.5 * (s * s - tf.reduce_sum(e * e, 1))
        return tf.reduce_sum(out, 1) if self.reduce_sum else out
