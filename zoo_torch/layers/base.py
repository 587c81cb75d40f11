"""Base module with canonical parameter names, and the elementary layers (Dense, BatchNorm, Dropout).

Canonical naming: a parameter's name is its attribute path (``mlp.layers.0.kernel``),
the same in ``zoo_tf/layers/base.py``.  Dense kernels are stored ``[in, out]`` in
both backends (``y = x @ kernel + bias``), so weights move between backends
without transposes.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.runtime import advise_huge_pages

ACTIVATIONS = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "linear": lambda x: x,
    "none": lambda x: x,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
}


def hand_written_backward() -> bool:
    """May a layer use its hand-written ``autograd.Function`` now?  Not while ``torch.jit`` traces or
    scripts (ONNX export), nor under ``torch.compile``, which derives the backward of the plain formula
    itself and fuses it with its neighbours (a hand-written backward is opaque to that fusion).
    The FM term follows this rule.  CIN and self-attention keep theirs under ``torch.compile`` (CIN's
    saves memory, not time) and only give them up for ``torch.jit``."""
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; available: {', '.join(ACTIVATIONS)}") from None


def full_table(shape, value: float = 0.0, like: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.full(shape, value)`` (torch's default dtype on the CPU, or ``like``'s dtype and device).

    On the CPU a tensor of ``common.runtime.HUGE_PAGE_MIN_BYTES`` or more (an embedding table, its
    optimiser slots) gets transparent huge pages before it is first written: its random row gathers
    and scatters then miss the TLB far less often."""
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else torch.device("cpu")
    t = torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=device)
    if device.type == "cpu":
        advise_huge_pages(t.data_ptr(), t.numel() * t.element_size())
    return t.fill_(value)


class ConstIndex:
    """A constant int64 index (pair indices, table offsets): not a weight, so not a buffer either (weights
    keep their canonical names across backends).  ``on(device)`` copies it to a device once, when first
    used there -- a host-to-GPU copy per step would make the host wait for the GPU.  One dict entry per
    device, so nn.DataParallel's replicas (which share this object across threads) each get their own."""

    def __init__(self, values):
        self.cpu = torch.as_tensor(np.asarray(values, dtype=np.int64))
        self._on = {self.cpu.device: self.cpu}

    def on(self, device) -> torch.Tensor:
        t = self._on.get(device)
        if t is None:
            t = self._on[device] = self.cpu.to(device)
        return t

    def __len__(self) -> int:
        return int(self.cpu.numel())


class Module(nn.Module):
    """nn.Module whose parameters carry an initialiser spec and a regularisation flag."""

    def add_param(self, name: str, shape, init: str = "glorot_uniform", regularize: bool = True,
                  sparse: bool = False) -> nn.Parameter:
        p = nn.Parameter(full_table(shape))
        p.zoo_init = init
        p.zoo_regularize = regularize
        p.zoo_sparse = sparse
        self.register_parameter(name, p)
        return p

    def add_state(self, name: str, shape, init: str = "zeros") -> torch.Tensor:
        """A non-trainable tensor (e.g. batch-norm moving statistics) that is part of the weights."""
        b = torch.zeros(*[int(s) for s in shape])
        self.register_buffer(name, b)
        self.__dict__.setdefault("zoo_state_inits", {})[name] = init
        return b


class Dense(Module):
    """y = x @ kernel + bias, kernel [in, out] Glorot-uniform, bias zeros (not regularised)."""

    def __init__(self, in_dim: int, out_dim: int, use_bias: bool = True, init: str = "glorot_uniform"):
        super().__init__()
        self.add_param("kernel", (in_dim, out_dim), init)
        self.use_bias = use_bias
        if use_bias:
            self.add_param("bias", (out_dim,), "zeros", regularize=False)

    def forward(self, x):
        if not self.use_bias:
            return x @ self.kernel
        if x.dim() == 2:
            return torch.addmm(self.bias, x, self.kernel)         # bias fused into the GEMM
        return x @ self.kernel + self.bias


class BatchNorm(Module):
    """Batch normalisation over the last axis.

    Train mode normalises with the batch's biased variance and updates
    ``moving = (1-momentum)*moving + momentum*batch`` (unbiased variance), the
    torch convention, implemented identically in TF.
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.add_param("gamma", (dim,), "ones", regularize=False)
        self.add_param("beta", (dim,), "zeros", regularize=False)
        self.add_state("moving_mean", (dim,), "zeros")
        self.add_state("moving_var", (dim,), "ones")

    def forward(self, x):
        if self.training:
            mean = x.mean(0)
            var = x.var(0, unbiased=False)
            n = x.shape[0]
            with torch.no_grad():
                self.moving_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.moving_var.mul_(1 - self.momentum).add_(self.momentum * var * n / max(n - 1, 1))
        else:
            mean, var = self.moving_mean, self.moving_var
        return (x - mean) * torch.rsqrt(var + self.eps) * self.gamma + self.beta


class Dropout(nn.Module):
    def __init__(self, rate: float):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x):
        if not self.training or self.rate <= 0.0:
            return x
        return F.dropout(x, self.rate, True)
