"""Attention layers: AFM's attention-based pooling and AutoInt's multi-head self-attention.

Mirror of ``zoo_torch/layers/attention.py`` (see there for the equations):

    AFM:      y = p^T Dropout( sum_{i<j} softmax_{(i,j)}( h^T ReLU(W (e_i (.) e_j) + b) ) (e_i (.) e_j) )
    AutoInt:  e_m^Res = ReLU( [ sum_k softmax_k <W_Q^h e_m, W_K^h e_k> W_V^h e_k ]_{h=1..H} + W_Res e_m )

zoo_torch runs AutoInt's layer through a hand-written backward (``_SelfAttention``: head-major Q/K/V
buffers, no head transposes); here TensorFlow differentiates the formula itself.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from zoo_tf.layers.base import Dropout, Module


class AttentionalPooling(Module):
    """AFM: [B, F, d] -> [B], the attention-weighted sum of pair-wise products projected by p."""

    def __init__(self, num_fields: int, dim: int, attention_size: int, dropout: float = 0.0):
        super().__init__()
        if num_fields < 2:
            raise ValueError(f"attention-based pooling over field pairs needs >= 2 fields, got {num_fields}")
        rows, cols = np.triu_indices(num_fields, 1)
        self._rows = tf.constant(rows, dtype=tf.int64)             # plain tensors, not weights
        self._cols = tf.constant(cols, dtype=tf.int64)
        self.num_pairs = len(rows)
        self.add_param("kernel", (dim, attention_size))
        self.add_param("bias", (attention_size,), "zeros", regularize=False)
        self.add_param("h", (attention_size, 1))
        self.add_param("p", (dim, 1))
        self.drop = Dropout(dropout)

    def attention(self, pairs):
        """[B, P, d] pair products -> [B, P] attention weights a_ij (softmax over the pairs)."""
        hidden = tf.nn.relu(tf.matmul(tf.reshape(pairs, [-1, pairs.shape[-1]]), self.kernel) + self.bias)  # [B P, A]
        return tf.nn.softmax(tf.reshape(tf.matmul(hidden, self.h), [-1, self.num_pairs]), 1)

    def __call__(self, e, training=False):
        pairs = tf.gather(e, self._rows, axis=1) * tf.gather(e, self._cols, axis=1)  # [B, P, d]
        pooled = tf.matmul(self.attention(pairs)[:, None, :], pairs)[:, 0]            # [B, d]
        return tf.squeeze(tf.matmul(self.drop(pooled, training=training), self.p), -1)


class MultiHeadSelfAttention(Module):
    """AutoInt interacting layer: [B, F, in_dim] -> [B, F, num_heads * head_dim]."""

    def __init__(self, in_dim: int, head_dim: int, num_heads: int, use_residual: bool = True):
        super().__init__()
        self.head_dim, self.num_heads, self.use_residual = head_dim, num_heads, use_residual
        self.out_dim = head_dim * num_heads
        self.add_param("query", (in_dim, self.out_dim))
        self.add_param("key", (in_dim, self.out_dim))
        self.add_param("value", (in_dim, self.out_dim))
        if use_residual:
            self.add_param("residual", (in_dim, self.out_dim))

    def split_heads(self, x, num_fields: int):
        """[B, F, H d'] -> [B, H, F, d']."""
        return tf.transpose(tf.reshape(x, [-1, num_fields, self.num_heads, self.head_dim]), [0, 2, 1, 3])

    def __call__(self, e, training=False):
        f = e.shape[1]
        q, k, v = (self.split_heads(tf.tensordot(e, w, 1), f) for w in (self.query, self.key, self.value))
        alpha = tf.nn.softmax(tf.matmul(q, k, transpose_b=True), -1)                   # [B, H, F, F]
        out = tf.reshape(tf.transpose(tf.matmul(alpha, v), [0, 2, 1, 3]), [-1, f, self.out_dim])
        if self.use_residual:
            out = out + tf.tensordot(e, self.residual, 1)
        return tf.nn.relu(out)
