"""PyTorch side of the CTR zoo.

    model = zoo_torch.build_model("DeepFM", schema, embed_size=16)
    logits = model(batch)                      # batch from zoo_torch.data.batches(...)
    w = zoo_torch.get_weights(model)           # {canonical name: numpy array}, same as zoo_tf
"""
from __future__ import annotations

import importlib

import numpy as np
import torch

from common.configs import MODELS, make_config, model_entry
from common.init import initial_value, param_rng

__all__ = ["build_model", "get_weights", "set_weights", "init_weights", "list_models", "count_params"]


def list_models() -> list[str]:
    return list(MODELS)


def model_class(name: str):
    entry = model_entry(name)
    mod = importlib.import_module(f"zoo_torch.models.{entry.module}")
    return getattr(mod, entry.cls)


def build_model(name: str, schema, **config):
    """Build a registered model from a schema; ``config`` overrides the model's config dataclass."""
    entry = model_entry(name)
    cfg = make_config(entry.name, **config)
    model = model_class(entry.name)(schema, cfg)
    model.model_name = entry.name
    init_weights(model, cfg.seed)
    return model


def named_weights(model):
    """Canonical name -> tensor (parameters and moving statistics)."""
    out = dict(model.named_parameters())
    out.update(dict(model.named_buffers()))
    return out


def init_weights(model, seed: int = 0) -> None:
    """Set every weight from its numpy initialiser (identical to zoo_tf for the same seed)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(initial_value(p.zoo_init, p.shape, param_rng(seed, name))))
        for mname, m in model.named_modules():
            for bname, init in getattr(m, "zoo_state_inits", {}).items():
                full = f"{mname}.{bname}" if mname else bname
                b = getattr(m, bname)
                b.copy_(torch.from_numpy(initial_value(init, b.shape, param_rng(seed, full))))


def get_weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in named_weights(model).items()}


def set_weights(model, weights: dict) -> None:
    own = named_weights(model)
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for k, t in own.items():
            a = np.asarray(weights[k])
            if tuple(a.shape) != tuple(t.shape):
                raise ValueError(f"weight {k}: shape {a.shape} != model's {tuple(t.shape)}")
            t.copy_(torch.from_numpy(a.astype(np.float32)))


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
