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

Computed channels-last over the N = B D rows (b, d): Z = X^{k-1}[:, :, None] * X^0[:, None, :] is
[N, H_{k-1} m] and X^k = Z @ W^k -- one outer product and one matmul per layer.  In training
``_CINMap`` does the same without keeping Z for the backward (it is recomputed there).
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
        b, m, d = e.shape
        x0 = e.transpose(1, 2).reshape(b * d, m)                     # [B D, m] rows n = (b, d)
        x, pooled = x0, []
        fast = torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.jit.is_scripting()
        for k, layer in enumerate(self.layers):
            if fast:                                                 # training: outer product not kept
                xk = _CINMap.apply(x, x0, layer.kernel, layer.bias)  # [B D, H_k]
            else:
                z = (x.unsqueeze(-1) * x0.unsqueeze(-2)).flatten(1)  # [B D, H_{k-1} m], c = i*m + j
                xk = layer(z)
            h = xk.shape[1]
            pooled.append(xk.view(b, d, h)[..., self.pool_from[k]:].sum(1))   # [B, H_k - pool_from]
            x = xk[:, :self.next_maps[k]]
        return torch.cat(pooled, -1)


class _CINMap(torch.autograd.Function):
    """One CIN layer over N = B D rows: ``X^k = (X^{k-1} (x) X^0) @ W + b`` with the outer product
    Z [N, H m] (the layer's biggest tensor, ~1 GB at batch 4096) never kept: the backward recomputes
    it for dW = Z^T dY, and gets dX^{k-1}_i = sum_j dZ_ij X^0_j, dX^0_j = sum_i dZ_ij X^{k-1}_i as two
    batched mat-vecs instead of autograd's product-then-reduce passes."""

    @staticmethod
    def forward(ctx, x, x0, kernel, bias):
        x = x.contiguous()
        z = (x.unsqueeze(2) * x0.unsqueeze(1)).view(x.shape[0], -1)
        ctx.save_for_backward(x, x0, kernel)
        return torch.addmm(bias, z, kernel) if bias is not None else z @ kernel

    @staticmethod
    def backward(ctx, gy):
        x, x0, kernel = ctx.saved_tensors
        n, h = x.shape
        gx = gx0 = gk = gb = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            gz = (gy @ kernel.t()).view(n, h, x0.shape[1])           # [N, H, m]
            if ctx.needs_input_grad[0]:
                gx = torch.bmm(gz, x0.unsqueeze(2)).squeeze(2)
            if ctx.needs_input_grad[1]:
                gx0 = torch.bmm(x.unsqueeze(1), gz).squeeze(1)
            del gz
        if ctx.needs_input_grad[2]:
            gk = (x.unsqueeze(2) * x0.unsqueeze(1)).view(n, -1).t() @ gy
        if ctx.needs_input_grad[3]:
            gb = gy.sum(0)
        return gx, gx0, gk, gb
