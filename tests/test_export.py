"""Exported models predict exactly what the live models predict.

- TorchScript (zoo_torch.export): traced at batch 8, evaluated at other batch sizes;
- ONNX (``onnx`` + ``onnxruntime`` are pinned in requirements.txt): every registered
  model is exported and run by onnxruntime at two batch sizes; the probabilities
  equal the live model's;
- SavedModel (zoo_tf.export): the serving signature (keyword tensors) and the
  dict-taking ``serve`` function;
- weights are canonical: the best weights of a PyTorch model exported through the
  TensorFlow SavedModel path predict what the PyTorch model predicts.

Models are trained a few steps first (with batch norm and dropout), so inference
mode matters and the weights are not their initial values.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
import torch

import zoo_tf
import zoo_torch
from common.batching import iter_numpy_batches
from common.configs import MODELS
from common.optim import make_optimizer_config
from common.schema import Schema
from zoo_tf import export as tf_export
from zoo_torch import export as pt_export

MODEL_KW = dict(mlp=(16, 8), embed_size=4, batch_norm=True, dropout=0.3, seed=2)


def _batches(data, split, bs):
    return list(iter_numpy_batches(data, split, bs, shuffle=False))


@pytest.fixture(scope="module")
def trained_torch(random_dataset):
    from zoo_torch.losses import get_loss
    from zoo_torch.optim import build_optimizer
    from zoo_torch.step import TrainStep

    schema = Schema.load(random_dataset)
    model = zoo_torch.build_model("DeepFM", schema, **MODEL_KW)
    step = TrainStep(model, build_optimizer(model, make_optimizer_config("Adam", 0.01)), get_loss("BCE"))
    for b in _batches(random_dataset, "train", 64)[:6]:
        step({k: torch.from_numpy(v) for k, v in b.items()})
    model.eval()
    return schema, model


@pytest.fixture(scope="module")
def trained_tf(random_dataset):
    from zoo_tf.losses import get_loss
    from zoo_tf.optim import build_optimizer
    from zoo_tf.step import TrainStep

    schema = Schema.load(random_dataset)
    model = zoo_tf.build_model("DeepFM", schema, **MODEL_KW)
    step = TrainStep(model, build_optimizer(model, make_optimizer_config("Adam", 0.01)), get_loss("BCE"))
    for b in _batches(random_dataset, "train", 64)[:6]:
        step(b)
    return schema, model


def _torch_probs(model, batch):
    with torch.no_grad():
        return torch.sigmoid(model({k: torch.from_numpy(v) for k, v in batch.items()})).numpy()


def test_torchscript_predicts_like_the_live_model(trained_torch, random_dataset, tmp_path):
    schema, model = trained_torch
    path = pt_export.export_torchscript(model, str(tmp_path / "m.pt"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    loaded = pt_export.load_torchscript(path)
    for bs in (37, 200):
        batch = _batches(random_dataset, "test", bs)[0]
        live = _torch_probs(model, batch)
        exported = loaded(*pt_export.batch_inputs(schema, batch)).numpy()
        assert exported.shape == (bs,)
        np.testing.assert_allclose(exported, live, rtol=1e-6, atol=1e-7)
    assert model.training is False
    # inference mode was traced: dropout off, batch-norm moving statistics (same input -> same output)
    b = _batches(random_dataset, "test", 37)[0]
    inp = pt_export.batch_inputs(schema, b)
    np.testing.assert_array_equal(loaded(*inp).numpy(), loaded(*inp).numpy())


def test_onnx_export_predicts_like_the_live_model(trained_torch, random_dataset, tmp_path):
    import onnx
    import onnxruntime as ort

    schema, model = trained_torch
    path = pt_export.export_onnx(model, str(tmp_path / "m.onnx"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    m = onnx.load(path)
    onnx.checker.check_model(m)
    assert [i.name for i in m.graph.input] == list(schema.feature_names)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for bs in (37, 200):
        batch = _batches(random_dataset, "test", bs)[0]
        got = sess.run(["prob"], {n: batch[n] for n in schema.feature_names})[0]
        assert got.shape == (bs,)
        np.testing.assert_allclose(got, _torch_probs(model, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_of_every_model(name, random_dataset, tmp_path):
    """Every registered model exports to ONNX and onnxruntime reproduces its predictions."""
    import onnxruntime as ort

    schema = Schema.load(random_dataset)
    fields = {f.name for f in dataclasses.fields(MODELS[name].config)}
    kw = {k: v for k, v in dict(embed_size=4, seed=3, mlp=(8,)).items() if k in fields}
    model = zoo_torch.build_model(name, schema, **kw)
    model.eval()
    path = pt_export.export_onnx(model, str(tmp_path / f"{name}.onnx"))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    batch = _batches(random_dataset, "test", 53)[0]
    names = [i.name for i in sess.get_inputs()]       # fields a model ignores (BiasedMF) are pruned
    assert names and set(names) <= set(schema.feature_names)
    got = sess.run(["prob"], {n: batch[n] for n in names})[0]
    np.testing.assert_allclose(got, _torch_probs(model, batch), rtol=1e-5, atol=1e-6)


def test_onnx_export_error_is_clean(trained_torch, tmp_path, monkeypatch):
    """Without the onnx package the export fails with the install hint and writes nothing."""
    schema, model = trained_torch
    monkeypatch.setattr(pt_export, "onnx_available", lambda: False)
    path = str(tmp_path / "m.onnx")
    with pytest.raises(RuntimeError, match=r"pip install onnx"):
        pt_export.export_onnx(model, path)
    assert not os.listdir(tmp_path)


def test_saved_model_predicts_like_the_live_model(trained_tf, random_dataset, tmp_path):
    schema, model = trained_tf
    path = tf_export.export_saved_model(model, str(tmp_path / "saved"))
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    loaded = tf_export.load_saved_model(path)
    sig = loaded.signatures["serving_default"]
    assert set(sig.structured_input_signature[1]) == set(schema.feature_names)
    for bs in (37, 200):
        batch = _batches(random_dataset, "test", bs)[0]
        feats = {k: v for k, v in batch.items() if k in schema.feature_names}
        live = tf.sigmoid(model(feats, training=False)).numpy()
        out = sig(**{k: tf.constant(v) for k, v in feats.items()})
        np.testing.assert_allclose(out["prob"].numpy(), live, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(tf.sigmoid(out["logit"]).numpy(), live, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(loaded.serve(feats)["prob"].numpy(), live, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(tf_export.predict_saved_model(loaded, batch), live, rtol=1e-6, atol=1e-7)


def test_saved_model_export_replaces_atomically(trained_tf, tmp_path):
    _, model = trained_tf
    target = tmp_path / "saved"
    tf_export.export_saved_model(model, str(target))
    first = sorted(os.listdir(target))
    tf_export.export_saved_model(model, str(target))          # overwrite: complete or not at all
    assert sorted(os.listdir(target)) == first
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".saved")]


def test_torch_weights_exported_as_saved_model_predict_the_same(trained_torch, random_dataset, tmp_path):
    schema, model = trained_torch
    weights = zoo_torch.get_weights(model)
    path = tf_export.export_weights("DeepFM", schema, dict(MODEL_KW), weights, str(tmp_path / "from_torch"))
    loaded = tf_export.load_saved_model(path)
    batch = _batches(random_dataset, "test", 64)[0]
    np.testing.assert_allclose(tf_export.predict_saved_model(loaded, batch), _torch_probs(model, batch),
                               rtol=1e-4, atol=1e-6)
