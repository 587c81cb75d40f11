"""Export a trained TensorFlow zoo model as a SavedModel with a serving signature.

    path = export_saved_model(model, "out/saved_model")
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["serving_default"](**{name: tensor for name in schema.feature_names})
    out["prob"], out["logit"]                       # float32 [B]

Inputs are the schema's feature fields by name (categorical int32 ``[B]``,
numeric float32 ``[B]``, sequence int32 ``[B, max_len]``); ``loaded.serve(batch_dict)``
is the same function taking one dict.  The directory is written atomically
(temporary sibling directory, renamed when complete).
"""
from __future__ import annotations

import os
import re

import tensorflow as tf

import zoo_tf
from common.io import atomic_directory
from zoo_tf.data import element_spec

SAVED_MODEL_DIR = "saved_model"


def signature_name(field: str) -> str:
    """A field name usable as a signature argument (invalid characters become ``_``)."""
    n = re.sub(r"[^A-Za-z0-9_.\-/>]", "_", field)
    return n if re.match(r"[A-Za-z0-9.]", n) else "f" + n


class ServingModule(tf.Module):
    """tf.Module holding the model's variables and a ``serve(features) -> {"prob", "logit"}`` function."""

    def __init__(self, model):
        super().__init__(name="ctr_zoo_serving")
        self.model = model
        schema = model.schema
        spec = {n: s for n, s in element_spec(schema).items() if n != "label"}
        self._names = {n: signature_name(n) for n in spec}
        sig = {n: tf.TensorSpec(s.shape, s.dtype, name=self._names[n]) for n, s in spec.items()}

        def serve(features):
            logits = model(features, training=False)
            return {"prob": tf.sigmoid(logits), "logit": logits}

        self.serve = tf.function(serve, input_signature=[sig], autograph=False)


def export_saved_model(model, path: str, overwrite: bool = True) -> str:
    """Save ``model`` (a zoo_tf model built outside any distribution strategy) to ``path``; returns it."""
    module = ServingModule(model)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})
    return path


def export_weights(model_name: str, schema, model_config: dict, weights: dict, path: str) -> str:
    """Build a fresh model (no strategy), load ``weights`` and export it."""
    model = zoo_tf.build_model(model_name, schema, **model_config)
    zoo_tf.set_weights(model, weights)
    return export_saved_model(model, path)


def load_saved_model(path: str):
    return tf.saved_model.load(path)


def predict_saved_model(loaded, batch: dict):
    """Probabilities of the exported model for a batch dict (numpy or tensors)."""
    fn = loaded.signatures["serving_default"]
    names = {a: a for a in fn.structured_input_signature[1]}
    kw = {}
    for field, value in batch.items():
        key = signature_name(field)
        if key in names:
            kw[key] = tf.convert_to_tensor(value)
    return fn(**kw)["prob"].numpy()


def export(model, fmt: str, out_dir: str) -> str:
    if fmt != "saved_model":
        raise ValueError(f"unknown export format {fmt!r} (TensorFlow: saved_model)")
    return export_saved_model(model, os.path.join(out_dir, SAVED_MODEL_DIR))
