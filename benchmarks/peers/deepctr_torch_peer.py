"""deepctr-torch (shenweichen/DeepCTR-Torch) peer runner.

The timed step is the body of ``deepctr_torch.models.basemodel.BaseModel.fit``'s
batch loop with ``verbose=0`` (no per-batch metrics): ``x.float()``, forward,
``optim.zero_grad()``, ``loss_func(y_pred, y, reduction='sum')``,
``get_regularization_loss()``, ``+ aux_loss``, ``loss.item()``,
``backward()``, ``optim.step()``.  Batches are slices of the in-memory
``[N, F]`` array that ``fit`` itself builds (``np.concatenate`` of the input
columns) -- cheaper than fit's per-sample ``DataLoader``, i.e. in the peer's
favour.  Optimiser: ``compile("adam")`` = ``torch.optim.Adam`` (dense
gradients: deepctr-torch's embeddings are ``sparse=False``), all L2 terms 0.
"""
from __future__ import annotations

import numpy as np

import _bench
import _torch_common as tc

MODELS = ("DeepFM", "DCN", "xDeepFM", "AutoInt")
LIBRARY = "deepctr-torch"


def check() -> dict:
    import deepctr_torch

    return dict(library=LIBRARY, version=deepctr_torch.__version__, models=list(MODELS))


def build(spec: dict, feature_columns):
    from deepctr_torch import models

    common = dict(l2_reg_embedding=0.0, init_std=1e-4, seed=int(spec["seed"]), task="binary", device="cpu")
    mlp = tuple(spec["mlp"])
    name = spec["model"]
    if name == "DeepFM":
        return models.DeepFM(feature_columns, feature_columns, dnn_hidden_units=mlp, l2_reg_linear=0.0,
                             l2_reg_dnn=0.0, dnn_dropout=0.0, dnn_use_bn=False, **common)
    if name == "DCN":
        return models.DCN(feature_columns, feature_columns, cross_num=int(spec["cross_layers"]),
                          cross_parameterization="vector", dnn_hidden_units=mlp, l2_reg_linear=0.0,
                          l2_reg_cross=0.0, l2_reg_dnn=0.0, dnn_dropout=0.0, dnn_use_bn=False, **common)
    if name == "xDeepFM":
        return models.xDeepFM(feature_columns, feature_columns, dnn_hidden_units=mlp,
                              cin_layer_size=tuple(spec["cin_layers"]), cin_split_half=bool(spec["cin_split_half"]),
                              l2_reg_linear=0.0, l2_reg_dnn=0.0, l2_reg_cin=0.0, dnn_dropout=0.0,
                              dnn_use_bn=False, **common)
    if name == "AutoInt":
        # deepctr-torch's InteractingLayer keeps the embedding size (no att_embedding_size knob)
        return models.AutoInt(feature_columns, feature_columns, att_layer_num=int(spec["attention_layers"]),
                              att_head_num=int(spec["num_heads"]), att_res=True, dnn_hidden_units=(),
                              l2_reg_dnn=0.0, dnn_dropout=0.0, dnn_use_bn=False, **common)
    raise ValueError(f"deepctr-torch runner has no model {name!r}")


def run(spec: dict) -> dict:
    torch = tc.setup_torch(spec)
    import deepctr_torch
    from deepctr_torch.inputs import SparseFeat

    res = tc.base_result(spec, LIBRARY, deepctr_torch.__version__, torch)
    cat, label = _bench.load_arrays(spec["npy_dir"], "train")
    vcat, vlabel = _bench.load_arrays(spec["npy_dir"], "valid")
    names = [f"C{i + 1}" for i in range(cat.shape[1])]
    cols = [SparseFeat(n, vocabulary_size=int(v), embedding_dim=int(spec["embed_size"]))
            for n, v in zip(names, spec["vocab_sizes"])]
    model = build(spec, cols)
    model.compile("adam", "binary_crossentropy")
    for g in model.optim.param_groups:
        g["lr"] = float(spec["lr"])
    res["params"] = tc.num_params(model)
    res["rss_after_build_mb"] = _bench.current_rss_mb()
    width = int(spec["num_heads"]) * int(spec["attention_dim"])
    if spec["model"] == "AutoInt" and width != int(spec["embed_size"]):
        res["config_note"] = (f"attention width {spec['embed_size']} (its heads split the embedding; "
                              f"the others use {spec['num_heads']} x {spec['attention_dim']} = {width})")

    X = torch.from_numpy(cat)          # fit: torch.from_numpy(np.concatenate(x, axis=-1))
    Y = torch.from_numpy(label)
    model = model.train()
    loss_func, optim = model.loss_func, model.optim
    sums = {"loss": 0.0}

    def step(lo, hi):
        x = X[lo:hi].float()
        y = Y[lo:hi].float()
        y_pred = model(x)
        if y_pred.ndim > 1 and y_pred.shape[-1] == 1:
            y_pred = y_pred.squeeze(-1)
        optim.zero_grad()
        loss = loss_func(y_pred, y, reduction="sum")
        reg_loss = model.get_regularization_loss()
        total_loss = loss + reg_loss + model.aux_loss
        sums["loss"] += loss.item()
        total_loss.item()
        total_loss.backward()
        optim.step()

    timing, plan = _bench.run_epoch(len(label), int(spec["batch_size"]), spec, step)
    res.update(timing)
    res["plan"] = plan
    res["train_mean_loss"] = sums["loss"] / max(1, len(label))
    probs = model.predict({n: vcat[:, i] for i, n in enumerate(names)}, batch_size=int(spec["batch_size"]))
    res.update(_bench.valid_metrics(vlabel, np.asarray(probs).reshape(-1)))
    return res
