"""``--search_loss`` of train_example_pytorch.py: AutoLossGen loss search for any registered model (PyTorch).

    python train_example_pytorch.py --model BiasedMF --data D --search_loss --search_budget 200 \\
        --optimizer SGD --lr 0.01 --batch_size 128 --model_save_dir runs/alg

The driver (rounds, log, formula file, checkpoints, summary) is
:func:`common.autolossgen.run_loss_search`; this module supplies its hooks with
the trainer's own machinery (:class:`zoo_torch.trainer.TorchBackend`, mirror:
``zoo_tf/search_loss.py``):

* the *real* model is one ``TorchBackend`` built from the flags (model, optimiser,
  ``--loss`` for epochs without a found loss);
* trials run on a second ``TorchBackend`` (the COPY): before each trial it gets the
  real model's weights, optimiser state and RNG state, then trains one epoch (the
  data epoch the real model reads next) with the candidate's compiled formula
  and returns its validation AUC.  As in the paper's code, trials train without
  the L2 penalty (``regularizer=False``); the real model keeps it.  A trial whose
  loss turns non-finite stops early and scores NaN (reward -1).  The torch RNG
  state is restored after a trial, so trials never disturb the real model.

Only one device: several ``--gpu_ids`` or torchrun are refused.
"""
from __future__ import annotations

import math
import sys

import torch

from common.autolossgen import controller_config, run_loss_search, trial_args
from common.errors import FlagError, cli_errors
from common.train_utils import TrainArgs, result_line
from zoo_torch.losses import get_loss
from zoo_torch.trainer import TorchBackend, dist_env

NAN_CHECK_EVERY = 50          # steps between non-finite-loss checks of a trial


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class TorchSearchHooks:
    """:class:`common.autolossgen.LossSearchHooks` on two TorchBackends (real model and trial copy)."""

    name = "pytorch"

    def __init__(self, args: TrainArgs):
        if dist_env()[1] > 1:
            raise FlagError("search_loss", "the loss search runs in one process; launch it without torchrun")
        if len(args.gpu_ids) > 1:
            raise FlagError("gpu_ids", "the loss search runs on one device; give at most one GPU id")
        self.args = args
        self.real = TorchBackend(args)
        self.trial = TorchBackend(trial_args(args))
        self.schema_hash = self.real.schema.model_hash()
        self.base_loss = self.real.step.loss_fn
        self.epoch = 0

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _loss(formula: str):
        return get_loss("formula:" + formula)

    def _run_epoch(self, backend: TorchBackend, loss_fn, stop_on_nan: bool) -> bool:
        """One epoch of ``backend`` with ``loss_fn``; False if the loss became non-finite (and ``stop_on_nan``)."""
        backend.step.loss_fn = loss_fn
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

    def trial_auc(self, formula: str) -> float:
        rng = torch.get_rng_state()
        try:
            self.trial.load_state_arrays(self.real.state_arrays())
            if not self._run_epoch(self.trial, self._loss(formula), stop_on_nan=True):
                return float("nan")
            with torch.no_grad():
                finite = all(bool(torch.isfinite(p).all()) for p in self.trial.model.parameters())
            return float(self.trial.evaluate("valid")["auc"]) if finite else float("nan")
        finally:
            torch.set_rng_state(rng)

    def train_epoch(self, formula: str | None) -> float:
        self._run_epoch(self.real, self._loss(formula) if formula else self.base_loss, stop_on_nan=False)
        self.real.step.loss_fn = self.base_loss
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
    from zoo_torch.controller import Controller

    if args.threads:
        torch.set_num_threads(args.threads)
    hooks = TorchSearchHooks(args)
    try:
        controller = Controller(controller_config(args))
    except ValueError as exc:
        raise FlagError("controller_ops", str(exc)) from None
    return run_loss_search(args, hooks, controller, log=_log)


def main(args: TrainArgs) -> None:
    """Entry point of ``train_example_pytorch.py --search_loss`` (flags validated, data resolved)."""
    with cli_errors():
        print(result_line(search(args)), flush=True)
