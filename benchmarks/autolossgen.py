"""AutoLossGen results of issue #6: the loss search and the effectiveness of the losses it finds.

    python benchmarks/autolossgen.py                  # (a) + (b) + (c), the reference run
    python benchmarks/autolossgen.py --quick          # smoke test: small data, budget 20, 2 seeds, 1 epoch
    python benchmarks/autolossgen.py --parts a --search_backends torch,tf
    python benchmarks/autolossgen.py --parts b,c --effect_backends torch --seeds 5

Outputs ``benchmarks/results/autolossgen_full.{json,md}`` (``autolossgen_quick``
with ``--quick``; ``--out`` to choose).  Intermediate results live in
``--work_dir`` (default ``$CTR_ZOO_CACHE/autolossgen/<full|quick>``, i.e. under
``~/.cache/ctr_zoo``): every finished search and every finished training run is
kept there, so rerunning the same command continues where it stopped and the
report is always rebuilt from everything finished so far (``--parts a`` and a
later ``--parts b,c`` give one report).  ``--fresh`` discards them.

(a) Search: ``train_example_<backend>.py --model BiasedMF --search_loss
    --search_budget 200`` on ml100k01-1-5 (prepared from
    ``$CTR_ZOO_SHARED_DATA/ml100k01-1-5`` with ``python -m data_prep --format csv``
    into the work directory), paper settings (SGD, lr 0.01, batch 128, L2 1e-4
    on dense kernels and on the embedding rows of each batch), one round from
    the freshly initialised model (the paper's first epoch), default controller
    (10 operator nodes, LSTM 64, 10 candidates per update), one intra-op thread.
    Wall time is measured around the whole command (start-up included); the
    machine's load average is recorded at start and end.
(a') One more PyTorch search with ``--found_budget`` candidates (default 1000):
    uniformly random formulas pass the validity check about 0.3% of the time,
    so 200 candidates often contain none; this larger search supplies the found
    loss of (b)/(c).
(b) Effectiveness on ml100k01-1-5: BiasedMF and DeepModel trained with BCE,
    MSE, Hinge, Focal, MaxR, SumR, LogMin and the best loss the search found
    (the best-AUC accepted formula that passed the validity check, from the
    large search first, then the 200-candidate ones; if none passed, the best
    accepted formula, flagged as such; ``--found_loss`` overrides), ``--seeds`` seeds each, paper
    settings, at most ``--epochs`` epochs with early stopping on validation AUC
    (patience 2, no learning-rate decay); test AUC of the best-validation epoch.
(c) The same losses with DeepFM on a planted synthetic dataset
    (``common.synthetic``, ``--synthetic_rows`` rows, 10 categorical + 3 numeric
    fields), Adam lr 1e-3, batch 512, embed 8, MLP 64-32, at most
    ``--synthetic_epochs`` epochs (patience 1): SGD at lr 0.01 barely moves
    DeepFM's 1e-4-initialised embeddings in a CPU-sized budget, so (c) uses
    DeepFM's usual optimiser; the Bayes-optimal test AUC is reported beside it.

The training runs of (b) and (c) go through the trainers' own ``train`` (flags
parsed by ``common.flags.parse_args``, exactly as on the command line), many
runs per worker process (``--effect_backends``, default torch only: CPU time on
the 2-core machine is scarce, and the two backends are parity-tested).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common.errors import FlagError, UserError, cli_errors  # noqa: E402
from common.io import atomic_write_text  # noqa: E402

BASE_LOSSES = ("BCE", "MSE", "Hinge", "Focal", "MaxR", "SumR", "LogMin")
SCRIPTS = {"torch": "train_example_pytorch.py", "tf": "train_example_tensorflow.py"}
BACKEND_NAMES = {"torch": "pytorch", "tf": "tensorflow"}
ML_SPEC = {"delimiter": "\t", "label": "label", "categorical": ["uid", "iid"]}
PAPER = ["--optimizer", "SGD", "--lr", "0.01", "--batch_size", "128", "--l2", "1e-4", "--l2_embedding", "1e-4"]
SYNTH_CARDS = (1000, 300, 20000, 50, 8, 3000, 120, 15, 5000, 400)
SYNTH_TRAIN = ["--optimizer", "Adam", "--lr", "0.001", "--batch_size", "512", "--embed_size", "8", "--mlp", "64,32"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _csv_list(text: str, allowed, flag: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad or (not out and flag != "parts"):
        raise FlagError(flag, f"{bad[0] if bad else text!r}: choose from {', '.join(allowed)}")
    return out


# ------------------------------------------------------------------------------------------------ settings
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-test scale (20k training rows, budget 20, 2 seeds, "
                                                        "1 epoch, 20k synthetic rows)")
    p.add_argument("--parts", default="a,b,c", help="which results: a (search), b (ml100k table), c (synthetic)")
    p.add_argument("--search_backends", default="torch,tf", help="backends of the search (a)")
    p.add_argument("--effect_backends", default="torch", help="backends of the effectiveness runs (b, c)")
    p.add_argument("--budget", type=int, default=None, help="candidates of the search (default 200; quick 20)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per loss (default 5; quick 2)")
    p.add_argument("--epochs", type=int, default=None, help="max epochs of (b) (default 6; quick 1)")
    p.add_argument("--synthetic_rows", type=int, default=None, help="rows of the synthetic dataset (c) "
                                                                    "(default 100000; quick 20000)")
    p.add_argument("--synthetic_epochs", type=int, default=None, help="max epochs of (c) (default 4; quick 1)")
    p.add_argument("--ml_rows", type=int, default=None, help="use only the first N lines of each ml100k file "
                                                             "(default all; quick 20000)")
    p.add_argument("--found_budget", type=int, default=None,
                   help="budget of an extra, larger PyTorch search whose best valid formula becomes the found loss "
                        "of (b)/(c) (default 1000; quick 0 = none)")
    p.add_argument("--found_loss", default="", help="the found loss of (b)/(c) (a formula); default: from (a)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every run")
    p.add_argument("--work_dir", default="", help="intermediate results (default $CTR_ZOO_CACHE/autolossgen/<scale>)")
    p.add_argument("--shared_data", default=os.environ.get("CTR_ZOO_SHARED_DATA",
                                                           os.path.join(os.path.dirname(ROOT), "shared", "data")))
    p.add_argument("--out", default="", help="report JSON (default benchmarks/results/autolossgen_<scale>.json); "
                                             "the Markdown goes next to it")
    p.add_argument("--fresh", action="store_true", help="discard the work directory's earlier results")
    p.add_argument("--note", default="", help="a line at the top of the report")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return a
    q = a.quick
    a.scale = "quick" if q else "full"
    defaults = dict(budget=(20, 200), found_budget=(0, 1000), seeds=(2, 5), epochs=(1, 6), synthetic_rows=(20000, 100000),
                    synthetic_epochs=(1, 4), ml_rows=(20000, 0))
    for k, (vq, vf) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, vq if q else vf)
        if getattr(a, k) < (0 if k in ("ml_rows", "found_budget") else 1):
            raise FlagError(k, f"must be a positive integer, got {getattr(a, k)}")
    if a.threads < 0:
        raise FlagError("threads", f"must be >= 0, got {a.threads}")
    a.parts = _csv_list(a.parts, ("a", "b", "c"), "parts")
    a.search_backends = _csv_list(a.search_backends, tuple(SCRIPTS), "search_backends")
    a.effect_backends = _csv_list(a.effect_backends, tuple(SCRIPTS), "effect_backends")
    if a.found_loss:
        from common.loss_formula import resolve

        try:
            resolve(a.found_loss)
        except ValueError as exc:
            raise FlagError("found_loss", str(exc).splitlines()[0]) from None
    from common.synthetic import default_cache_dir

    a.work_dir = os.path.abspath(a.work_dir or os.path.join(default_cache_dir(), "autolossgen", a.scale))
    a.out = os.path.abspath(a.out or os.path.join(HERE, "results", f"autolossgen_{a.scale}.json"))
    src = os.path.join(a.shared_data, "ml100k01-1-5")
    a.ml_files = {s: os.path.join(src, f"ml100k01-1-5.{s}.csv") for s in ("train", "validation", "test")}
    if any(p in a.parts for p in ("a", "b")):
        missing = [f for f in a.ml_files.values() if not os.path.isfile(f)]
        if missing:
            raise FlagError("shared_data", f"{missing[0]} not found (set CTR_ZOO_SHARED_DATA or --shared_data)")
    return a


# ------------------------------------------------------------------------------------------------ datasets
def prepare_ml100k(a) -> str:
    out = os.path.join(a.work_dir, "data", f"ml100k01-1-5{'-' + str(a.ml_rows) if a.ml_rows else ''}")
    if os.path.exists(os.path.join(out, "schema.json")):
        return out
    spec = os.path.join(a.work_dir, "ml100k_spec.json")
    atomic_write_text(spec, json.dumps(ML_SPEC))
    cmd = [sys.executable, "-m", "data_prep", "--format", "csv", "--spec", spec, "--input", a.ml_files["train"],
           "--valid", a.ml_files["validation"], "--test", a.ml_files["test"], "--output", out, "--no_progress"]
    if a.ml_rows:
        cmd += ["--rows", str(a.ml_rows)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(f"data_prep failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return out


def prepare_synthetic(a) -> str:
    out = os.path.join(a.work_dir, "data", f"synthetic-{a.synthetic_rows}")
    if os.path.exists(os.path.join(out, "schema.json")):
        return out
    from common.synthetic import write_synthetic

    write_synthetic(out, rows=a.synthetic_rows, seed=7, cardinalities=SYNTH_CARDS, n_categorical=len(SYNTH_CARDS),
                    n_numeric=3, progress=True)
    return out


# ------------------------------------------------------------------------------------------------ (a) search
def search_argv(a, data: str, save_dir: str, budget: int) -> list[str]:
    return ["--model", "BiasedMF", "--data", data, *PAPER, "--search_loss", "--search_budget", str(budget),
            "--search_epochs", "1", "--threads", str(a.threads), "--eval_batch_size", "4096",
            "--model_save_dir", save_dir]


def run_search(a, backend: str, data: str, budget: int, tag: str = "") -> dict:
    name = f"search_{backend}{tag}"
    rec_path = os.path.join(a.work_dir, f"{name}.json")
    if os.path.exists(rec_path):
        with open(rec_path) as fh:
            rec = json.load(fh)
        if rec.get("budget") == budget and rec.get("data") == data:
            _log(f"(a) {backend}: reusing the finished search in {rec['save_dir']}")
            return rec
    save_dir = os.path.join(a.work_dir, name)
    argv = search_argv(a, data, save_dir, budget)
    _log(f"(a) search, {backend}: {SCRIPTS[backend]} {' '.join(argv)}")
    load0, t0 = _load(), time.perf_counter()
    # --noresume: a search interrupted in an earlier benchmark run is started over, so that the wall time
    # measured here is the time of one complete search
    p = subprocess.run([sys.executable, os.path.join(ROOT, SCRIPTS[backend]), *argv, "--noresume"], cwd=ROOT,
                       stdout=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise UserError(f"the {backend} search failed (exit {p.returncode}); see its stderr above")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    with open(summary["formula_path"]) as fh:
        formulas = json.load(fh)["formulas"]
    rec = {"backend": backend, "data": data, "budget": budget, "save_dir": save_dir, "command": argv,
           "finished": _dt.datetime.now().isoformat(timespec="seconds"), "valid_trained": valid_trained(save_dir),
           "wall_s": round(wall, 1), "loadavg_start": load0, "loadavg_end": _load(), "summary": summary,
           "top_formulas": formulas[:10]}
    atomic_write_text(rec_path, json.dumps(rec, indent=1) + "\n")
    return rec


def valid_trained(save_dir: str) -> list[dict]:
    """The distinct trained (or reused) candidates of a search that pass the validity check, with their outcome."""
    import csv

    from common.loss_check import validity_check

    out, seen = [], set()
    with open(os.path.join(save_dir, "search_log.csv"), newline="") as fh:
        for r in csv.DictReader(fh):
            if r["status"] == "rejected" or r["formula"] in seen:
                continue
            seen.add(r["formula"])
            if validity_check(r["formula"]).passed:
                out.append({"formula": r["formula"], "step": int(r["step"]), "auc": float(r["auc"]),
                            "baseline": float(r["baseline"]), "outcome": r["reason"] or "accepted"})
    return out


def found_loss(a, searches: dict) -> tuple[str | None, str]:
    """The loss of (b)/(c): ``--found_loss``, else the best accepted formula that passed the validity check
    (the large PyTorch search first), else the best accepted formula of the first search."""
    if a.found_loss:
        return a.found_loss, "--found_loss"
    order = [k for k in ("torch_large", *a.search_backends, *SCRIPTS) if k in searches]
    for k in order:
        s = searches[k]["summary"]
        if s.get("best_valid_formula"):
            return s["best_valid_formula"], (f"best accepted formula passing the validity check, {k} search "
                                             f"(budget {searches[k]['budget']}), validation AUC "
                                             f"{s['best_valid_auc']:.4f} after one epoch")
    for k in order:
        s = searches[k]["summary"]
        if s.get("best_formula"):
            return s["best_formula"], (f"best accepted formula of the {k} search (budget {searches[k]['budget']}); "
                                       f"NO accepted formula passed the validity check")
    return None, ""


# ------------------------------------------------------------------------------------------------ (b), (c)
def effect_runs(a, part: str, data: str, loss_found: str) -> list[dict]:
    losses = list(BASE_LOSSES) + ["found"]
    runs = []
    if part == "b":
        models = [("BiasedMF", []), ("DeepModel", [])]
        common = [*PAPER, "--epochs", str(a.epochs), "--patience", "2"]
    else:
        models = [("DeepFM", [])]
        common = [*SYNTH_TRAIN, "--epochs", str(a.synthetic_epochs), "--patience", "1"]
    for model, extra in models:
        for loss in losses:
            for seed in range(a.seeds):
                name = "formula:" + loss_found if loss == "found" else loss
                argv = ["--model", model, "--data", data, *common, *extra, "--loss", name, "--seed", str(seed),
                        "--lr_decay_factor", "1", "--eval_batch_size", "4096", "--checkpoint_every", "0",
                        "--threads", str(a.threads), "--noprogress", "--noresume"]
                runs.append({"key": f"{part}/{model}/{loss}/{seed}", "part": part, "model": model, "loss": loss,
                             "loss_name": name, "seed": seed, "argv": argv})
    return runs


def read_jsonl(path: str) -> list[dict]:
    out = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except ValueError:          # a line cut short by an interruption
                    pass
    return out


def run_effect(a, backend: str, runs: list[dict], execute: bool = True, counter: dict | None = None) -> list[dict]:
    """The records of ``runs`` (training the missing ones first when ``execute``)."""
    path = os.path.join(a.work_dir, f"effect_{backend}.jsonl")
    done = {(r["key"], r["loss_name"]) for r in read_jsonl(path)}
    todo = [r for r in runs if (r["key"], r["loss_name"]) not in done]
    if counter is not None:
        counter["new"] += len(todo) if execute else 0
        counter["reused"] += len(runs) - len(todo)
    if todo and execute:
        spec = os.path.join(a.work_dir, f"effect_{backend}.todo.json")
        atomic_write_text(spec, json.dumps({"backend": backend, "runs": todo, "out": path,
                                            "save_root": os.path.join(a.work_dir, "runs", backend)}))
        _log(f"(b/c) {backend}: {len(todo)} training runs ({len(runs) - len(todo)} already done)")
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec], cwd=ROOT,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        if p.returncode != 0:
            raise UserError(f"the {backend} training worker failed (exit {p.returncode})")
    keys = {(r["key"], r["loss_name"]) for r in runs}
    return [r for r in read_jsonl(path) if (r["key"], r["loss_name"]) in keys]


def worker(spec_path: str) -> None:
    """Train every run of the spec in this process; append one JSON line per finished run."""
    with open(spec_path) as fh:
        spec = json.load(fh)
    backend = spec["backend"]
    from tqdm import tqdm

    from common.flags import parse_args

    if backend == "torch":
        from zoo_torch.trainer import train
    else:
        import tensorflow  # noqa: F401

        from zoo_tf.trainer import train
    import contextlib

    log_path = os.path.splitext(spec["out"])[0] + ".log"      # the trainers' evaluation lines
    bar = tqdm(spec["runs"], desc=f"training runs ({backend})", unit="run", file=sys.stderr, mininterval=2)
    for run in bar:
        bar.set_postfix_str(run["key"], refresh=False)
        save = os.path.join(spec["save_root"], run["key"].replace("/", "_"))
        args = parse_args(["x", *run["argv"], "--model_save_dir", save], BACKEND_NAMES[backend])
        t0 = time.perf_counter()
        with open(log_path, "a") as lf, contextlib.redirect_stderr(lf):
            print(f"== {run['key']} ({run['loss_name']})", file=lf, flush=True)
            res = train(args)
        rec = {k: run[k] for k in ("key", "part", "model", "loss", "loss_name", "seed")}
        rec.update(backend=backend, wall_s=round(time.perf_counter() - t0, 2), loadavg=_load(),
                   finished=_dt.datetime.now().isoformat(timespec="seconds"),
                   **{k: res.get(k) for k in ("test_auc", "test_logloss", "valid_auc", "epochs", "best_step",
                                              "stopped_early", "bayes_auc", "auc_gap")})
        with open(spec["out"], "a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        shutil.rmtree(save, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ report
def _stats(xs: list[float]) -> dict:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    n = len(xs)
    if not n:
        return {"n": 0, "mean": None, "std": None}
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "mean": m, "std": sd}


def effect_table(records: list[dict]) -> dict:
    """model -> loss -> test AUC stats, epochs, paired difference to BCE (same seeds)."""
    out: dict = {}
    for model in sorted({r["model"] for r in records}):
        rows = [r for r in records if r["model"] == model]
        bce = {r["seed"]: r["test_auc"] for r in rows if r["loss"] == "BCE"}
        tab = {}
        for loss in [*BASE_LOSSES, "found"]:
            rs = [r for r in rows if r["loss"] == loss]
            if not rs:
                continue
            d = [r["test_auc"] - bce[r["seed"]] for r in rs if r["seed"] in bce and r["test_auc"] is not None]
            st = _stats([r["test_auc"] for r in rs])
            ds = _stats(d)
            # a paired t statistic over seeds (see T_CRIT)
            t = (ds["mean"] / (ds["std"] / math.sqrt(ds["n"]))) if ds["n"] > 1 and ds["std"] else None
            tab[loss] = {"loss_name": rs[0]["loss_name"], "test_auc": st,
                         "epochs": _stats([r["epochs"] for r in rs])["mean"],
                         "diff_vs_bce": ds, "paired_t": t, "seeds_better_than_bce": sum(x > 0 for x in d),
                         "bayes_auc": _stats([r.get("bayes_auc") for r in rs])["mean"],
                         "wall_s": round(sum(r["wall_s"] for r in rs), 1)}
        out[model] = tab
    return out


def _f(x, nd=4):
    return "-" if x is None else f"{x:.{nd}f}"


# two-sided 5% critical values of Student's t by degrees of freedom
T_CRIT = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def verdict(table: dict) -> list[str]:
    lines = []
    for model, tab in table.items():
        f, b = tab.get("found"), tab.get("BCE")
        if not f or not b or f["diff_vs_bce"]["n"] == 0:
            continue
        d, t = f["diff_vs_bce"], f["paired_t"]
        crit = T_CRIT.get(d["n"] - 1)
        sig = t is not None and crit is not None and abs(t) > crit
        if d["mean"] > 0 and sig:
            word = f"beats BCE (paired t over seeds {t:.2f} > {crit})"
        elif d["mean"] > 0:
            word = "is above BCE on average, but not significantly (paired t test, 5%)"
        elif sig:
            word = f"is WORSE than BCE (paired t over seeds {t:.2f}, |t| > {crit})"
        else:
            word = "does not beat BCE (below it on average, not significantly)"
        best = max(tab.items(), key=lambda kv: kv[1]["test_auc"]["mean"] or -1)
        lines.append(f"- **{model}**: the found loss {word}: {_f(f['test_auc']['mean'])} vs "
                     f"{_f(b['test_auc']['mean'])}, difference {d['mean']:+.4f} ± {d['std']:.4f} "
                     f"({f['seeds_better_than_bce']}/{d['n']} seeds better); the best loss in this table is "
                     f"{best[0]} ({_f(best[1]['test_auc']['mean'])}).")
    return lines


def _formula(summary: dict, key: str, auc_key: str) -> str:
    return f"`{summary[key]}` ({_f(summary[auc_key])})" if summary.get(key) else "none"


CAVEATS = [
    "- Paper settings train slowly here: with SGD at lr 0.01 on the batch-mean loss, one epoch moves BiasedMF "
    "(embeddings initialised with std 0.1) only a little, so the search's rewards (validation AUC after one "
    "epoch from the initial model) lie close to the starting AUC and favour formulas with large gradients, "
    "including invalid ones (e.g. ones that push every prediction up: item popularity alone raises the AUC).  "
    "The validity check filters those; the formula file keeps both.",
    "- MaxR and SumR use e = 1e-6 (common/loss_formula.py, the paper README's `--smooth_coef 1e-6`): their "
    "gradients reach ~1/e, and without gradient clipping SGD drives the global bias to about -100 in the first "
    "epoch, every prediction becomes 0 and the AUC 0.5.  The paper's runner clips gradient VALUES at 50 "
    "(`clip_grad_value_(..., 50)` in BaseRunner.fit) for every loss; our trainers have no such clipping, so "
    "those two rows are not comparable to the paper's.",
    "- Candidates are trained without the L2 penalty (the paper's `regularizer=False`); the effectiveness runs "
    "keep L2 1e-4.",
]


def backend_agreement(searches: dict) -> str | None:
    """How the torch and tf 200-candidate searches compare (same candidates? AUC differences?)."""
    import csv

    if "torch" not in searches or "tf" not in searches:
        return None
    logs = {}
    for b in ("torch", "tf"):
        p = os.path.join(searches[b]["save_dir"], "search_log.csv")
        if not os.path.exists(p):
            return None
        with open(p, newline="") as fh:
            logs[b] = list(csv.DictReader(fh))
    key = lambda r: (r["formula"], r["status"], r["reason"])  # noqa: E731
    same = [key(x) == key(y) for x, y in zip(logs["torch"], logs["tf"])]
    n_same = same.index(False) if False in same else len(same)
    diffs = [abs(float(x["auc"]) - float(y["auc"])) for x, y in zip(logs["torch"][:n_same], logs["tf"][:n_same])
             if x["auc"] and y["auc"]]
    return (f"The PyTorch and TensorFlow searches sampled the same {n_same} of {len(same)} candidates with the same "
            f"outcomes (validation AUCs differ by at most {max(diffs, default=0):.1e}).")


def summary_lines(rep: dict) -> list[str]:
    L = []
    for b, r in rep.get("search", {}).items():
        sm = r["summary"]
        L.append(f"- Search `{b}`: {sm['candidates']} candidates in {r['wall_s'] / 60:.1f} min (whole command, "
                 f"load average {r['loadavg_start'][0]}-{r['loadavg_end'][0]}); {sm['rejected_cheaply']} rejected "
                 f"cheaply, {sm['reused']} reused, {sm['evaluated']} trained; {sm['accepted_formulas']} distinct "
                 f"accepted formulas, {sm['passed_validity']} of them pass the validity check.")
    agree = backend_agreement(rep.get("search", {}))
    if agree:
        L.append(f"- {agree}")
    if rep.get("found_loss"):
        L.append(f"- Found loss used below: `{rep['found_loss']}` ({rep.get('found_loss_source')}).")
    for part in ("b", "c"):
        for backend, table in rep.get("effect", {}).get(part, {}).get("tables", {}).items():
            L += verdict(table)
    return L


def markdown(rep: dict) -> str:
    s = rep["settings"]
    L = [f"# AutoLossGen (issue #6): loss search and found-loss effectiveness ({s['scale']})", ""]
    if rep.get("note"):
        L += [rep["note"], ""]
    tr = rep.get("training_runs", {})
    L += [f"Generated {rep['generated']} by `python benchmarks/autolossgen.py{' --quick' if s['scale'] == 'quick' else ''}`"
          f" on {rep['host']['cpus']} CPUs ({rep['host']['platform']}), load average "
          f"{rep['host']['loadavg_start']} at start, {rep['host'].get('loadavg_end')} at end. The machine was shared "
          f"with other jobs: wall times are those of a loaded machine.  This invocation trained "
          f"{tr.get('new', 0)} new runs and reused {tr.get('reused', 0)} finished ones of its work directory.", ""]
    L += ["## Summary", "", *summary_lines(rep), ""]
    # ---- (a)
    L += ["## (a) Search: BiasedMF on ml100k01-1-5", ""]
    srch = rep.get("search", {})
    if not srch:
        L += ["(not run)", ""]
    else:
        L += [f"One round of `--search_budget` candidates from the freshly initialised model (the paper's first "
              f"epoch), in each backend with budget {s['budget']}"
              + (f", plus one larger PyTorch search (`torch_large`, budget {s['found_budget']}) to look for a "
                 f"formula that passes the validity check" if s.get('found_budget') else "") + ": each candidate that survives the cheap checks trains a copy of the model for one epoch "
              f"(SGD lr 0.01, batch 128, no L2 as in the paper's search) and is scored by validation AUC. "
              f"Paper settings for the model (L2 1e-4), controller defaults (10 operator nodes, LSTM 64, "
              f"update every 10 candidates), {s['threads']} thread.", "",
              "| | " + " | ".join(srch) + " |", "|---|" + "---|" * len(srch)]
        rows = [("budget (candidates)", lambda r: r["budget"]),
                ("wall time (whole command)", lambda r: f"{r['wall_s'] / 60:.1f} min"),
                ("load average start / end", lambda r: f"{r['loadavg_start'][0]} / {r['loadavg_end'][0]}"),
                ("candidates", lambda r: r["summary"]["candidates"]),
                ("rejected cheaply (no training)", lambda r: r["summary"]["rejected_cheaply"]),
                ("  of which: " + "/".join(("no_gradient", "zero_gradient", "nan")),
                 lambda r: "/".join(str(r["summary"]["rejected_why"].get(k, 0))
                                    for k in ("no_gradient", "zero_gradient", "nan"))),
                ("reused (same gradient signature)", lambda r: r["summary"]["reused"]),
                ("trained (one epoch each)", lambda r: r["summary"]["evaluated"]),
                ("below the moving baseline", lambda r: r["summary"]["below_baseline"]),
                ("non-finite", lambda r: r["summary"]["not_finite"]),
                ("accepted candidates", lambda r: r["summary"]["accepted"]),
                ("distinct accepted formulas", lambda r: r["summary"]["accepted_formulas"]),
                ("... of which passed the validity check", lambda r: r["summary"]["passed_validity"]),
                ("distinct trained formulas passing validity",
                 lambda r: f"{r['summary']['distinct_trained_passed_validity']} / "
                           f"{r['summary']['distinct_trained_formulas']}"),
                ("starting validation AUC", lambda r: _f(r["summary"]["start_auc"])),
                ("best formula (validation AUC)", lambda r: _formula(r["summary"], "best_formula", "best_auc")),
                ("best formula passing validity",
                 lambda r: _formula(r["summary"], "best_valid_formula", "best_valid_auc")),
                ("time in candidates / real-model epoch",
                 lambda r: f"{r['summary']['search_wall_s']:.0f} s / {r['summary']['train_wall_s']:.0f} s")]
        for name, fn in rows:
            L.append(f"| {name} | " + " | ".join(str(fn(r)) for r in srch.values()) + " |")
        L.append("")
        for b, r in srch.items():
            vt = r.get("valid_trained")
            if vt is None and os.path.exists(os.path.join(r["save_dir"], "search_log.csv")):
                vt = valid_trained(r["save_dir"])
            if vt:
                L += [f"Trained candidates passing the validity check ({b}): " + "; ".join(
                    f"`{v['formula']}` (candidate {v['step']}, validation AUC {v['auc']:.4f}, moving baseline "
                    f"{v['baseline']:.4f}: {v['outcome']})" for v in vt) + ".", ""]
        for b, r in srch.items():
            L += [f"Top accepted formulas ({b}):", "", "| # | formula | validation AUC | passes validity |",
                  "|---|---|---|---|"]
            for i, f in enumerate(r["top_formulas"][:5]):
                L.append(f"| {i + 1} | `{f['formula']}` | {_f(f['valid_auc'])} | "
                         f"{'yes' if f['passed_validity'] else 'no'} ({f['pos_pct']}% / {f['neg_pct']}%) |")
            L.append("")
    # ---- (b), (c)
    for part, title in (("b", "(b) Effectiveness on ml100k01-1-5 (paper settings)"),
                        ("c", "(c) Effectiveness: DeepFM on the planted synthetic dataset")):
        eff = rep.get("effect", {}).get(part)
        L += [f"## {title}", ""]
        if not eff:
            L += ["(not run)", ""]
            continue
        L += [eff["settings_text"], "", f"Found loss: `{rep.get('found_loss')}` ({rep.get('found_loss_source')}).", ""]
        for backend, table in eff["tables"].items():
            models = list(table)
            L += [f"Backend: {backend}. Test AUC, mean ± std over {s['seeds']} seeds (difference to BCE: paired "
                  f"over the same seeds).", "",
                  "| loss | " + " | ".join(f"{m} test AUC | {m} Δ vs BCE | {m} epochs" for m in models) + " |",
                  "|---|" + "---|---|---|" * len(models)]
            for loss in [*BASE_LOSSES, "found"]:
                cells = []
                for m in models:
                    e = table[m].get(loss)
                    if not e:
                        cells += ["-", "-", "-"]
                        continue
                    st, d = e["test_auc"], e["diff_vs_bce"]
                    cells += [f"{_f(st['mean'])} ± {_f(st['std'])}",
                              "—" if loss == "BCE" else f"{d['mean']:+.4f} ± {d['std']:.4f} "
                                                          f"({e['seeds_better_than_bce']}/{d['n']})",
                              f"{e['epochs']:.1f}"]
                label = "found: `" + rep.get("found_loss", "") + "`" if loss == "found" else loss
                L.append(f"| {label} | " + " | ".join(cells) + " |")
            if part == "c":
                bayes = next((e["bayes_auc"] for e in table.get("DeepFM", {}).values() if e.get("bayes_auc")), None)
                if bayes:
                    L += ["", f"Bayes-optimal test AUC of the synthetic dataset: {_f(bayes)}."]
            L += ["", "Does the found loss beat BCE?", "", *verdict(table), ""]
    L += ["## Caveats", "", *CAVEATS, "", "## Settings", "", "```", json.dumps(s, indent=1), "```", ""]
    return "\n".join(L)


def main(argv=None) -> None:
    with cli_errors():
        a = parse(argv)
        if a.worker:
            worker(a.worker)
            return
        if a.fresh and os.path.isdir(a.work_dir):
            shutil.rmtree(a.work_dir)
        os.makedirs(a.work_dir, exist_ok=True)
        import torch

        host = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                "torch": torch.__version__, "loadavg_start": _load()}
        try:
            from importlib.metadata import version

            host["tensorflow"] = version("tensorflow-cpu")
        except Exception:  # noqa: BLE001
            pass
        settings = {k: v for k, v in vars(a).items() if k not in ("worker", "ml_files", "fresh", "note")}
        rep = {"generated": _dt.datetime.now().isoformat(timespec="seconds"), "host": host, "settings": settings,
               "note": a.note, "search": {}, "effect": {}, "training_runs": {"new": 0, "reused": 0}}
        t0 = time.perf_counter()
        ml = prepare_ml100k(a) if any(p in a.parts for p in ("a", "b")) else None
        # earlier finished searches of this work directory count too
        for b, budget in [(b, a.budget) for b in SCRIPTS] + [("torch_large", a.found_budget)]:
            pth = os.path.join(a.work_dir, f"search_{b}.json")
            if budget and os.path.exists(pth):
                with open(pth) as fh:
                    r = json.load(fh)
                if r.get("budget") == budget:
                    rep["search"][b] = r
        if "a" in a.parts:
            for b in a.search_backends:
                rep["search"][b] = run_search(a, b, ml, a.budget)
            if a.found_budget:
                rep["search"]["torch_large"] = run_search(a, "torch", ml, a.found_budget, "_large")
        rep["found_loss"], rep["found_loss_source"] = found_loss(a, rep["search"])
        if any(p in a.parts for p in ("b", "c")) and not rep["found_loss"]:
            raise FlagError("found_loss", "no search result in the work directory: run --parts a first or give "
                                          "--found_loss")
        for part in ("b", "c"):
            # parts not asked for are reported from the runs finished earlier in this work directory
            run_now = part in a.parts
            data = (ml if part == "b" else prepare_synthetic(a)) if run_now else ""
            runs = effect_runs(a, part, data, rep["found_loss"]) if rep["found_loss"] else []
            tables = {}
            for b in a.effect_backends:
                recs = run_effect(a, b, runs, execute=run_now, counter=rep["training_runs"])
                if recs:
                    tables[b] = effect_table(recs)
            if not tables:
                continue
            if part == "b":
                text = (f"BiasedMF and DeepModel (defaults of common/configs.py: embed 64, DeepModel MLP 64-16 with "
                        f"batch norm and dropout 0.2), SGD lr 0.01, batch 128, L2 1e-4 (dense kernels and the "
                        f"embedding rows of each batch), at most {a.epochs} epochs with early stopping on "
                        f"validation AUC (patience 2, no lr decay); test AUC of the best-validation epoch. "
                        f"{a.epochs} epochs is what the CPU budget allows for {len(runs)} runs: with SGD at lr 0.01 "
                        f"the models are NOT converged (validation AUC still rising at the last epoch), so this "
                        f"table compares losses early in training, the regime the one-epoch search optimises for.")
            else:
                text = (f"DeepFM (embed 8, MLP 64-32), Adam lr 1e-3, batch 512, no L2, at most "
                        f"{a.synthetic_epochs} epochs with early stopping (patience 1) on a planted synthetic "
                        f"dataset of {a.synthetic_rows} rows (80/10/10 split, 10 categorical fields with "
                        f"cardinalities {list(SYNTH_CARDS)}, 3 numeric fields, seed 7).")
            rep["effect"][part] = {"settings_text": text, "tables": tables}
        rep["host"]["loadavg_end"] = _load()
        rep["wall_s"] = round(time.perf_counter() - t0, 1)
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        atomic_write_text(a.out, json.dumps(rep, indent=1, default=str) + "\n")
        md = os.path.splitext(a.out)[0] + ".md"
        atomic_write_text(md, markdown(rep))
        print(json.dumps({"json": a.out, "md": md, "wall_s": rep["wall_s"],
                          "found_loss": rep["found_loss"]}), flush=True)


if __name__ == "__main__":
    main()
