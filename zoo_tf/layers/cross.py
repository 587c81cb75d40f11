"""Explicit feature-crossing networks of DCN (Wang et al., ADKDD 2017) and DCN-V2 (Wang et al., WWW 2021).

Mirror of ``zoo_torch/layers/cross.py`` (see there for the equations and the storage layout).

CrossNet     (DCN, eq. 3)      x_{l+1} = x_0 x_l^T w_l + b_l + x_l
CrossNetV2   (DCN-V2, eq. 1)   x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l
             low rank (eq. 3)  x_{l+1} = x_0 ⊙ (U_l (V_l^T x_l) + b_l) + x_l
CrossNetMix  (DCN-V2, eq. 4)   x_{l+1} = sum_i G_i(x_l) x_0 ⊙ (U_i g(C_i g(V_i^T x_l)) + b_l) + x_l
"""
from __future__ import annotations

import math

import tensorflow as tf

from zoo_tf.layers.base import Module, activation


def expert_glorot(fan_in: int, fan_out: int) -> str:
    """Glorot-uniform spec of one expert's matrix (the stacked tensor's own fans would count K)."""
    return f"uniform:{math.sqrt(6.0 / (fan_in + fan_out))!r}"


class CrossLayer(Module):
    """x_{l+1} = x_0 (x_l . w) + b + x_l   (x_0 x_l^T w = x_0 * scalar, never a D x D matrix)."""

    def __init__(self, dim: int):
        super().__init__()
        self.add_param("kernel", (dim, 1))
        self.add_param("bias", (dim,), "zeros", regularize=False)

    def __call__(self, x0, x, training=False):
        return x0 * tf.matmul(x, self.kernel) + self.bias + x


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

    def __call__(self, x0, x, training=False):
        wx = tf.matmul(tf.matmul(x, self.V), self.U) if self.low_rank else tf.matmul(x, self.kernel)
        return x0 * (wx + self.bias) + x


class CrossLayerMix(Module):
    """x_{l+1} = sum_i G_i(x_l) x_0 ⊙ (U_i g(C_i g(V_i^T x_l)) + b) + x_l over K low-rank experts."""

    def __init__(self, dim: int, low_rank: int, num_experts: int, act: str = "tanh"):
        super().__init__()
        self.dim, self.low_rank, self.num_experts = dim, low_rank, num_experts
        self._act = activation(act)
        self.add_param("V", (dim, num_experts, low_rank), expert_glorot(dim, low_rank))
        self.add_param("C", (num_experts, low_rank, low_rank), expert_glorot(low_rank, low_rank))
        self.add_param("U", (num_experts, low_rank, dim), expert_glorot(low_rank, dim))
        self.add_param("gate", (dim, num_experts))
        self.add_param("bias", (dim,), "zeros", regularize=False)

    def __call__(self, x0, x, training=False):
        k, r = self.num_experts, self.low_rank
        h = tf.reshape(self._act(tf.matmul(x, tf.reshape(self.V, [self.dim, k * r]))), [-1, k, r])
        h = self._act(tf.einsum("bkr,krs->bks", h, self.C))
        g = tf.nn.softmax(tf.matmul(x, self.gate), -1)
        u = tf.matmul(tf.reshape(h * g[:, :, None], [-1, k * r]), tf.reshape(self.U, [k * r, self.dim]))
        return x0 * (u + self.bias) + x


class _CrossStack(Module):
    def __call__(self, x0, training=False):
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


class CrossNet(_CrossStack):
    """DCN cross network: ``num_layers`` CrossLayers, [B, D] -> [B, D]."""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.layers = [CrossLayer(dim) for _ in range(num_layers)]


class CrossNetV2(_CrossStack):
    """DCN-V2 cross network, full-rank (``low_rank=0``) or low-rank matrices, [B, D] -> [B, D]."""

    def __init__(self, dim: int, num_layers: int, low_rank: int = 0):
        super().__init__()
        self.layers = [CrossLayerV2(dim, low_rank) for _ in range(num_layers)]


class CrossNetMix(_CrossStack):
    """DCN-V2 mixture of low-rank experts (DCN-Mix), [B, D] -> [B, D]."""

    def __init__(self, dim: int, num_layers: int, low_rank: int, num_experts: int, act: str = "tanh"):
        super().__init__()
        self.layers = [CrossLayerMix(dim, low_rank, num_experts, act) for _ in range(num_layers)]
