"""Base module with canonical parameter names, and the elementary layers (Dense, BatchNorm, Dropout).

Mirror of ``zoo_torch/layers/base.py``: a variable's canonical name is its
attribute path (``mlp.layers.0.kernel``); Dense kernels are ``[in, out]``.
Models are plain ``tf.Module``s (no Keras layers), called as ``m(x, training=...)``.
"""
from __future__ import annotations

import tensorflow as tf

ACTIVATIONS = {
    "relu": tf.nn.relu,
    "sigmoid": tf.sigmoid,
    "tanh": tf.tanh,
    "linear": lambda x: x,
    "none": lambda x: x,
    "leaky_relu": lambda x: tf.nn.leaky_relu(x, 0.01),
    "gelu": lambda x: tf.nn.gelu(x, approximate=True),
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; available: {', '.join(ACTIVATIONS)}") from None


class Module(tf.Module):
    """tf.Module whose variables carry an initialiser spec and a regularisation flag."""

    def _meta(self) -> dict:
        return self.__dict__.setdefault("_zoo_meta", {})

    def add_param(self, name: str, shape, init: str = "glorot_uniform", regularize: bool = True,
                  sparse: bool = False) -> tf.Variable:
        v = tf.Variable(tf.zeros([int(s) for s in shape]), trainable=True, name=name)
        self._meta()[name] = {"init": init, "regularize": regularize, "sparse": sparse, "state": False}
        setattr(self, name, v)
        return v

    def add_state(self, name: str, shape, init: str = "zeros") -> tf.Variable:
        v = tf.Variable(tf.zeros([int(s) for s in shape]), trainable=False, name=name)
        self._meta()[name] = {"init": init, "regularize": False, "sparse": False, "state": True}
        setattr(self, name, v)
        return v

    def zoo_named(self, prefix: str = ""):
        """Yield (canonical name, owner module, attribute) for every weight, like torch's named_parameters."""
        for k, v in list(vars(self).items()):
            if k.startswith("_"):
                continue
            if isinstance(v, tf.Variable) and k in self._meta():
                yield prefix + k, self, k
            elif isinstance(v, Module):
                yield from v.zoo_named(f"{prefix}{k}.")
            elif isinstance(v, (list, tuple)):
                for i, m in enumerate(v):
                    if isinstance(m, Module):
                        yield from m.zoo_named(f"{prefix}{k}.{i}.")

    def zoo_modules(self, prefix: str = ""):
        yield prefix.rstrip("."), self
        for k, v in list(vars(self).items()):
            if k.startswith("_"):
                continue
            if isinstance(v, Module):
                yield from v.zoo_modules(f"{prefix}{k}.")
            elif isinstance(v, (list, tuple)):
                for i, m in enumerate(v):
                    if isinstance(m, Module):
                        yield from m.zoo_modules(f"{prefix}{k}.{i}.")


class Dense(Module):
    """y = x @ kernel + bias, kernel [in, out] Glorot-uniform, bias zeros (not regularised)."""

    def __init__(self, in_dim: int, out_dim: int, use_bias: bool = True, init: str = "glorot_uniform"):
        super().__init__()
        self.add_param("kernel", (in_dim, out_dim), init)
        self.use_bias = use_bias
        if use_bias:
            self.add_param("bias", (out_dim,), "zeros", regularize=False)

    def __call__(self, x, training=False):
        y = tf.matmul(x, self.kernel) if len(x.shape) == 2 else tf.tensordot(x, self.kernel, 1)
        return y + self.bias if self.use_bias else y


class BatchNorm(Module):
    """Batch normalisation over the last axis, torch conventions (see zoo_torch.layers.base.BatchNorm)."""

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.add_param("gamma", (dim,), "ones", regularize=False)
        self.add_param("beta", (dim,), "zeros", regularize=False)
        self.add_state("moving_mean", (dim,), "zeros")
        self.add_state("moving_var", (dim,), "ones")

    def __call__(self, x, training=False):
        if training:
            mean, var = tf.nn.moments(x, axes=[0])
            n = tf.cast(tf.shape(x)[0], x.dtype)
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * (1 - m) + m * mean)
            self.moving_var.assign(self.moving_var * (1 - m) + m * var * n / tf.maximum(n - 1, 1.0))
        else:
            mean, var = self.moving_mean, self.moving_var
        return (x - mean) * tf.math.rsqrt(var + self.eps) * self.gamma + self.beta


class Dropout(Module):
    """Inverted dropout; masks come from a seeded stateless stream (``seed_rng`` in zoo_tf.init_weights)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = float(rate)
        self._rng = None

    def seed_rng(self, seed: int) -> None:
        if self.rate > 0:
            self._rng = tf.random.Generator.from_seed(seed)

    def __call__(self, x, training=False):
        if not training or self.rate <= 0.0:
            return x
        if self._rng is None:
            self.seed_rng(0)
        seed = self._rng.make_seeds(1)[:, 0]
        return tf.nn.experimental.stateless_dropout(x, self.rate, seed=seed)
