"""FuxiCTR (reczoo/FuxiCTR) peer runner.

The pip package ships the layers and ``BaseModel`` but not the model zoo, so the
models are assembled here from the package's own layers in the structure of
the FuxiCTR model zoo (``model_zoo/<Model>/src/<Model>.py``):

- DeepFM  = FeatureEmbedding -> FactorizationMachine (LR + inner products) + MLP_Block(out 1)
- DCN     = FeatureEmbedding(flat) -> [CrossNet ; MLP_Block] -> Linear(1)
- xDeepFM = LogisticRegression + CompressedInteractionNet(out 1) + MLP_Block(out 1)

AutoInt is not built: its MultiHeadSelfAttention lives in the model zoo, not in
the pip package.

The timed step is ``BaseModel.train_step`` itself (zero_grad, forward,
``compute_loss`` = BCE mean + regularisation (none here), backward,
``clip_grad_norm_(max_norm=10)`` as ``fit``'s default, ``optimizer.step()``)
with ``compile("adam", "binary_crossentropy", lr)``.  Batches are dicts of
per-field LongTensor column views of one in-memory tensor (like the package's
``BatchCollator``).  Note: importing ``fuxictr.pytorch.layers`` imports
``fuxictr.preprocess``, which imports ray and polars (part of this peer's memory).
"""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict

import numpy as np

import _bench
import _torch_common as tc

MODELS = ("DeepFM", "DCN", "xDeepFM")
LIBRARY = "fuxictr"


def check() -> dict:
    import fuxictr
    from fuxictr.pytorch.layers import FeatureEmbedding  # noqa: F401
    from fuxictr.pytorch.models import BaseModel  # noqa: F401

    return dict(library=LIBRARY, version=fuxictr.__version__, models=list(MODELS))


def make_feature_map(names, vocab_sizes, embed_size, data_dir):
    from fuxictr.features import FeatureMap

    fm = FeatureMap("bench", data_dir)
    fm.features = OrderedDict((n, {"source": "", "type": "categorical", "vocab_size": int(v), "padding_idx": 0})
                              for n, v in zip(names, vocab_sizes))
    fm.labels = ["label"]
    fm.default_emb_dim = int(embed_size)
    fm.num_fields = fm.get_num_fields()
    fm.total_features = int(sum(vocab_sizes))
    fm.set_column_index()
    return fm


def model_classes():
    import torch
    from torch import nn
    from fuxictr.pytorch.layers import (CompressedInteractionNet, CrossNet, FactorizationMachine,
                                        FeatureEmbedding, LogisticRegression, MLP_Block)
    from fuxictr.pytorch.models import BaseModel

    def finish(model, kw, lr):
        model.compile(kw["optimizer"], kw["loss"], lr)
        model.reset_parameters()
        model.model_to_device()

    class DeepFM(BaseModel):
        def __init__(self, feature_map, embedding_dim, hidden_units, learning_rate, **kw):
            super().__init__(feature_map, model_id="DeepFM", gpu=-1, **kw)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            self.fm = FactorizationMachine(feature_map)
            self.mlp = MLP_Block(input_dim=feature_map.sum_emb_out_dim(), output_dim=1,
                                 hidden_units=list(hidden_units), hidden_activations="ReLU",
                                 output_activation=None, dropout_rates=0, batch_norm=False)
            finish(self, kw, learning_rate)

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            emb = self.embedding_layer(X)
            y = self.fm(X, emb)
            y += self.mlp(emb.flatten(start_dim=1))
            return {"y_pred": self.output_activation(y)}

    class DCN(BaseModel):
        def __init__(self, feature_map, embedding_dim, hidden_units, learning_rate, num_cross_layers, **kw):
            super().__init__(feature_map, model_id="DCN", gpu=-1, **kw)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            dim = feature_map.sum_emb_out_dim()
            self.dnn = MLP_Block(input_dim=dim, output_dim=None, hidden_units=list(hidden_units),
                                 hidden_activations="ReLU", output_activation=None, dropout_rates=0,
                                 batch_norm=False) if hidden_units else None
            self.crossnet = CrossNet(dim, num_cross_layers)
            self.fc = nn.Linear(dim + (hidden_units[-1] if hidden_units else 0), 1)
            finish(self, kw, learning_rate)

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            emb = self.embedding_layer(X, flatten_emb=True)
            out = self.crossnet(emb)
            if self.dnn is not None:
                out = torch.cat([out, self.dnn(emb)], dim=-1)
            return {"y_pred": self.output_activation(self.fc(out))}

    class xDeepFM(BaseModel):
        def __init__(self, feature_map, embedding_dim, hidden_units, learning_rate, cin_hidden_units, **kw):
            super().__init__(feature_map, model_id="xDeepFM", gpu=-1, **kw)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            self.dnn = MLP_Block(input_dim=feature_map.sum_emb_out_dim(), output_dim=1,
                                 hidden_units=list(hidden_units), hidden_activations="ReLU",
                                 output_activation=None, dropout_rates=0, batch_norm=False) if hidden_units else None
            self.lr_layer = LogisticRegression(feature_map, use_bias=False)
            self.cin = CompressedInteractionNet(feature_map.num_fields, list(cin_hidden_units), output_dim=1)
            finish(self, kw, learning_rate)

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            emb = self.embedding_layer(X)
            y = self.lr_layer(X) + self.cin(emb)
            if self.dnn is not None:
                y += self.dnn(emb.flatten(start_dim=1))
            return {"y_pred": self.output_activation(y)}

    return {"DeepFM": DeepFM, "DCN": DCN, "xDeepFM": xDeepFM}


def run(spec: dict) -> dict:
    torch = tc.setup_torch(spec)
    import fuxictr
    import fuxictr.pytorch.layers  # noqa: F401  (the import cost is part of the library)

    res = tc.base_result(spec, LIBRARY, fuxictr.__version__, torch)
    name = spec["model"]
    if name not in MODELS:
        raise ValueError(f"fuxictr runner has no model {name!r}")
    cat, label = _bench.load_arrays(spec["npy_dir"], "train")
    vcat, vlabel = _bench.load_arrays(spec["npy_dir"], "valid")
    names = [f"C{i + 1}" for i in range(cat.shape[1])]
    work = tempfile.mkdtemp(prefix="fuxictr-bench-")
    fmap = make_feature_map(names, spec["vocab_sizes"], spec["embed_size"], work)
    kw = dict(optimizer="adam", loss="binary_crossentropy", verbose=0, model_root=os.path.join(work, "ckpt"),
              metrics=["AUC", "logloss"], embedding_regularizer=None, net_regularizer=None)
    cls = model_classes()[name]
    extra = {}
    if name == "DCN":
        extra["num_cross_layers"] = int(spec["cross_layers"])
    if name == "xDeepFM":
        extra["cin_hidden_units"] = list(spec["cin_layers"])
    model = cls(fmap, int(spec["embed_size"]), list(spec["mlp"]), float(spec["lr"]), **extra, **kw)
    model._max_gradient_norm = 10.0        # BaseModel.fit(max_gradient_norm=10.) default
    res["params"] = tc.num_params(model)
    res["rss_after_build_mb"] = _bench.current_rss_mb()

    X = torch.from_numpy(cat.astype(np.int64))
    Y = torch.from_numpy(label)
    model.train()
    sums = {"loss": 0.0}

    def batch(lo, hi, X=X, Y=Y):
        b = X[lo:hi]
        d = {n: b[:, i] for i, n in enumerate(names)}
        d["label"] = Y[lo:hi]
        return d

    def step(lo, hi):
        loss = model.train_step(batch(lo, hi))
        sums["loss"] += loss.item() * (hi - lo)

    timing, plan = _bench.run_epoch(len(label), int(spec["batch_size"]), spec, step)
    res.update(timing)
    res["plan"] = plan
    res["train_mean_loss"] = sums["loss"] / max(1, len(label))
    model.eval()
    VX, VY = torch.from_numpy(vcat.astype(np.int64)), torch.from_numpy(vlabel)
    probs = []
    B = int(spec["batch_size"])
    with torch.no_grad():
        for lo in range(0, len(vlabel), B):
            probs.append(model.forward(batch(lo, min(len(vlabel), lo + B), VX, VY))["y_pred"].numpy().reshape(-1))
    res.update(_bench.valid_metrics(vlabel, np.concatenate(probs)))
    return res
