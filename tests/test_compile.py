"""Training under torch.compile (``TrainStep(compile=True)``, ``--compile``): the same training as eager
mode up to float32 rounding, the row-sparse lookups kept eager, deterministic, and a clean eager
fallback without a C++ compiler or when compilation fails."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import zoo_torch
from common.errors import FlagError
from common.flags import parse_args
from common.schema import Schema
from parity_base import random_weights, rel, small_config
from zoo_torch import data as zdata
from zoo_torch import step as zstep
from zoo_torch.losses import get_loss
from zoo_torch.optim import build_optimizer, make_optimizer_config

B = 128
STEPS = 4
# Compiled and eager kernels sum in different orders (Inductor fuses the FM term, ReLU's gradient and
# the bias sums), so float32 rounding differs.  Measured after 4 LazyAdam steps at lr 1e-2: weights
# within 5.2e-7 relative (xDeepFM; DeepFM 1.5e-7), losses within 1.2e-7.  The bars allow ~20x that.
WEIGHT_BAR = 1e-5
LOSS_BAR = 2e-6


def _batches(dataset, n=STEPS, batch_size=B):
    it = iter(zdata.batches(dataset, "train", batch_size=batch_size, shuffle=True, seed=3))
    return [next(it) for _ in range(n)]


def _model(name, dataset):
    torch.manual_seed(0)
    m = zoo_torch.build_model(name, Schema.load(dataset), **small_config(name, dropout=0.0))
    zoo_torch.set_weights(m, random_weights(m))
    return m


def _train(model, batches, compile, opt="LazyAdam"):
    step = zstep.TrainStep(model, build_optimizer(model, make_optimizer_config(opt, 1e-2)), get_loss("BCE"),
                           compile=compile)
    losses = [float(step(b)) for b in batches]
    return step, losses, zoo_torch.get_weights(model)


class _Spy:
    """Counts the calls that reach the compiled model."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, batch):
        self.calls += 1
        return self.fn(batch)


@pytest.mark.parametrize("name", ["DeepFM", "DCN", "AutoInt", "xDeepFM"])
def test_compiled_training_matches_eager(name, random_dataset):
    batches = _batches(random_dataset)
    eager, comp = _model(name, random_dataset), _model(name, random_dataset)
    _, loss_e, w_e = _train(eager, batches, compile=False)
    step, loss_c, w_c = _train(comp, batches, compile=True)
    assert isinstance(step.forward, zstep.CompiledForward) and step.forward.active
    assert step.forward.batch_rows == B
    # the optimiser still got row-sparse table gradients (the lookups ran eagerly)
    sparse = [n for n, p in comp.named_parameters() if getattr(p, "zoo_sparse", False)]
    assert sparse and all(dict(comp.named_parameters())[n].grad.is_sparse for n in sparse)
    assert max(abs(a - b) / abs(a) for a, b in zip(loss_e, loss_c)) < LOSS_BAR, (loss_e, loss_c)
    worst = max(rel(w_e[k], w_c[k]) for k in w_e)
    assert worst < WEIGHT_BAR, worst
    # and training really moved the weights (the comparison above is not between two unchanged models)
    start = random_weights(comp)           # what _model started from: the values depend only on the shapes
    assert max(rel(start[k], w_c[k]) for k in start) > 1e-3


def test_compiled_training_is_deterministic(random_dataset):
    batches = _batches(random_dataset)
    a, b = _model("DeepFM", random_dataset), _model("DeepFM", random_dataset)
    _, la, wa = _train(a, batches, compile=True)
    _, lb, wb = _train(b, batches, compile=True)
    assert la == lb
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_only_full_training_batches_are_compiled(random_dataset):
    model = _model("DeepFM", random_dataset)
    step, _, _ = _train(model, _batches(random_dataset, n=1), compile=True)
    spy = step.forward._compiled = _Spy(step.forward._compiled)
    full, short = _batches(random_dataset, n=1)[0], _batches(random_dataset, n=1, batch_size=B // 2)[0]
    step(full)
    assert spy.calls == 1
    step(short)                       # an epoch's shorter last batch: eager, no second compilation
    assert spy.calls == 1
    probs, labels = zstep.predict(model, [full, short])     # evaluation: eager
    assert spy.calls == 1 and probs.shape == labels.shape == (B + B // 2,)
    with torch.no_grad():
        step.forward(full)
    assert spy.calls == 1
    assert model.training


def test_without_a_cxx_compiler_training_stays_eager(random_dataset, monkeypatch, capsys):
    batches = _batches(random_dataset)
    eager, other = _model("DeepFM", random_dataset), _model("DeepFM", random_dataset)
    _, loss_e, w_e = _train(eager, batches, compile=False)
    monkeypatch.setattr(zstep, "cxx_compiler", lambda: None)
    step, loss_c, w_c = _train(other, batches, compile=True)
    assert not step.forward.active
    assert capsys.readouterr().err.strip() == ("torch.compile: off, training runs eagerly "
                                               "(no C++ compiler on the PATH (set CXX))")
    assert loss_e == loss_c and all(np.array_equal(w_e[k], w_c[k]) for k in w_e)   # bit for bit eager


def test_a_failed_compilation_falls_back_to_eager(random_dataset, monkeypatch, capsys):
    def broken_compile(model, **kw):
        def run(batch):
            raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("cc1plus: boom"), None)
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    batches = _batches(random_dataset)
    eager, other = _model("DeepFM", random_dataset), _model("DeepFM", random_dataset)
    _, loss_e, w_e = _train(eager, batches, compile=False)
    step, loss_c, w_c = _train(other, batches, compile=True)
    assert not step.forward.active
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("torch.compile: off, training runs eagerly (compilation failed:")
    assert "boom" in err[0]
    assert loss_e == loss_c and all(np.array_equal(w_e[k], w_c[k]) for k in w_e)


def test_compile_needs_the_raw_model(random_dataset):
    model = _model("DeepFM", random_dataset)
    with pytest.raises(ValueError, match="raw model"):
        zstep.TrainStep(model, build_optimizer(model, make_optimizer_config("Adam", 1e-3)), get_loss("BCE"),
                        forward=torch.nn.DataParallel(model), compile=True)


@pytest.mark.parametrize("argv,backend,text", [
    (["--compile"], "tensorflow", "only the PyTorch trainer compiles"),
    (["--compile", "--gpu_ids", "0"], "pytorch", "verified on the CPU only"),
    (["--compile", "--search_loss"], "pytorch", "the searches train eagerly"),
])
def test_compile_flag_errors(argv, backend, text, tmp_path):
    with pytest.raises(FlagError) as exc:
        parse_args(["x", "--model_save_dir", str(tmp_path / "out"), *argv], backend)
    assert exc.value.path == "--compile" and text in str(exc.value)


def test_compile_flag_reaches_the_trainer_args(tmp_path):
    assert parse_args(["x", "--compile", "--model_save_dir", str(tmp_path)], "pytorch").compile is True
    assert parse_args(["x", "--model_save_dir", str(tmp_path)], "pytorch").compile is False
