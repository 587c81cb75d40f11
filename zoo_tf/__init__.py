"""TensorFlow 2 side of the CTR zoo (mirror of zoo_torch).

    model = zoo_tf.build_model("DeepFM", schema, embed_size=16)
    logits = model(batch, training=False)      # batch from zoo_tf.data.batches(...)
    w = zoo_tf.get_weights(model)              # {canonical name: numpy array}, same as zoo_torch
"""
from __future__ import annotations

import importlib
import zlib

import numpy as np
import tensorflow as tf

from common.configs import MODELS, make_config, model_entry
from common.init import initial_value, param_rng

__all__ = ["build_model", "get_weights", "set_weights", "init_weights", "list_models", "count_params"]


def list_models() -> list[str]:
    return list(MODELS)


def model_class(name: str):
    entry = model_entry(name)
    mod = importlib.import_module(f"zoo_tf.models.{entry.module}")
    return getattr(mod, entry.cls)


def build_model(name: str, schema, **config):
    """Build a registered model from a schema; ``config`` overrides the model's config dataclass."""
    entry = model_entry(name)
    cfg = make_config(entry.name, **config)
    model = model_class(entry.name)(schema, cfg)
    model.model_name = entry.name
    init_weights(model, cfg.seed)
    return model


def named_weights(model) -> dict[str, tf.Variable]:
    return {name: getattr(owner, attr) for name, owner, attr in model.zoo_named()}


def weight_meta(model) -> dict[str, dict]:
    return {name: owner._meta()[attr] for name, owner, attr in model.zoo_named()}


def trainable_named(model) -> dict[str, tf.Variable]:
    return {n: getattr(o, a) for n, o, a in model.zoo_named() if not o._meta()[a]["state"]}


def init_weights(model, seed: int = 0) -> None:
    """Set every weight from its numpy initialiser (identical to zoo_torch for the same seed)."""
    from zoo_tf.layers.base import Dropout

    for name, owner, attr in model.zoo_named():
        v = getattr(owner, attr)
        v.assign(initial_value(owner._meta()[attr]["init"], v.shape, param_rng(seed, name)))
    for mname, m in model.zoo_modules():
        if isinstance(m, Dropout):
            m.seed_rng((int(seed) * 1000003 + zlib.crc32(mname.encode())) & 0x7FFFFFFF)


def get_weights(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in named_weights(model).items()}


def set_weights(model, weights: dict) -> None:
    own = named_weights(model)
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in own.items():
        a = np.asarray(weights[k])
        if tuple(a.shape) != tuple(v.shape):
            raise ValueError(f"weight {k}: shape {a.shape} != model's {tuple(v.shape)}")
        v.assign(a.astype(np.float32))


def count_params(model) -> int:
    return int(sum(np.prod(v.shape) for v in trainable_named(model).values()))
