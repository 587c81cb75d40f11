"""CIN (xDeepFM): the chunked layer maps with hand-written gradients (zoo_torch ``_CINMap``, zoo_tf
``_cin_map``) against the plain formula differentiated by autograd, in one chunk and in many."""
from __future__ import annotations

import pytest
import torch

from zoo_torch.layers.cin import CIN, _CINMap


@pytest.fixture(params=["one chunk", "chunks of 3 rows"])
def chunking(request, monkeypatch):
    """The default chunk budget (one chunk for these small inputs), or 3-row chunks with a remainder."""
    if request.param != "one chunk":
        import zoo_torch.layers.cin as cin_mod
        monkeypatch.setattr(cin_mod, "_chunk_rows", lambda x, x0: 3)
    return request.param


def test_chunk_rows_fit_the_budget():
    import zoo_torch.layers.cin as cin_mod
    x, x0 = torch.zeros(65536, 100), torch.zeros(65536, 39)
    rows = cin_mod._chunk_rows(x, x0)
    assert rows * 100 * 39 * 4 <= cin_mod.CHUNK_BYTES["cpu"] < (rows + 1) * 100 * 39 * 4
    assert cin_mod._chunk_rows(torch.zeros(4, 10 ** 6), torch.zeros(4, 39)) == 1   # never 0 rows


def test_cin_map_gradcheck(chunking):
    g = torch.Generator().manual_seed(0)
    n, h, m, out = 7, 3, 4, 5
    args = [torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(n, m, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(h * m, out, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(out, generator=g, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(_CINMap.apply, args)
    # the strided slice the CIN hands to the next layer works as input too
    wide = torch.randn(n, 2 * h, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, *a: _CINMap.apply(w[:, :h], *a), [wide] + args[1:])


@pytest.mark.parametrize("split_half", [True, False])
def test_cin_training_path_equals_plain_formula(split_half, chunking):
    torch.manual_seed(0)
    cin = CIN(5, (6, 4, 3), split_half=split_half).double()
    for p in cin.parameters():
        torch.nn.init.normal_(p, std=0.3)
    e = torch.randn(8, 5, 3, dtype=torch.float64, requires_grad=True)
    fast = cin(e)                                   # _CINMap, chunked
    g_fast = torch.autograd.grad(fast.square().sum(), [e, *cin.parameters()])
    with torch.no_grad():
        eval_value = cin(e)                         # evaluation: the same chunked forward
    traced = torch.jit.trace(cin, (e.detach(),))    # export path: the plain formula
    torch.testing.assert_close(fast, eval_value)
    torch.testing.assert_close(traced(e.detach()), fast.detach())
    assert not any(n.kind() == "prim::PythonOp" for n in traced.graph.nodes())   # no _CINMap in the trace

    def plain(e):                                   # the plain formula, differentiated by autograd
        b, m, d = e.shape
        x0 = e.transpose(1, 2).reshape(b * d, m)
        x, pooled = x0, []
        for k, layer in enumerate(cin.layers):
            xk = layer((x.unsqueeze(-1) * x0.unsqueeze(-2)).flatten(1))
            pooled.append(xk.view(b, d, -1)[..., cin.pool_from[k]:].sum(1))
            x = xk[:, :cin.next_maps[k]]
        return torch.cat(pooled, -1)

    ref = plain(e)
    g_ref = torch.autograd.grad(ref.square().sum(), [e, *cin.parameters()])
    assert tuple(cin(torch.zeros(0, 5, 3, dtype=torch.float64)).shape) == (0, cin.out_dim)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)


# ---- zoo_tf: _cin_map (tf.custom_gradient over a while_loop of row chunks) ---------------------------
@pytest.mark.parametrize("chunk_bytes", [None, 3 * 4 * 5 * 4])        # default: one chunk; 3-row chunks
@pytest.mark.parametrize("split_half", [True, False])
def test_tf_cin_equals_plain_formula_with_gradients(monkeypatch, chunk_bytes, split_half):
    import numpy as np
    import tensorflow as tf

    import zoo_tf.layers.cin as tf_cin

    if chunk_bytes:
        monkeypatch.setattr(tf_cin, "CHUNK_BYTES", chunk_bytes)
        assert tf_cin._chunk_rows(4, 5) == 3
    cin = tf_cin.CIN(5, (6, 4, 3), split_half=split_half)
    rng = np.random.default_rng(0)
    for v in cin.trainable_variables:
        v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32))
    e = tf.constant(rng.normal(0, 1, (8, 5, 3)).astype(np.float32))     # N = 24 rows

    def plain(e):
        x0 = tf.transpose(e, [0, 2, 1])
        x, pooled = x0, []
        for k, layer in enumerate(cin.layers):
            z = x[:, :, :, None] * x0[:, :, None, :]
            xk = layer(tf.reshape(z, [-1, z.shape[1], z.shape[2] * z.shape[3]]))
            pooled.append(tf.reduce_sum(xk[..., cin.pool_from[k]:], 1))
            x = xk[..., :cin.next_maps[k]]
        return tf.concat(pooled, -1)

    def value_and_grads(fn):
        with tf.GradientTape() as tape:
            tape.watch(e)
            y = fn(e)
            loss = tf.reduce_sum(tf.square(y))
        return y, tape.gradient(loss, [e, *cin.trainable_variables])

    for run in (lambda f: f, tf.function):                 # eager and traced
        y, grads = value_and_grads(run(cin.__call__))
        y_ref, grads_ref = value_and_grads(plain)
        np.testing.assert_allclose(y.numpy(), y_ref.numpy(), rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, grads_ref):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
    empty = cin(tf.zeros([0, 5, 3]))
    assert tuple(empty.shape) == (0, cin.out_dim)
