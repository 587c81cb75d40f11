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
and evaluation ``_CINMap`` does the same in cache-sized row chunks, without ever holding all of Z
(its backward recomputes each chunk's block); only a traced export (ONNX) uses the plain two ops.
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
        chunked = not torch.jit.is_tracing() and not torch.jit.is_scripting()   # export: plain ops
        for k, layer in enumerate(self.layers):
            if chunked:                                              # Z built chunk by chunk, never kept
                xk = _CINMap.apply(x, x0, layer.kernel, layer.bias)  # [B D, H_k]
            else:
                z = (x.unsqueeze(-1) * x0.unsqueeze(-2)).flatten(1)  # [B D, H_{k-1} m], c = i*m + j
                xk = layer(z)
            h = xk.shape[1]
            pooled.append(xk.view(b, d, h)[..., self.pool_from[k]:].sum(1))   # [B, H_k - pool_from]
            x = xk[:, :self.next_maps[k]]
        return torch.cat(pooled, -1)


CHUNK_BYTES = {"cpu": 8 << 20, "accelerator": 256 << 20}


def _chunk_rows(x, x0) -> int:
    """Rows per chunk of ``_CINMap``: an outer-product block of about 8 MB on CPU (the block, its
    gradient and the GEMM operands stay near the cores instead of a ~1 GB Z streaming through memory;
    1.45x faster per layer at batch 4096), 256 MB on an accelerator (fewer, larger kernels)."""
    budget = CHUNK_BYTES["cpu" if x.device.type == "cpu" else "accelerator"]
    return max(1, budget // (x.shape[1] * x0.shape[1] * x.element_size()))


class _CINMap(torch.autograd.Function):
    """One CIN layer over N = B D rows: ``X^k = (X^{k-1} (x) X^0) @ W + b``, computed in row chunks.

    The outer product Z [N, H m] (the layer's biggest tensor, ~1 GB at batch 4096) is never built
    whole: each chunk of rows gets its block of Z in one reused buffer, then its GEMM.  Nothing of Z is
    kept for the backward, which recomputes each block for dW = sum_chunks Z_c^T dY_c and gets
    dX^{k-1}_i = sum_j dZ_ij X^0_j, dX^0_j = sum_i dZ_ij X^{k-1}_i as two batched mat-vecs.  The
    chunks are visited in a fixed order, so dW is deterministic."""

    @staticmethod
    def forward(ctx, x, x0, kernel, bias):
        x, x0 = x.contiguous(), x0.contiguous()
        n, h = x.shape
        m = x0.shape[1]
        step = _chunk_rows(x, x0)
        out = torch.empty(n, kernel.shape[1], dtype=x.dtype, device=x.device)
        z = torch.empty(min(step, n), h, m, dtype=x.dtype, device=x.device)
        for s in range(0, n, step):
            e = min(s + step, n)
            zc = z[:e - s]
            torch.mul(x[s:e].unsqueeze(2), x0[s:e].unsqueeze(1), out=zc)
            if bias is not None:
                torch.addmm(bias, zc.view(e - s, -1), kernel, out=out[s:e])
            else:
                torch.mm(zc.view(e - s, -1), kernel, out=out[s:e])
        ctx.save_for_backward(x, x0, kernel)
        return out

    @staticmethod
    def backward(ctx, gy):
        x, x0, kernel = ctx.saved_tensors
        n, h = x.shape
        m = x0.shape[1]
        need_x, need_x0, need_k, need_b = ctx.needs_input_grad
        gy = gy.contiguous()
        step = _chunk_rows(x, x0)
        gx = torch.empty_like(x) if need_x else None
        gx0 = torch.empty_like(x0) if need_x0 else None
        gk = torch.zeros_like(kernel) if need_k else None
        z = torch.empty(min(step, n), h, m, dtype=x.dtype, device=x.device) if need_k else None
        gz = torch.empty(min(step, n), h * m, dtype=x.dtype, device=x.device) if (need_x or need_x0) else None
        kt = kernel.t()
        for s in range(0, n, step):
            e = min(s + step, n)
            c = e - s
            if need_k:
                zc = z[:c]
                torch.mul(x[s:e].unsqueeze(2), x0[s:e].unsqueeze(1), out=zc)
                gk.addmm_(zc.view(c, -1).t(), gy[s:e])
            if gz is not None:
                gzc = torch.mm(gy[s:e], kt, out=gz[:c]).view(c, h, m)
                if need_x:
                    torch.bmm(gzc, x0[s:e].unsqueeze(2), out=gx[s:e].unsqueeze(2))
                if need_x0:
                    torch.bmm(x[s:e].unsqueeze(1), gzc, out=gx0[s:e].unsqueeze(1))
        gb = gy.sum(0) if need_b else None                          # need_b is False for bias=None
        return gx, gx0, gk, gb
