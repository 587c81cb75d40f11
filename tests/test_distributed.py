"""Distributed training equals single-device training with the same GLOBAL batch (CPU, in CI).

Each case runs the real entry point in subprocesses for 20 steps and compares the
weights of the final checkpoint with a single-process run:

- PyTorch: 2-process DistributedDataParallel (gloo) launched with torchrun;
- TensorFlow: MirroredStrategy over 2 logical CPU devices (--cpu_replicas 2);
- TensorFlow: 2-worker MultiWorkerMirroredStrategy on 127.0.0.1 (two processes with TF_CONFIG).

The model has L2 on dense kernels and on the looked-up embedding rows, so the
penalty's scaling over replicas is checked too; the optimiser is Adagrad, which
updates the embedding rows from the all-reduced row-sparse gradients.  (Adam's
g/sqrt(v) amplifies float-rounding differences of near-zero gradients, so the
1e-5 tolerance is checked with Adagrad.)
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, subprocess_env, write_random_dataset

from common.train_utils import list_checkpoints, read_checkpoint, split_prefix

STEPS = 20
BATCH = 64
FLAGS = ["--model", "DeepFM", "--mlp", "32,16", "--embed_size", "8", "--batch_size", str(BATCH),
         "--max_steps", str(STEPS), "--optimizer", "Adagrad", "--lr", "0.05", "--l2", "1e-4",
         "--l2_embedding", "1e-4", "--eval_every", "0", "--checkpoint_every", "0", "--noprogress",
         "--threads", "1", "--seed", "3"]
TIMEOUT = 420


def _env(tmp_path) -> dict:
    return subprocess_env(tmp_path, PYTHONUNBUFFERED="1")


def _script(backend: str) -> str:
    return os.path.join(ROOT, f"train_example_{backend}.py")


def _final_weights(save_dir: str) -> dict[str, np.ndarray]:
    ck = list_checkpoints(save_dir)
    assert ck, f"no checkpoint in {save_dir}"
    step, path = ck[-1]
    arrays, meta = read_checkpoint(path)
    assert step == STEPS and meta["trainer"]["step"] == STEPS and meta["trainer"]["finished"]
    return split_prefix(arrays, "w/")


def _result(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _check(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"


def assert_same_weights(a: dict, b: dict, rtol: float = 1e-5) -> None:
    """Every tensor within rtol of the other, relative to the tensor's largest magnitude."""
    assert set(a) == set(b)
    for k in a:
        scale = max(float(np.abs(b[k]).max()), 1e-12)
        err = float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) / scale
        assert err <= rtol, f"{k}: relative difference {err:.3g} > {rtol:g}"


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def dist_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dist") / "data")
    write_random_dataset(path, rows=(1408, 200, 200), seed=7)      # 22 global batches of 64
    return path


def _run_single(backend, data, tmp_path):
    out = str(tmp_path / f"single-{backend}")
    p = subprocess.run([sys.executable, _script(backend), "--data", data, "--model_save_dir", out, *FLAGS],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=TIMEOUT)
    _check(p)
    assert _result(p.stdout)["world_size"] == 1
    return _final_weights(out)


@pytest.fixture(scope="module")
def tf_single(dist_data, tmp_path_factory):
    return _run_single("tensorflow", dist_data, tmp_path_factory.mktemp("tf_single"))


def test_torch_ddp_two_processes_equals_single_process(dist_data, tmp_path):
    single = _run_single("pytorch", dist_data, tmp_path)
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           _script("pytorch"), "--data", dist_data, "--model_save_dir", out, *FLAGS]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=TIMEOUT)
    _check(p)
    res = _result(p.stdout)
    assert res["world_size"] == 2 and res["steps"] == STEPS
    ddp = _final_weights(out)
    # the weights moved (so the comparison means something) ...
    moved = {k for k in single if not np.allclose(single[k], 0.0)}
    assert {"embedding.weight", "dnn.layers.0.kernel", "linear.emb.weight"} <= moved
    # ... and ended where one process with the whole global batch ends
    assert_same_weights(ddp, single)


def test_tf_mirrored_two_logical_cpus_equals_single_device(dist_data, tf_single, tmp_path):
    out = str(tmp_path / "mirrored")
    p = subprocess.run([sys.executable, _script("tensorflow"), "--data", dist_data, "--model_save_dir", out,
                        "--cpu_replicas", "2", *FLAGS], capture_output=True, text=True, env=_env(tmp_path),
                       timeout=TIMEOUT)
    _check(p)
    res = _result(p.stdout)
    assert res["world_size"] == 2 and res["device"].startswith("MirroredStrategy over ")
    assert res["device"].count("CPU:") == 2, res["device"]
    assert_same_weights(_final_weights(out), tf_single)


def test_tf_multiworker_two_workers_equals_single_device(dist_data, tf_single, tmp_path):
    out = str(tmp_path / "multiworker")
    ports = _free_ports(2)
    workers = [f"127.0.0.1:{p}" for p in ports]
    procs = []
    for i in range(2):
        env = _env(tmp_path)
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
        procs.append(subprocess.Popen([sys.executable, _script("tensorflow"), "--data", dist_data,
                                       "--model_save_dir", out, *FLAGS], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    outs = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=TIMEOUT)
            outs.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, o, e in outs:
        assert rc == 0, f"rc={rc}\nstdout:\n{o[-3000:]}\nstderr:\n{e[-6000:]}"
    chief = _result(outs[0][1])
    assert chief["world_size"] == 2 and chief["steps"] == STEPS
    assert outs[1][1].strip() == ""          # only the chief prints the result line
    assert_same_weights(_final_weights(out), tf_single)
