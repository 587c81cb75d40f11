"""``--search_arch`` (NASRec supernet warm-up + regularized evolution) through both train examples.

- PyTorch: an uninterrupted search, and the same command SIGKILL-ed during the supernet
  warm-up and again during the evolution, restarted each time: the resumed search ends with
  the same supernet, the same candidates (CSV) and the same top-k; a top-k JSON trains from
  scratch with ``--model NASRec --supernet_config``.
- TensorFlow: the same search gives the same initial population with close scores, and its
  best subnet trains with the TensorFlow trainer.
- a search scored by fine-tuning the final layer (``--zeroshot none``) in the NASRec-Full space.
- the backend-free pieces in process: LR schedule, warm-up plan, head fine-tuning, head inputs.
- bad flags: one ``error:`` line, exit status 2.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, last_json, sigkill_when, subprocess_env

from common import nas_search
from common.nas_space import load_subnet_config
from common.train_utils import load_weights

SCRIPTS = {"pytorch": os.path.join(ROOT, "train_example_pytorch.py"),
           "tensorflow": os.path.join(ROOT, "train_example_tensorflow.py")}
TINY = ["--n_blocks", "2", "--init_population", "6", "--sample_size", "3", "--n_childs", "2", "--n_generations", "3",
        "--batch_size", "64", "--top_k", "3", "--threads", "1", "--embed_size", "4"]
N_CANDIDATES = 6 + 3 * 2
TIMEOUT = 300


def _cmd(backend, data, out, *extra):
    return [sys.executable, SCRIPTS[backend], "--search_arch", "--data", data, "--model_save_dir", str(out),
            *TINY, *extra]


def _run(cmd, tmp_path):
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=TIMEOUT, cwd=str(tmp_path))


def _csv(out) -> list[dict]:
    with open(os.path.join(out, nas_search.CSV_FILE), newline="") as fh:
        return list(csv.DictReader(fh))


def _kill_when(cmd, tmp_path, ready, what):
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(tmp_path),
                         cwd=str(tmp_path))
    sigkill_when(p, ready, what, TIMEOUT, poll=0.005)


def _check_search_dir(out, res, backend):
    assert res["backend"] == backend and res["evaluated"] == N_CANDIDATES
    rows = _csv(out)
    assert [int(r["index"]) for r in rows] == list(range(N_CANDIDATES))
    assert len({r["token_hash"] for r in rows}) == N_CANDIDATES
    assert [int(r["generation"]) for r in rows] == [-1] * 6 + [0, 0, 1, 1, 2, 2]
    # top-k files: loadable subnet configs, the k best scores of the CSV, best first
    assert len(res["top_k"]) == 3 and res["best_config"] == res["top_k"][0]
    cfgs = [load_subnet_config(p) for p in res["top_k"]]
    by_hash = {r["token_hash"]: r for r in rows}
    assert [c.token_hash() for c in cfgs] == [os.path.basename(p).split("_")[1][:-5] for p in res["top_k"]]
    assert [float(by_hash[c.token_hash()]["score"]) for c in cfgs] == sorted(float(r["score"]) for r in rows)[:3]
    assert all(c.space.num_blocks == 2 for c in cfgs)
    assert res["best_score"] == float(by_hash[cfgs[0].token_hash()]["score"])
    return rows


def _strip_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


@pytest.fixture(scope="module")
def torch_reference(random_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nas_ref")
    out = tmp / "search"
    p = _run(_cmd("pytorch", random_dataset, out, "--warmup_epochs", "3"), tmp)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "evolution (sigeo)" in p.stderr and "supernet warm-up" in p.stderr      # tqdm bars
    return str(out), last_json(p.stdout)


def test_pytorch_search_writes_csv_and_top_k(torch_reference, random_dataset, tmp_path):
    out, res = torch_reference
    rows = _check_search_dir(out, res, "pytorch")
    for r in rows:       # the sigeo score is -ZiCo - FR (default coefficients), all proxies are logged
        extra = json.loads(r["extra"])
        assert set(extra) == {"loss", "fisher_rao", "mean_abs_grad", "zico", "sigeo"}
        assert float(r["score"]) == pytest.approx(-extra["zico"] - extra["fisher_rao"], rel=1e-9)
        assert json.loads(r["config"])[0]["sparse_op"] == "efc"                 # the NASRec-Small space
    assert res["warmup_steps"] == 30 and res["optimizer"] == "Adagrad" and res["lr"] == 0.12  # published setting
    assert os.path.exists(res["supernet"]) and res["evaluated_this_run"] == N_CANDIDATES
    # a finished search run again reports the same result without evaluating anything
    p = _run(_cmd("pytorch", random_dataset, out, "--warmup_epochs", "3", "--noprogress"), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    again = last_json(p.stdout)
    assert again["evaluated_this_run"] == 0 and again["top_k"] == res["top_k"]
    assert again["top_k_scores"] == res["top_k_scores"]


def test_pytorch_search_killed_twice_resumes_to_the_same_result(torch_reference, random_dataset, tmp_path):
    ref_out, ref = torch_reference
    out = tmp_path / "killed"
    cmd = _cmd("pytorch", random_dataset, out, "--warmup_epochs", "3", "--checkpoint_every", "4", "--noprogress")
    ckpt = out / nas_search.WARMUP_CKPT
    _kill_when(cmd, tmp_path, lambda: ckpt.exists(), "warm-up checkpoint")
    assert not (out / nas_search.SUPERNET_FILE).exists()
    csv_path = out / nas_search.CSV_FILE

    def some_rows():
        try:
            return len(csv_path.read_text().splitlines()) >= 5
        except OSError:
            return False
    _kill_when(cmd, tmp_path, some_rows, "evaluated candidates")
    p = _run(cmd, tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    res = last_json(p.stdout)
    assert 0 < res["evaluated_this_run"] < N_CANDIDATES and res["from_saved_state"] > 0
    assert res["warmup_resumed_from_step"] == 30          # the warm-up had finished before the second kill
    _check_search_dir(str(out), res, "pytorch")
    assert _strip_wall(_csv(str(out))) == _strip_wall(_csv(ref_out))
    assert res["top_k_scores"] == ref["top_k_scores"]
    assert [os.path.basename(p) for p in res["top_k"]] == [os.path.basename(p) for p in ref["top_k"]]
    wa, _ = load_weights(os.path.join(ref_out, nas_search.SUPERNET_FILE))
    wb, _ = load_weights(str(out / nas_search.SUPERNET_FILE))
    assert set(wa) == set(wb)
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    # another search into the same directory is refused
    p = _run(_cmd("pytorch", random_dataset, out, "--warmup_epochs", "2", "--noprogress"), tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().startswith("error: --model_save_dir:") and len(p.stderr.strip().splitlines()) == 1
    assert "warmup_epochs" in p.stderr


def test_found_subnet_trains_from_scratch_with_pytorch(torch_reference, random_dataset, tmp_path):
    _, res = torch_reference
    out = tmp_path / "train"
    p = _run([sys.executable, SCRIPTS["pytorch"], "--model", "NASRec", "--supernet_config", res["best_config"],
              "--data", random_dataset, "--model_save_dir", str(out), "--epochs", "1", "--batch_size", "64",
              "--embed_size", "4", "--noprogress", "--threads", "1"], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    r = last_json(p.stdout)
    assert r["model"] == "NASRec" and 0 < r["test_auc"] < 1 and math.isfinite(r["test_logloss"])
    w, meta = load_weights(r["checkpoint"])
    assert meta["model_config"]["supernet_config"] == res["best_config"]
    import zoo_torch
    from common.schema import Schema

    m = zoo_torch.build_model("NASRec", Schema.load(random_dataset), embed_size=4,
                              supernet_config=res["best_config"])
    assert {k: v.shape for k, v in zoo_torch.get_weights(m).items()} == {k: v.shape for k, v in w.items()}


def test_tensorflow_search_matches_pytorch_and_its_best_subnet_trains(torch_reference, random_dataset, tmp_path):
    ref_out, ref = torch_reference
    out = tmp_path / "tf"
    p = _run(_cmd("tensorflow", random_dataset, out, "--warmup_epochs", "3", "--noprogress"), tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    res = last_json(p.stdout)
    rows = _check_search_dir(str(out), res, "tensorflow")
    ref_rows = _csv(ref_out)
    # same seed, same data, same paths, same optimiser rules: the same initial population, close scores
    assert [r["token_hash"] for r in rows[:6]] == [r["token_hash"] for r in ref_rows[:6]]
    np.testing.assert_allclose([float(r["score"]) for r in rows[:6]], [float(r["score"]) for r in ref_rows[:6]],
                               rtol=2e-3)
    p = _run([sys.executable, SCRIPTS["tensorflow"], "--model", "NASRec", "--supernet_config", res["best_config"],
              "--data", random_dataset, "--model_save_dir", str(tmp_path / "tf_train"), "--epochs", "1",
              "--batch_size", "64", "--embed_size", "4", "--noprogress", "--threads", "1"], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    r = last_json(p.stdout)
    assert r["backend"] == "tensorflow" and r["model"] == "NASRec" and 0 < r["test_auc"] < 1


def test_search_scored_by_head_finetuning_in_the_full_space(random_dataset, tmp_path):
    out = tmp_path / "none"
    p = _run(_cmd("pytorch", random_dataset, out, "--zeroshot", "none", "--finetune_steps", "5",
                  "--search_space", "full", "--warmup_fraction", "0.5", "--optimizer", "Adam", "--lr", "0.01",
                  "--noprogress"), tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    res = last_json(p.stdout)
    rows = _check_search_dir(str(out), res, "pytorch")
    assert res["warmup_steps"] == 5 and res["optimizer"] == "Adam" and res["lr"] == 0.01   # explicit flags win
    assert {b["sparse_op"] for r in rows for b in json.loads(r["config"])} <= {"efc", "attention"}
    for r in rows:
        extra = json.loads(r["extra"])
        assert float(r["score"]) == extra["valid_logloss"] and extra["finetune_steps"] == 5
        assert 0 <= extra["valid_auc"] <= 1 and extra["valid_logloss"] > 0


@pytest.mark.parametrize("args,flag", [
    (["--search_arch", "--model", "DeepFM"], "search_arch"),
    (["--search_arch", "--zeroshot", "snip"], "zeroshot"),
    (["--search_arch", "--sample_size", "9", "--init_population", "8"], "sample_size"),
    (["--search_arch", "--warmup_fraction", "1.5"], "warmup_fraction"),
    (["--n_generations", "5"], "n_generations"),
    (["--search_arch", "--supernet_config", "x.json"], "supernet_config"),
    (["--search_arch", "--proxy_batches", "1"], "proxy_batches"),
])
def test_bad_search_flags(args, flag, random_dataset, tmp_path):
    out = tmp_path / "bad"
    p = _run([sys.executable, SCRIPTS["pytorch"], "--data", random_dataset, "--model_save_dir", str(out), *args],
             tmp_path)
    assert p.returncode == 2 and p.stdout == "", p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --{flag}:"), p.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# backend-free pieces, in process
# ---------------------------------------------------------------------------------------------
def test_cosine_schedule_and_warmup_plan():
    lrs = [nas_search.cosine_lr(s, 20, 0.12) for s in range(20)]
    assert lrs[:2] == [0.06, 0.12]                               # 2 linear warm-up steps (10% of 20)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and 0 < lrs[-1] < 0.01
    assert nas_search.cosine_lr(2 + 9, 20, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 18)))
    assert nas_search.warmup_plan(1000, 64, 1.0, 2) == (16, 32)     # 16 batches (last one partial) per pass
    assert nas_search.warmup_plan(1000, 64, 0.1, 3) == (2, 6)
    assert nas_search.warmup_plan(1000, 64, 0.0, 3) == (0, 0)


def test_finetune_head_is_logistic_regression_on_the_features():
    rng = np.random.default_rng(0)
    w_true = np.array([1.5, -1.0, 0.5, 0.0, 2.0])

    def batch(n):
        x = rng.normal(0, 1, (n, 5))
        return x, (rng.random(n) < 1 / (1 + np.exp(-x @ w_true))).astype(np.float64)

    train, valid = [batch(64) for _ in range(150)], [batch(500)]
    opt = nas_search.make_optimizer_config("Adagrad", 0.1)
    zero = nas_search.finetune_head([], valid, np.zeros(5), 0.0, opt, 0.1)
    assert zero["valid_logloss"] == pytest.approx(math.log(2)) and zero["finetune_steps"] == 0
    r = nas_search.finetune_head(iter(train), valid, np.zeros(5), 0.0, opt, 0.1)
    x, y = valid[0]
    p = 1 / (1 + np.exp(-x @ w_true))
    bayes = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    from common.metrics import auc

    assert r["finetune_steps"] == 150 and r["valid_logloss"] < bayes + 0.03
    assert r["valid_auc"] > auc(y, p) - 0.01 and r["valid_logloss"] < zero["valid_logloss"] - 0.1
    # Adam and SGD rules run as well and improve on the untrained head
    for name in ("Adam", "SGD"):
        q = nas_search.finetune_head(iter(train), valid, np.zeros(5), 0.0,
                                     nas_search.make_optimizer_config(name, 0.05), 0.05)
        assert q["valid_logloss"] < zero["valid_logloss"] - 0.05


def test_head_inputs_reproduce_the_subnet_logits_in_both_backends():
    import tensorflow as tf
    import torch

    import zoo_tf
    import zoo_torch
    from common.nas_space import SearchSpace, sample_subnet
    from test_nasrec import make_schema, numpy_batch, perturbed
    from zoo_tf import proxies as fp
    from zoo_tf import supernet as fs
    from zoo_torch import proxies as tp
    from zoo_torch import supernet as ts

    space = SearchSpace.full(num_blocks=3, dense_widths=(8, 16), sparse_widths=(4, 8), attention_heads=2)
    schema = make_schema()
    n1 = ts.build_supernet(schema, space, embed_size=4)
    n2 = fs.build_supernet(schema, space, embed_size=4)
    w = perturbed(zoo_torch.get_weights(n1), 2)
    zoo_torch.set_weights(n1, w)
    zoo_tf.set_weights(n2, w)
    b = numpy_batch(schema, 12, 0)
    tb, fb = {k: torch.from_numpy(v) for k, v in b.items()}, {k: tf.constant(v) for k, v in b.items()}
    rng = np.random.default_rng(1)
    for _ in range(2):
        cfg = sample_subnet(space, rng)
        k1, b1 = ts.active_head(n1, cfg)
        k2, b2 = fs.active_head(n2, cfg)
        np.testing.assert_array_equal(k1, k2)
        f1 = ts.head_inputs(n1, tb, cfg).detach().numpy()
        f2 = fs.head_inputs(n2, fb, cfg).numpy()
        assert f1.shape == (12, k1.size)
        np.testing.assert_allclose(f1 @ k1 + b1, n1(tb, path=cfg).detach().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f2 @ k2 + b2, f1 @ k1 + b1, rtol=1e-4, atol=2e-5)
        # mean |grad| of a subnet view is normalised by the subnet's own size, as for the standalone model
        batches = [numpy_batch(schema, 16, 5 + i) for i in range(2)]
        view = tp.zero_shot_proxies(n1.subnet(cfg), tp.numpy_batches_to_torch(batches))
        alone = tp.zero_shot_proxies(ts.standalone_from_supernet(n1, cfg), tp.numpy_batches_to_torch(batches))
        tfv = fp.zero_shot_proxies(n2.subnet(cfg), fp.numpy_batches_to_tf(batches))
        assert view["mean_abs_grad"] == pytest.approx(alone["mean_abs_grad"], rel=1e-5)
        assert tfv["mean_abs_grad"] == pytest.approx(alone["mean_abs_grad"], rel=2e-4)
