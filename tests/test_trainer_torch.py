"""The PyTorch trainer (in-process) and the backend-free machinery in common/train_utils.py.

Backend-free: Plateau (early stopping + LR decay), checkpoint files (atomic, no
pickle, corrupt ones skipped), run fingerprints, TensorBoard event files.
PyTorch: a run's outputs (best weights really are the best evaluation's, test
metrics come from them), early stopping and LR decay in a real run, resume
refusal for a different run, restart of a finished run, checkpoint contents,
and the DDP sparse-gradient all-gather.
"""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest
import torch

from common.errors import FlagError
from common.train_utils import (BEST_FILE, Plateau, ScalarWriter, TrainArgs, checkpoint_path, list_checkpoints,
                                load_weights, prune_checkpoints, read_checkpoint, read_scalars, resume_checkpoint,
                                run_fingerprint, save_weights, split_prefix, write_checkpoint)


# ----------------------------------------------------------------------------------------------
# backend-free pieces
def test_plateau_decays_lr_then_stops():
    p = Plateau(lr=1.0, patience=3, factor=0.5, lr_patience=1, min_lr=0.2)
    seq = [(0.60, True, None, False), (0.70, True, None, False), (0.69, False, 0.5, False),
           (0.70, False, 0.25, False), (0.71, True, None, False), (0.70, False, 0.2, False),   # floored at min_lr
           (0.70, False, None, False), (0.65, False, None, True)]
    for i, (m, improved, new_lr, stop) in enumerate(seq):
        assert p.update(m, step=i) == (improved, new_lr, stop), i
    assert p.best == 0.71 and p.best_step == 4 and p.lr == 0.2


def test_plateau_disabled_and_nan_and_roundtrip():
    p = Plateau(lr=0.1, patience=0, factor=1.0, lr_patience=1)
    for m in (0.5, 0.4, 0.3, 0.2, float("nan")):
        improved, new_lr, stop = p.update(m)
        assert new_lr is None and not stop
    assert p.best == 0.5 and p.bad == 4
    q = Plateau(lr=0.1, patience=0, factor=1.0, lr_patience=1)
    q.load_state_dict(json.loads(json.dumps(p.state_dict())))
    assert q.state_dict() == p.state_dict()
    fresh = Plateau(lr=0.3)
    assert fresh.state_dict()["best"] is None and fresh.update(float("nan")) == (False, 0.15, False)


def test_checkpoint_roundtrip_prune_and_corrupt_files(tmp_path):
    d = str(tmp_path)
    arrays = {"w/a": np.arange(6, dtype=np.float32).reshape(2, 3), "opt/__step__": np.asarray(7, np.int64)}
    for step in (3, 10, 12):
        write_checkpoint(checkpoint_path(d, step), arrays, {"trainer": {"step": step}, "fingerprint": {"x": 1}})
    assert [s for s, _ in list_checkpoints(d)] == [3, 10, 12]
    got, meta = read_checkpoint(checkpoint_path(d, 10))
    assert meta["trainer"]["step"] == 10 and set(got) == set(arrays)
    np.testing.assert_array_equal(got["w/a"], arrays["w/a"])
    assert not [f for f in os.listdir(d) if f.startswith(".tmp")]
    prune_checkpoints(d, 2)
    assert [s for s, _ in list_checkpoints(d)] == [10, 12]
    # a truncated newest checkpoint is skipped with a warning, the previous one is resumed
    data = open(checkpoint_path(d, 12), "rb").read()
    open(checkpoint_path(d, 12), "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable"):
        read_checkpoint(checkpoint_path(d, 12))
    path, note = resume_checkpoint(d, {"x": 1}, resume=True)
    assert path == checkpoint_path(d, 10) and "step 10" in note
    assert resume_checkpoint(d, {"x": 1}, resume=False) == (None, "")
    with pytest.raises(FlagError) as ei:
        resume_checkpoint(d, {"x": 2}, resume=True)
    assert ei.value.path == "--model_save_dir" and "differs in: x" in ei.value.message
    # not our format
    np.savez(os.path.join(d, "ckpt-000000099.npz"), a=np.zeros(2))
    with pytest.raises(ValueError, match="not a ctr-zoo checkpoint"):
        read_checkpoint(os.path.join(d, "ckpt-000000099.npz"))


def test_weights_file_roundtrip(tmp_path):
    w = {"dnn.layers.0.kernel": np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)}
    save_weights(str(tmp_path / BEST_FILE), w, {"model": "DeepFM", "step": 5})
    got, meta = load_weights(str(tmp_path / BEST_FILE))
    assert meta["model"] == "DeepFM" and meta["step"] == 5 and meta["kind"] == "weights"
    np.testing.assert_array_equal(got["dnn.layers.0.kernel"], w["dnn.layers.0.kernel"])


def test_scalar_writer_writes_valid_tensorboard_records(tmp_path):
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    w = ScalarWriter(str(tmp_path / "tb"))
    w.scalars(1, {"valid/auc": 0.75, "train/loss": 0.5})
    w.scalars(2, {"valid/auc": 0.8, "skipped": float("nan")})
    w.close()
    sc = read_scalars(str(tmp_path / "tb"))
    assert sc["valid/auc"] == [(1, 0.75), (2, pytest.approx(0.8))] and sc["train/loss"] == [(1, 0.5)]
    assert "skipped" not in sc
    data = open(w.path, "rb").read()          # every record's length and data CRCs are valid
    pos, n_records = 0, 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
        body = data[pos + 12:pos + 12 + n]
        assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc32c(body)
        pos += 16 + n
        n_records += 1
    assert pos == len(data) and n_records == 3     # file_version + 2 summaries


def test_fingerprint_changes_with_what_matters():
    a = TrainArgs(model="DeepFM", data="/d", batch_size=64, model_config={"mlp": (8,)})
    fp = run_fingerprint(a, "pytorch", "h", 1)
    assert fp == run_fingerprint(TrainArgs(model="DeepFM", data="/d", batch_size=64, model_config={"mlp": (8,)},
                                           epochs=99, patience=7), "pytorch", "h", 1)
    for other in (TrainArgs(model="DeepFM", data="/d", batch_size=32, model_config={"mlp": (8,)}),
                  TrainArgs(model="DeepFM", data="/d", batch_size=64, model_config={"mlp": (16,)})):
        assert run_fingerprint(other, "pytorch", "h", 1) != fp
    assert run_fingerprint(a, "pytorch", "h", 2) != fp and run_fingerprint(a, "tensorflow", "h", 1) != fp


# ----------------------------------------------------------------------------------------------
# the PyTorch trainer in-process
def _args(data, out, **kw):
    base = dict(model="DeepFM", data=data, model_config={"mlp": (16, 8), "embed_size": 4, "seed": 0},
                epochs=2, batch_size=50, optimizer="Adam", lr=0.01, model_save_dir=str(out), patience=0,
                eval_every=0, checkpoint_every=0, progress=False, threads=1)
    base.update(kw)
    return TrainArgs(**base)


def _train(args):
    from zoo_torch.trainer import train

    return train(args)


def test_run_outputs_and_best_checkpoint_is_the_best_evaluation(random_dataset, tmp_path):
    from zoo_torch.trainer import TorchBackend

    args = _args(random_dataset, tmp_path / "o", eval_every=3, epochs=2, lr=0.05)
    res = _train(args)
    hist = json.loads((tmp_path / "o" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in hist] == list(range(3, 25, 3))
    best = max(hist, key=lambda h: h["valid_auc"])
    assert res["best_step"] == best["step"] and res["valid_auc"] == best["valid_auc"]
    # evaluating the saved best weights reproduces the recorded validation AUC and the test result
    b = TorchBackend(_args(random_dataset, tmp_path / "o2", eval_every=3, epochs=2, lr=0.05))
    w, meta = load_weights(res["checkpoint"])
    assert meta["step"] == best["step"]
    b.set_weights(w)
    assert b.evaluate("valid")["auc"] == pytest.approx(best["valid_auc"], abs=1e-12)
    assert b.evaluate("test", collective=False)["auc"] == pytest.approx(res["test_auc"], abs=1e-12)
    assert res["epochs"] == 2 and res["steps"] == 24 and not res["stopped_early"]


def test_early_stopping_and_lr_decay_in_a_real_run(random_dataset, tmp_path):
    args = _args(random_dataset, tmp_path / "o", eval_every=1, epochs=3, patience=2, lr=0.3,
                 lr_decay_factor=0.5, lr_decay_patience=1)
    res = _train(args)
    hist = json.loads((tmp_path / "o" / "metrics.json").read_text())["history"]
    assert res["stopped_early"] and res["steps"] < 36 and res["steps"] == hist[-1]["step"]
    assert [h["improved"] for h in hist[-2:]] == [False, False]        # stopped after `patience` bad evals
    assert not any(not a["improved"] and not b["improved"] for a, b in zip(hist[:-2], hist[1:-1]))
    lr = 0.3
    for h in hist:                                                     # lr halves at every non-improvement
        if not h["improved"]:
            lr *= 0.5
        assert h["lr"] == pytest.approx(lr)
    _, meta = read_checkpoint(list_checkpoints(str(tmp_path / "o"))[-1][1])
    assert meta["trainer"]["plateau"]["stopped"] and meta["trainer"]["finished"]


def test_checkpoint_contents_and_resume_refusal(random_dataset, tmp_path):
    out = tmp_path / "o"
    _train(_args(random_dataset, out, max_steps=5, checkpoint_every=2))
    steps = [s for s, _ in list_checkpoints(str(out))]
    assert steps == [4, 5]
    arrays, meta = read_checkpoint(list_checkpoints(str(out))[0][1])
    t = meta["trainer"]
    assert (t["epoch"], t["batch"], t["step"], t["finished"]) == (0, 4, 4, False)
    assert {"w/embedding.weight", "opt/__step__", "opt/__lr__", "opt/embedding.weight/m", "opt/embedding.weight/v",
            "rng/torch", "rng/numpy_keys", "rng/python_state"} <= set(arrays)
    assert int(arrays["opt/__step__"]) == 4
    # a different run in the same directory is refused, nothing is touched
    before = sorted(os.listdir(out))
    with pytest.raises(FlagError) as ei:
        _train(_args(random_dataset, out, max_steps=5, batch_size=40))
    assert ei.value.path == "--model_save_dir" and "batch_size" in ei.value.message
    assert sorted(os.listdir(out)) == before
    # --noresume starts over
    res = _train(_args(random_dataset, out, max_steps=3, batch_size=40, resume=False))
    assert res["resumed_from_step"] is None and [s for s, _ in list_checkpoints(str(out))] == [3]


def test_finished_run_reports_again_continues_with_more_epochs_or_starts_over(random_dataset, tmp_path):
    out = tmp_path / "o"
    a = _train(_args(random_dataset, out, epochs=1))
    wa = split_prefix(read_checkpoint(list_checkpoints(str(out))[-1][1])[0], "w/")
    # the same command again: nothing is trained, the same result is reported
    b = _train(_args(random_dataset, out, epochs=1))
    assert b["resumed_from_step"] == 12 and b["steps"] == 12
    assert (b["test_auc"], b["valid_auc"], b["best_step"]) == (a["test_auc"], a["valid_auc"], a["best_step"])
    # more epochs continue the finished run; it ends where a 2-epoch run from scratch ends
    c = _train(_args(random_dataset, out, epochs=2))
    assert c["resumed_from_step"] == 12 and c["steps"] == 24
    wc = split_prefix(read_checkpoint(list_checkpoints(str(out))[-1][1])[0], "w/")
    d = _train(_args(random_dataset, tmp_path / "two", epochs=2))
    wd = split_prefix(read_checkpoint(list_checkpoints(str(tmp_path / "two"))[-1][1])[0], "w/")
    assert d["test_auc"] == c["test_auc"]
    for k in wc:
        np.testing.assert_array_equal(wc[k], wd[k])
    # --noresume trains again from scratch, identically
    e = _train(_args(random_dataset, out, epochs=1, resume=False))
    we = split_prefix(read_checkpoint(list_checkpoints(str(out))[-1][1])[0], "w/")
    assert e["resumed_from_step"] is None and e["test_auc"] == a["test_auc"]
    for k in wa:
        np.testing.assert_array_equal(wa[k], we[k])


def test_sparse_gradient_allgather_matches_one_process(tmp_path):
    """allgather_sparse on a 2-process gloo group equals the single-process gradient of the whole batch."""
    import torch.multiprocessing as mp

    port = _free_port()
    mp.spawn(_sparse_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    idx = torch.tensor([[1, 2], [3, 4], [1, 5], [7, 7]])
    w = torch.nn.Parameter(torch.linspace(-1, 1, 30).reshape(10, 3))
    (torch.nn.functional.embedding(idx, w, sparse=True).sum(-1) ** 2).mean().backward()
    ref = w.grad.coalesce().to_dense().numpy()
    for r in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"g{r}.npy"), ref, rtol=1e-6, atol=1e-7)


def _free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _sparse_worker(rank, world, port, out):
    import torch.distributed as dist

    from zoo_torch.trainer import allgather_sparse

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        idx = torch.tensor([[1, 2], [3, 4], [1, 5], [7, 7]])[rank * 2:(rank + 1) * 2]
        w = torch.nn.Parameter(torch.linspace(-1, 1, 30).reshape(10, 3))
        (torch.nn.functional.embedding(idx, w, sparse=True).sum(-1) ** 2).mean().backward()
        g = allgather_sparse(w.grad, world)
        np.save(os.path.join(out, f"g{rank}.npy"), g.coalesce().to_dense().numpy())
    finally:
        dist.destroy_process_group()


def test_backend_state_roundtrip_is_exact(random_dataset, tmp_path):
    from zoo_torch.trainer import TorchBackend

    a = TorchBackend(_args(random_dataset, tmp_path / "a", model_config={"mlp": (8,), "embed_size": 4, "seed": 0,
                                                                          "dropout": 0.5}))
    for i, item in enumerate(a.train_batches(0, 0)):
        a.train_step(item)
        if i == 2:
            break
    state = a.state_arrays()
    b = TorchBackend(_args(random_dataset, tmp_path / "b", model_config={"mlp": (8,), "embed_size": 4, "seed": 0,
                                                                          "dropout": 0.5}))
    b.load_state_arrays(state)
    assert b.optimizer.t == 3
    # same state + same next batch (with dropout: the RNG state is part of the state) -> same weights
    item_a = next(iter(a.train_batches(0, 3)))
    item_b = next(iter(b.train_batches(0, 3)))
    a.train_step(item_a)
    b.load_state_arrays(state)          # the process-wide torch RNG moved on in a's step: restore it
    b.train_step(item_b)
    wa, wb = a.get_weights(), b.get_weights()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    assert math.isfinite(float(a.to_floats([a.train_step(item_a)])[0]))


def test_global_batch_must_split_over_ddp_processes(random_dataset, tmp_path, monkeypatch):
    from zoo_torch.trainer import TorchBackend

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(FlagError) as ei:
        TorchBackend(_args(random_dataset, tmp_path / "o", batch_size=63))
    assert ei.value.format() == "--batch_size: global batch size 63 is not divisible by the 2 processes"
    assert not (tmp_path / "o").exists()
