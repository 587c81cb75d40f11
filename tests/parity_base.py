"""The TensorFlow-free part of the parity checks (tests/parity_utils.py): small model configs, the
training config and drift bars, random starting weights -- shared with benchmarks/gpu_check.py, which
runs where TensorFlow is not installed."""
from __future__ import annotations

import dataclasses

import numpy as np

import zoo_torch
from common.configs import model_entry

TRAIN_CONFIG = dict(activation="tanh", batch_norm=False, l2=1e-4, l2_embedding=1e-4, seed=11)
SENSITIVITY_FACTOR = 10.0       # drift allowed between two implementations, relative to float32's own drift
WEIGHT_CAP = 1e-2               # never more than this, whatever float32's own drift

SMALL = dict(embed_size=8, mlp=(32, 16), cin_layers=(8, 8), attention_dim=8, attention_size=8,
             attention_layers=2, num_heads=2, cross_layers=2, dropout=0.0, attention_dropout=0.0)


def small_config(name, **extra):
    """The small test config, restricted to the keys the model's dataclass has.

    A model whose default ``mlp`` is empty (AutoInt: no DNN) keeps it empty.
    """
    fields = {f.name: f for f in dataclasses.fields(model_entry(name).config)}
    cfg = {k: v for k, v in {**SMALL, **extra}.items() if k in fields}
    if "mlp" in fields and not fields["mlp"].default:
        cfg.pop("mlp", None)
    return cfg


def rel(a, b, floor=1e-12):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(np.abs(a).max(), floor))


def random_weights(tm, seed=1):
    """Non-trivial weights of O(1) activations (init zeros/1e-4 tables would hide most differences)."""
    rng = np.random.default_rng(seed)
    sparse = {n for n, p in tm.named_parameters() if getattr(p, "zoo_sparse", False)}
    out = {}
    for k, a in zoo_torch.get_weights(tm).items():
        last = k.rsplit(".", 1)[-1]
        if last == "moving_var" or last == "gamma":
            v = rng.uniform(0.5, 1.5, a.shape)
        elif last == "moving_mean":
            v = rng.normal(0, 0.1, a.shape)
        elif k in sparse:
            v = rng.normal(0, 0.3, a.shape)
        elif a.ndim >= 2:
            v = rng.normal(0, 1.0 / np.sqrt(a.shape[-2]), a.shape)
        else:
            v = rng.normal(0, 0.1, a.shape)
        out[k] = v.astype(np.float32)
    return out


def to_float64(batch):
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
