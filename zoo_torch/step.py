"""The PyTorch training step and prediction loop (the hot loop of training and of the speed benchmark).

    step = TrainStep(model, build_optimizer(model, cfg), get_loss("BCE"))
    for batch in zoo_torch.data.batches(...):
        loss = step(batch)                     # detached 0-d tensor: the batch's mean data loss
    probs, labels = predict(model, zoo_torch.data.batches(..., split="valid", shuffle=False))

One step = ``zero_grad``; ``logits = forward(batch)`` in train mode;
``objective = loss_fn(logits, label) + model.penalty(B)``; ``backward``;
``optimizer.step()``.  ``forward`` (default: the model) lets a trainer pass a
DistributedDataParallel / DataParallel wrapper while the penalty and the
optimiser use the raw model.

``TrainStep(..., compile=True)`` runs the training forward (and so its backward) under
``torch.compile`` (:class:`CompiledForward`): Inductor fuses the element-wise work around the
GEMMs (bias + ReLU, ReLU's gradient + the bias gradient's sum, the FM term and its gradient) into
one pass each.  The row-sparse embedding lookups stay eager (``FeatureEmbedding`` is excluded), so
the gradients the optimiser sees are the same row-sparse tensors.
"""
from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import torch

from common.runtime import evaluation_memory
from zoo_torch.optim import unwrap


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor's CPU code needs (``$CXX``, else ``g++`` / ``c++`` / ``clang++`` on
    the PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


class CompiledForward:
    """``model(batch)`` under ``torch.compile`` for training batches, the eager model otherwise.

    Compiled: train mode with gradients enabled and the batch size of the first such batch (an
    epoch's shorter last batch, evaluation and ``no_grad`` calls run eagerly, so neither triggers a
    second compilation).  The first compiled call takes 10-30 s (Inductor writes and builds C++;
    later processes reuse its on-disk cache).  Random ops draw from torch's generator exactly as in
    eager mode (``fallback_random``), so a seed fixes the same dropout masks compiled or not.
    Without a C++ compiler, or if compilation fails, it says so once on stderr and stays eager.
    Modules whose class sets ``eager_under_compile`` (the table lookups) run eagerly inside the
    compiled model; a model that looks its tables up first (DeepFM) gets everything after them as one graph.
    """

    def __init__(self, model):
        self.model = model
        self.batch_rows = None
        self.reason = None if cxx_compiler() else "no C++ compiler on the PATH (set CXX)"
        self._compiled = None
        if self.reason is None:
            import torch._inductor.config as inductor_config

            inductor_config.fallback_random = True
            for m in model.modules():          # e.g. FeatureEmbedding: its row-sparse lookups stay eager
                if getattr(type(m), "eager_under_compile", False) and "forward" not in vars(m):
                    m.forward = torch.compiler.disable(m.forward)
            self._compiled = torch.compile(model, dynamic=False)
        else:
            self._say()

    @property
    def active(self) -> bool:
        """Are training batches compiled (False after a fallback to eager)?"""
        return self.reason is None

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def _say(self) -> None:
        print(f"torch.compile: off, training runs eagerly ({self.reason})", file=sys.stderr)

    def __call__(self, batch):
        if self.reason is None and self.model.training and torch.is_grad_enabled():
            n = batch["label"].shape[0]
            if self.batch_rows is None:
                self.batch_rows = n
            if n == self.batch_rows:
                try:
                    return self._compiled(batch)
                except torch._dynamo.exc.BackendCompilerFailed as exc:
                    inner = getattr(exc, "inner_exception", None) or exc
                    first = (str(inner).strip().splitlines() or [""])[0][:200]
                    self.reason = f"compilation failed: {type(inner).__name__}: {first}"
                    self._say()
        return self.model(batch)


class TrainStep:
    def __init__(self, model, optimizer, loss_fn, forward=None, compile: bool = False):
        self.model = unwrap(model)
        self.forward = forward if forward is not None else model
        if compile:
            if self.forward is not self.model:
                raise ValueError("compile=True needs the raw model as forward (no DataParallel / DDP wrapper)")
            self.forward = CompiledForward(self.model)
        self.optimizer = optimizer
        self.loss_fn = loss_fn

    def __call__(self, batch: dict) -> torch.Tensor:
        """Train on one batch; returns the mean data loss (without the penalty) as a detached 0-d tensor.

        ``float(step(batch))`` gives a Python float (only call it when logging).
        """
        fwd, model = self.forward, self.model
        if not fwd.training:
            fwd.train()
        if not model.training:
            model.train()
        self.optimizer.zero_grad()
        logits = fwd(batch)
        loss = self.loss_fn(logits, batch["label"])
        penalty = model.penalty(logits.shape[0])
        (loss + penalty if torch.is_tensor(penalty) else loss).backward()
        self.optimizer.step()
        return loss.detach()


def predict(model, batches) -> tuple[np.ndarray, np.ndarray]:
    """``(probs, labels)`` float32 numpy arrays over ``batches``, in eval mode and without gradients.

    The model's previous train/eval mode is restored afterwards.  Runs under
    :func:`common.runtime.evaluation_memory` (the heap does not grow around training's freed blocks).
    """
    was_training = model.training
    model.eval()
    probs, labels = [], []
    try:
        with torch.inference_mode(), evaluation_memory():
            for b in batches:
                probs.append(torch.sigmoid(model(b)).float().cpu().numpy())
                labels.append(b["label"].cpu().numpy())
    finally:
        model.train(was_training)
    if not probs:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(probs).astype(np.float32, copy=False), np.concatenate(labels).astype(np.float32, copy=False)
