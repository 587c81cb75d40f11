"""torchfm (rixwew/pytorch-fm) peer runner.

The timed step is torchfm's own example training loop (``examples/main.py``):
``y = model(fields)``, ``BCELoss``, ``model.zero_grad()``, ``backward()``,
``optimizer.step()`` with ``torch.optim.Adam`` (weight decay 0 here, so every
runner minimises the same plain log loss).  ``fields`` is a LongTensor
``[B, F]`` of per-field indices (the model adds the field offsets itself);
batches are slices of one in-memory tensor.

Model notes: torchfm's MLP always has BatchNorm1d after every hidden layer, its
embeddings are one dense-gradient ``nn.Embedding`` over all fields, and its
AutoInt (``AutomaticFeatureInteractionModel``) always adds a linear term and an
MLP output head (here with no hidden layer: ``mlp_dims=()``).
"""
from __future__ import annotations

import numpy as np

import _bench
import _torch_common as tc

MODELS = ("DeepFM", "DCN", "xDeepFM", "AutoInt")
LIBRARY = "torchfm"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("torchfm")
    except Exception:  # noqa: BLE001
        return "unknown"


def check() -> dict:
    import torchfm.model.dfm  # noqa: F401

    return dict(library=LIBRARY, version=_version(), models=list(MODELS))


def build(spec: dict, field_dims):
    name = spec["model"]
    e, mlp = int(spec["embed_size"]), tuple(spec["mlp"])
    if name == "DeepFM":
        from torchfm.model.dfm import DeepFactorizationMachineModel

        return DeepFactorizationMachineModel(field_dims, e, mlp, dropout=0.0)
    if name == "DCN":
        from torchfm.model.dcn import DeepCrossNetworkModel

        return DeepCrossNetworkModel(field_dims, e, int(spec["cross_layers"]), mlp, dropout=0.0)
    if name == "xDeepFM":
        from torchfm.model.xdfm import ExtremeDeepFactorizationMachineModel

        return ExtremeDeepFactorizationMachineModel(field_dims, e, mlp, 0.0, tuple(spec["cin_layers"]),
                                                    split_half=bool(spec["cin_split_half"]))
    if name == "AutoInt":
        from torchfm.model.afi import AutomaticFeatureInteractionModel

        return AutomaticFeatureInteractionModel(field_dims, e, int(spec["num_heads"]) * int(spec["attention_dim"]),
                                                int(spec["num_heads"]), int(spec["attention_layers"]), (),
                                                (0.0, 0.0, 0.0), has_residual=True)
    raise ValueError(f"torchfm runner has no model {name!r}")


def run(spec: dict) -> dict:
    torch = tc.setup_torch(spec)
    import torchfm  # noqa: F401

    res = tc.base_result(spec, LIBRARY, _version(), torch)
    cat, label = _bench.load_arrays(spec["npy_dir"], "train")
    vcat, vlabel = _bench.load_arrays(spec["npy_dir"], "valid")
    field_dims = np.asarray(spec["vocab_sizes"], dtype=np.int64)
    model = build(spec, field_dims)
    criterion = torch.nn.BCELoss()
    optimizer = torch.optim.Adam(params=model.parameters(), lr=float(spec["lr"]), weight_decay=0.0)
    res["params"] = tc.num_params(model)
    res["rss_after_build_mb"] = _bench.current_rss_mb()

    X = torch.from_numpy(cat.astype(np.int64))
    Y = torch.from_numpy(label)
    model.train()
    sums = {"loss": 0.0}

    def step(lo, hi):
        fields, target = X[lo:hi], Y[lo:hi]
        y = model(fields)
        loss = criterion(y, target.float())
        model.zero_grad()
        loss.backward()
        optimizer.step()
        sums["loss"] += loss.item() * (hi - lo)

    timing, plan = _bench.run_epoch(len(label), int(spec["batch_size"]), spec, step)
    res.update(timing)
    res["plan"] = plan
    res["train_mean_loss"] = sums["loss"] / max(1, len(label))
    model.eval()
    VX = torch.from_numpy(vcat.astype(np.int64))
    probs = []
    with torch.no_grad():
        for lo in range(0, len(vlabel), int(spec["batch_size"])):
            probs.append(model(VX[lo:lo + int(spec["batch_size"])]).numpy())
    res.update(_bench.valid_metrics(vlabel, np.concatenate(probs)))
    return res
