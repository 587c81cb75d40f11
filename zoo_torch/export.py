"""Export a trained PyTorch zoo model for serving: TorchScript and ONNX (``onnx``, pinned in requirements.txt).

The exported program takes the feature tensors as POSITIONAL inputs in schema
order (``schema.feature_names``: categorical int32 ``[B]``, numeric float32
``[B]``, sequence int32 ``[B, max_len]``) and returns the click probability
``sigmoid(logits)`` float32 ``[B]``; the batch size is free.

    path = export_torchscript(model, "out/model.torchscript.pt")
    m = torch.jit.load(path)
    probs = m(*[batch[n] for n in model.schema.feature_names])

Files are written atomically (temporary file + rename).
"""
from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import torch
from torch import nn

import zoo_torch
from common.configs import config_to_dict
from common.io import atomic_write_bytes
from zoo_torch.optim import unwrap

TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"


class ServingModel(nn.Module):
    """``forward(*features) -> probabilities``: the zoo model with positional field inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = unwrap(model)
        self.names = list(self.model.schema.feature_names)

    def forward(self, *features):
        batch = dict(zip(self.names, features))
        return torch.sigmoid(self.model(batch))


def example_inputs(schema, batch_size: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random valid inputs in schema order (for tracing and tests)."""
    rng = np.random.default_rng(seed)
    out = []
    for f in schema.categorical:
        out.append(torch.from_numpy(rng.integers(0, max(f.vocab_size, 1), batch_size).astype(np.int32)))
    for _ in schema.numeric:
        out.append(torch.from_numpy(rng.normal(0, 1, batch_size).astype(np.float32)))
    for f in schema.sequence:
        out.append(torch.from_numpy(rng.integers(0, max(f.vocab_size, 1), (batch_size, f.max_len)).astype(np.int32)))
    return tuple(out)


def batch_inputs(schema, batch: dict) -> tuple[torch.Tensor, ...]:
    """The positional inputs of a batch dict."""
    return tuple(torch.as_tensor(batch[n]) for n in schema.feature_names)


def _serving(model) -> ServingModel:
    """A CPU copy in eval mode whose parameters do not require grad (the export is inference only)."""
    live = unwrap(model)
    fresh = zoo_torch.build_model(live.model_name, live.schema, **config_to_dict(live.config))
    zoo_torch.set_weights(fresh, zoo_torch.get_weights(live))
    s = ServingModel(fresh).cpu()
    s.eval()
    for p in s.parameters():
        p.requires_grad_(False)
    return s


def export_torchscript(model, path: str, example: tuple | None = None) -> str:
    """Trace the model (eval mode, CPU) into a TorchScript file at ``path``; returns ``path``."""
    serving = _serving(model)
    example = example if example is not None else example_inputs(serving.model.schema)
    with torch.no_grad():
        traced = torch.jit.trace(serving, example, check_trace=False, strict=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_torchscript(path: str):
    m = torch.jit.load(path, map_location="cpu")
    m.eval()
    return m


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(model, path: str, example: tuple | None = None, opset: int = 17) -> str:
    """Export to ONNX (inputs named after the fields, output ``prob``, dynamic batch axis).

    Needs the ``onnx`` package (in requirements.txt): RuntimeError with the
    install hint when it is missing.  Fields the model ignores (BiasedMF uses
    only user and item) are pruned from the graph's inputs.
    """
    if not onnx_available():
        raise RuntimeError("ONNX export needs the `onnx` package (pip install onnx); it is not "
                           "installed")
    serving = _serving(model)
    schema = serving.model.schema
    example = example if example is not None else example_inputs(schema)
    names = list(schema.feature_names)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=d)
    os.close(fd)
    try:
        with torch.no_grad():
            torch.onnx.export(serving, example, tmp, input_names=names, output_names=["prob"],
                              dynamic_axes={**{n: {0: "batch"} for n in names}, "prob": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export(model, fmt: str, out_dir: str) -> str:
    """``fmt`` in {"torchscript", "onnx"}: write ``out_dir/<file>`` and return its path."""
    if fmt == "torchscript":
        return export_torchscript(model, os.path.join(out_dir, TORCHSCRIPT_FILE))
    if fmt == "onnx":
        return export_onnx(model, os.path.join(out_dir, ONNX_FILE))
    raise ValueError(f"unknown export format {fmt!r} (PyTorch: torchscript, onnx)")
