"""End-to-end tests of train_example_pytorch.py and train_example_tensorflow.py (subprocesses).

- a short run of each script: the LAST stdout line is JSON with the result keys,
  metrics.json, best.npz, resume checkpoints, TensorBoard scalars and the export exist;
- on a planted synthetic dataset the result carries bayes_auc and auc_gap;
- every bad flag gives exit status 2, exactly one stderr line ``error: --flag: ...``,
  nothing on stdout and no --model_save_dir created; the original zoo's command
  line (GPUs '1, 2, 3, 4') errors cleanly on a machine without those GPUs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, last_json, subprocess_env

from common.train_utils import list_checkpoints, load_weights, read_checkpoint, read_scalars

SCRIPTS = {"pytorch": os.path.join(ROOT, "train_example_pytorch.py"),
           "tensorflow": os.path.join(ROOT, "train_example_tensorflow.py")}
RESULT_KEYS = {"test_auc", "test_logloss", "epochs", "train_rows_per_s", "checkpoint", "valid_auc", "steps",
               "model", "backend", "metrics"}
SMALL = ["--mlp", "16,8", "--embed_size", "4", "--batch_size", "50", "--noprogress", "--threads", "1"]
TIMEOUT = 400


def run(backend, args, tmp_path, cwd=None):
    return subprocess.run([sys.executable, SCRIPTS[backend], *args], capture_output=True, text=True,
                          env=subprocess_env(tmp_path), timeout=TIMEOUT, cwd=cwd or str(tmp_path))


@pytest.mark.parametrize("backend", ["pytorch", "tensorflow"])
def test_short_run_writes_result_metrics_checkpoints_and_export(backend, random_dataset, tmp_path):
    out = tmp_path / "run"
    export = "torchscript" if backend == "pytorch" else "saved_model"
    p = run(backend, ["--model", "DeepFM", "--data", random_dataset, "--model_save_dir", str(out), "--max_steps", "8",
                      "--eval_every", "4", "--checkpoint_every", "3", "--export", export, *SMALL], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    res = last_json(p.stdout)
    assert RESULT_KEYS <= set(res)
    assert res["backend"] == backend and res["model"] == "DeepFM" and res["steps"] == 8
    assert res["device"] == "cpu"
    assert 0.0 < res["test_auc"] < 1.0 and res["test_logloss"] > 0 and res["train_rows_per_s"] > 0
    assert res["epochs"] == pytest.approx(8 * 50 / 600, abs=1e-3)     # 12 steps per epoch, stopped at 8
    assert "bayes_auc" not in res                                     # not a synthetic dataset
    # best checkpoint: weights-only, of the best evaluation
    assert os.path.samefile(res["checkpoint"], out / "best.npz")
    weights, meta = load_weights(res["checkpoint"])
    assert meta["model"] == "DeepFM" and meta["step"] == res["best_step"]
    assert "embedding.weight" in weights and weights["embedding.weight"].shape[1] == 4
    # metrics.json: history of evaluations (steps 4 and 8), test metrics, result
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [4, 8]
    assert metrics["test"]["auc"] == pytest.approx(res["test_auc"])
    assert metrics["result"]["checkpoint"] == res["checkpoint"]
    assert metrics["args"]["model_config"]["mlp"] == [16, 8]
    # resume checkpoints: the newest two (keep_checkpoints=2), the last one is the finished state
    steps = [s for s, _ in list_checkpoints(str(out))]
    assert steps == [6, 8]
    _, ck_meta = read_checkpoint(list_checkpoints(str(out))[-1][1])
    assert ck_meta["trainer"]["finished"] and ck_meta["trainer"]["step"] == 8
    # TensorBoard scalars
    sc = read_scalars(str(out / "tensorboard"))
    assert [s for s, _ in sc["valid/auc"]] == [4, 8]
    assert {"train/loss", "valid/logloss", "train/rows_per_s", "train/lr", "test/auc"} <= set(sc)
    # export
    assert os.path.exists(res["exports"][export])
    # progress / log lines go to stderr, stdout has just the result line
    assert len([ln for ln in p.stdout.splitlines() if ln.strip()]) == 1


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory):
    from common.synthetic import write_synthetic

    path = str(tmp_path_factory.mktemp("syn") / "synthetic")
    write_synthetic(path, rows=2000, seed=1, cardinalities=[40, 20, 10, 6], n_categorical=4, n_numeric=2,
                    chunk_rows=256, progress=False)
    return path


def test_synthetic_data_reports_bayes_auc_and_gap(synthetic_dataset, tmp_path):
    p = run("pytorch", ["--model", "FM", "--data", synthetic_dataset, "--model_save_dir", str(tmp_path / "o"),
                        "--epochs", "1", "--embed_size", "4", "--batch_size", "100", "--noprogress"], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    res = last_json(p.stdout)
    truth = json.loads(open(os.path.join(synthetic_dataset, "truth.json")).read())["splits"]["test"]
    assert res["bayes_auc"] == pytest.approx(truth["bayes_auc"])
    assert res["auc_gap"] == pytest.approx(truth["bayes_auc"] - res["test_auc"])
    assert res["epochs"] == 1 and res["steps"] == 16          # 1600 train rows / 100


def _not_a_dataset(tmp_path):
    d = tmp_path / "empty_dir"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    return str(d)


def _bad_version(tmp_path, random_dataset):
    d = tmp_path / "bad_version"
    d.mkdir()
    schema = json.loads(open(os.path.join(random_dataset, "schema.json")).read())
    schema["version"] = 99
    (d / "schema.json").write_text(json.dumps(schema))
    return str(d)


BAD_FLAGS = [
    (["--model", "NoSuchNet"], "model", "available models: LR, FM"),
    (["--batch_size", "0"], "batch_size", "positive"),
    (["--batch_size", "-4096"], "batch_size", "positive"),
    (["--batch_size", "many"], "batch_size", "invalid value"),
    (["--lr", "0"], "lr", "> 0"),
    (["--lr", "-0.1"], "lr", "> 0"),
    (["--lr", "nan"], "lr", "finite"),
    (["--epochs", "0"], "epochs", "positive"),
    (["--optimizer", "Adamax"], "optimizer", "available optimizers"),
    (["--loss", "KL"], "loss", "available losses"),
    (["--loss", "formula:log(p"], "loss", "formula"),
    (["--gpu_ids", "0,x"], "gpu_ids", "comma-separated"),
    (["--gpu_ids", "1,1"], "gpu_ids", "twice"),
    (["--mlp", "32,abc"], "mlp", "integers"),
    (["--cross_layers", "2"], "cross_layers", "model DeepFM has no option cross_layers"),
    (["--dropout", "1.5"], "dropout", "< 1"),
    (["--no_such_flag", "1"], "no_such_flag", "unknown flag"),
    (["--data", "/nonexistent/dataset"], "data", "not a directory"),
    (["--data", "NOT_A_DATASET"], "data", "no schema.json"),
    (["--data", "BAD_VERSION"], "data", "version 99"),
    (["--patience", "-1"], "patience", ">= 0"),
    (["--lr_decay_factor", "2"], "lr_decay_factor", "<= 1"),
    (["--export", "pickle"], "export", "not an export format"),
]


@pytest.mark.parametrize("backend", ["pytorch", "tensorflow"])
@pytest.mark.parametrize("flags,flag,text", BAD_FLAGS, ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_FLAGS)])
def test_bad_flag_is_one_line_exit_2_and_writes_nothing(backend, flags, flag, text, random_dataset, tmp_path):
    flags = [_not_a_dataset(tmp_path) if f == "NOT_A_DATASET" else
             _bad_version(tmp_path, random_dataset) if f == "BAD_VERSION" else f for f in flags]
    data = [] if "--data" in flags else ["--data", random_dataset]
    out = tmp_path / "never"
    p = run(backend, [*data, "--model_save_dir", str(out), *flags], tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"error: --{flag}: "), lines[0]
    assert text in lines[0], lines[0]
    assert p.stdout == ""
    assert not out.exists()
    assert not (tmp_path / "cache").exists()          # the default dataset was not generated either


@pytest.mark.parametrize("backend", ["pytorch", "tensorflow"])
def test_original_zoo_command_line_errors_cleanly_without_those_gpus(backend, tmp_path):
    # the original zoo's usage, verbatim; CI has no GPU, so GPU 1 does not exist
    p = run(backend, ["--epochs", "100", "--batch_size", "4096", "--optimizer", "Adam", "--loss", "BCE",
                      "--gpu_ids", "1, 2, 3, 4", "--lr", "0.001", "--embed_size", "8",
                      "--model_save_dir", "./checkpoints/DeepFM/"], tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr[-3000:])
    assert p.stderr.splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("error: --gpu_ids: GPU 1 does not exist")
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "cache").exists()


def test_the_original_flags_parse_and_validate():
    """Same command line as above, up to the GPU check (which needs a framework)."""
    from common.flags import parse_args

    args = parse_args(["x", "--epochs", "100", "--batch_size", "4096", "--optimizer", "Adam", "--loss", "BCE",
                       "--gpu_ids", "1, 2, 3, 4", "--lr", "0.001", "--embed_size", "8",
                       "--model_save_dir", "./checkpoints/DeepFM/"], "pytorch")
    assert args.model == "DeepFM" and args.gpu_ids == [1, 2, 3, 4] and args.epochs == 100
    assert args.batch_size == 4096 and args.lr == 0.001 and args.model_config["embed_size"] == 8
    assert args.model_save_dir == os.path.abspath("./checkpoints/DeepFM/")
    assert args.optimizer == "Adam" and args.loss == "BCE"


def test_help_lists_common_and_model_flags(tmp_path):
    p = run("pytorch", ["--help"], tmp_path)
    assert p.returncode == 0
    for f in ("--model", "--batch_size", "--gpu_ids", "--mlp", "--cross_layers", "--cin_layers", "--num_heads",
              "--dropout", "--[no]batch_norm", "--cpu_replicas", "--max_steps", "--patience", "--[no]resume"):
        assert f in p.stdout, f
