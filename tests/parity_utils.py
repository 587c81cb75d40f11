"""The PyTorch/TensorFlow parity checks, shared by tests/test_parity.py and benchmarks/zoo_table.py.

Each ``*_check(name, data, figures=None)`` runs one check of test_parity.py for
one model on ``data`` (:func:`parity_data` of the ``random_dataset`` fixture's
dataset) and raises AssertionError (or ``pytest.fail``'s exception) when a bar
is missed.  The numbers it measures are put into ``figures`` as they are
computed, so a caller that catches the failure still has them:

- forward_check:  logit_init, logit_eval, logit_train (max |logit_torch - logit_tf|), state
- gradient_check: loss_delta, grad_rel (worst relative gradient difference), worst
- training_check: per optimiser ``<opt>/weight_rel`` (worst relative weight difference after
  STEPS steps), ``<opt>/loss_delta``, ``<opt>/auc_delta``, ``<opt>/float32_drift``, and
  ``weight_rel`` = the worst over the optimisers
- roundtrip_check: prob_delta

See test_parity.py's docstring for what is checked and why.
"""
from __future__ import annotations

import os
import types

import numpy as np
import pytest
import tensorflow as tf
import torch

import zoo_tf
import zoo_tf.data
import zoo_torch
import zoo_torch.data
from common.metrics import auc
from parity_base import (SENSITIVITY_FACTOR, SMALL, TRAIN_CONFIG, WEIGHT_CAP, random_weights, rel,  # noqa: F401
                         small_config, to_float64)
from common.optim import make_optimizer_config
from zoo_tf import losses as tf_losses, optim as tf_optim, step as tf_step
from zoo_torch import losses as torch_losses, optim as torch_optim, step as torch_step

BATCH = 64
STEPS = 50
EPOCHS = 6                      # 600 train rows / 64 = 10 batches per epoch
LOGIT_TOL = 1e-5
GRAD_TOL = 1e-4
WEIGHT_TOL = 1e-4
AUC_TOL = 1e-3
GRAD_FLOOR = 1e-2               # 'tiny' of the gradient check, as a fraction of the model's largest gradient

REPORT = os.environ.get("ZOO_PARITY_REPORT")     # optional path: append one line of numbers per check


def report(model, **numbers):
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(f"{model} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in numbers.items()) + "\n")


def build_pair(name, schema, **extra):
    cfg = small_config(name, **extra)
    return zoo_torch.build_model(name, schema, **cfg), zoo_tf.build_model(name, schema, **cfg)



def set_both(tm, fm, w):
    zoo_torch.set_weights(tm, w)
    zoo_tf.set_weights(fm, w)


def tf_forward(fm, batch, training):
    keys = zoo_tf.data.element_spec(fm.schema)
    return fm({k: batch[k] for k in keys}, training=training).numpy()


def torch_forward(tm, batch, training):
    tm.train(training)
    with torch.no_grad():
        return tm(batch).numpy()


def assert_same_weights(wt, wf, tol, what, exact=False):
    assert sorted(wt) == sorted(wf), f"{what}: weight names differ"
    worst = 0.0
    for k in wt:
        assert wt[k].shape == wf[k].shape, f"{what}: {k} shape {wt[k].shape} vs {wf[k].shape}"
        if exact:
            assert np.array_equal(wt[k], wf[k]), f"{what}: {k} differs"
        else:
            r = rel(wt[k], wf[k])
            assert r <= tol, f"{what}: {k} relative difference {r:.3g} > {tol}"
            worst = max(worst, r)
    return worst


# ----- data: the same batches from both loaders ------------------------------------------------
def parity_data(random_dataset):
    """Train batches (the first STEPS of EPOCHS shuffled epochs) and valid batches from both loaders,
    checked equal; ``random_dataset`` is a dataset written by conftest.write_random_dataset."""
    tb = zoo_torch.data.batches(random_dataset, "train", BATCH, shuffle=True, seed=0, prefetch=0)
    torch_train, tf_train = [], []
    for e in range(EPOCHS):
        tb.set_epoch(e)
        torch_train += list(tb)
        tf_train += list(zoo_tf.data.batches(random_dataset, "train", BATCH, shuffle=True, seed=0, epoch=e,
                                             prefetch=0))
    torch_valid = list(zoo_torch.data.batches(random_dataset, "valid", BATCH, shuffle=False, prefetch=0))
    tf_valid = list(zoo_tf.data.batches(random_dataset, "valid", BATCH, shuffle=False, prefetch=0))
    assert len(torch_train) >= STEPS and len(torch_train) == len(tf_train) and len(torch_valid) == len(tf_valid)
    for bt, bf in zip(torch_train + torch_valid, tf_train + tf_valid):
        assert sorted(bt) == sorted(bf)
        for k in bt:
            assert np.array_equal(bt[k].numpy(), bf[k].numpy()), f"loaders disagree on {k}"
    schema = tb.schema
    assert len(schema.categorical) == 4 and len(schema.numeric) == 2 and len(schema.sequence) == 1
    return types.SimpleNamespace(schema=schema, torch_train=torch_train[:STEPS], tf_train=tf_train[:STEPS],
                                 torch_valid=torch_valid, tf_valid=tf_valid)


# ----- (a) forward --------------------------------------------------------------------------------
def forward_check(name, data, figures=None, **variant):
    figures = {} if figures is None else figures
    tm, fm = build_pair(name, data.schema, batch_norm=True, seed=3, **variant)
    assert_same_weights(zoo_torch.get_weights(tm), zoo_tf.get_weights(fm), 0, "initial weights", exact=True)
    bt, bf = data.torch_train[0], data.tf_train[0]

    d_init = np.abs(torch_forward(tm, bt, False) - tf_forward(fm, bf, False)).max()
    figures["logit_init"] = float(d_init)
    assert d_init <= LOGIT_TOL, f"eval logits with initial weights differ by {d_init:.3g}"

    w = random_weights(tm)
    set_both(tm, fm, w)
    assert_same_weights(zoo_torch.get_weights(tm), zoo_tf.get_weights(fm), 0, "set_weights", exact=True)
    lt = torch_forward(tm, bt, False)
    d_eval = np.abs(lt - tf_forward(fm, bf, False)).max()
    figures["logit_eval"] = float(d_eval)
    assert d_eval <= LOGIT_TOL, f"eval logits differ by {d_eval:.3g}"
    assert np.std(lt) > 1e-2, "random weights give near-constant logits: the check would be vacuous"

    d_train = np.abs(torch_forward(tm, bt, True) - tf_forward(fm, bf, True)).max()
    figures["logit_train"] = float(d_train)
    assert d_train <= LOGIT_TOL, f"train-mode logits differ by {d_train:.3g}"
    # batch-norm moving statistics (and everything else) after the train-mode forward
    wt, wf = zoo_torch.get_weights(tm), zoo_tf.get_weights(fm)
    d_state = assert_same_weights(wt, wf, 1e-5, "weights after train-mode forward")
    figures["state"] = d_state
    has_bn = any(k.endswith("moving_mean") for k in wt)
    if has_bn:
        assert any(not np.array_equal(wt[k], w[k]) for k in wt if k.endswith("moving_mean"))
    report(name, check="forward", logit_init=float(d_init), logit_eval=float(d_eval), logit_train=float(d_train),
           state=d_state, max_logit=float(np.abs(lt).max()), batch_norm=has_bn)
    return figures


# ----- (b) gradients ------------------------------------------------------------------------------
def torch_gradients(tm, batch):
    tm.train()
    for p in tm.parameters():
        p.grad = None
    logits = tm(batch)
    loss = torch_losses.get_loss("BCE")(logits, batch["label"]) + tm.penalty(logits.shape[0])
    loss.backward()
    out = {}
    for n, p in tm.named_parameters():
        if p.grad is not None:
            out[n] = (p.grad.to_dense() if p.grad.is_sparse else p.grad).numpy()
    return float(loss), out


def tf_gradients(fm, batch):
    keys = zoo_tf.data.element_spec(fm.schema)
    batch = {k: batch[k] for k in keys}
    named = zoo_tf.trainable_named(fm)
    with tf.GradientTape() as tape:
        logits = fm(batch, training=True)
        loss = tf_losses.get_loss("BCE")(logits, batch["label"]) + fm.penalty(tf.shape(logits)[0])
    grads = tape.gradient(loss, list(named.values()))
    out = {}
    for (n, v), g in zip(named.items(), grads):
        if g is None:
            continue
        if isinstance(g, tf.IndexedSlices):
            g = tf.math.unsorted_segment_sum(g.values, g.indices, v.shape[0])
        out[n] = g.numpy()
    return float(loss), out


def gradient_check(name, data, figures=None, **variant):
    """Relative difference max|dg| / max(max|g|, tiny), tiny = GRAD_FLOOR * (largest gradient of the model).

    The floor matters only for gradients that are mathematically zero, e.g. a
    dense bias right before a batch norm (the norm removes it): both backends
    give float32 round-off there (~1e-8 of the largest gradient), which a pure
    relative measure would call a 100% difference.  Those are still compared
    absolutely, at 1e-6 of the largest gradient.
    """
    figures = {} if figures is None else figures
    tm, fm = build_pair(name, data.schema, batch_norm=True, l2=1e-2, l2_embedding=1e-2, seed=5, **variant)
    set_both(tm, fm, random_weights(tm, seed=2))
    lt, gt = torch_gradients(tm, data.torch_train[1])
    lf, gf = tf_gradients(fm, data.tf_train[1])
    figures["loss_delta"] = abs(lt - lf)
    assert abs(lt - lf) <= 1e-5 * max(1.0, abs(lt)), f"loss {lt} vs {lf}"
    assert sorted(gt) == sorted(gf), "different parameters receive gradients"
    assert set(gt) == {n for n, _ in tm.named_parameters()}, "some parameters get no gradient"
    scale = max(np.abs(g).max() for g in gt.values())
    worst, worst_name = 0.0, ""
    for n in gt:
        assert gt[n].shape == gf[n].shape
        r = rel(gt[n], gf[n], floor=GRAD_FLOOR * scale)
        if r > worst:
            worst, worst_name = r, n
    figures["grad_rel"], figures["worst"] = worst, worst_name
    assert worst <= GRAD_TOL, f"gradient of {worst_name}: relative difference {worst:.3g}"
    report(name, check="gradient", loss_delta=abs(lt - lf), grad_rel=worst, worst=worst_name)
    return figures


# ----- (c) training -------------------------------------------------------------------------------
OPTIMIZERS = {"Adam": dict(lr=1e-3), "LazyAdam": dict(lr=1e-3)}


def float64_trajectory(name, schema, w0, oc, batches):
    """The same torch steps in float64: (weights, per-step losses) free of float32 round-off."""
    tm = zoo_torch.build_model(name, schema, **small_config(name, **TRAIN_CONFIG))
    zoo_torch.set_weights(tm, w0)
    tm.double()
    ts = torch_step.TrainStep(tm, torch_optim.build_optimizer(tm, oc), torch_losses.get_loss("BCE"))
    losses = [float(ts(to_float64(b))) for b in batches]
    return zoo_torch.get_weights(tm), np.array(losses)


def training_check(name, data, figures=None, **variant):
    """50 steps of each optimiser through zoo_*.step.TrainStep; then weights, predictions and AUC.

    Bars: per tensor max|w_torch - w_tf| / max|w_torch| <= 1e-4, the 50 per-step
    training losses within 1e-4, validation AUC within 1e-3.

    Adam's division by sqrt(v) + eps turns float32 round-off of a (nearly) zero
    gradient into a step of a sizeable fraction of lr, and a ReLU kink crossed in
    one backend but not the other changes a step discretely; after 50 steps such
    events dominate whatever the backends compute.  To keep the comparison about
    the backends: training starts from random weights (with the zero-initialised
    linear part and 1e-4 embeddings every logit is ~0, p = 0.5 exactly in
    float32, and a row seen with as many positives as negatives gets a round-off
    gradient), the activation is tanh where configurable (ReLU is covered by (a)
    and (b)), and batch_norm is off (a dense bias before a batch norm has an
    exactly zero gradient).

    Where weights or losses still exceed the bar, the same torch steps are run in
    float64 and the backends may differ by at most SENSITIVITY_FACTOR times
    float32's own drift (torch float32 vs float64), never more than WEIGHT_CAP.
    A wrong update rule or gradient moves weights systematically and fails both.
    """
    figures = {} if figures is None else figures
    tm, fm = build_pair(name, data.schema, **{**TRAIN_CONFIG, **variant})
    w0 = random_weights(tm, seed=6)
    for opt_name, kw in OPTIMIZERS.items():
        set_both(tm, fm, w0)
        oc = make_optimizer_config(opt_name, **kw)
        ts = torch_step.TrainStep(tm, torch_optim.build_optimizer(tm, oc), torch_losses.get_loss("BCE"))
        fs = tf_step.TrainStep(fm, tf_optim.build_optimizer(fm, oc), tf_losses.get_loss("BCE"))
        losses = np.array([(float(ts(bt)), float(fs(bf))) for bt, bf in zip(data.torch_train, data.tf_train)])
        loss_delta = float(np.abs(losses[:, 0] - losses[:, 1]).max())
        figures[f"{opt_name}/loss_delta"] = loss_delta
        assert ts.optimizer.num_steps == fs.optimizer.num_steps == STEPS
        wt, wf = zoo_torch.get_weights(tm), zoo_tf.get_weights(fm)
        assert sorted(wt) == sorted(wf)
        moved = max(rel(w0[k], wt[k]) for k in wt)
        assert moved > 1e-2, "training did not move the weights: the check would be vacuous"
        cross = {k: rel(wt[k], wf[k]) for k in wt}
        worst_key = max(cross, key=cross.get)
        figures[f"{opt_name}/weight_rel"] = cross[worst_key]
        figures["weight_rel"] = max(figures.get("weight_rel", 0.0), cross[worst_key])
        drift = 0.0
        if cross[worst_key] > WEIGHT_TOL or loss_delta > 1e-4:
            try:
                w64, l64 = float64_trajectory(name, data.schema, w0, oc, data.torch_train)
            except (RuntimeError, TypeError) as exc:
                pytest.fail(f"{opt_name}: backends differ by {cross[worst_key]:.3g} ({worst_key}) / per-step loss "
                            f"{loss_delta:.3g} after {STEPS} steps, and the model cannot run in float64 to measure "
                            f"float32's own drift: {exc}")
            own_loss = float(np.abs(l64 - losses[:, 0]).max())
            assert loss_delta <= 1e-4 or loss_delta <= min(WEIGHT_CAP, SENSITIVITY_FACTOR * own_loss), (
                f"{opt_name}: per-step losses differ by up to {loss_delta:.3g}; float32's own drift {own_loss:.3g}")
            for k, r in cross.items():
                if r > WEIGHT_TOL:
                    own = rel(w64[k], wt[k])
                    assert r <= min(WEIGHT_CAP, SENSITIVITY_FACTOR * own), (
                        f"{opt_name}: {k} differs by {r:.3g} relative between backends after {STEPS} steps; "
                        f"float32 round-off alone (torch float32 vs float64) moves it by {own:.3g}")
            drift = rel(w64[worst_key], wt[worst_key])
        figures[f"{opt_name}/float32_drift"] = drift
        pt, yt = torch_step.predict(tm, data.torch_valid)
        pf, yf = tf_step.predict(fm, data.tf_valid)
        assert np.array_equal(yt, yf)
        a_t, a_f = auc(yt, pt), auc(yf, pf)
        figures[f"{opt_name}/auc_delta"] = abs(a_t - a_f)
        assert abs(a_t - a_f) <= AUC_TOL, f"{opt_name}: validation AUC {a_t} vs {a_f}"
        report(name, check=f"train-{opt_name}", weight_rel=cross[worst_key], worst=worst_key, float32_drift=drift,
               auc_torch=a_t, auc_delta=abs(a_t - a_f), prob_delta=float(np.abs(pt - pf).max()),
               loss_delta=loss_delta)
    return figures


# ----- (d) weight round trip ----------------------------------------------------------------------
def roundtrip_check(name, data, figures=None, **variant):
    figures = {} if figures is None else figures
    tm, fm = build_pair(name, data.schema, batch_norm=True, seed=21, **variant)
    w = random_weights(tm, seed=4)
    zoo_torch.set_weights(tm, w)
    zoo_tf.set_weights(fm, zoo_torch.get_weights(tm))
    back = zoo_tf.get_weights(fm)
    tm2 = zoo_torch.build_model(name, data.schema, **small_config(name, batch_norm=True, seed=99, **variant))
    zoo_torch.set_weights(tm2, back)
    assert_same_weights(w, zoo_torch.get_weights(tm2), 0, "torch -> tf -> torch", exact=True)
    p1, _ = torch_step.predict(tm, data.torch_valid)
    p2, _ = torch_step.predict(tm2, data.torch_valid)
    pf, _ = tf_step.predict(fm, data.tf_valid)
    figures["prob_delta"] = float(np.abs(p1 - pf).max())
    assert np.array_equal(p1, p2)
    assert np.abs(p1 - pf).max() <= LOGIT_TOL
    with pytest.raises(ValueError):
        zoo_tf.set_weights(fm, {k: v for k, v in back.items() if k != next(iter(back))})
    return figures
