"""Zero-shot proxies of a (sub)network from a few training batches (TensorFlow; mirror of zoo_torch/proxies.py).

    p = zero_shot_proxies(model, batches, zico_coef=1, fr_coef=1, loss_coef=0)
    p["sigeo"], p["zico"], p["fisher_rao"], p["mean_abs_grad"], p["loss"]

``model(batch, training=...)`` returns logits (any zoo model or a supernet SubnetView).
The proxy arithmetic is common.evolution.proxies_from_gradients, shared with PyTorch.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from common.evolution import proxies_from_gradients

__all__ = ["gradient_samples", "zero_shot_proxies", "sigeo_score"]


def _to_numpy(g):
    if isinstance(g, tf.IndexedSlices):
        return g.indices.numpy().astype(np.int64), g.values.numpy()   # duplicates are summed downstream
    return None, g.numpy()


def gradient_samples(model, batches, training: bool = False, include_penalty: bool = False):
    """Per-batch gradients {name: (rows or None, values)}, the weights that got gradients {name: array},
    per-batch losses, and the number of trainable parameters."""
    params = {n: getattr(o, a) for n, o, a in model.zoo_named() if not o._meta()[a]["state"]}
    names, variables = list(params), list(params.values())
    grads, losses = [], []
    for batch in batches:
        with tf.GradientTape() as tape:
            logits = model(batch, training=training)
            label = tf.cast(batch["label"], logits.dtype)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=label, logits=logits))
            total = loss + model.penalty(tf.shape(logits)[0]) if include_penalty else loss
        gs = tape.gradient(total, variables)
        grads.append({n: _to_numpy(g) for n, g in zip(names, gs) if g is not None})
        losses.append(float(loss.numpy()))
    used = set().union(*[set(g) for g in grads]) if grads else set()
    theta = {n: params[n].numpy() for n in used}
    n_elements = _subnet_elements(model)
    if n_elements is None:
        n_elements = int(sum(np.prod(v.shape) for v in variables))
    return grads, theta, losses, n_elements


def _subnet_elements(model):
    """Mirror of zoo_torch.proxies._subnet_elements (SubnetView: the standalone network's weight count)."""
    cfg, net = getattr(model, "subnet_config", None), getattr(model, "supernet", None)
    if cfg is None or net is None:
        return None
    from common.nas_space import subnet_param_count

    shapes = {n: tuple(int(s) for s in getattr(o, a).shape) for n, o, a in net.zoo_named() if not o._meta()[a]["state"]}
    return subnet_param_count(cfg, net.layout, shapes)


def zero_shot_proxies(model, batches, zico_coef: float = 1.0, fr_coef: float = 1.0, loss_coef: float = 0.0,
                      training: bool = False, include_penalty: bool = False) -> dict:
    grads, theta, losses, n_elements = gradient_samples(model, batches, training, include_penalty)
    return proxies_from_gradients(grads, theta, losses, zico_coef, fr_coef, loss_coef, n_elements)


def sigeo_score(model, batches, zico_coef: float = 1.0, fr_coef: float = 1.0, loss_coef: float = 0.0) -> float:
    return float(zero_shot_proxies(model, batches, zico_coef, fr_coef, loss_coef)["sigeo"])


def numpy_batches_to_tf(batches):
    return [{k: tf.constant(np.asarray(v)) for k, v in b.items()} for b in batches]
