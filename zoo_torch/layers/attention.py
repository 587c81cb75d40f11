"""Attention layers: AFM's attention-based pooling and AutoInt's multi-head self-attention.

AttentionalPooling (Xiao et al., IJCAI 2017), over the P = F(F-1)/2 field pairs i < j
(pair index tensors built once, row-major order of ``numpy.triu_indices``):

    p_ij  = e_i (.) e_j                                   pair-wise interaction layer   [B, P, d]
    a'_ij = h^T ReLU(W p_ij + b)                          W = kernel [d, A], b [A], h [A, 1]
    a_ij  = softmax_{(i,j)} a'_ij                         over the P pairs of one example
    y     = p^T Dropout( sum_{i<j} a_ij p_ij )            p [d, 1]  ->  [B]

The dropout (``attention_dropout``) sits on the attention-pooled vector, i.e. the
paper's dropout on the pair-wise interaction layer as seen by the prediction layer
(the same place as DeepCTR's AFMLayer).

MultiHeadSelfAttention (Song et al., CIKM 2019), one interacting layer over the F fields,
heads h = 1..H with d' = ``head_dim``; head h uses columns [h d', (h+1) d') of each kernel:

    alpha^h_{m,k} = softmax_k < W_Q^h e_m, W_K^h e_k >           (no 1/sqrt(d') scaling, as in the paper)
    e~_m          = [ sum_k alpha^1_{m,k} W_V^1 e_k ; ... ; sum_k alpha^H_{m,k} W_V^H e_k ]     [H d']
    e_m^Res       = ReLU( e~_m + W_Res e_m )                      (ReLU(e~_m) with use_residual=False)

The kernels ``query``, ``key``, ``value``, ``residual`` are [in_dim, H d'] (no biases, as in
the paper); all heads are computed at once as batched matmuls over [B, H, F, d'].
"""
from __future__ import annotations

import numpy as np
import torch

from zoo_torch.layers.base import Dropout, Module


class AttentionalPooling(Module):
    """AFM: [B, F, d] -> [B], the attention-weighted sum of pair-wise products projected by p."""

    def __init__(self, num_fields: int, dim: int, attention_size: int, dropout: float = 0.0):
        super().__init__()
        if num_fields < 2:
            raise ValueError(f"attention-based pooling over field pairs needs >= 2 fields, got {num_fields}")
        rows, cols = np.triu_indices(num_fields, 1)
        self._rows = torch.as_tensor(rows, dtype=torch.int64)      # plain tensors, not weights
        self._cols = torch.as_tensor(cols, dtype=torch.int64)
        self.num_pairs = len(rows)
        self.add_param("kernel", (dim, attention_size))
        self.add_param("bias", (attention_size,), "zeros", regularize=False)
        self.add_param("h", (attention_size, 1))
        self.add_param("p", (dim, 1))
        self.drop = Dropout(dropout)

    def attention(self, pairs):
        """[B, P, d] pair products -> [B, P] attention weights a_ij (softmax over the pairs)."""
        hidden = torch.relu(torch.addmm(self.bias, pairs.reshape(-1, pairs.shape[-1]), self.kernel))   # [B P, A]
        return torch.softmax((hidden @ self.h).reshape(-1, self.num_pairs), 1)

    def forward(self, e):
        pairs = e.index_select(1, self._rows) * e.index_select(1, self._cols)        # [B, P, d]
        pooled = torch.bmm(self.attention(pairs).unsqueeze(1), pairs).squeeze(1)     # [B, d]
        return (self.drop(pooled) @ self.p).squeeze(-1)


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
        return x.reshape(-1, num_fields, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, e):
        f = e.shape[1]
        q, k, v = (self.split_heads(e @ w, f) for w in (self.query, self.key, self.value))
        alpha = torch.softmax(q @ k.transpose(-1, -2), -1)                             # [B, H, F, F]
        out = (alpha @ v).transpose(1, 2).reshape(-1, f, self.out_dim)                 # [B, F, H d']
        if self.use_residual:
            out = out + e @ self.residual
        return torch.relu(out)
