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
        if self.reduce_sum:
            return _fm_sum(e)
        s = tf.reduce_sum(e, 1)
        return 0.5 * (s * s - tf.reduce_sum(e * e, 1))

    def share(self, e):
        """``(FM term [B], e)`` for a model whose other parts read the same ``e`` (DeepFM's DNN).

        zoo_torch folds the FM gradient into the DNN's here (fewer passes over [B, F, d]).  TensorFlow
        without XLA runs the same element-wise ops either way, so this is ``(self(e), e)``.
        """
        return self(e), e


@tf.custom_gradient
def _fm_sum(e):
    """y_b = 1/2 (||s_b||^2 - ||e_b||_F^2), s_b = sum_i e_bi; closed-form gradient s_b - e_bi."""
    s = tf.reduce_sum(e, 1)                                     # [B, d]
    out = 0.5 * (tf.reduce_sum(s * s, 1) - tf.reduce_sum(tf.square(e), [1, 2]))

    def grad(g):
        return (s[:, None, :] - e) * g[:, None, None]

    return out, grad
