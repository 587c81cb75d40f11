"""Explicit feature-crossing networks of DCN (Wang et al., ADKDD 2017) and DCN-V2 (Wang et al., WWW 2021).

All three act on the flat input x_0 in R^D (the concatenated field embeddings) and keep
the width D; a net of L layers returns x_L.  Column-vector notation as in the papers;
every matrix is stored ``[in, out]`` like a Dense kernel, so ``W x`` is ``x @ kernel``.

CrossNet     (DCN, eq. 3)      x_{l+1} = x_0 x_l^T w_l + b_l + x_l            w_l, b_l in R^D
CrossNetV2   (DCN-V2, eq. 1)   x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l          W_l in R^{D x D}
             low rank (eq. 3)  x_{l+1} = x_0 ⊙ (U_l (V_l^T x_l) + b_l) + x_l  U_l, V_l in R^{D x r}
CrossNetMix  (DCN-V2, eq. 4)   x_{l+1} = sum_i G_i(x_l) E_i(x_l) + x_l
                               E_i(x)  = x_0 ⊙ (U_i g(C_i g(V_i^T x)) + b_l)  C_i in R^{r x r}, g = tanh
                               G_i(x)  = softmax_i(g_i^T x)                   one gate vector per expert

Storage (per layer l): ``kernel`` [D, 1] (v1) or [D, D] (v2) holds w_l / W_l^T; ``V`` [D, r],
``U`` [r, D] hold V_l / U_l^T; the mixture holds ``V`` [D, K, r] (V[:, i] = V_i), ``C`` [K, r, r]
(C[i] = C_i^T), ``U`` [K, r, D] (U[i] = U_i^T) and ``gate`` [D, K] (column i = g_i).

The mixture is computed with one matmul for all experts: because the softmax gates sum to 1,
sum_i G_i x_0 ⊙ (u_i + b) = x_0 ⊙ (sum_i G_i u_i + b), and sum_i G_i u_i = [G_1 c_1; ..; G_K c_K] U.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from zoo_torch.layers.base import Module, activation


def expert_glorot(fan_in: int, fan_out: int) -> str:
    """Glorot-uniform spec of one expert's matrix (the stacked tensor's own fans would count K)."""
    return f"uniform:{math.sqrt(6.0 / (fan_in + fan_out))!r}"


class CrossLayer(Module):
    """x_{l+1} = x_0 (x_l . w) + b + x_l   (x_0 x_l^T w = x_0 * scalar, never a D x D matrix)."""

    def __init__(self, dim: int):
        super().__init__()
        self.add_param("kernel", (dim, 1))
        self.add_param("bias", (dim,), "zeros", regularize=False)

    def forward(self, x0, x):
        return x0 * (x @ self.kernel) + self.bias + x


class CrossLayerV2(Module):
    """x_{l+1} = x_0 ⊙ (W x_l + b) + x_l, with W full rank or W = U V^T of rank ``low_rank``."""

    def __init__(self, dim: int, low_rank: int = 0):
        super().__init__()
        self.low_rank = low_rank
        if low_rank:
            self.add_param("V", (dim, low_rank))
            self.add_param("U", (low_rank, dim))
        else:
            self.add_param("kernel", (dim, dim))
        self.add_param("bias", (dim,), "zeros", regularize=False)

    def forward(self, x0, x):
        wx = (x @ self.V) @ self.U if self.low_rank else x @ self.kernel
        return x0 * (wx + self.bias) + x


class CrossLayerMix(Module):
    """x_{l+1} = sum_i G_i(x_l) x_0 ⊙ (U_i g(C_i g(V_i^T x_l)) + b) + x_l over K low-rank experts."""

    def __init__(self, dim: int, low_rank: int, num_experts: int, act: str = "tanh"):
        super().__init__()
        self.dim, self.low_rank, self.num_experts = dim, low_rank, num_experts
        self.act = activation(act)
        self.add_param("V", (dim, num_experts, low_rank), expert_glorot(dim, low_rank))
        self.add_param("C", (num_experts, low_rank, low_rank), expert_glorot(low_rank, low_rank))
        self.add_param("U", (num_experts, low_rank, dim), expert_glorot(low_rank, dim))
        self.add_param("gate", (dim, num_experts))
        self.add_param("bias", (dim,), "zeros", regularize=False)

    def forward(self, x0, x):
        k, r = self.num_experts, self.low_rank
        h = self.act(x @ self.V.reshape(self.dim, k * r)).reshape(-1, k, r)    # g(V_i^T x)      [B, K, r]
        h = self.act(torch.einsum("bkr,krs->bks", h, self.C))                 # g(C_i g(V_i^T x))
        g = torch.softmax(x @ self.gate, -1)                                   # G_i(x)          [B, K]
        u = (h * g.unsqueeze(-1)).reshape(-1, k * r) @ self.U.reshape(k * r, self.dim)   # sum_i G_i U_i h_i
        return x0 * (u + self.bias) + x


class _CrossStack(Module):
    def forward(self, x0):
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


class CrossNet(_CrossStack):
    """DCN cross network: ``num_layers`` CrossLayers, [B, D] -> [B, D]."""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CrossLayer(dim) for _ in range(num_layers))


class CrossNetV2(_CrossStack):
    """DCN-V2 cross network, full-rank (``low_rank=0``) or low-rank matrices, [B, D] -> [B, D]."""

    def __init__(self, dim: int, num_layers: int, low_rank: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(CrossLayerV2(dim, low_rank) for _ in range(num_layers))


class CrossNetMix(_CrossStack):
    """DCN-V2 mixture of low-rank experts (DCN-Mix), [B, D] -> [B, D]."""

    def __init__(self, dim: int, num_layers: int, low_rank: int, num_experts: int, act: str = "tanh"):
        super().__init__()
        self.layers = nn.ModuleList(CrossLayerMix(dim, low_rank, num_experts, act) for _ in range(num_layers))
