"""NAS proxy study (issue 7a): how well do zero-shot proxies rank NASRec subnets, at 0%, 10% and 100% warm-up?

    python benchmarks/nas_proxy_study.py                 # the reference run (PyTorch), ~26 min on 2 busy cores
    python benchmarks/nas_proxy_study.py --quick         # smoke scale (~2 min)
    python benchmarks/nas_proxy_study.py --backend tf    # the same study with TensorFlow

Writes ``--out`` (default benchmarks/results/nas_proxy_study.json) and the Markdown table next to it.

Protocol
--------
1. Data: a planted synthetic dataset (common.synthetic, ``--rows`` rows split 8/1/1, 16 categorical
   fields of 3..20000 ids and 6 numeric fields; Bayes-optimal logloss in truth.json), generated once
   into ``benchmarks/.data/``.
2. Search space: NASRec-``--space`` with ``--blocks`` blocks, dense widths 16..256, sparse widths
   8..32, embedding size 8 (a scaled-down NASRec space; the published one has 7 blocks, widths up
   to 1024 / 64, embedding 16).
3. Ground truth: ``--subnets`` random subnets (any-path sampling, seed ``--seed``), each trained
   from scratch as a standalone NASRec model for ``--train_steps`` steps of batch 512 (about half an
   epoch of the reference data) with the published recipe (Adagrad lr 0.12, cosine schedule with
   10% linear warm-up), then its validation logloss.  ``--workers`` processes share the subnets.
4. Proxies: the supernet of the space warmed up on 0%, 10% and 100% of one pass over the train
   split with the search's own warm-up (common.nas_search.warmup: path sampling, Adagrad 0.12,
   cosine); for every subnet, with the weights it inherits, on 4 training batches of 512 (the
   search's ``--proxy_batches`` default): the training loss, the Fisher-Rao norm, mean |grad|,
   ZiCo and the SiGeo score (-ZiCo - FR, the flag defaults); plus the one-shot estimate (the
   validation logloss of the inherited weights, no fine-tuning).
5. Spearman's rho and Kendall's tau-b (common.rank_corr) of each raw proxy value against the true
   validation logloss.  Sign convention as in the SiGeo paper's table (training loss 0.30 / 0.71 /
   0.85, Fisher-Rao -0.31 / -0.61 / -0.69 at 0 / 10 / 100% warm-up): a proxy that grows with the
   loss correlates positively, one that shrinks as the loss grows (FR, ZiCo) negatively; SiGeo and
   the one-shot estimate are "lower is better" scores, so a good one is positive.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from common.io import atomic_write_text  # noqa: E402

BENCH_CARDINALITIES = (120, 60, 20000, 40, 12, 800, 150, 3, 3000, 400, 250, 10, 1500, 8, 600, 200)
DENSE_WIDTHS = (16, 32, 64, 128, 256)
SPARSE_WIDTHS = (8, 16, 24, 32)
EMBED = 8
BATCH = 512
PUBLISHED_OPT, PUBLISHED_LR = "Adagrad", 0.12
LEVELS = (0.0, 0.1, 1.0)
PROXIES = (("loss", "training loss"), ("fisher_rao", "Fisher-Rao norm"), ("mean_abs_grad", "mean |grad|"),
           ("zico", "ZiCo"), ("sigeo", "SiGeo (-ZiCo - FR)"), ("oneshot_logloss", "one-shot (inherited weights)"))
PUBLISHED = {"loss": (0.30, 0.71, 0.85), "fisher_rao": (-0.31, -0.61, -0.69)}


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def bench_dataset(rows: int, seed: int = 7, progress: bool = True) -> str:
    """The planted synthetic dataset of the NAS benchmarks (generated once into benchmarks/.data/)."""
    from common.synthetic import write_synthetic

    root = os.path.join(HERE, ".data")
    os.makedirs(root, exist_ok=True)
    gi = os.path.join(root, ".gitignore")
    if not os.path.exists(gi):
        atomic_write_text(gi, "*\n")
    path = os.path.join(root, f"nas-synthetic-{rows}-{seed}")
    if not os.path.exists(os.path.join(path, "truth.json")):
        try:
            write_synthetic(path, rows=rows, seed=seed, n_categorical=len(BENCH_CARDINALITIES), n_numeric=6,
                            cardinalities=BENCH_CARDINALITIES, progress=progress)
        except FileExistsError:
            pass
    return path


def bench_space(name: str, blocks: int):
    from common.nas_space import SearchSpace

    return SearchSpace.named(name, num_blocks=blocks, dense_widths=DENSE_WIDTHS, sparse_widths=SPARSE_WIDTHS)


def sample_configs(space, n: int, seed: int):
    from common.nas_space import sample_subnet

    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        c = sample_subnet(space, rng)
        if c.token_hash() not in seen:
            seen.add(c.token_hash())
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# ground truth: brief standalone training (worker processes)
# ---------------------------------------------------------------------------------------------
def train_standalone(backend: str, data: str, cfg, steps: int, seed: int, threads: int = 1) -> dict:
    """Train the standalone NASRec of ``cfg`` ``steps`` steps (published recipe); validation metrics."""
    from common import nas_search
    from common.batching import open_dataset
    from common.metrics import auc, logloss
    from common.optim import make_optimizer_config

    schema, _ = open_dataset(data)
    t0 = time.perf_counter()
    kw = dict(supernet_config=cfg.to_dict(), embed_size=EMBED, seed=seed)
    if backend == "torch":
        import torch

        import zoo_torch
        from zoo_torch.data import batches
        from zoo_torch.losses import get_loss
        from zoo_torch.optim import build_optimizer
        from zoo_torch.step import TrainStep, predict

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        model = zoo_torch.build_model("NASRec", schema, **kw)
        opt = build_optimizer(model, make_optimizer_config(PUBLISHED_OPT, PUBLISHED_LR))
        step = TrainStep(model, opt, get_loss("BCE"))

        def set_lr(lr):
            opt.lr = lr
        params = zoo_torch.count_params(model)
    else:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        import zoo_tf
        from zoo_tf.data import batches
        from zoo_tf.losses import get_loss
        from zoo_tf.optim import build_optimizer
        from zoo_tf.step import TrainStep, predict

        model = zoo_tf.build_model("NASRec", schema, **kw)
        opt = build_optimizer(model, make_optimizer_config(PUBLISHED_OPT, PUBLISHED_LR))
        step = TrainStep(model, opt, get_loss("BCE"))
        set_lr = opt.set_lr
        params = zoo_tf.count_params(model)
    losses, n = [], 0
    epoch = 0
    while n < steps:
        it = batches(data, "train", BATCH, shuffle=True, seed=seed, epoch=epoch)
        for b in it:
            set_lr(nas_search.cosine_lr(n, steps, PUBLISHED_LR))
            losses.append(float(step(b)))
            n += 1
            if n >= steps:
                break
        epoch += 1
    p, y = predict(model, batches(data, "valid", 4096, shuffle=False))
    return {"valid_logloss": float(logloss(y, p)), "valid_auc": float(auc(y, p)),
            "train_loss_last50": float(np.mean(losses[-50:])), "params": int(params),
            "train_s": time.perf_counter() - t0}


def worker_truth(a) -> None:
    from common.nas_space import SubnetConfig

    specs = json.loads(open(a.specs).read())
    out = {}
    for s in specs:
        cache = os.path.join(a.workdir, f"truth-{a.backend}-{s['hash']}-{a.train_steps}.json")
        if os.path.exists(cache):
            out[s["hash"]] = json.load(open(cache))
            continue
        cfg = SubnetConfig.from_dict(s["config"])
        r = train_standalone(a.backend, a.data, cfg, a.train_steps, a.seed, a.threads)
        atomic_write_text(cache, json.dumps(r))
        out[s["hash"]] = r
        print(f"[truth {a.backend}] {s['hash']}: valid logloss {r['valid_logloss']:.5f} ({r['train_s']:.0f}s)",
              file=sys.stderr, flush=True)
    atomic_write_text(a.result, json.dumps(out))


def ground_truth(a, data, configs) -> dict:
    """{hash: truth} for every config, split over ``--workers`` processes (cached in the work dir)."""
    jobs = []
    k = max(1, a.workers)
    for w in range(k):
        part = [{"hash": c.token_hash(), "config": c.to_dict()} for c in configs[w::k]]
        if not part:
            continue
        specs = os.path.join(a.workdir, f"specs-{w}.json")
        res = os.path.join(a.workdir, f"result-{w}.json")
        atomic_write_text(specs, json.dumps(part))
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", "truth", "--backend", a.backend,
               "--data", data, "--workdir", a.workdir, "--specs", specs, "--result", res,
               "--train_steps", str(a.train_steps), "--seed", str(a.seed), "--threads", str(a.threads)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS=str(a.threads))
        jobs.append((subprocess.Popen(cmd, env=env), res))
    out = {}
    for p, res in jobs:
        if p.wait() != 0:
            raise SystemExit(f"error: a ground-truth worker failed (exit {p.returncode})")
        out.update(json.load(open(res)))
    return out


# ---------------------------------------------------------------------------------------------
# proxies at three warm-up levels (in process)
# ---------------------------------------------------------------------------------------------
def proxies_at_levels(a, data, space, configs) -> dict:
    from common import nas_search
    from common.batching import open_dataset

    schema, store = open_dataset(data)
    if a.backend == "torch":
        import torch

        torch.set_num_threads(a.threads)
        from zoo_torch.search_arch import TorchArchBackend as Backend
    else:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(a.threads)
        tf.config.threading.set_inter_op_parallelism_threads(a.threads)
        from zoo_tf.search_arch import TFArchBackend as Backend
    out = {}
    for f in LEVELS:
        s = nas_search.ArchSearchSettings(
            data=data, save_dir=os.path.join(a.workdir, f"warm-{a.backend}-{f:g}"), backend=a.backend, space=space,
            model_config={"seed": a.seed, "embed_size": EMBED}, batch_size=BATCH, optimizer=PUBLISHED_OPT,
            lr=PUBLISHED_LR, seed=a.seed, warmup_fraction=f, warmup_epochs=1, zeroshot="sigeo", progress=True,
            threads=a.threads, checkpoint_every=100)
        fp = s.fingerprint(schema.model_hash())
        os.makedirs(s.save_dir, exist_ok=True)
        _, total = nas_search.warmup_plan(store.rows("train"), BATCH, f, 1)
        backend = Backend(s, schema, int(round(s.full_fraction * total)))
        t0 = time.perf_counter()
        warm = nas_search.warmup(s, backend, store, schema, fp)
        proxy_batches = [backend.to_batch(b) for b in
                         nas_search.scoring_batches(store, schema, "train", BATCH, 4, a.seed + 1)]
        valid = [(backend.to_batch(b), np.asarray(b["label"])) for b in
                 nas_search.scoring_batches(store, schema, "valid", 4096, None, 0)]
        per = {}
        t1 = time.perf_counter()
        for c in configs:
            p = backend.proxies(c, proxy_batches)
            kernel, bias = backend.active_head(c)
            one = nas_search.finetune_head([], [(backend.head_inputs(c, b), y) for b, y in valid], kernel, bias,
                                           s.optimizer_config(), s.lr)
            per[c.token_hash()] = dict(p, oneshot_logloss=one["valid_logloss"], oneshot_auc=one["valid_auc"])
        out[f"{f:g}"] = {"warmup_steps": warm["steps"], "warmup_s": warm["seconds"],
                         "warmup_final_loss": warm.get("final_loss"), "proxies_s": time.perf_counter() - t1,
                         "level_wall_s": time.perf_counter() - t0, "per_subnet": per}
        print(f"[proxies {a.backend}] warm-up {f:.0%}: {warm['steps']} steps, proxies of {len(configs)} subnets in "
              f"{time.perf_counter() - t1:.0f}s", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def correlations(configs, truth, proxies) -> dict:
    from common.rank_corr import kendall_tau, spearman

    y = [truth[c.token_hash()]["valid_logloss"] for c in configs]
    out = {}
    for key, _ in PROXIES:
        out[key] = {}
        for lvl, d in proxies.items():
            x = [d["per_subnet"][c.token_hash()][key] for c in configs]
            ok = [i for i, v in enumerate(x) if np.isfinite(v)]
            xs, ys = [x[i] for i in ok], [y[i] for i in ok]
            out[key][lvl] = {"spearman": spearman(xs, ys), "kendall": kendall_tau(xs, ys), "n": len(ok)}
    return out


def _f(v, nd=2):
    return "n/a" if v is None or not np.isfinite(v) else f"{v:+.{nd}f}"


def markdown(rep: dict) -> str:
    s = rep["settings"]
    lv = [f"{x:g}" for x in LEVELS]
    lines = [f"# NAS proxy study ({rep['backend']})", "",
             f"Generated {rep['date']} by `python benchmarks/nas_proxy_study.py{' --quick' if s['quick'] else ''}"
             f"{'' if rep['backend'] == 'torch' else ' --backend tf'}` in {rep['wall_s'] / 60:.1f} min "
             f"(load average {rep['host']['loadavg_start'][0]} at start, {rep['host']['loadavg_end'][0]} at end; the "
             "2-core machine was shared with other jobs, so times are not reference figures).", "",
             f"- data: planted synthetic, {s['rows']} rows (train {rep['data']['train_rows']}, valid "
             f"{rep['data']['valid_rows']}), {len(BENCH_CARDINALITIES)} categorical + 6 numeric fields; Bayes-optimal "
             f"valid logloss {rep['data']['bayes_valid_logloss']:.4f}, base-rate logloss "
             f"{rep['data']['base_rate_logloss']:.4f}",
             f"- space: NASRec-{s['space']}, {s['blocks']} blocks, dense widths {list(DENSE_WIDTHS)}, sparse widths "
             f"{list(SPARSE_WIDTHS)}, embedding {EMBED}",
             f"- ground truth: {s['subnets']} random subnets trained from scratch {s['train_steps']} steps x {BATCH} "
             f"(Adagrad 0.12, cosine, 10% warm-up); validation logloss {rep['truth_summary']['min']:.4f} .. "
             f"{rep['truth_summary']['max']:.4f} (median {rep['truth_summary']['median']:.4f})",
             f"- proxies: supernet warmed on 0 / 10 / 100% of one pass over the train split "
             f"({' / '.join(str(rep['levels'][x]['warmup_steps']) for x in lv)} steps), 4 training batches of {BATCH} "
             "per subnet, inherited weights",
             "- correlation of the raw proxy value with the true validation logloss (positive: grows with the loss)",
             "", "| proxy | " + " | ".join(f"Spearman {float(x):.0%}" for x in lv) + " | "
             + " | ".join(f"Kendall {float(x):.0%}" for x in lv) + " | published Spearman 0/10/100% |",
             "|---|" + "---:|" * (2 * len(lv)) + "---|"]
    for key, label in PROXIES:
        c = rep["correlations"][key]
        pub = PUBLISHED.get(key)
        lines.append(f"| {label} | " + " | ".join(_f(c[x]["spearman"]) for x in lv) + " | "
                     + " | ".join(_f(c[x]["kendall"]) for x in lv) + " | "
                     + (" / ".join(f"{v:+.2f}" for v in pub) if pub else "") + " |")
    def level(x):
        d = rep["levels"][x]
        loss = f"{d['warmup_final_loss']:.4f}" if d.get("warmup_final_loss") is not None else "n/a"
        return (f"{float(x):.0%}: {d['warmup_steps']} steps in {d['warmup_s']:.0f}s, last-50-step loss {loss}, "
                f"proxies {d['proxies_s']:.0f}s")

    lines += ["", "Per warm-up level: " + "; ".join(level(x) for x in lv) + ".",
              f"Ground-truth training: {rep['truth_s']:.0f}s wall over {s['workers']} worker(s).", ""]
    if rep.get("notes"):
        lines += [rep["notes"], ""]
    return "\n".join(lines)


def rerender(path: str, notes: str, markdown) -> None:
    """``--rerender``: rewrite the Markdown of the JSON report ``path`` (setting its notes first if given)."""
    with open(path) as fh:
        rep = json.load(fh)
    if notes:
        rep["notes"] = notes
        atomic_write_text(path, json.dumps(rep, indent=1) + "\n")
    atomic_write_text(os.path.splitext(path)[0] + ".md", markdown(rep) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke scale: 40k rows, 8 subnets, 40 training steps")
    ap.add_argument("--backend", default="torch", choices=("torch", "tf"))
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--space", default="full", choices=("small", "full"))
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--subnets", type=int, default=32)
    ap.add_argument("--train_steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--notes", default="", help="a paragraph appended to the Markdown report")
    ap.add_argument("--rerender", default="", help="only rewrite the Markdown of this JSON report (with --notes)")
    # worker-only
    ap.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    ap.add_argument("--specs", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rerender:
        return rerender(a.rerender, a.notes, markdown)
    if a._worker == "truth":
        return worker_truth(a)
    if a.quick:
        a.rows, a.subnets, a.train_steps = min(a.rows, 40_000), min(a.subnets, 8), min(a.train_steps, 40)
    if a.subnets < 3 or a.train_steps < 1 or a.rows < 2000 or a.blocks < 1 or a.workers < 1 or a.threads < 1:
        ap.error("--subnets >= 3, --train_steps >= 1, --rows >= 2000, --blocks/--workers/--threads >= 1")
    tag = "_quick" if a.quick else ""
    out = a.out or os.path.join(HERE, "results", f"nas_proxy_study{tag}.json")
    a.workdir = a.workdir or os.path.join(HERE, ".data", f"nas-proxy-work-{a.rows}-{a.space}{a.blocks}-{a.seed}")
    os.makedirs(a.workdir, exist_ok=True)
    t0 = time.perf_counter()
    load0 = _load()
    data = bench_dataset(a.rows)
    from common.batching import open_dataset
    from common.synthetic import load_truth

    _, store = open_dataset(data)
    truth_json = load_truth(data)["splits"]
    space = bench_space(a.space, a.blocks)
    configs = sample_configs(space, a.subnets, a.seed)
    t1 = time.perf_counter()
    truth = ground_truth(a, data, configs)
    truth_s = time.perf_counter() - t1
    levels = proxies_at_levels(a, data, space, configs)
    corr = correlations(configs, truth, levels)
    ll = [truth[c.token_hash()]["valid_logloss"] for c in configs]
    ctr = truth_json["valid"]["ctr"]
    rep = {
        "benchmark": "nas_proxy_study", "backend": a.backend, "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "settings": {"quick": a.quick, "rows": a.rows, "space": a.space, "blocks": a.blocks, "subnets": a.subnets,
                     "train_steps": a.train_steps, "batch_size": BATCH, "seed": a.seed, "workers": a.workers,
                     "threads": a.threads, "embed_size": EMBED, "dense_widths": list(DENSE_WIDTHS),
                     "sparse_widths": list(SPARSE_WIDTHS), "proxy_batches": 4, "optimizer": PUBLISHED_OPT,
                     "lr": PUBLISHED_LR},
        "data": {"path": data, "train_rows": store.rows("train"), "valid_rows": store.rows("valid"),
                 "bayes_valid_logloss": truth_json["valid"]["bayes_logloss"],
                 "bayes_valid_auc": truth_json["valid"]["bayes_auc"],
                 "base_rate_logloss": float(-(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr)))},
        "truth_summary": {"min": float(np.min(ll)), "max": float(np.max(ll)), "median": float(np.median(ll))},
        "correlations": corr, "published_spearman": PUBLISHED, "levels": levels, "truth_s": truth_s,
        "subnets": [{"token_hash": c.token_hash(), "config": c.to_dict(), "truth": truth[c.token_hash()]}
                    for c in configs],
        "wall_s": time.perf_counter() - t0,
        "host": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                 "loadavg_start": load0, "loadavg_end": _load()},
        "notes": a.notes,
    }
    from common.train_utils import _clean_nan

    atomic_write_text(out, json.dumps(_clean_nan(rep), indent=1) + "\n")
    md = markdown(rep)
    atomic_write_text(os.path.splitext(out)[0] + ".md", md + "\n")
    print(md)
    print(json.dumps({"out": out, "wall_s": rep["wall_s"],
                      "spearman": {k: {x: v["spearman"] for x, v in c.items()} for k, c in corr.items()}}))


if __name__ == "__main__":
    main()
