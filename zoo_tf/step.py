"""The TensorFlow training step and prediction loop (mirror of zoo_torch/step.py).

    step = TrainStep(model, build_optimizer(model, cfg), get_loss("BCE"))
    for batch in zoo_tf.data.batches(...):
        loss = step(batch)                     # scalar tf.Tensor: the batch's mean data loss
    probs, labels = predict(model, zoo_tf.data.batches(..., split="valid", shuffle=False))

``step(batch)`` runs ONE ``tf.function`` (forward in training mode, loss +
``model.penalty(B)``, gradients w.r.t. ``zoo_tf.trainable_named(model)``,
``optimizer.apply``).  Its input signature comes from
``zoo_tf.data.element_spec(schema)`` (batch dimension ``None``), so a last
partial batch does not retrace.  Keys of the batch that the signature does not
know (e.g. the synthetic ``"prob"``) are dropped before the call.

For distributed training the pieces are exposed:
``compute_gradients(batch) -> (loss, {name: grad})`` (a tf.function) and
``apply(grads)``; ``gradients(batch)`` is the same computation as a plain
Python function, to be called inside a trainer's own tf.function /
``strategy.run``.
"""
from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

from zoo_tf import trainable_named
from zoo_tf.data import PLAN_KEYS, element_spec


def configure_threads(intra_op: int | None = None, inter_op: int | None = None) -> bool:
    """Set TF's thread pools if the runtime has not started yet; returns whether it took effect.

    TF's default (0 = one thread per core for both pools) is sensible; on a
    small shared machine ``inter_op=1`` avoids two pools competing for cores.
    """
    try:
        if intra_op is not None:
            tf.config.threading.set_intra_op_parallelism_threads(int(intra_op))
        if inter_op is not None:
            tf.config.threading.set_inter_op_parallelism_threads(int(inter_op))
        return True
    except RuntimeError:   # runtime already initialised
        return False


def _signature(model) -> dict:
    return element_spec(model.schema)


class TrainStep:
    def __init__(self, model, optimizer, loss_fn):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        named = trainable_named(model)
        self.names = list(named)
        self._vars = [named[n] for n in self.names]
        spec = _signature(model)
        self._keys = tuple(spec)
        self._step = tf.function(self._step_impl, input_signature=[spec], reduce_retracing=True)
        # batches that carry the loader's row plan (zoo_tf.data PLAN_KEYS): a second signature
        plan_spec = element_spec(model.schema, with_plan=True)
        self._plan_keys = tuple(plan_spec) if len(plan_spec) > len(spec) else None
        self._step_plan = (tf.function(self._step_impl, input_signature=[plan_spec], reduce_retracing=True)
                           if self._plan_keys else None)
        self._compute = tf.function(self.gradients, input_signature=[spec], reduce_retracing=True)
        self._apply = tf.function(self._apply_impl, reduce_retracing=True)

    def _select(self, batch):
        return {k: batch[k] for k in self._keys}

    def gradients(self, batch):
        """``(mean data loss, {name: gradient of loss + penalty})``; plain (traceable) Python."""
        with tf.GradientTape() as tape:
            logits = self.model(batch, training=True)
            loss = self.loss_fn(logits, batch["label"])
            objective = loss + self.model.penalty(tf.shape(logits)[0])
        grads = tape.gradient(objective, self._vars)
        return loss, dict(zip(self.names, grads))

    def _step_impl(self, batch):
        loss, grads = self.gradients(batch)
        self.optimizer.apply(grads)
        return loss

    def _apply_impl(self, grads):
        self.optimizer.apply(grads)
        return tf.constant(True)

    def __call__(self, batch):
        """Train on one batch; returns the mean data loss (without the penalty), a scalar tensor."""
        if self._plan_keys is not None and PLAN_KEYS[0] in batch:
            return self._step_plan({k: batch[k] for k in self._plan_keys})
        return self._step(self._select(batch))

    def compute_gradients(self, batch):
        """``(loss, {name: Tensor | IndexedSlices | None})`` without updating anything (tf.function)."""
        return self._compute(self._select(batch))

    def apply(self, grads: dict) -> None:
        """``optimizer.apply(grads)`` as a tf.function."""
        self._apply(grads)


_PREDICT_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _predict_fn(model):
    fn = _PREDICT_FNS.get(model)
    if fn is None:
        spec = _signature(model)

        def probs(batch):
            return tf.sigmoid(model(batch, training=False))

        fn = (tf.function(probs, input_signature=[spec], reduce_retracing=True), tuple(spec))
        _PREDICT_FNS[model] = fn
    return fn


def predict(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """``(probs, labels)`` float32 numpy arrays over ``dataset`` (iterable of batch dicts), training=False."""
    fn, keys = _predict_fn(model)
    probs, labels = [], []
    for b in dataset:
        probs.append(fn({k: b[k] for k in keys}).numpy())
        labels.append(np.asarray(b["label"]))
    if not probs:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(probs).astype(np.float32, copy=False), np.concatenate(labels).astype(np.float32, copy=False)
