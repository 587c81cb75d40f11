"""Parameter initialisers, computed in numpy so both backends start from identical weights.

A parameter declares an initialiser spec string; ``initial_value(spec, shape, rng)``
turns it into a float32 array.  The generator of every parameter is derived from
the model seed and the parameter's canonical name, so the same seed gives the same
initial weights in PyTorch and TensorFlow, independent of construction order.

Specs: ``zeros``, ``ones``, ``glorot_uniform`` (Xavier; dense kernels are stored
``[fan_in, fan_out]``), ``glorot_normal``, ``normal:<std>``, ``uniform:<limit>``,
``const:<value>``.
"""
from __future__ import annotations

import math
import zlib

import numpy as np


def param_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])


def fans(shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def initial_value(spec: str, shape, rng: np.random.Generator) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    kind, _, arg = spec.partition(":")
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    if kind == "ones":
        return np.ones(shape, np.float32)
    if kind == "const":
        return np.full(shape, float(arg), np.float32)
    if kind == "normal":
        return rng.normal(0.0, float(arg or 1.0), size=shape).astype(np.float32)
    if kind == "uniform":
        a = float(arg or 0.05)
        return rng.uniform(-a, a, size=shape).astype(np.float32)
    if kind == "glorot_uniform":
        fi, fo = fans(shape)
        a = math.sqrt(6.0 / (fi + fo))
        return rng.uniform(-a, a, size=shape).astype(np.float32)
    if kind == "glorot_normal":
        fi, fo = fans(shape)
        return rng.normal(0.0, math.sqrt(2.0 / (fi + fo)), size=shape).astype(np.float32)
    raise ValueError(f"unknown initialiser {spec!r}")
