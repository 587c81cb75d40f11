"""Loss table (common/losses.py): numpy reference values, gradient signs and values, both backends agree."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import tensorflow as tf
import torch

from common.losses import LOSSES, NAMED_FORMULAS, canonical_loss_name, is_formula_loss
from zoo_tf.losses import get_loss as tf_get_loss
from zoo_torch.losses import get_loss as torch_get_loss


def ref_loss(name, z, y):
    """Textbook definitions in float64 (fine for moderate |z|)."""
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    p = 1.0 / (1.0 + np.exp(-z))
    if name == "BCE":
        return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))
    if name == "MSE":
        return float(np.mean((p - y) ** 2))
    if name == "Hinge":
        return float(np.mean(np.maximum(0.0, 1.0 - (2 * y - 1) * z)))
    if name == "Focal":
        return float(np.mean(-(y * (1 - p) ** 2 * np.log(p) + (1 - y) * p ** 2 * np.log(1 - p))))
    raise KeyError(name)


def ref_grad(name, z, y, h=1e-5):
    """d(mean loss)/dz_i by central differences of the reference (float64)."""
    g = np.zeros(len(z))
    for i in range(len(z)):
        zp, zm = z.astype(np.float64).copy(), z.astype(np.float64).copy()
        zp[i] += h
        zm[i] -= h
        g[i] = (ref_loss(name, zp, y) - ref_loss(name, zm, y)) / (2 * h)
    return g


def torch_value_grad(name, z, y):
    zt = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    loss = torch_get_loss(name)(zt, torch.tensor(y, dtype=torch.float32))
    loss.backward()
    return float(loss), zt.grad.numpy()


def tf_value_grad(name, z, y):
    zt = tf.Variable(np.asarray(z, np.float32))
    with tf.GradientTape() as tape:
        loss = tf_get_loss(name)(zt, tf.constant(y, tf.float32))
    return float(loss), tape.gradient(loss, zt).numpy()


def sample(n=64, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, scale, n).astype(np.float32)
    z[np.abs(np.abs(z) - 1.0) < 1e-2] += 0.05          # keep away from the hinge's kink
    y = (rng.random(n) < 0.4).astype(np.float32)
    return z, y


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("backend", ["torch", "tf"])
def test_loss_matches_reference(name, backend):
    z, y = sample()
    value, grad = (torch_value_grad if backend == "torch" else tf_value_grad)(name, z, y)
    assert value == pytest.approx(ref_loss(name, z, y), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(grad, ref_grad(name, z, y), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("backend", ["torch", "tf"])
def test_gradient_sign(name, backend):
    """Raising the logit lowers the loss of a positive and raises that of a negative (where not flat)."""
    z = np.array([-4.0, -1.5, -0.3, 0.0, 0.4, 0.9, 3.0], np.float32)
    fn = torch_value_grad if backend == "torch" else tf_value_grad
    for label, sign in ((1.0, -1.0), (0.0, 1.0)):
        _, g = fn(name, z, np.full_like(z, label))
        active = np.ones_like(z, bool) if name != "Hinge" else (1 - (2 * label - 1) * z) > 0
        assert np.all(np.sign(g[active]) == sign), (label, g)
        if name == "Hinge":
            assert np.all(g[~active] == 0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_backends_agree(name):
    z, y = sample(256, scale=5.0, seed=1)
    tv, tg = torch_value_grad(name, z, y)
    fv, fg = tf_value_grad(name, z, y)
    assert tv == pytest.approx(fv, rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(tg, fg, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", list(LOSSES))
def test_extreme_logits_are_finite(name):
    z = np.array([-200.0, -60.0, 60.0, 200.0], np.float32)
    y = np.array([1.0, 0.0, 1.0, 0.0], np.float32)          # two badly wrong, two right
    expected = {"BCE": (200 + 0 + 0 + 200) / 4, "MSE": 0.5, "Hinge": (201 + 0 + 0 + 201) / 4,
                "Focal": (200 + 0 + 0 + 200) / 4}[name]
    for fn in (torch_value_grad, tf_value_grad):
        v, g = fn(name, z, y)
        assert np.isfinite(v) and np.all(np.isfinite(g))
        assert v == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_names():
    assert canonical_loss_name("bce") == "BCE"
    assert canonical_loss_name("LogLoss") == "BCE"
    assert canonical_loss_name("focal") == "Focal"
    assert canonical_loss_name("maxr") == "MaxR"
    assert canonical_loss_name("Formula: p - y") == "formula:p - y"
    assert is_formula_loss("formula:p") and is_formula_loss("LogMin") and not is_formula_loss("BCE")
    with pytest.raises(ValueError) as e:
        canonical_loss_name("kl")
    for n in (*LOSSES, *NAMED_FORMULAS):
        assert n in str(e.value)
    with pytest.raises(ValueError):
        canonical_loss_name("formula:")
    with pytest.raises(ValueError):
        torch_get_loss("nope")
    with pytest.raises(ValueError):
        tf_get_loss("nope")


@pytest.mark.parametrize("backend", ["zoo_torch", "zoo_tf"])
def test_formulas_are_delegated(backend, monkeypatch):
    """Formula names go to zoo_<backend>.loss_formula.compile_loss with the canonical name."""
    seen = []
    fake = types.ModuleType(f"{backend}.loss_formula")

    def compile_loss(name):
        seen.append(name)
        return "compiled"

    fake.compile_loss = compile_loss
    monkeypatch.setitem(sys.modules, f"{backend}.loss_formula", fake)
    get = torch_get_loss if backend == "zoo_torch" else tf_get_loss
    assert get("formula:log(p) * y") == "compiled"
    assert get("sumr") == "compiled"
    assert seen == ["formula:log(p) * y", "SumR"]
