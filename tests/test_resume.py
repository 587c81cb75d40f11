"""A run killed with SIGKILL and restarted with the same command ends with the same weights.

For both entry points: an uninterrupted run, and a run that is ``kill -9``-ed as
soon as a checkpoint past a few steps exists and then restarted with the very
same command line.  The model has dropout (so the RNG state must be restored),
evaluation every few steps with learning-rate decay on plateau (so the trainer
state must be restored), and the kill lands mid-epoch (so the data position
must be restored).  The final weights must be bit-identical.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, sigkill_when, subprocess_env, write_random_dataset

from common.train_utils import list_checkpoints, read_checkpoint, split_prefix

FLAGS = ["--model", "DeepFM", "--mlp", "32,16", "--embed_size", "8", "--dropout", "0.2", "--batch_size", "32",
         "--epochs", "2", "--eval_every", "5", "--checkpoint_every", "7", "--patience", "0",
         "--lr_decay_patience", "1", "--lr_decay_factor", "0.5", "--lr", "0.003", "--noprogress", "--threads", "1",
         "--seed", "11"]
TIMEOUT = 420
# On a GPU machine, CTR_ZOO_TEST_GPU_IDS=0 runs the PyTorch case on that GPU (CI has none: the CPU case)
GPU_IDS = os.environ.get("CTR_ZOO_TEST_GPU_IDS", "")


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("resume") / "data")
    write_random_dataset(path, rows=(1280, 200, 200), seed=5)      # 40 steps per epoch, 80 in all
    return path


def _cmd(backend, data, out):
    gpu = ["--gpu_ids", GPU_IDS] if GPU_IDS and backend == "pytorch" else []
    return [sys.executable, os.path.join(ROOT, f"train_example_{backend}.py"), "--data", data,
            "--model_save_dir", out, *FLAGS, *gpu]


def _final(out):
    step, path = list_checkpoints(out)[-1]
    arrays, meta = read_checkpoint(path)
    assert meta["trainer"]["finished"]
    return step, arrays, meta


@pytest.mark.parametrize("backend", ["pytorch", "tensorflow"])
def test_kill_9_and_restart_gives_identical_weights(backend, resume_data, tmp_path):
    env = subprocess_env(tmp_path)
    ref_dir, run_dir = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")

    ref = subprocess.run(_cmd(backend, resume_data, ref_dir), capture_output=True, text=True, env=env,
                         timeout=TIMEOUT)
    assert ref.returncode == 0, ref.stderr[-4000:]
    ref_result = json.loads(ref.stdout.strip().splitlines()[-1])
    assert ref_result["steps"] == 80 and ref_result["resumed_from_step"] is None

    # start the same command, SIGKILL it once a checkpoint at step >= 21 exists (mid-epoch 1)
    p = subprocess.Popen(_cmd(backend, resume_data, run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    sigkill_when(p, lambda: any(s >= 21 for s, _ in list_checkpoints(run_dir)), "a checkpoint at step >= 21",
                 TIMEOUT)
    left = list_checkpoints(run_dir)
    assert left and left[-1][0] < 80
    for _, path in left:                       # what a killed run leaves behind is complete
        _, meta = read_checkpoint(path)
        assert not meta["trainer"]["finished"]
    killed_at = left[-1][0]

    # the same command again resumes and finishes
    again = subprocess.run(_cmd(backend, resume_data, run_dir), capture_output=True, text=True, env=env,
                           timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr[-4000:]
    res = json.loads(again.stdout.strip().splitlines()[-1])
    assert res["resumed_from_step"] == killed_at and res["steps"] == 80
    if backend == "pytorch":
        assert res["device"] == (f"cuda:{GPU_IDS.split(',')[0].strip()}" if GPU_IDS else "cpu")
    assert "resuming from" in again.stderr

    step_a, a, meta_a = _final(ref_dir)
    step_b, b, meta_b = _final(run_dir)
    assert step_a == step_b == 80
    wa, wb = split_prefix(a, "w/"), split_prefix(b, "w/")
    assert set(wa) == set(wb)
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    # optimiser state, learning-rate schedule and evaluation history agree as well
    for k in a:
        if k.startswith("opt/"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ha, hb = meta_a["trainer"]["history"], meta_b["trainer"]["history"]
    assert [(h["step"], h["valid_auc"], h["lr"]) for h in ha] == [(h["step"], h["valid_auc"], h["lr"]) for h in hb]
    assert ha[-1]["lr"] < 0.003            # the plateau decayed the lr after the kill point: state was restored
    assert res["test_auc"] == ref_result["test_auc"]
