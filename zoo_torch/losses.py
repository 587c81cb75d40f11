"""PyTorch losses of the table in common/losses.py: ``get_loss(name) -> fn(logits, labels) -> mean loss``."""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from common.losses import FOCAL_GAMMA, canonical_loss_name, is_formula_loss


def bce(z, y):
    return (F.softplus(z) - y * z).mean()


def mse(z, y):
    return (torch.sigmoid(z) - y).square().mean()


def hinge(z, y):
    return torch.relu(1.0 - (2.0 * y - 1.0) * z).mean()


def focal(z, y, gamma: float = FOCAL_GAMMA):
    sp_pos = F.softplus(z)        # -log(1 - p)
    sp_neg = F.softplus(-z)       # -log p
    return (y * torch.exp(-gamma * sp_pos) * sp_neg + (1.0 - y) * torch.exp(-gamma * sp_neg) * sp_pos).mean()


_TABLE = {"BCE": bce, "MSE": mse, "Hinge": hinge, "Focal": focal}


def get_loss(name: str):
    """The loss function for ``name`` (see common/losses.py); formulas come from zoo_torch.loss_formula."""
    canon = canonical_loss_name(name)
    if is_formula_loss(canon):
        return importlib.import_module("zoo_torch.loss_formula").compile_loss(canon)
    return _TABLE[canon]
