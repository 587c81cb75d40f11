"""Zero-shot proxies of a (sub)network from a few training batches (PyTorch; mirror of zoo_tf/proxies.py).

    p = zero_shot_proxies(model, batches, zico_coef=1, fr_coef=1, loss_coef=0)
    p["sigeo"], p["zico"], p["fisher_rao"], p["mean_abs_grad"], p["loss"]

``model`` is any zoo model, a supernet ``SubnetView`` or anything called as ``model(batch)``
returning logits.  Gradients of the mean binary cross-entropy are taken at the current
weights for every batch (no update in between); the proxy arithmetic is
common.evolution.proxies_from_gradients, shared with TensorFlow.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.evolution import proxies_from_gradients

__all__ = ["gradient_samples", "zero_shot_proxies", "sigeo_score"]


def _to_numpy(g):
    if g.is_sparse:
        g = g.coalesce()
        return g.indices()[0].cpu().numpy(), g.values().detach().cpu().numpy()
    return None, g.detach().cpu().numpy()


def gradient_samples(model, batches, training: bool = False, include_penalty: bool = False):
    """Per-batch gradients {name: (rows or None, values)}, the weights that got gradients {name: array},
    per-batch losses, and the number of trainable parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names, tensors = list(params), list(params.values())
    was_training = model.training
    model.train(training)
    grads, losses = [], []
    try:
        for batch in batches:
            logits = model(batch)
            loss = F.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.dtype))
            total = loss + model.penalty(logits.shape[0]) if include_penalty else loss
            gs = torch.autograd.grad(total, tensors, allow_unused=True)
            grads.append({n: _to_numpy(g) for n, g in zip(names, gs) if g is not None})
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    used = set().union(*[set(g) for g in grads]) if grads else set()
    theta = {n: params[n].detach().cpu().numpy() for n in used}
    n_elements = _subnet_elements(model)
    if n_elements is None:
        n_elements = sum(p.numel() for p in tensors)
    return grads, theta, losses, n_elements


def _subnet_elements(model):
    """For a supernet SubnetView: the weight count of its standalone network (so that mean |grad|
    is normalised by the subnet's size, as for the standalone model); None otherwise."""
    cfg, net = getattr(model, "subnet_config", None), getattr(model, "supernet", None)
    if cfg is None or net is None:
        return None
    from common.nas_space import subnet_param_count

    shapes = {n: tuple(p.shape) for n, p in net.named_parameters() if p.requires_grad}
    return subnet_param_count(cfg, net.layout, shapes)


def zero_shot_proxies(model, batches, zico_coef: float = 1.0, fr_coef: float = 1.0, loss_coef: float = 0.0,
                      training: bool = False, include_penalty: bool = False) -> dict:
    """loss, fisher_rao, mean_abs_grad, zico, sigeo (= -zico_coef*ZiCo - fr_coef*FR + loss_coef*loss)."""
    grads, theta, losses, n_elements = gradient_samples(model, batches, training, include_penalty)
    return proxies_from_gradients(grads, theta, losses, zico_coef, fr_coef, loss_coef, n_elements)


def sigeo_score(model, batches, zico_coef: float = 1.0, fr_coef: float = 1.0, loss_coef: float = 0.0) -> float:
    """The SiGeo score alone (lower is better, as regularized evolution minimises)."""
    return float(zero_shot_proxies(model, batches, zico_coef, fr_coef, loss_coef)["sigeo"])


def numpy_batches_to_torch(batches):
    """Helper: numpy batch dicts -> torch batch dicts."""
    return [{k: torch.from_numpy(np.asarray(v)) for k, v in b.items()} for b in batches]
