"""Optimisers (common/optim.py rules) in both backends against a hand-written numpy reference.

A toy model with a dense kernel, a bias, a row-sparse table and a parameter that
never gets a gradient is updated for a few steps from given gradients (sparse
ones with duplicate indices and untouched rows); after every step all weights
and optimiser slots must match the float64 reference, lazy variants must leave
untouched rows and their moments bit-identical, and a state_dict round trip
must resume bit-identically.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import tensorflow as tf
import torch

import zoo_tf
import zoo_torch
from common.optim import OPTIMIZERS, OptimizerConfig, canonical_optimizer_name, make_optimizer_config
from zoo_tf import optim as tf_optim
from zoo_tf.layers.base import Module as TFModule
from zoo_torch import optim as torch_optim
from zoo_torch.layers.base import Module as TorchModule

ROWS, DIM, TOUCHABLE = 10, 4, 7          # sparse table rows; only rows < TOUCHABLE ever get gradients
SHAPES = {"w": (3, DIM), "b": (DIM,), "table": (ROWS, DIM), "unused": (2,)}
SPARSE = {"w": False, "b": False, "table": True, "unused": False}

CASES = {
    "Adam": dict(name="Adam", lr=0.05, eps=0.3),          # large eps: its placement matters
    "LazyAdam": dict(name="LazyAdam", lr=0.05, beta1=0.8, beta2=0.99, eps=0.1),
    "Adagrad": dict(name="Adagrad", lr=0.1, initial_accumulator=0.1),
    "LazyAdagrad": dict(name="LazyAdagrad", lr=0.1),
    "SGD": dict(name="SGD", lr=0.1),
    "SGD-momentum": dict(name="SGD", lr=0.1, momentum=0.9),
}


# ----- toy models ------------------------------------------------------------------------
class TorchToy(TorchModule):
    def __init__(self):
        super().__init__()
        for n, s in SHAPES.items():
            self.add_param(n, s, "zeros", regularize=n != "b", sparse=SPARSE[n])


class TFToy(TFModule):
    def __init__(self):
        super().__init__()
        for n, s in SHAPES.items():
            self.add_param(n, s, "zeros", regularize=n != "b", sparse=SPARSE[n])


def initial_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0, 1, s).astype(np.float32) for n, s in SHAPES.items()}


def gradient_stream(steps, seed=1):
    """Per step: {name: dense array | (indices, row values)}; 'unused' never gets a gradient."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        idx = rng.integers(0, TOUCHABLE, 6)
        idx[1] = idx[0]                                       # always at least one duplicate
        out.append({"w": rng.normal(0, 1, SHAPES["w"]).astype(np.float32),
                    "b": rng.normal(0, 1, SHAPES["b"]).astype(np.float32),
                    "table": (idx.astype(np.int64), rng.normal(0, 1, (6, DIM)).astype(np.float32))})
    return out


# ----- the numpy reference: the rules of common/optim.py, written out --------------------
class Reference:
    def __init__(self, cfg: OptimizerConfig, weights):
        self.c = cfg
        self.p = {n: w.astype(np.float64) for n, w in weights.items()}
        self.t = 0
        self.lr = cfg.lr
        init = {"m": 0.0, "v": 0.0, "accumulator": cfg.initial_accumulator, "momentum": 0.0}
        self.s = {n: {s: np.full(w.shape, init[s]) for s in cfg.slot_names()} for n, w in weights.items()}

    def step(self, grads):
        c, lr = self.c, self.lr
        self.t += 1
        t = self.t
        for n, g in grads.items():
            p, s = self.p[n], self.s[n]
            if isinstance(g, tuple):
                idx, vals = g
                dense = np.zeros(p.shape)
                np.add.at(dense, idx, vals.astype(np.float64))      # duplicates summed
                rows = np.unique(idx) if (c.lazy and SPARSE[n]) else np.arange(p.shape[0])
                g = dense[rows]
            else:
                rows = slice(None)
                g = g.astype(np.float64)
            if c.base == "Adam":
                s["m"][rows] = c.beta1 * s["m"][rows] + (1 - c.beta1) * g
                s["v"][rows] = c.beta2 * s["v"][rows] + (1 - c.beta2) * g ** 2
                mhat = s["m"][rows] / (1 - c.beta1 ** t)
                vhat = s["v"][rows] / (1 - c.beta2 ** t)
                p[rows] -= lr * mhat / (np.sqrt(vhat) + c.eps)
            elif c.base == "Adagrad":
                s["accumulator"][rows] += g ** 2
                p[rows] -= lr * g / (np.sqrt(s["accumulator"][rows]) + c.eps)
            elif c.momentum > 0:
                s["momentum"][rows] = c.momentum * s["momentum"][rows] + g
                p[rows] -= lr * s["momentum"][rows]
            else:
                p[rows] -= lr * g


# ----- backend drivers -------------------------------------------------------------------
class TorchRun:
    def __init__(self, cfg, weights, wrap=None, fused=True):
        self.model = TorchToy()
        zoo_torch.set_weights(self.model, weights)
        self.opt = torch_optim.build_optimizer(wrap(self.model) if wrap else self.model, cfg)
        if not fused:
            self.opt._fused = False          # the foreach fallback for builds without torch._fused_adam_

    def step(self, grads):
        params = dict(self.model.named_parameters())
        self.opt.zero_grad()
        for n, g in grads.items():
            if isinstance(g, tuple):
                idx, vals = g
                params[n].grad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(vals),
                                                         SHAPES[n])
            else:
                params[n].grad = torch.from_numpy(g.copy())
        self.opt.step()

    def set_lr(self, lr):
        self.opt.lr = lr

    def weights(self):
        return zoo_torch.get_weights(self.model)

    def slots(self):
        return {n: {s: t.detach().numpy().copy() for s, t in sl.items()}
                for n, sl in self.opt.state_dict()["state"].items()}


class TFRun:
    def __init__(self, cfg, weights, use_function=True):
        self.model = TFToy()
        zoo_tf.set_weights(self.model, weights)
        self.opt = tf_optim.build_optimizer(self.model, cfg)
        self.apply = tf.function(self.opt.apply, reduce_retracing=True) if use_function else self.opt.apply

    def step(self, grads):
        tg = {}
        for n, g in grads.items():
            if isinstance(g, tuple):
                idx, vals = g
                tg[n] = tf.IndexedSlices(tf.constant(vals), tf.constant(idx), tf.constant(SHAPES[n], tf.int64))
            else:
                tg[n] = tf.constant(g)
        self.apply(tg)

    def set_lr(self, lr):
        self.opt.set_lr(lr)

    def weights(self):
        return zoo_tf.get_weights(self.model)

    def slots(self):
        return self.opt.state_dict()["state"]


def assert_matches_reference(run, ref, what):
    w = run.weights()
    for n in SHAPES:
        np.testing.assert_allclose(w[n], ref.p[n], rtol=2e-5, atol=2e-6, err_msg=f"{what}: weight {n}")
    slots = run.slots()
    for n in SHAPES:
        for s, a in ref.s[n].items():
            np.testing.assert_allclose(slots[n][s], a, rtol=2e-5, atol=2e-6, err_msg=f"{what}: slot {n}/{s}")


def run_and_check(run, cfg, steps=6, what=""):
    """Drive ``run`` and the reference through the same gradients, checking every step."""
    w0 = initial_weights()
    ref = Reference(cfg, w0)
    lazy_rows = cfg.lazy or cfg.base == "Adagrad" or (cfg.base == "SGD" and cfg.momentum == 0)
    moved_untouched = False
    for k, grads in enumerate(gradient_stream(steps)):
        if k == 3:                                   # LR decay between steps
            run.set_lr(cfg.lr * 0.5)
            ref.lr = cfg.lr * 0.5
        before_w, before_s = run.weights(), run.slots()
        run.step(grads)
        ref.step(grads)
        assert_matches_reference(run, ref, f"{what} step {k + 1}")
        after_w, after_s = run.weights(), run.slots()
        # a parameter without gradient never changes, nor does its state
        assert np.array_equal(after_w["unused"], before_w["unused"])
        for s in after_s["unused"]:
            assert np.array_equal(after_s["unused"][s], before_s["unused"][s])
        untouched = np.setdiff1d(np.arange(ROWS), grads["table"][0])
        same = np.array_equal(after_w["table"][untouched], before_w["table"][untouched])
        for s in after_s["table"]:
            same = same and np.array_equal(after_s["table"][s][untouched], before_s["table"][s][untouched])
        if lazy_rows:
            assert same, f"{what} step {k + 1}: untouched rows or their state changed"
        moved_untouched |= not same
    if not lazy_rows:   # dense Adam / momentum: moments of untouched rows decay and the rows keep moving
        assert moved_untouched


@pytest.mark.parametrize("case", list(CASES))
def test_torch_matches_reference(case):
    cfg = OptimizerConfig(**CASES[case])
    run_and_check(TorchRun(cfg, initial_weights()), cfg, what=f"torch {case}")


@pytest.mark.parametrize("case", ["Adam", "LazyAdam"])
def test_torch_foreach_fallback_matches_reference(case):
    cfg = OptimizerConfig(**CASES[case])
    run = TorchRun(cfg, initial_weights(), fused=False)
    run_and_check(run, cfg, what=f"torch foreach {case}")
    assert run.opt._fused is False


@pytest.mark.parametrize("case", list(CASES))
def test_tf_matches_reference(case):
    cfg = OptimizerConfig(**CASES[case])
    run_and_check(TFRun(cfg, initial_weights()), cfg, what=f"tf {case}")


def test_tf_eager_apply_matches_reference():
    cfg = OptimizerConfig(name="LazyAdam", lr=0.05)
    run_and_check(TFRun(cfg, initial_weights(), use_function=False), cfg, what="tf eager LazyAdam")


def test_torch_optimizer_sees_through_wrappers():
    cfg = OptimizerConfig(name="Adam", lr=0.05)
    run = TorchRun(cfg, initial_weights(), wrap=torch.nn.DataParallel)
    assert set(run.opt.state_dict()["state"]) == set(SHAPES)          # canonical names, no "module."
    run_and_check(run, cfg, what="torch DataParallel Adam")


@pytest.mark.parametrize("case", ["Adam", "LazyAdam", "Adagrad", "SGD-momentum"])
def test_backends_agree_on_state(case):
    cfg = OptimizerConfig(**CASES[case])
    tr, fr = TorchRun(cfg, initial_weights()), TFRun(cfg, initial_weights())
    for grads in gradient_stream(5):
        tr.step(grads)
        fr.step(grads)
    ts, fs = tr.opt.state_dict(), fr.opt.state_dict()
    assert ts["step"] == fs["step"] == 5 and ts["config"] == fs["config"]
    for n in SHAPES:
        np.testing.assert_allclose(tr.weights()[n], fr.weights()[n], rtol=1e-5, atol=1e-6)
        for s in cfg.slot_names():
            np.testing.assert_allclose(ts["state"][n][s].numpy(), fs["state"][n][s], rtol=1e-5, atol=1e-6)


# ----- exact resume ----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["Adam", "LazyAdam", "LazyAdagrad", "SGD-momentum"])
def test_torch_state_dict_resumes_exactly(case):
    cfg = OptimizerConfig(**CASES[case])
    grads = gradient_stream(6)
    a = TorchRun(cfg, initial_weights())
    for g in grads[:3]:
        a.step(g)
    a.set_lr(0.02)
    saved_w, saved_opt = a.weights(), copy.deepcopy(a.opt.state_dict())
    for g in grads[3:]:
        a.step(g)
    b = TorchRun(OptimizerConfig(**CASES[case]), initial_weights(seed=7))
    zoo_torch.set_weights(b.model, saved_w)
    b.opt.load_state_dict(saved_opt)
    assert b.opt.lr == 0.02 and b.opt.num_steps == 3
    for g in grads[3:]:
        b.step(g)
    for n, w in a.weights().items():
        assert np.array_equal(w, b.weights()[n]), n
    for n, sl in a.slots().items():
        for s, v in sl.items():
            assert np.array_equal(v, b.slots()[n][s]), (n, s)


@pytest.mark.parametrize("case", ["Adam", "LazyAdam", "LazyAdagrad", "SGD-momentum"])
def test_tf_state_dict_resumes_exactly(case):
    cfg = OptimizerConfig(**CASES[case])
    grads = gradient_stream(6)
    a = TFRun(cfg, initial_weights())
    for g in grads[:3]:
        a.step(g)
    a.set_lr(0.02)
    saved_w, saved_opt = a.weights(), a.opt.state_dict()
    for g in grads[3:]:
        a.step(g)
    b = TFRun(OptimizerConfig(**CASES[case]), initial_weights(seed=7))
    zoo_tf.set_weights(b.model, saved_w)
    b.opt.load_state_dict(saved_opt)
    assert abs(float(b.opt.lr.numpy()) - 0.02) < 1e-9 and b.opt.num_steps == 3
    for g in grads[3:]:
        b.step(g)
    for n, w in a.weights().items():
        assert np.array_equal(w, b.weights()[n]), n
    for n, sl in a.slots().items():
        for s, v in sl.items():
            assert np.array_equal(v, b.slots()[n][s]), (n, s)


@pytest.mark.parametrize("case", ["LazyAdam", "SGD-momentum"])
def test_state_dict_moves_between_backends(case):
    """torch state_dict -> TF load_state_dict (and back): training continues on the other backend."""
    cfg = OptimizerConfig(**CASES[case])
    grads = gradient_stream(6)
    tr = TorchRun(cfg, initial_weights())
    for g in grads[:3]:
        tr.step(g)
    fr = TFRun(OptimizerConfig(**CASES[case]), initial_weights(seed=7))
    zoo_tf.set_weights(fr.model, tr.weights())
    fr.opt.load_state_dict(tr.opt.state_dict())
    assert fr.opt.num_steps == 3
    tr2 = TorchRun(OptimizerConfig(**CASES[case]), initial_weights(seed=8))
    for g in grads[3:]:
        tr.step(g)
        fr.step(g)
    zoo_torch.set_weights(tr2.model, fr.weights())
    tr2.opt.load_state_dict(fr.opt.state_dict())
    assert tr2.opt.num_steps == 6
    for n in SHAPES:
        np.testing.assert_allclose(fr.weights()[n], tr.weights()[n], rtol=1e-5, atol=1e-6)
        for s in cfg.slot_names():
            np.testing.assert_allclose(tr2.slots()[n][s], tr.slots()[n][s], rtol=1e-5, atol=1e-6)


def test_tf_checkpoint_of_optimizer_variables(tmp_path):
    cfg = OptimizerConfig(**CASES["LazyAdam"])
    grads = gradient_stream(5)
    a = TFRun(cfg, initial_weights())
    for g in grads[:2]:
        a.step(g)
    path = tf.train.Checkpoint(model=a.model, optimizer=a.opt.trackable).write(str(tmp_path / "ckpt"))
    for g in grads[2:]:
        a.step(g)
    b = TFRun(OptimizerConfig(**CASES["LazyAdam"]), initial_weights(seed=7))
    tf.train.Checkpoint(model=b.model, optimizer=b.opt.trackable).read(path).assert_consumed()
    assert b.opt.num_steps == 2
    assert len(b.opt.variables()) == 2 + 2 * len(SHAPES)       # iterations, lr, m and v per parameter
    for g in grads[2:]:
        b.step(g)
    for n, w in a.weights().items():
        assert np.array_equal(w, b.weights()[n]), n


def test_state_dict_rejects_other_optimizer():
    a = TorchRun(OptimizerConfig(**CASES["Adam"]), initial_weights())
    b = TorchRun(OptimizerConfig(**CASES["Adagrad"]), initial_weights())
    with pytest.raises(ValueError, match="Adam"):
        b.opt.load_state_dict(a.opt.state_dict())
    fa = TFRun(OptimizerConfig(**CASES["Adam"]), initial_weights())
    fb = TFRun(OptimizerConfig(**CASES["SGD"]), initial_weights())
    with pytest.raises(ValueError, match="Adam"):
        fb.opt.load_state_dict(fa.opt.state_dict())


# ----- real sparse gradients ---------------------------------------------------------------
def test_real_embedding_gradients_lazy_adam():
    """Gradients produced by F.embedding(sparse=True) / tf.gather (duplicates, two lookups) inside a tf.function."""
    cfg = OptimizerConfig(name="LazyAdam", lr=0.05)
    w0 = initial_weights()
    tm, fm = TorchToy(), TFToy()
    zoo_torch.set_weights(tm, w0)
    zoo_tf.set_weights(fm, w0)
    topt, fopt = torch_optim.build_optimizer(tm, cfg), tf_optim.build_optimizer(fm, cfg)
    ref = Reference(cfg, w0)
    x = np.random.default_rng(3).normal(0, 1, (5, 3)).astype(np.float32)

    @tf.function(reduce_retracing=True)
    def tf_step(i1, i2):
        with tf.GradientTape() as tape:
            e = tf.gather(fm.table, i1) + tf.reduce_sum(tf.gather(fm.table, i2), 1)
            loss = tf.reduce_sum(tf.tanh(x @ fm.w + e + fm.b))
        vs = zoo_tf.trainable_named(fm)
        grads = dict(zip(vs, tape.gradient(loss, list(vs.values()))))
        fopt.apply(grads)
        return grads["table"]

    rng = np.random.default_rng(4)
    for k in range(4):
        i1 = rng.integers(0, TOUCHABLE, 5)
        i2 = rng.integers(0, TOUCHABLE, (5, 2))
        topt.zero_grad()
        e = torch.nn.functional.embedding(torch.from_numpy(i1), tm.table, sparse=True) + \
            torch.nn.functional.embedding(torch.from_numpy(i2), tm.table, sparse=True).sum(1)
        torch.tanh(torch.from_numpy(x) @ tm.w + e + tm.b).sum().backward()
        assert tm.table.grad.is_sparse
        tgrads = {n: p.grad.coalesce() if p.grad.is_sparse else p.grad.clone()
                  for n, p in tm.named_parameters() if p.grad is not None}
        topt.step()
        g_tab = tf_step(tf.constant(i1), tf.constant(i2))
        assert isinstance(g_tab, tf.IndexedSlices)
        tg = tgrads["table"]
        ref.step({"w": tgrads["w"].numpy(), "b": tgrads["b"].numpy(),
                  "table": (tg.indices()[0].numpy(), tg.values().numpy())})
        untouched = np.setdiff1d(np.arange(ROWS), np.concatenate([i1, i2.ravel()]))
        for run_w in (zoo_torch.get_weights(tm), zoo_tf.get_weights(fm)):
            for n in ("w", "b", "table"):
                np.testing.assert_allclose(run_w[n], ref.p[n], rtol=2e-5, atol=2e-6, err_msg=f"step {k}: {n}")
            assert np.array_equal(run_w["table"][untouched], w0["table"][untouched]) or k > 0


# ----- configuration -----------------------------------------------------------------------
def test_config_names_and_defaults():
    assert canonical_optimizer_name("lazyadam") == "LazyAdam"
    assert canonical_optimizer_name("ADAGRAD") == "Adagrad"
    assert make_optimizer_config("sgd", 0.1, momentum=0.9).momentum == 0.9
    assert make_optimizer_config("Adam", 1e-3).eps == 1e-8
    assert make_optimizer_config("LazyAdagrad", 1e-2).eps == 1e-10
    assert make_optimizer_config("LazyAdam", 1e-3).lazy and make_optimizer_config("LazyAdam", 1e-3).base == "Adam"
    with pytest.raises(ValueError) as e:
        make_optimizer_config("rmsprop", 1e-3)
    for n in OPTIMIZERS:
        assert n in str(e.value)
    with pytest.raises(ValueError, match="unknown optimizer option"):
        make_optimizer_config("Adam", 1e-3, betas=(0.9, 0.99))
    with pytest.raises(ValueError):
        make_optimizer_config("Adagrad", 1e-3, eps=0.0)
