"""NASRec supernet / standalone subnets / zero-shot proxies: PyTorch vs TensorFlow parity and weight sharing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
import torch

import zoo_tf
import zoo_torch
from common.nas_space import (DENSE_OPS, SearchSpace, SupernetLayout, as_path, default_subnet,
                              extract_subnet_weights, sample_subnet)
from common.schema import Field, Schema
from zoo_tf import proxies as fp
from zoo_tf import supernet as fs
from zoo_torch import proxies as tp
from zoo_torch import supernet as ts

EMBED = 8
SMALL_T = SearchSpace.small(num_blocks=4, dense_widths=(8, 16, 32), sparse_widths=(4, 8))
FULL_T = SearchSpace.full(num_blocks=4, dense_widths=(8, 16, 32), sparse_widths=(4, 8), attention_heads=2)
SPACES = {"small": SMALL_T, "full": FULL_T}


def make_schema(n_num: int = 2) -> Schema:
    fields = [Field(f"c{i}", "categorical", vocab_size=v) for i, v in enumerate((13, 7, 29, 5))]
    fields += [Field(f"n{i}", "numeric") for i in range(n_num)]
    fields.append(Field("hist", "sequence", vocab_size=13, embedding_group="c0", max_len=5))
    return Schema(fields=fields)


def numpy_batch(schema: Schema, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    b = {f.name: rng.integers(0, f.vocab_size, n).astype(np.int32) for f in schema.categorical}
    b.update({f.name: rng.normal(0, 1, n).astype(np.float32) for f in schema.numeric})
    for f in schema.sequence:
        s = rng.integers(1, f.vocab_size, (n, f.max_len)).astype(np.int32)
        s[np.arange(f.max_len)[None, :] >= rng.integers(0, f.max_len + 1, n)[:, None]] = 0
        b[f.name] = s
    b["label"] = (rng.random(n) < 0.4).astype(np.float32)
    return b


def to_torch(b):
    return {k: torch.from_numpy(v) for k, v in b.items()}


def to_tf(b):
    return {k: tf.constant(v) for k, v in b.items()}


def perturbed(weights: dict, seed: int) -> dict:
    """Non-trivial weights (layer-norm scales, biases, embeddings all away from their init)."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for k, v in weights.items()}


def pair_of_supernets(space, schema, full_steps=0, path_seed=0, seed=0, perturb=None):
    n1 = ts.build_supernet(schema, space, full_steps=full_steps, path_seed=path_seed, embed_size=EMBED, seed=seed)
    n2 = fs.build_supernet(schema, space, full_steps=full_steps, path_seed=path_seed, embed_size=EMBED, seed=seed)
    if perturb is not None:
        w = perturbed(zoo_torch.get_weights(n1), perturb)
        zoo_torch.set_weights(n1, w)
        zoo_tf.set_weights(n2, w)
    return n1, n2


def configs_covering_ops(space, seed, n_random=4):
    """Random subnets plus ones putting every op (and both merge flags) in the last block."""
    rng = np.random.default_rng(seed)
    out = [sample_subnet(space, rng) for _ in range(n_random)]
    for op in space.dense_ops:
        for sop in space.sparse_ops:
            c = sample_subnet(space, rng)
            out.append(c.replace_block(space.num_blocks - 1, dense_op=op, sparse_op=sop,
                                       dense_to_sparse=1, sparse_to_dense=1))
    return out


# ----------------------------------------------------------------------------------------------
# supernet: PyTorch == TensorFlow
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPACES))
def test_supernet_forward_parity_for_sampled_paths(name):
    space, schema = SPACES[name], make_schema()
    n1, n2 = pair_of_supernets(space, schema, full_steps=6, path_seed=3)
    w1, w2 = zoo_torch.get_weights(n1), zoo_tf.get_weights(n2)
    assert sorted(w1) == sorted(w2)
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    b = numpy_batch(schema, 24, 0)
    tb, fb = to_torch(b), to_tf(b)
    n_full = 0
    for _ in range(8):                       # no path given: each call samples one (same seed -> same paths)
        a = n1(tb).detach().numpy()
        c = n2(fb, training=True).numpy()
        assert n1.last_path == n2.last_path
        n_full += n1.last_config is None
        assert a.shape == (24,)
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=2e-5)
    assert 1 <= n_full < 8                   # the full supernet and subnets were both drawn
    for cfg in configs_covering_ops(space, 1, n_random=2):
        np.testing.assert_allclose(n1(tb, path=cfg).detach().numpy(), n2(fb, path=cfg).numpy(),
                                   rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(n1(tb, path="full").detach().numpy(), n2(fb, path="full").numpy(),
                               rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# subnet view == standalone NASRec with copied weights
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPACES))
def test_subnet_view_equals_standalone_with_copied_weights(name):
    space, schema = SPACES[name], make_schema()
    n1, n2 = pair_of_supernets(space, schema, perturb=5)
    b = numpy_batch(schema, 16, 1)
    tb, fb = to_torch(b), to_tf(b)
    sup = zoo_torch.get_weights(n1)
    for cfg in configs_covering_ops(space, 2, n_random=1):
        view1, view2 = n1.subnet(cfg), n2.subnet(cfg)
        m1, m2 = ts.standalone_from_supernet(n1, cfg), fs.standalone_from_supernet(n2, cfg)
        w1, w2 = zoo_torch.get_weights(m1), zoo_tf.get_weights(m2)
        assert sorted(w1) == sorted(w2) and all(np.array_equal(w1[k], w2[k]) for k in w1)
        # the standalone is smaller than the supernet, with supernet names
        assert set(w1) <= set(sup) and sum(v.size for v in w1.values()) < sum(v.size for v in sup.values())
        v1, s1 = view1(tb).detach().numpy(), m1(tb).detach().numpy()
        v2, s2 = view2(fb).numpy(), m2(fb).numpy()
        np.testing.assert_allclose(s1, v1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s2, v2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=2e-5)
        assert np.abs(v1).max() > 1e-2                    # not a trivially zero network


# ----------------------------------------------------------------------------------------------
# elastic width by slicing == elastic width by masking (independent numpy reference)
# ----------------------------------------------------------------------------------------------
def _ln(x, g, b, axis=-1, active=None):
    """Layer norm over ``axis``; with ``active`` only the first ``active`` entries are normalised
    (statistics over them) and the rest are masked to zero."""
    x = np.moveaxis(x, axis, -1)
    n = x.shape[-1] if active is None else active
    a = x[..., :n]
    mu = a.mean(-1, keepdims=True)
    var = ((a - mu) ** 2).mean(-1, keepdims=True)
    y = np.zeros_like(x)
    y[..., :n] = (a - mu) / np.sqrt(var + 1e-5) * g[:n] + b[:n]
    return np.moveaxis(y, -1, axis)


def _masked_supernet_forward(W, space, layout, cfg, dense0, sparse0):
    """The supernet with full-size tensors: unselected sources are zeros, kernels are used whole,
    inactive output channels are masked to zero."""
    M, S, m, d = layout.M, layout.S, layout.m, layout.d
    P = layout.binary_size
    B = dense0.shape[0]
    dense, sparse = [dense0], [sparse0]
    for i, blk in enumerate(cfg.blocks):
        p, w, s = f"blocks.{i}.", blk.dense_width, blk.sparse_width
        X = np.concatenate([dense[j] * (j in blk.dense_in) for j in range(i + 1)], 1)
        SP = np.concatenate([sparse[j] * (j in blk.sparse_in) for j in range(i + 1)], 1)

        def side(j):
            return np.pad(dense[j], ((0, 0), (0, P - dense[j].shape[1])))

        if blk.dense_op == "fc":
            out = np.maximum(_ln(X @ W[p + "fc.linear.kernel"], W[p + "fc.norm.gamma"], W[p + "fc.norm.beta"],
                                 active=w), 0)
        elif blk.dense_op == "dot":
            a = _ln(X @ W[p + "dot.dense_proj.kernel"], W[p + "dot.dense_norm.gamma"], W[p + "dot.dense_norm.beta"])
            y = _ln(np.einsum("bnd,nk->bkd", SP, W[p + "dot.sparse_proj.kernel"]), W[p + "dot.sparse_norm.gamma"],
                    W[p + "dot.sparse_norm.beta"], axis=1)
            t = np.concatenate([a[:, None], y], 1)
            z = t @ t.transpose(0, 2, 1)
            li, lj = np.tril_indices(t.shape[1], -1)
            out = _ln(z[:, li, lj] @ W[p + "dot.out.kernel"], W[p + "dot.norm.gamma"], W[p + "dot.norm.beta"],
                      active=w)
        elif blk.dense_op == "gating":
            g = 1 / (1 + np.exp(-(side(blk.left) @ W[p + "gating.gate.kernel"] + W[p + "gating.gate.bias"])))
            out = _ln((g * side(blk.right)) @ W[p + "gating.out.kernel"], W[p + "gating.norm.gamma"],
                      W[p + "gating.norm.beta"], active=w)
        else:
            out = _ln((side(blk.left) + side(blk.right)) @ W[p + "sum.out.kernel"], W[p + "sum.norm.gamma"],
                      W[p + "sum.norm.beta"], active=w)
        assert blk.sparse_op == "efc"
        y = np.maximum(_ln(np.einsum("bnd,ns->bsd", SP, W[p + "efc.linear.kernel"]), W[p + "efc.norm.gamma"],
                           W[p + "efc.norm.beta"], axis=1, active=s), 0)
        merge = np.zeros((B, m, d))
        if blk.dense_to_sparse:
            merge = _ln(out @ W[p + "to_sparse.linear.kernel"], W[p + "to_sparse.norm.gamma"],
                        W[p + "to_sparse.norm.beta"]).reshape(B, m, d)
        if blk.sparse_to_dense:
            fm = 0.5 * (y.sum(1) ** 2 - (y * y).sum(1))
            out = out + _ln(fm @ W[p + "to_dense.linear.kernel"], W[p + "to_dense.norm.gamma"],
                            W[p + "to_dense.norm.beta"], active=w)
        assert out.shape == (B, M) and y.shape == (B, S, d)
        dense.append(out)
        sparse.append(np.concatenate([y, merge], 1))
    feats = np.concatenate([dense[-1], sparse[-1].reshape(B, -1)], 1)
    return (feats @ W["head.kernel"] + W["head.bias"])[:, 0]


def test_elastic_slicing_equals_masked_supernet():
    space = SearchSpace(name="no-attention", dense_ops=DENSE_OPS, sparse_ops=("efc",), num_blocks=4,
                        dense_widths=(8, 16, 32), sparse_widths=(4, 8))
    schema = make_schema()
    net = ts.build_supernet(schema, space, embed_size=EMBED, seed=1)
    zoo_torch.set_weights(net, perturbed(zoo_torch.get_weights(net), 9))
    W = {k: v.astype(np.float64) for k, v in zoo_torch.get_weights(net).items()}
    b = numpy_batch(schema, 12, 3)
    tb = to_torch(b)
    sparse0 = net.embedding(tb).detach().numpy().astype(np.float64)
    dense0 = np.stack([b["n0"], b["n1"]], 1).astype(np.float64)
    layout = net.layout
    for cfg in configs_covering_ops(space, 4, n_random=6):
        ref = _masked_supernet_forward(W, space, layout, cfg, dense0, sparse0)
        np.testing.assert_allclose(net(tb, path=cfg).detach().numpy(), ref, rtol=1e-4, atol=1e-4)


def test_subnet_gradients_touch_only_its_slice_of_shared_weights():
    schema = make_schema()
    space = FULL_T
    net = ts.build_supernet(schema, space, embed_size=EMBED)
    rng = np.random.default_rng(0)
    cfg = sample_subnet(space, rng)
    cfg = (cfg.replace_block(1, dense_width=16)
           .replace_block(2, dense_op="fc", dense_in=(0, 2), dense_width=8, sparse_op="efc")
           .replace_block(3, dense_op="fc", dense_in=(3,), sparse_in=(3,)))     # block 2 feeds the last block
    tb = to_torch(numpy_batch(schema, 16, 2))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(tb, path=cfg), tb["label"])
    loss.backward()
    blk = net.blocks[2]
    g = blk.fc.linear.kernel.grad.numpy()
    d0, M = net.layout.d0, net.layout.M
    allowed = np.zeros_like(g, bool)
    allowed[:d0, :8] = True                                  # the stem
    allowed[d0 + M:d0 + M + 16, :8] = True                   # block 1's output: its 16 active channels
    assert np.all(g[~allowed] == 0) and np.abs(g[allowed]).sum() > 0
    assert blk.dot.out.kernel.grad is None and blk.gating.gate.kernel.grad is None
    assert blk.attention.proj.kernel.grad is None and blk.efc.linear.kernel.grad is not None
    eg = net.embedding.weight.grad
    assert eg.is_sparse                                      # row-sparse embedding gradients are kept


def test_head_finetune_snapshot_and_restore():
    schema = make_schema()
    n1, n2 = pair_of_supernets(SMALL_T, schema, seed=4)
    cfg = sample_subnet(SMALL_T, np.random.default_rng(1))
    b = numpy_batch(schema, 16, 5)
    tb, fb = to_torch(b), to_tf(b)
    before1, before2 = zoo_torch.get_weights(n1), zoo_tf.get_weights(n2)
    y1, y2 = n1(tb, path=cfg).detach().numpy(), n2(fb, path=cfg).numpy()
    s1, s2 = ts.snapshot_weights(n1), fs.snapshot_weights(n2)
    # one SGD step on the head only (what scoring by head fine-tuning does)
    opt = torch.optim.SGD(ts.head_parameters(n1), lr=0.5)
    torch.nn.functional.binary_cross_entropy_with_logits(n1(tb, path=cfg), tb["label"]).backward()
    opt.step()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=fb["label"], logits=n2(fb, path=cfg)))
    for v, g in zip(fs.head_parameters(n2), tape.gradient(loss, fs.head_parameters(n2))):
        v.assign_sub(0.5 * g)
    a1, a2 = zoo_torch.get_weights(n1), zoo_tf.get_weights(n2)
    changed1 = {k for k in a1 if not np.array_equal(a1[k], before1[k])}
    assert changed1 == {"head.kernel", "head.bias"} == {k for k in a2 if not np.array_equal(a2[k], before2[k])}
    np.testing.assert_allclose(a1["head.kernel"], a2["head.kernel"], rtol=1e-4, atol=1e-6)
    ts.restore_weights(n1, s1)
    fs.restore_weights(n2, s2)
    np.testing.assert_array_equal(n1(tb, path=cfg).detach().numpy(), y1)
    np.testing.assert_array_equal(n2(fb, path=cfg).numpy(), y2)


# ----------------------------------------------------------------------------------------------
# standalone NASRec model (registered)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_num", [2, 0])
def test_nasrec_standalone_parity_default_and_from_json(n_num, tmp_path):
    schema = make_schema(n_num)
    b = numpy_batch(schema, 20, 4)
    path = tmp_path / "subnet.json"
    sample_subnet(FULL_T, np.random.default_rng(7)).save(str(path))
    outs = []
    for kw in ({}, {"supernet_config": str(path)}, {"supernet_config": str(path), "activation": "tanh"},
               {"supernet_config": default_subnet().to_dict()}):
        m1 = zoo_torch.build_model("NASRec", schema, embed_size=EMBED, seed=3, **kw)
        m2 = zoo_tf.build_model("NASRec", schema, embed_size=EMBED, seed=3, **kw)
        w1, w2 = zoo_torch.get_weights(m1), zoo_tf.get_weights(m2)
        assert sorted(w1) == sorted(w2) and all(np.array_equal(w1[k], w2[k]) for k in w1)
        w = perturbed(w1, 1)
        zoo_torch.set_weights(m1, w)
        zoo_tf.set_weights(m2, w)
        a, c = m1(to_torch(b)).detach().numpy(), m2(to_tf(b), training=True).numpy()
        assert a.shape == (20,) and np.abs(a).max() > 1e-2
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=2e-5)
        outs.append(a)
    assert m1.subnet == default_subnet()
    assert np.abs(outs[1] - outs[2]).max() > 1e-3        # same subnet and weights, relu vs tanh


# ----------------------------------------------------------------------------------------------
# zero-shot proxies: PyTorch == TensorFlow; subnet view == standalone
# ----------------------------------------------------------------------------------------------
def _assert_proxies_close(p, q, rtol=2e-4):
    assert set(p) == {"loss", "fisher_rao", "mean_abs_grad", "zico", "sigeo"} == set(q)
    for k in p:
        assert math.isfinite(p[k]), k
        assert p[k] == pytest.approx(q[k], rel=rtol, abs=1e-6), k


def test_proxies_parity_across_backends_and_view_equals_standalone():
    schema = make_schema()
    batches = [numpy_batch(schema, 32, 10 + i) for i in range(3)]
    tbs, fbs = tp.numpy_batches_to_torch(batches), fp.numpy_batches_to_tf(batches)
    # standalone default NASRec
    m1 = zoo_torch.build_model("NASRec", schema, embed_size=EMBED, seed=2)
    m2 = zoo_tf.build_model("NASRec", schema, embed_size=EMBED, seed=2)
    w = perturbed(zoo_torch.get_weights(m1), 3)
    zoo_torch.set_weights(m1, w)
    zoo_tf.set_weights(m2, w)
    p1 = tp.zero_shot_proxies(m1, tbs, zico_coef=1, fr_coef=1, loss_coef=0.5)
    p2 = fp.zero_shot_proxies(m2, fbs, zico_coef=1, fr_coef=1, loss_coef=0.5)
    _assert_proxies_close(p1, p2)
    assert p1["sigeo"] == pytest.approx(-p1["zico"] - p1["fisher_rao"] + 0.5 * p1["loss"])
    assert tp.sigeo_score(m1, tbs) == pytest.approx(-p1["zico"] - p1["fisher_rao"], rel=1e-9)
    # subnet views of the Full supernet
    n1, n2 = pair_of_supernets(FULL_T, schema, perturb=4)
    for cfg in configs_covering_ops(FULL_T, 6, n_random=1)[:2]:
        q1 = tp.zero_shot_proxies(n1.subnet(cfg), tbs)
        q2 = fp.zero_shot_proxies(n2.subnet(cfg), fbs)
        _assert_proxies_close(q1, q2)
        # only the subnet's slice of the shared weights gets gradients -> same ZiCo/FR/loss as standalone
        s1 = tp.zero_shot_proxies(ts.standalone_from_supernet(n1, cfg), tbs)
        for k in ("zico", "fisher_rao", "loss", "sigeo"):
            assert s1[k] == pytest.approx(q1[k], rel=1e-5), k
    # proxies depend on the architecture
    other = tp.zero_shot_proxies(n1.subnet(sample_subnet(FULL_T, np.random.default_rng(99))), tbs)
    assert other["zico"] != pytest.approx(q1["zico"], rel=1e-3)


def test_extract_weights_shapes_follow_the_layout():
    schema = make_schema()
    layout = SupernetLayout(FULL_T, 2, schema.num_fields, EMBED)
    net = ts.build_supernet(schema, FULL_T, embed_size=EMBED)
    cfg = default_subnet(SearchSpace.full(num_blocks=3))
    with pytest.raises(ValueError):
        net(to_torch(numpy_batch(schema, 4, 0)), path=cfg)          # a config from another space
    cfg = sample_subnet(FULL_T, np.random.default_rng(3))
    w = extract_subnet_weights(zoo_torch.get_weights(net), cfg, layout)
    m = zoo_torch.build_model("NASRec", schema, embed_size=EMBED, supernet_config=cfg.to_json())
    own = zoo_torch.get_weights(m)
    assert {k: v.shape for k, v in w.items()} == {k: v.shape for k, v in own.items()}
    last = cfg.blocks[-1]
    assert w["head.kernel"].shape == (last.dense_width + (last.sparse_width + 8 * last.dense_to_sparse) * EMBED, 1)
    assert as_path(cfg)[0].dense_ops == (cfg.blocks[0].dense_op,)
