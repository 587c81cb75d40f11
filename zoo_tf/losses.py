"""TensorFlow losses of the table in common/losses.py: ``get_loss(name) -> fn(logits, labels) -> mean loss``."""
from __future__ import annotations

import importlib

import tensorflow as tf

from common.losses import FOCAL_GAMMA, canonical_loss_name, is_formula_loss


def bce(z, y):
    return tf.reduce_mean(tf.nn.softplus(z) - y * z)


def mse(z, y):
    return tf.reduce_mean(tf.square(tf.sigmoid(z) - y))


def hinge(z, y):
    return tf.reduce_mean(tf.nn.relu(1.0 - (2.0 * y - 1.0) * z))


def focal(z, y, gamma: float = FOCAL_GAMMA):
    sp_pos = tf.nn.softplus(z)    # -log(1 - p)
    sp_neg = tf.nn.softplus(-z)   # -log p
    return tf.reduce_mean(y * tf.exp(-gamma * sp_pos) * sp_neg + (1.0 - y) * tf.exp(-gamma * sp_neg) * sp_pos)


_TABLE = {"BCE": bce, "MSE": mse, "Hinge": hinge, "Focal": focal}


def get_loss(name: str):
    """The loss function for ``name`` (see common/losses.py); formulas come from zoo_tf.loss_formula."""
    canon = canonical_loss_name(name)
    if is_formula_loss(canon):
        return importlib.import_module("zoo_tf.loss_formula").compile_loss(canon)
    return _TABLE[canon]
