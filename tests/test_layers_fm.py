"""FMInteraction's closed-form backward and ``share`` (the FM term plus the same ``e`` for a DNN), whose
PyTorch backward folds the FM gradient into the DNN's: all equal autograd of the plain formula."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo_torch.layers.interactions import FMInteraction, _FMShare, _FMSum


def plain_fm(e):
    s = e.sum(1)
    return 0.5 * ((s * s).sum(1) - (e * e).sum((1, 2)))


def test_fm_matches_the_pairwise_sum():
    e = torch.randn(5, 4, 3, dtype=torch.float64)
    pairs = sum((e[:, i] * e[:, j]).sum(1) for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(FMInteraction()(e), pairs)
    y, e2 = FMInteraction().share(e)
    torch.testing.assert_close(y, pairs)
    assert e2 is e                                    # nothing to fold without gradients


@pytest.mark.parametrize("use", ["both", "fm_only", "e_only"])
def test_share_gradcheck(use):
    torch.manual_seed(0)
    e = torch.randn(6, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(15, dtype=torch.float64)

    def f(x):
        y, x2 = _FMShare.apply(x)
        dnn = torch.tanh(x2.flatten(1) @ w)
        return {"both": y * 0.7 + dnn, "fm_only": y, "e_only": dnn}[use]

    assert torch.autograd.gradcheck(f, (e,))
    assert torch.autograd.gradcheck(_FMSum.apply, (e,))


def test_share_equals_plain_autograd_in_a_deepfm_shaped_graph():
    torch.manual_seed(1)
    e0 = torch.randn(64, 7, 4)
    k = torch.randn(28, 5)
    label = torch.randint(0, 2, (64,)).float()
    grads = []
    for mode in ("share", "plain"):
        e = e0.clone().requires_grad_(True)
        if mode == "share":
            y_fm, e2 = FMInteraction().share(e)
        else:
            y_fm, e2 = plain_fm(e), e
        logits = y_fm + torch.relu(e2.flatten(1) @ k).sum(1)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, label).backward()
        grads.append((logits.detach(), e.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)


def test_share_is_plain_ops_in_a_trace():
    e = torch.randn(3, 4, 2)
    traced = torch.jit.trace(lambda x: (lambda y, e2: y + e2.sum((1, 2)))(*FMInteraction().share(x)),
                             e.requires_grad_(True))
    assert "PythonOp" not in str(traced.graph)
    np.testing.assert_allclose(traced(e).detach().numpy(), (plain_fm(e) + e.sum((1, 2))).detach().numpy(),
                               rtol=1e-6, atol=1e-6)


def test_tf_share_is_the_fm_term_and_e():
    import tensorflow as tf

    from zoo_tf.layers.interactions import FMInteraction as TFFM

    e = np.random.default_rng(2).normal(size=(8, 5, 3)).astype(np.float32)
    y, e2 = TFFM().share(tf.constant(e))
    np.testing.assert_allclose(y.numpy(), plain_fm(torch.from_numpy(e)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(e2.numpy(), e)
