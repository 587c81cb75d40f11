"""``--search_arch`` with TensorFlow: NASRec supernet warm-up + regularized evolution.

Mirror of zoo_torch/search_arch.py.

    python train_example_tensorflow.py --search_arch --search_space small --n_blocks 7 --warmup_fraction 0.1 \\
        --zeroshot sigeo --model_save_dir ./checkpoints/nas
    python train_example_tensorflow.py --model NASRec --supernet_config ./checkpoints/nas/rank1_<hash>.json

The driver is :mod:`common.nas_search`; this file is the TensorFlow math it calls
(:class:`TFArchBackend`).  The supernet's path is chosen in Python at every call, so the
warm-up steps and the proxies run eagerly (no ``tf.function``).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

import zoo_tf
from common import nas_search
from common.errors import cli_errors
from common.train_utils import split_prefix
from zoo_tf import proxies as fp
from zoo_tf import supernet as fs
from zoo_tf import trainable_named
from zoo_tf.optim import build_optimizer

__all__ = ["TFArchBackend", "main"]


class TFArchBackend(nas_search.ArchBackend):
    name = "tensorflow"

    def __init__(self, settings: nas_search.ArchSearchSettings, schema, full_steps: int):
        if settings.threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(settings.threads)
                tf.config.threading.set_inter_op_parallelism_threads(settings.threads)
            except RuntimeError:      # the runtime already started (in-process use)
                pass
        self.settings = settings
        self.net = fs.build_supernet(schema, settings.space, full_steps=full_steps, path_seed=settings.seed,
                                     **settings.model_config)
        self.opt = build_optimizer(self.net, settings.optimizer_config())
        named = trainable_named(self.net)
        self.names = list(named)
        self.vars = [named[n] for n in self.names]

    def to_batch(self, batch: dict):
        return {k: tf.constant(np.asarray(v)) for k, v in batch.items()}

    def train_step(self, batch, lr: float) -> float:
        self.opt.set_lr(lr)
        with tf.GradientTape() as tape:
            logits = self.net(batch, training=True)           # the sampler draws this step's path
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
                labels=tf.cast(batch["label"], logits.dtype), logits=logits))
            objective = loss + self.net.penalty(tf.shape(logits)[0])
        grads = tape.gradient(objective, self.vars)
        self.opt.apply(dict(zip(self.names, grads)))
        return float(loss.numpy())

    def sampler_state(self) -> dict:
        return self.net.sampler.state()

    def set_sampler_state(self, state: dict) -> None:
        self.net.sampler.set_state(state)

    def get_weights(self) -> dict:
        return zoo_tf.get_weights(self.net)

    def set_weights(self, weights: dict) -> None:
        zoo_tf.set_weights(self.net, weights)

    def state_arrays(self) -> dict:
        out = {f"w/{k}": v for k, v in self.get_weights().items()}
        out.update({f"opt/{k}": v for k, v in self.opt.state_arrays().items()})
        return out

    def load_state_arrays(self, arrays: dict) -> None:
        self.set_weights(split_prefix(arrays, "w/"))
        self.opt.load_state_arrays(split_prefix(arrays, "opt/"))

    def proxies(self, cfg, batches) -> dict:
        s = self.settings
        return fp.zero_shot_proxies(self.net.subnet(cfg), batches, s.zico_coef, s.fr_coef, s.loss_coef)

    def head_inputs(self, cfg, batch) -> np.ndarray:
        return fs.head_inputs(self.net, batch, cfg).numpy()

    def active_head(self, cfg):
        return fs.active_head(self.net, cfg)


def main(args) -> dict:
    """Entry of ``train_example_tensorflow.py --search_arch`` (``args``: TrainArgs, data resolved)."""
    with cli_errors():
        return nas_search.main(args, "tensorflow", TFArchBackend)
