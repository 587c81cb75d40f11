"""``--search_loss`` (AutoLossGen) through both train example scripts, on the small random dataset.

One uninterrupted PyTorch search (2 rounds x 6 candidates) is the reference: its
log, formula file, results file and result line are checked against each other
and against the validity check; a run SIGKILLed after its 8th candidate (in the
second round) and restarted with the same command must reproduce the reference
log and formula file exactly.  The TensorFlow search is killed and resumed too
and must sample the same candidates with the same outcome (same controller,
same rejection rules, models equal within float32 tolerance).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from common.autolossgen import KILL_ENV, LOG_COLUMNS
from common.loss_check import validity_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"torch": "train_example_pytorch.py", "tf": "train_example_tensorflow.py"}
BUDGET, ROUNDS = 6, 2
SEARCH = ["--model", "DeepFM", "--mlp", "16,16", "--embed_size", "4", "--batch_size", "100", "--search_loss",
          "--search_budget", str(BUDGET), "--search_epochs", str(ROUNDS), "--controller_nodes", "5",
          "--controller_aggregate", "4", "--train_with_optim", "--threads", "1", "--noprogress"]
WALL = ("wall_s", "search_wall_s", "train_wall_s", "train_epoch_s")


def run(backend, *args, env=None, check=True):
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0")
    e.pop(KILL_ENV, None)
    e.update(env or {})
    p = subprocess.run([sys.executable, os.path.join(ROOT, SCRIPTS[backend]), *args], capture_output=True,
                       text=True, env=e, cwd=ROOT, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def search(backend, data, out, *extra, **kw):
    return run(backend, *SEARCH, "--data", data, "--model_save_dir", str(out), *extra, **kw)


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def no_wall(d):
    if isinstance(d, dict):
        return {k: no_wall(v) for k, v in d.items() if k not in WALL}
    if isinstance(d, list):
        return [no_wall(x) for x in d]
    return d


@pytest.fixture(scope="module")
def reference(random_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "torch"
    p = search("torch", random_dataset, out)
    return out, json.loads(p.stdout.strip().splitlines()[-1])


def test_log_formula_file_results_and_result_line(reference):
    out, res = reference
    rows = read_csv(out / "search_log.csv")
    assert list(rows[0]) == LOG_COLUMNS and len(rows) == BUDGET * ROUNDS
    assert [(int(r["round"]), int(r["step"])) for r in rows] == [(k, i) for k in range(ROUNDS) for i in range(BUDGET)]
    status = [r["status"] for r in rows]
    assert set(status) <= {"rejected", "reused", "evaluated"} and "evaluated" in status and "rejected" in status
    for r in rows:
        if r["status"] == "rejected":
            assert r["reason"] in ("no_gradient", "zero_gradient", "nan") and float(r["reward"]) == -1 and not r["auc"]
        else:
            auc = float(r["auc"])
            assert 0.0 <= auc <= 1.0
            assert float(r["reward"]) == (-1.0 if r["reason"] else auc)
        assert float(r["wall_s"]) >= 0
    # controller updates every --controller_aggregate candidates of a round
    assert [i for i, r in enumerate(rows) if r["controller_update"]] == [3, 9]
    # result line = the log's counts
    assert res["backend"] == "pytorch" and res["model"] == "DeepFM" and res["rounds"] == ROUNDS
    assert res["candidates"] == len(rows)
    assert res["rejected_cheaply"] == status.count("rejected") and res["reused"] == status.count("reused")
    assert res["evaluated"] == status.count("evaluated")
    assert res["below_baseline"] == sum(r["reason"] == "below_baseline" for r in rows)
    accepted = {r["formula"] for r in rows if r["status"] != "rejected" and not r["reason"]}
    assert res["accepted"] == sum(r["status"] != "rejected" and not r["reason"] for r in rows)
    # formula file: every accepted formula once, best validation AUC first, validity as the checker says
    doc = json.loads((out / "formulas.json").read_text())
    found = doc["formulas"]
    assert {f["formula"] for f in found} == accepted and len(found) == len(accepted) == res["accepted_formulas"]
    aucs = [f["valid_auc"] for f in found]
    assert aucs == sorted(aucs, reverse=True)
    for f in found:
        assert f["passed_validity"] == validity_check(f["formula"]).passed
        best_row = max(float(r["auc"]) for r in rows if r["formula"] == f["formula"] and not r["reason"]
                       and r["status"] != "rejected")
        assert f["valid_auc"] == best_row
    assert res["passed_validity"] == sum(f["passed_validity"] for f in found)
    assert res["best_formula"] == found[0]["formula"] and res["best_auc"] == found[0]["valid_auc"]
    # results file: the result line plus the per-round history
    results = json.loads((out / "search_results.json").read_text())
    assert {k: results[k] for k in res} == res
    hist = results["history"]
    assert [h["round"] for h in hist] == list(range(ROUNDS))
    assert hist[1]["start_auc"] == pytest.approx(hist[0]["valid_auc_after"], abs=1e-6)
    for h, k in zip(hist, range(ROUNDS)):
        best = max((float(r["auc"]) for r in rows if int(r["round"]) == k and r["status"] != "rejected"
                    and not r["reason"]), default=None)
        assert h["best_auc"] == best
        # --train_with_optim: the round's best candidate trains the real model when it does not lower the AUC
        assert h["trained_with"] == (h["best_formula"] if best is not None and best >= h["start_auc"] - 1e-5
                                     else None)
    assert res["valid_auc"] == pytest.approx(hist[-1]["valid_auc_after"], abs=1e-9)
    assert 0.5 < res["test_auc"] <= 1.0 and os.path.exists(res["checkpoint"])
    # the search state is kept for resumption, the finished round's checkpoint is gone
    assert (out / "search_state.json").exists() and not list(out.glob("search_round-*"))


def test_sigkill_and_restart_reproduce_the_search(reference, random_dataset, tmp_path):
    ref, ref_res = reference
    out = tmp_path / "killed"
    p = search("torch", random_dataset, out, env={KILL_ENV: str(BUDGET + 2)}, check=False)
    assert p.returncode == -9                                   # SIGKILL in round 2, candidate 3
    assert len(read_csv(out / "search_log.csv")) == BUDGET + 2
    assert list(out.glob("search_round-001.json"))
    p = search("torch", random_dataset, out)
    assert "resuming the loss search" in p.stderr
    assert strip(read_csv(out / "search_log.csv")) == strip(read_csv(ref / "search_log.csv"))
    assert (out / "formulas.json").read_text() == (ref / "formulas.json").read_text()
    res = json.loads(p.stdout.strip().splitlines()[-1])
    paths = ("log_csv", "formula_path", "results", "checkpoint")
    assert {k: v for k, v in no_wall(res).items() if k not in paths} == \
        {k: v for k, v in no_wall(ref_res).items() if k not in paths}
    hist = json.loads((out / "search_results.json").read_text())["history"]
    assert no_wall(hist) == no_wall(json.loads((ref / "search_results.json").read_text())["history"])
    # a finished search: the same command reports the result again without sampling
    p = search("torch", random_dataset, out)
    assert "has finished" in p.stderr and len(read_csv(out / "search_log.csv")) == BUDGET * ROUNDS
    assert json.loads(p.stdout.strip().splitlines()[-1])["best_formula"] == ref_res["best_formula"]
    # another run's settings in the same directory: one error line
    p = search("torch", random_dataset, out, "--controller_hidden", "32", check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("error: --model_save_dir:") and p.stdout == ""
    assert "different run" in p.stderr and "search" in p.stderr


def test_tensorflow_search_resumes_and_matches_pytorch(reference, random_dataset, tmp_path):
    ref, ref_res = reference
    out = tmp_path / "tf"
    p = search("tf", random_dataset, out, "--formula_path", str(tmp_path / "found.csv"),
               env={KILL_ENV: str(3)}, check=False)
    assert p.returncode == -9 and len(read_csv(out / "search_log.csv")) == 3
    p = search("tf", random_dataset, out, "--formula_path", str(tmp_path / "found.csv"))
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["backend"] == "tensorflow"
    rows, ref_rows = read_csv(out / "search_log.csv"), read_csv(ref / "search_log.csv")
    key = lambda r: (r["round"], r["step"], r["formula"], r["status"], r["reason"], r["reused_from"])  # noqa: E731
    assert [key(r) for r in rows] == [key(r) for r in ref_rows]
    for a, b in zip(rows, ref_rows):
        assert (a["auc"] == "") == (b["auc"] == "")
        if a["auc"]:
            assert float(a["auc"]) == pytest.approx(float(b["auc"]), abs=2e-3)
    for k in ("candidates", "rejected_cheaply", "reused", "evaluated", "accepted", "best_formula"):
        assert res[k] == ref_res[k], k
    # --formula_path ending in .csv: the CSV layout, readable by `python -m common.loss_check --csv`
    found = read_csv(tmp_path / "found.csv")
    assert [f["formula"] for f in found] == [f["formula"] for f in
                                             json.loads((ref / "formulas.json").read_text())["formulas"]]
    assert not (out / "formulas.json").exists()


@pytest.mark.parametrize("flags, where", [
    (["--search_budget", "0"], "--search_budget"),
    (["--controller_ops", "add,nope"], "--controller_ops"),
    (["--controller_lr", "-1"], "--controller_lr"),
])
def test_bad_search_flags_are_one_line_errors(random_dataset, tmp_path, flags, where):
    p = run("torch", "--model", "DeepFM", "--data", random_dataset, "--search_loss", "--model_save_dir",
            str(tmp_path / "x"), *flags, check=False)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith(f"error: {where}:")
    assert not (tmp_path / "x").exists()


def test_corrupt_search_state_is_one_line_error(random_dataset, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "search_state.json").write_text("{not json")
    p = search("torch", random_dataset, out, check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert "cannot resume the loss search" in p.stderr and "--noresume" in p.stderr
    p = search("torch", random_dataset, out, "--noresume", "--search_epochs", "1")
    assert json.loads(p.stdout.strip().splitlines()[-1])["candidates"] == BUDGET
