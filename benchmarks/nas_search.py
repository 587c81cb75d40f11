"""Scaled-down NASRec + SiGeo search (issue 7b) in each backend, and its best subnet against DeepFM and DCNv2.

    python benchmarks/nas_search.py                       # the reference run: PyTorch then TensorFlow, ~16 min
    python benchmarks/nas_search.py --quick               # smoke scale (~5 min)
    python benchmarks/nas_search.py --backends torch --zeroshot zico --warmup_fraction 0.1

Writes ``--out`` (default benchmarks/results/nas_search.json) and the Markdown next to it.

Per backend
-----------
1. **Search** -- one process running exactly what ``train_example_<backend>.py --search_arch`` runs
   (``zoo_<backend>.search_arch.main`` with a ``TrainArgs``; the process is started here only so that
   the search space's widths, which have no command-line flag, can be scaled down): supernet warm-up
   on ``--warmup_fraction`` (10%: SiGeo's sub-one-shot setting) of one pass over the train split with the published setting (Adagrad lr
   0.12, batch 512, cosine schedule with 10% warm-up, path sampling), then regularized evolution
   (``--init_population``, ``--sample_size``, ``--n_childs``, ``--generations``) scoring every child
   with ``--zeroshot`` on 4 training batches.  Its wall time is the process's, start-up included.
2. **Training from scratch with the same budget** -- ``train_example_<backend>.py`` (the normal
   trainer) for the best subnet (``--model NASRec --supernet_config <rank1>.json``), a random
   subnet of the same space (the search's baseline), DeepFM and DCNv2 (their default configs), each
   with ``--epochs`` epochs of batch 512, Adam lr 1e-3, embedding size 8, early stopping on
   validation AUC (patience 1), test AUC / logloss of the best checkpoint.

Data: the planted synthetic dataset of benchmarks/nas_proxy_study.py (``--rows`` rows, 8/1/1 split,
Bayes-optimal test AUC / logloss known).  Search space: NASRec-``--space``, ``--blocks`` blocks, dense
widths 16..256, sparse widths 8..32, embedding 8 (published: 7 blocks, widths up to 1024 / 64, 128 +
240 x 8 = 2048 candidates; here ``--init_population + --generations x --n_childs``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
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

import numpy as np  # noqa: E402

from common.io import atomic_write_text, last_json_line  # noqa: E402

SCRIPTS = {"torch": os.path.join(ROOT, "train_example_pytorch.py"),
           "tf": os.path.join(ROOT, "train_example_tensorflow.py")}
EMBED = 8
BATCH = 512


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def _env(threads: int) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS=str(threads))
    for k in ("TF_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _last_json(text: str) -> dict:
    res = last_json_line(text)
    if res is None:
        raise RuntimeError("no JSON result line")
    return res


def search_options(a) -> dict:
    from benchmarks.nas_proxy_study import DENSE_WIDTHS, SPARSE_WIDTHS

    return {"search_space": a.space, "n_blocks": a.blocks, "warmup_fraction": a.warmup_fraction,
            "warmup_epochs": 1, "n_generations": a.generations, "init_population": a.init_population,
            "sample_size": a.sample_size, "n_childs": a.n_childs, "zeroshot": a.zeroshot, "proxy_batches": 4,
            "finetune_steps": 200, "top_k": 5, "zico_coef": 1.0, "fr_coef": 1.0, "loss_coef": a.loss_coef,
            "dense_widths": list(DENSE_WIDTHS), "sparse_widths": list(SPARSE_WIDTHS)}


def worker_search(a) -> None:
    """The search process: what ``--search_arch`` runs, with the scaled-down widths."""
    import importlib

    from common.train_utils import TrainArgs

    args = TrainArgs(model="NASRec", data=a.data, model_config={"seed": a.seed, "embed_size": EMBED},
                     model_save_dir=a.save_dir, seed=a.seed, threads=a.threads, progress=True,
                     search={"mode": "arch", "options": json.loads(a.options)})
    if a.backend == "tf":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(a.threads)
        tf.config.threading.set_inter_op_parallelism_threads(a.threads)
    importlib.import_module(f"zoo_{a.backend}.search_arch").main(args)


def run_logged(cmd, log_path, threads):
    t0 = time.perf_counter()
    with open(log_path, "w") as err:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_env(threads), cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        with open(log_path) as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {p.returncode}):\n{tail}")
    return _last_json(p.stdout), wall


def train(a, backend, data, model, out_dir, log_dir, extra=()):
    cmd = [sys.executable, SCRIPTS[backend], "--model", model, "--data", data, "--model_save_dir", out_dir,
           "--epochs", str(a.epochs), "--batch_size", str(BATCH), "--optimizer", "Adam", "--lr", "0.001",
           "--embed_size", str(EMBED), "--patience", "1", "--threads", str(a.threads), "--noprogress",
           "--noresume", "--seed", str(a.seed), *extra]
    res, wall = run_logged(cmd, os.path.join(log_dir, f"train-{backend}-{os.path.basename(out_dir)}.log"), a.threads)
    return {"model": model, "test_auc": res["test_auc"], "test_logloss": res["test_logloss"],
            "valid_auc": res["valid_auc"], "epochs": res["epochs"], "steps": res["steps"],
            "stopped_early": res["stopped_early"], "train_rows_per_s": res["train_rows_per_s"], "wall_s": wall,
            "auc_gap": res.get("auc_gap"), "logloss_gap": res.get("logloss_gap")}


def run_backend(a, backend, data, work) -> dict:
    from common.nas_space import sample_subnet

    bdir = os.path.join(work, backend)
    if os.path.exists(bdir):
        shutil.rmtree(bdir)            # a fresh search every time: its wall time is measured
    os.makedirs(bdir)
    sdir = os.path.join(bdir, "search")
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", "search", "--backend", backend, "--data", data,
           "--save_dir", sdir, "--options", json.dumps(search_options(a)), "--threads", str(a.threads),
           "--seed", str(a.seed)]
    print(f"[{backend}] search ...", file=sys.stderr, flush=True)
    load0 = _load()
    summary, search_wall = run_logged(cmd, os.path.join(bdir, "search.log"), a.threads)
    print(f"[{backend}] search: {summary['evaluated']} candidates in {search_wall / 60:.1f} min; best "
          f"{summary['best_score']:.5g}", file=sys.stderr, flush=True)
    from common.nas_space import load_subnet_config

    best = load_subnet_config(summary["best_config"])
    rnd = sample_subnet(best.space, np.random.default_rng(12345))
    rnd_path = os.path.join(bdir, "random_subnet.json")
    rnd.save(rnd_path)
    runs = []
    for label, model, extra in (("NASRec (searched, rank 1)", "NASRec", ("--supernet_config", summary["best_config"])),
                                ("NASRec (random subnet)", "NASRec", ("--supernet_config", rnd_path)),
                                ("DeepFM", "DeepFM", ()), ("DCNv2", "DCNv2", ())):
        print(f"[{backend}] training {label} ...", file=sys.stderr, flush=True)
        r = train(a, backend, data, model, os.path.join(bdir, label.split(" ")[0] + ("-random" if "random" in label
                                                                                     else "")), bdir, extra)
        r["label"] = label
        runs.append(r)
        print(f"[{backend}] {label}: test AUC {r['test_auc']:.4f}, logloss {r['test_logloss']:.4f}",
              file=sys.stderr, flush=True)
    blocks = [{k: b[k] for k in ("dense_op", "sparse_op", "dense_width", "sparse_width", "dense_in", "sparse_in",
                                 "dense_to_sparse", "sparse_to_dense")} for b in best.to_dict()["blocks"]]
    return {"search": {k: summary[k] for k in ("evaluated", "best_score", "best_token_hash", "best_extra",
                                               "top_k_scores", "warmup_steps", "warmup_s", "evaluation_s", "search_s",
                                               "wall_s", "optimizer", "lr", "batch_size", "zeroshot")},
            "search_process_wall_s": search_wall, "best_config": best.to_dict(), "best_blocks": blocks,
            "random_config": rnd.to_dict(), "runs": runs, "loadavg_start": load0, "loadavg_end": _load()}


def markdown(rep) -> str:
    s = rep["settings"]
    t = rep["data"]
    lines = ["# Scaled-down NASRec search (issue 7b)", "",
             f"Generated {rep['date']} by `python benchmarks/nas_search.py{' --quick' if s['quick'] else ''}` in "
             f"{rep['wall_s'] / 60:.1f} min on the shared 2-core machine (load average {rep['host']['loadavg_start'][0]}"
             f" at start, {rep['host']['loadavg_end'][0]} at end; other jobs were running, so times are upper bounds).",
             "",
             f"- data: planted synthetic, {s['rows']} rows (train {t['train_rows']}, valid {t['valid_rows']}, test "
             f"{t['test_rows']}); Bayes-optimal test AUC {t['bayes_test_auc']:.4f}, logloss {t['bayes_test_logloss']:.4f}",
             f"- space: NASRec-{s['space']}, {s['blocks']} blocks, dense widths 16..256, sparse widths 8..32, "
             f"embedding {EMBED} (published: 7 blocks, up to 1024 / 64, embedding 16)",
             f"- search: supernet warm-up on {s['warmup_fraction']:.0%} of one pass (Adagrad 0.12, batch {BATCH}, cosine"
             f" with 10% warm-up), regularized evolution {s['init_population']} + {s['generations']} x {s['n_childs']} "
             f"= {s['init_population'] + s['generations'] * s['n_childs']} candidates (sample {s['sample_size']}; "
             f"published 128 + 240 x 8 = 2048), scored by `--zeroshot {s['zeroshot']}`"
             + (f" (loss_coef {s['loss_coef']:g})" if s["zeroshot"] == "sigeo" else "") + " on 4 x 512 training rows",
             f"- final training (same budget for every model): up to {s['epochs']} epochs, batch {BATCH}, Adam 1e-3, "
             f"embedding {EMBED}, early stopping on validation AUC (patience 1), test metrics of the best checkpoint",
             "", "| backend | search wall | warm-up | scoring | candidates | model | test AUC | test logloss | train wall |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for b, r in rep["backends"].items():
        sr = r["search"]
        for i, run in enumerate(r["runs"]):
            head = (f"| {b} | {r['search_process_wall_s'] / 60:.1f} min | {sr['warmup_s']:.0f}s ({sr['warmup_steps']} "
                    f"steps) | {sr['evaluation_s']:.0f}s | {sr['evaluated']} " if i == 0 else "| | | | | ")
            lines.append(head + f"| {run['label']} | {run['test_auc']:.4f} | {run['test_logloss']:.4f} | "
                                f"{run['wall_s']:.0f}s |")
    lines += ["", "Best subnets (per block: dense op/width, sparse op/width, merges d->s / s->d):", ""]
    for b, r in rep["backends"].items():
        desc = "; ".join(f"{x['dense_op']}{x['dense_width']}/{x['sparse_op']}{x['sparse_width']}"
                         f"{' d>s' if x['dense_to_sparse'] else ''}{' s>d' if x['sparse_to_dense'] else ''}"
                         for x in r["best_blocks"])
        lines.append(f"- {b}: `{desc}` (score {r['search']['best_score']:.5g})")
    lines.append("")
    if rep.get("notes"):
        lines += [rep["notes"], ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke scale: 40k rows, warm-up 10%%, 8 + 2 x 4 candidates, "
                                                         "1 epoch")
    ap.add_argument("--backends", default="torch,tf")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--space", default="full", choices=("small", "full"))
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--zeroshot", default="sigeo", choices=("sigeo", "zico", "fr", "loss", "none"))
    ap.add_argument("--loss_coef", type=float, default=0.0)
    ap.add_argument("--warmup_fraction", type=float, default=0.1)
    ap.add_argument("--init_population", type=int, default=24)
    ap.add_argument("--sample_size", type=int, default=8)
    ap.add_argument("--n_childs", type=int, default=6)
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    ap.add_argument("--notes", default="", help="a paragraph appended to the Markdown report")
    ap.add_argument("--rerender", default="", help="only rewrite the Markdown of this JSON report (with --notes)")
    ap.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    ap.add_argument("--save_dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--options", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rerender:
        from benchmarks.nas_proxy_study import rerender

        return rerender(a.rerender, a.notes, markdown)
    if a._worker == "search":
        return worker_search(a)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if not backends or any(b not in SCRIPTS for b in backends):
        ap.error("--backends: a comma list of torch, tf")
    if a.quick:
        a.rows, a.init_population, a.sample_size, a.n_childs, a.generations, a.epochs = \
            min(a.rows, 40_000), 8, 4, 4, 2, 1
        a.warmup_fraction = min(a.warmup_fraction, 0.1)
    if a.sample_size > a.init_population or min(a.init_population, a.n_childs, a.generations, a.epochs) < 1:
        ap.error("need 1 <= --sample_size <= --init_population and --n_childs, --generations, --epochs >= 1")
    from benchmarks.nas_proxy_study import bench_dataset
    from common.batching import open_dataset
    from common.synthetic import load_truth

    t0 = time.perf_counter()
    load0 = _load()
    data = bench_dataset(a.rows)
    _, store = open_dataset(data)
    tj = load_truth(data)["splits"]
    work = os.path.join(HERE, ".data", f"nas-search-work{'-quick' if a.quick else ''}")
    out = a.out or os.path.join(HERE, "results", f"nas_search{'_quick' if a.quick else ''}.json")
    rep = {"benchmark": "nas_search", "date": _dt.datetime.now().isoformat(timespec="seconds"),
           "settings": {k: getattr(a, k) for k in ("quick", "rows", "space", "blocks", "zeroshot", "loss_coef",
                                                   "warmup_fraction", "init_population", "sample_size", "n_childs",
                                                   "generations", "epochs", "seed", "threads")},
           "data": {"path": data, "train_rows": store.rows("train"), "valid_rows": store.rows("valid"),
                    "test_rows": store.rows("test"), "bayes_test_auc": tj["test"]["bayes_auc"],
                    "bayes_test_logloss": tj["test"]["bayes_logloss"]},
           "search_options": search_options(a), "backends": {}, "notes": a.notes}
    for b in backends:
        rep["backends"][b] = run_backend(a, b, data, work)
    rep["wall_s"] = time.perf_counter() - t0
    rep["host"] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                   "loadavg_start": load0, "loadavg_end": _load()}
    from common.train_utils import _clean_nan

    atomic_write_text(out, json.dumps(_clean_nan(rep), indent=1) + "\n")
    md = markdown(rep)
    atomic_write_text(os.path.splitext(out)[0] + ".md", md + "\n")
    print(md)
    print(json.dumps({"out": out, "wall_s": rep["wall_s"]}))


if __name__ == "__main__":
    main()
