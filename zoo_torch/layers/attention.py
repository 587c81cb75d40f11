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
the paper).  Training and evaluation run ``_SelfAttention`` (Q, K, V projected head by head into a
head-major buffer, per-head batched matmuls, hand-written backward); a traced export runs the same
formula as plain ops over [B, H, F, d'].
"""
from __future__ import annotations

import numpy as np
import torch

from zoo_torch.layers.base import ConstIndex, Dropout, Module


class AttentionalPooling(Module):
    """AFM: [B, F, d] -> [B], the attention-weighted sum of pair-wise products projected by p."""

    def __init__(self, num_fields: int, dim: int, attention_size: int, dropout: float = 0.0):
        super().__init__()
        if num_fields < 2:
            raise ValueError(f"attention-based pooling over field pairs needs >= 2 fields, got {num_fields}")
        rows, cols = np.triu_indices(num_fields, 1)
        self._rows, self._cols = ConstIndex(rows), ConstIndex(cols)
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
        pairs = e.index_select(1, self._rows.on(e.device)) * e.index_select(1, self._cols.on(e.device))        # [B, P, d]
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
        kernels = [self.query, self.key, self.value] + ([self.residual] if self.use_residual else [])
        if not torch.jit.is_tracing() and not torch.jit.is_scripting():      # export: the plain ops below
            return _SelfAttention.apply(e, self.num_heads, *kernels)
        f = e.shape[1]
        q, k, v = (self.split_heads(e @ w, f) for w in (self.query, self.key, self.value))
        alpha = torch.softmax(q @ k.transpose(-1, -2), -1)                             # [B, H, F, F]
        out = (alpha @ v).transpose(1, 2).reshape(-1, f, self.out_dim)                 # [B, F, H d']
        if self.use_residual:
            out = out + e @ self.residual
        return torch.relu(out)


class _SelfAttention(torch.autograd.Function):
    """``MultiHeadSelfAttention`` with a hand-written backward (same formula, same result).

    Memory layout is the point: Q, K, V are projected head by head straight into one head-major
    buffer [3, H, B, F, d'] (one GEMM per head and kernel, no transposes), because at batch 4096
    the small batched matmuls run 2-3x slower on strided column blocks and a permuting copy costs
    more than the projection itself.  Kept for the backward: e, Q/K/V, the attention weights
    alpha [H, B, F, F] and the output (its ReLU mask) -- less than autograd keeps for the same
    formula.  Per head h with dO_h = (dY (.) [Y > 0])_h:

        dV_h = alpha_h^T dO_h,   dS_h = alpha_h (.) (dO_h V_h^T - rowsum(alpha_h (.) dO_h V_h^T)),
        dQ_h = dS_h K_h,         dK_h = dS_h^T Q_h,
        dW_X^h = e^T dX_h,       de = sum_{X,h} dX_h (W_X^h)^T + dY' W_Res^T     (X = Q, K, V)

    (Tried and dropped: processing the batch in cache-sized chunks of samples -- slower, the small
    ops parallelise badly over the threads; the two sums as single GEMMs over [dQ | dK | dV]
    permuted into one [B F, 3 H d'] matrix -- ~20 % faster for one layer alone, no gain in the
    AutoInt step, and 120 MB more peak memory.)"""

    @staticmethod
    def forward(ctx, e, heads, *kernels):
        b, f, i = e.shape
        width = kernels[0].shape[1]
        d = width // heads
        e2 = e.reshape(-1, i)
        n = e2.shape[0]
        qkv = torch.empty(3, heads, b, f, d, dtype=e.dtype, device=e.device)
        for j in range(3):
            for h in range(heads):
                torch.mm(e2, kernels[j][:, h * d:(h + 1) * d], out=qkv[j, h].view(n, d))
        out = (torch.mm(e2, kernels[3]) if len(kernels) == 4
               else torch.zeros(n, width, dtype=e.dtype, device=e.device)).view(b, f, width)
        alpha = torch.empty(heads, b, f, f, dtype=e.dtype, device=e.device)
        for h in range(heads):
            q, k, v = qkv[0, h], qkv[1, h], qkv[2, h]                          # [B, F, d'] each
            a = torch.bmm(q, k.transpose(1, 2), out=alpha[h])
            torch.softmax(a, -1, out=a)
            out[:, :, h * d:(h + 1) * d] += torch.bmm(a, v)
        out.relu_()
        ctx.save_for_backward(e, qkv, alpha, out, *kernels)
        ctx.heads = heads
        return out

    @staticmethod
    def backward(ctx, gy):
        e, qkv, alpha, out, *kernels = ctx.saved_tensors
        b, f, i = e.shape
        heads, width = ctx.heads, out.shape[2]
        d = width // heads
        e2 = e.reshape(-1, i)
        n = e2.shape[0]
        gz = torch.ops.aten.threshold_backward(gy, out, 0)                    # through the ReLU
        go = torch.empty(heads, b, f, d, dtype=e.dtype, device=e.device)
        gqkv = torch.empty_like(qkv)
        for h in range(heads):
            q, k, v = qkv[0, h], qkv[1, h], qkv[2, h]
            a = alpha[h]
            go[h] = gz[:, :, h * d:(h + 1) * d]
            torch.bmm(a.transpose(1, 2), go[h], out=gqkv[2, h])
            gs = torch._softmax_backward_data(torch.bmm(go[h], v.transpose(1, 2)), a, -1, a.dtype)
            torch.bmm(gs, k, out=gqkv[0, h])
            torch.bmm(gs.transpose(1, 2), q, out=gqkv[1, h])
        need_e, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        gz2 = gz.view(n, width)
        ge = None
        if need_e:
            ge = torch.mm(gz2, kernels[3].t()) if len(kernels) == 4 else torch.zeros_like(e2)
            for j in range(3):
                for h in range(heads):
                    ge.addmm_(gqkv[j, h].view(n, d), kernels[j][:, h * d:(h + 1) * d].t())
            ge = ge.view(b, f, i)
        gw = []
        for j, need in enumerate(need_w):
            if not need:
                gw.append(None)
            elif j == 3:
                gw.append(torch.mm(e2.t(), gz2))
            else:
                gw.append(torch.cat([torch.mm(e2.t(), gqkv[j, h].view(n, d)) for h in range(heads)], 1))
        return (ge, None, *gw)
