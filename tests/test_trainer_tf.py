"""The TensorFlow trainer in-process (single device; the strategies are tested in test_distributed.py).

- a run's outputs: best weights are those of the best evaluation, test metrics come from them;
- checkpoint state (weights, optimiser slots, dropout generator states) round-trips exactly;
- the PyTorch and TensorFlow trainers follow the same trajectory for the same flags;
- TF_CONFIG parsing and the MEAN aggregation of batch-norm statistics under a strategy.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from common.errors import FlagError
from common.train_utils import TrainArgs, list_checkpoints, load_weights, read_checkpoint, split_prefix


def _args(data, out, **kw):
    base = dict(model="DeepFM", data=data, model_config={"mlp": (16, 8), "embed_size": 4, "seed": 0},
                epochs=2, batch_size=50, optimizer="Adam", lr=0.01, model_save_dir=str(out), patience=0,
                eval_every=0, checkpoint_every=0, progress=False)
    base.update(kw)
    return TrainArgs(**base)


def test_tf_run_outputs_and_best_checkpoint(random_dataset, tmp_path):
    from zoo_tf.trainer import TFBackend, train

    args = _args(random_dataset, tmp_path / "o", eval_every=4, lr=0.05, checkpoint_every=5)
    res = train(args)
    assert res["backend"] == "tensorflow" and res["steps"] == 24 and res["epochs"] == 2
    hist = json.loads((tmp_path / "o" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in hist] == [4, 8, 12, 16, 20, 24]
    best = max(hist, key=lambda h: h["valid_auc"])
    assert res["best_step"] == best["step"]
    b = TFBackend(_args(random_dataset, tmp_path / "o2"))
    w, _ = load_weights(res["checkpoint"])
    b.set_weights(w)
    assert b.evaluate("valid")["auc"] == pytest.approx(best["valid_auc"], abs=1e-12)
    assert b.evaluate("test", collective=False)["auc"] == pytest.approx(res["test_auc"], abs=1e-12)
    assert [s for s, _ in list_checkpoints(str(tmp_path / "o"))] == [20, 24]


def test_tf_state_roundtrip_with_dropout_is_exact(random_dataset, tmp_path):
    from zoo_tf.trainer import TFBackend

    cfg = {"mlp": (8,), "embed_size": 4, "seed": 0, "dropout": 0.5}
    a = TFBackend(_args(random_dataset, tmp_path / "a", model_config=cfg, optimizer="LazyAdam"))
    it = a.train_batches(0, 0)
    for _ in range(3):
        a.train_step(next(it))
    state = a.state_arrays()
    assert {"opt/__step__", "opt/embedding.weight/m", "opt/embedding.weight/v"} <= set(state)
    assert [k for k in state if k.startswith("rng/tf_dropout/")] == ["rng/tf_dropout/dnn.drop"]
    b = TFBackend(_args(random_dataset, tmp_path / "b", model_config={**cfg, "seed": 1}, optimizer="LazyAdam"))
    b.load_state_arrays(state)
    after = b.state_arrays()
    for k in state:
        np.testing.assert_array_equal(after[k], state[k], err_msg=k)
    # one more step with dropout from the same state -> identical weights
    item = next(it)
    a.train_step(item)
    b.train_step(next(b.train_batches(0, 3)))
    wa, wb = a.get_weights(), b.get_weights()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_torch_and_tf_trainers_follow_the_same_trajectory(random_dataset, tmp_path):
    from zoo_tf.trainer import train as tf_train
    from zoo_torch.trainer import train as pt_train

    kw = dict(eval_every=3, max_steps=12, optimizer="Adagrad", lr=0.05,
              model_config={"mlp": (16, 8), "embed_size": 4, "seed": 4, "l2": 1e-4, "l2_embedding": 1e-4})
    r_pt = pt_train(_args(random_dataset, tmp_path / "pt", **kw))
    r_tf = tf_train(_args(random_dataset, tmp_path / "tf", **kw))
    h_pt = json.loads((tmp_path / "pt" / "metrics.json").read_text())["history"]
    h_tf = json.loads((tmp_path / "tf" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in h_pt] == [h["step"] for h in h_tf] == [3, 6, 9, 12]
    for a, b in zip(h_pt, h_tf):
        assert a["valid_auc"] == pytest.approx(b["valid_auc"], abs=2e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    wa = split_prefix(read_checkpoint(list_checkpoints(str(tmp_path / "pt"))[-1][1])[0], "w/")
    wb = split_prefix(read_checkpoint(list_checkpoints(str(tmp_path / "tf"))[-1][1])[0], "w/")
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert r_pt["test_auc"] == pytest.approx(r_tf["test_auc"], abs=2e-4)


def test_set_lr_reaches_the_optimizer(random_dataset, tmp_path):
    from zoo_tf.trainer import TFBackend

    b = TFBackend(_args(random_dataset, tmp_path / "a"))
    b.set_lr(0.0)
    w0 = b.get_weights()
    b.train_step(next(iter(b.train_batches(0, 0))))
    w1 = b.get_weights()
    assert all(np.array_equal(w0[k], w1[k]) for k in w0)       # lr 0: Adam moves nothing
    b.set_lr(0.01)
    b.train_step(next(iter(b.train_batches(0, 1))))
    assert not np.array_equal(w1["dnn.out.kernel"], b.get_weights()["dnn.out.kernel"])


def test_cluster_info_from_tf_config(monkeypatch):
    from zoo_tf.trainer import cluster_info

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert cluster_info() is None
    w = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": w}, "task": {"type": "worker", "index": 2}}))
    assert cluster_info() == {"num_workers": 3, "worker_index": 2, "is_chief": False}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": w[:1], "worker": w[1:]},
                                                "task": {"type": "worker", "index": 0}}))
    assert cluster_info() == {"num_workers": 3, "worker_index": 1, "is_chief": False}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": w[:1], "worker": w[1:]},
                                                "task": {"type": "chief", "index": 0}}))
    assert cluster_info()["is_chief"]
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": w[:1]}, "task": {"type": "worker"}}))
    assert cluster_info() is None
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(FlagError, match="TF_CONFIG"):
        cluster_info()


def test_state_variables_get_mean_aggregation():
    from zoo_tf.trainer import _mean_aggregation_for_state

    with tf.variable_creator_scope(_mean_aggregation_for_state):
        moving = tf.Variable(tf.zeros([3]), trainable=False)
        weight = tf.Variable(tf.zeros([3]), trainable=True)
        counter = tf.Variable(0, dtype=tf.int64, trainable=False)
    assert moving.aggregation == tf.VariableAggregation.MEAN
    assert weight.aggregation == tf.VariableAggregation.NONE
    assert counter.aggregation == tf.VariableAggregation.NONE
