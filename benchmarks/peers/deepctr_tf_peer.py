"""DeepCTR (shenweichen/DeepCTR, TensorFlow) peer runner, on legacy tf-keras.

DeepCTR builds tf.keras functional models, which needs Keras 2: the runner sets
``TF_USE_LEGACY_KERAS=1`` before importing TensorFlow so ``tf.keras`` is the
``tf_keras`` package.  Training is Keras' own ``model.fit(x_dict, y,
batch_size, epochs=1, shuffle=False, verbose=0)`` (its compiled train function
and numpy data adapter) after ``compile("adam", "binary_crossentropy")``; a
callback stamps the clock at window boundaries (``on_train_batch_end``).  All
L2 terms 0, no dropout, no batch norm.  Validation: ``model.predict``.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import _bench  # noqa: E402

MODELS = ("DeepFM", "DCN", "xDeepFM", "AutoInt")
LIBRARY = "deepctr"


def check() -> dict:
    import tensorflow as tf
    import deepctr
    from deepctr.models import DeepFM  # noqa: F401

    return dict(library=LIBRARY, version=deepctr.__version__, tensorflow=tf.__version__,
                keras=getattr(tf.keras, "__version__", "?"), models=list(MODELS))


def build(spec: dict, cols):
    from deepctr import models

    common = dict(l2_reg_embedding=0.0, l2_reg_dnn=0.0, seed=int(spec["seed"]), dnn_dropout=0.0, dnn_use_bn=False,
                  task="binary")
    mlp = tuple(spec["mlp"])
    name = spec["model"]
    if name == "DeepFM":
        return models.DeepFM(cols, cols, dnn_hidden_units=mlp, l2_reg_linear=0.0, **common)
    if name == "DCN":
        return models.DCN(cols, cols, cross_num=int(spec["cross_layers"]), cross_parameterization="vector",
                          dnn_hidden_units=mlp, l2_reg_linear=0.0, l2_reg_cross=0.0, **common)
    if name == "xDeepFM":
        return models.xDeepFM(cols, cols, dnn_hidden_units=mlp, cin_layer_size=tuple(spec["cin_layers"]),
                              cin_split_half=bool(spec["cin_split_half"]), l2_reg_linear=0.0, l2_reg_cin=0.0,
                              **common)
    if name == "AutoInt":
        return models.AutoInt(cols, cols, att_layer_num=int(spec["attention_layers"]),
                              att_embedding_size=int(spec["attention_dim"]), att_head_num=int(spec["num_heads"]),
                              att_res=True, dnn_hidden_units=(), l2_reg_linear=0.0, **common)
    raise ValueError(f"deepctr runner has no model {name!r}")


def run(spec: dict) -> dict:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(int(spec["threads"]))
    tf.config.threading.set_inter_op_parallelism_threads(int(spec["inter_op_threads"]))
    tf.random.set_seed(int(spec["seed"]))
    import deepctr
    from deepctr.feature_column import SparseFeat

    res = dict(runner=spec["runner"], model=spec["model"], library=LIBRARY, library_version=deepctr.__version__,
               framework="tensorflow", framework_version=tf.__version__,
               keras=f"tf_keras {getattr(tf.keras, '__version__', '?')}", device="cpu", optimizer="Adam (tf_keras)",
               lr=spec["lr"], batch_size=spec["batch_size"],
               threads=dict(intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
                            inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads()),
               rss_after_import_mb=_bench.current_rss_mb())
    cat, label = _bench.load_arrays(spec["npy_dir"], "train")
    vcat, vlabel = _bench.load_arrays(spec["npy_dir"], "valid")
    names = [f"C{i + 1}" for i in range(cat.shape[1])]
    cols = [SparseFeat(n, vocabulary_size=int(v), embedding_dim=int(spec["embed_size"]))
            for n, v in zip(names, spec["vocab_sizes"])]
    model = build(spec, cols)
    model.compile(tf.keras.optimizers.Adam(learning_rate=float(spec["lr"])), "binary_crossentropy")
    res["params"] = int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))
    res["rss_after_build_mb"] = _bench.current_rss_mb()

    B = int(spec["batch_size"])
    n = len(label)
    plan = _bench.plan_windows(_bench.num_steps(n, B), spec["warmup"], spec["window"], spec["windows"])
    timer = _bench.StepTimer(plan)
    losses = []

    class Stamp(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            timer.begin()

        def on_train_batch_end(self, batch, logs=None):
            lo = batch * B
            timer.step_done(min(n, lo + B) - lo)
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_train_end(self, logs=None):
            timer.end()

    x = {nm: cat[:, i] for i, nm in enumerate(names)}
    model.fit(x, label, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[Stamp()])
    res.update(timer.summary())
    res["plan"] = plan
    res["train_mean_loss"] = losses[-1] if losses else float("nan")   # Keras' running epoch mean
    probs = model.predict({nm: vcat[:, i] for i, nm in enumerate(names)}, batch_size=B, verbose=0)
    res.update(_bench.valid_metrics(vlabel, np.asarray(probs).reshape(-1)))
    return res
