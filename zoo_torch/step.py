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
"""
from __future__ import annotations

import numpy as np
import torch

from common.runtime import evaluation_memory
from zoo_torch.optim import unwrap


class TrainStep:
    def __init__(self, model, optimizer, loss_fn, forward=None):
        self.model = unwrap(model)
        self.forward = forward if forward is not None else model
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
