"""``--search_loss`` of train_example_tensorflow.py: AutoLossGen loss search for any registered model (TensorFlow).

    python train_example_tensorflow.py --model BiasedMF --data D --search_loss --search_budget 200 \\
        --optimizer SGD --lr 0.01 --batch_size 128 --model_save_dir runs/alg

Mirror of ``zoo_torch/search_loss.py``.  The driver (rounds, log, formula file,
checkpoints, summary) is :func:`common.autolossgen.run_loss_search`; this module
supplies its hooks with the trainer's own machinery
(:class:`zoo_tf.trainer.TFBackend`):

* the *real* model is one ``TFBackend`` built from the flags (model, optimiser,
  ``--loss`` for epochs without a found loss);
* trials run on a second ``TFBackend`` (the COPY): before each trial it gets the
  real model's weights, optimiser state and dropout RNG state, then trains one
  epoch (the data epoch the real model reads next) with the candidate's
  compiled formula and returns its validation AUC.  As in the paper's code,
  trials train without the L2 penalty (``regularizer=False``); the real model
  keeps it.  A trial whose loss turns non-finite stops early and scores NaN
  (reward -1).

A loss is part of the traced train step, so each candidate gets its own
:class:`zoo_tf.step.TrainStep` (one trace per trial).  Only one device: several
``--gpu_ids``, ``--cpu_replicas`` > 1 or a multi-worker TF_CONFIG are refused.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import tensorflow as tf

from common.autolossgen import controller_config, run_loss_search, trial_args
from common.errors import FlagError, cli_errors
from common.train_utils import TrainArgs, result_line
from zoo_tf.losses import get_loss
from zoo_tf.step import TrainStep
from zoo_tf.trainer import TFBackend, cluster_info

NAN_CHECK_EVERY = 50          # steps between non-finite-loss checks of a trial


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class TFSearchHooks:
    """:class:`common.autolossgen.LossSearchHooks` on two TFBackends (real model and trial copy)."""

    name = "tensorflow"

    def __init__(self, args: TrainArgs):
        if cluster_info() is not None:
            raise FlagError("search_loss", "the loss search runs in one process; unset the multi-worker TF_CONFIG")
        if len(args.gpu_ids) > 1:
            raise FlagError("gpu_ids", "the loss search runs on one device; give at most one GPU id")
        if args.cpu_replicas > 1:
            raise FlagError("cpu_replicas", "the loss search runs on one device; drop --cpu_replicas")
        self.args = args
        self.real = TFBackend(args)
        self.trial = TFBackend(trial_args(args))
        self.schema_hash = self.real.schema.model_hash()
        self.base_step = self.real.step
        self.epoch = 0

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _loss(formula: str):
        return get_loss("formula:" + formula)

    def _run_epoch(self, backend: TFBackend, stop_on_nan: bool) -> bool:
        """One epoch of ``backend`` with its current step; False if the loss became non-finite (and ``stop_on_nan``)."""
        for i, item in enumerate(backend.train_batches(self.epoch, 0)):
            loss = backend.train_step(item)
            if stop_on_nan and (i + 1) % NAN_CHECK_EVERY == 0 and not math.isfinite(float(loss)):
                return False
        return True

    # ------------------------------------------------------------------ SearchHooks
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def validation_auc(self) -> float:
        return float(self.real.evaluate("valid")["auc"])

    @staticmethod
    def _set_step(backend: TFBackend, step: TrainStep | None) -> None:
        """Swap the backend's train step (one device: a OneDeviceStrategy step is retraced, since its traced
        function captured the previous step)."""
        backend.step = step
        if backend.strategy is not None and step is not None:
            backend._dist_step = tf.function(backend._dist_step_impl, reduce_retracing=True)

    def trial_auc(self, formula: str) -> float:
        t = self.trial
        t.load_state_arrays(self.real.state_arrays())
        self._set_step(t, TrainStep(t.model, t.optimizer, self._loss(formula)))
        try:
            if not self._run_epoch(t, stop_on_nan=True):
                return float("nan")
            finite = all(bool(np.isfinite(v.numpy()).all()) for v in t.model.trainable_variables)
            return float(t.evaluate("valid")["auc"]) if finite else float("nan")
        finally:
            self._set_step(t, None)         # drop the traced functions of this candidate

    def train_epoch(self, formula: str | None) -> float:
        r = self.real
        self._set_step(r, TrainStep(r.model, r.optimizer, self._loss(formula)) if formula else self.base_step)
        try:
            self._run_epoch(r, stop_on_nan=False)
        finally:
            self._set_step(r, self.base_step)
        return self.validation_auc()

    # ------------------------------------------------------------------ LossSearchHooks
    def evaluate(self, split: str) -> dict:
        return self.real.evaluate(split)

    def get_weights(self) -> dict:
        return self.real.get_weights()

    def state_arrays(self) -> dict:
        return self.real.state_arrays()

    def load_state_arrays(self, arrays: dict) -> None:
        self.real.load_state_arrays(arrays)


def search(args: TrainArgs) -> dict:
    """Run ``--search_loss`` for ``args`` (data resolved); the summary dict (the result line)."""
    from zoo_tf.controller import Controller

    hooks = TFSearchHooks(args)
    try:
        controller = Controller(controller_config(args))
    except ValueError as exc:
        raise FlagError("controller_ops", str(exc)) from None
    return run_loss_search(args, hooks, controller, log=_log)


def main(args: TrainArgs) -> None:
    """Entry point of ``train_example_tensorflow.py --search_loss`` (flags validated, data resolved)."""
    with cli_errors():
        print(result_line(search(args)), flush=True)
