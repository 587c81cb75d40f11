"""Training-speed benchmark: our DeepFM / DCN / xDeepFM / AutoInt (PyTorch and TensorFlow) against
deepctr-torch, DeepCTR (TF), FuxiCTR and torchfm, on the same data and configuration, in one run.

    python benchmarks/train_speed.py                       # everything (CPU), ~1 h on 2 cores
    python benchmarks/train_speed.py --quick               # smaller data, fewer windows
    python benchmarks/train_speed.py --models DeepFM --backends torch --peers none
    python benchmarks/train_speed.py --device cuda         # our PyTorch side on a GPU (no TF, no peers)

Outputs ``--out`` (JSON, default benchmarks/results/train_speed.json) and the
Markdown table next to it (same name, ``.md``).

What is measured (see benchmarks/README.md for the full protocol)
-----------------------------------------------------------------
- Data: one planted synthetic Criteo-shaped dataset written through our
  pipeline (``common.synthetic.write_synthetic``): ``--fields`` categorical
  fields of ``--vocab`` ids each, ``--rows`` training + ``--valid_rows``
  validation rows, in the LMDB store.  Our runs read it through the real
  loaders (``zoo_torch.data.batches`` / ``zoo_tf.data.batches``, shuffled);
  the peers get the same rows exported once to ``.npy`` arrays (stored order),
  sliced in memory -- the cheapest feeding there is, i.e. in their favour.
- One epoch per run; rows/s = median over timed windows of consecutive steps
  after a warm-up (data feeding included); validation AUC / logloss after that
  one epoch (the same numpy AUC code for everyone); peak resident memory
  (``ru_maxrss``) of the run's own process -- every run is a separate process.
- Threads: ``--threads`` intra-op and ``--inter_op_threads`` inter-op threads
  for every runner (torch.set_num_threads / set_num_interop_threads, TF
  threading config); recorded per run.
- Same model configuration everywhere (embedding size, MLP sizes, cross / CIN /
  attention sizes -- AutoInt: embedding / heads per head, and with the linear
  term every peer's AutoInt has --, learning rate, no L2, no dropout, no batch
  norm where the library allows).  We train with ``--optimizer`` (default LazyAdam); every
  peer with its own standard Adam.

The peers are installed by this script into their own virtualenv
(``--peers_venv``, default benchmarks/.venv-peers, created with
``--system-site-packages`` so it reuses the installed torch / tensorflow); they
are never in requirements.txt.  The runners are in benchmarks/peers/.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS_DIR = os.path.join(HERE, "peers")
for _p in (ROOT, PEERS_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

import _bench  # noqa: E402  (benchmarks/peers/_bench.py: the shared timing / memory / AUC code)
from common.io import last_json_line  # noqa: E402

DEFAULT_MODELS = ("DeepFM", "DCN", "xDeepFM", "AutoInt")
BACKENDS = ("torch", "tf")
# runner name -> (display name, framework, pip requirement)
PEERS = {
    "deepctr_torch": ("deepctr-torch", "torch", "deepctr-torch==0.3.0"),
    "deepctr_tf": ("deepctr (TF)", "tensorflow", "deepctr==0.9.4"),
    "fuxictr": ("fuxictr", "torch", "fuxictr==2.3.10"),
    "torchfm": ("torchfm", "torch", "torchfm==0.7.0"),
}
# Models each peer library has (benchmarks/peers/<runner>_peer.py MODELS); fuxictr's AutoInt attention
# block is in its model zoo, which the pip package does not ship.
PEER_MODELS = {
    "deepctr_torch": ("DeepFM", "DCN", "xDeepFM", "AutoInt"),
    "deepctr_tf": ("DeepFM", "DCN", "xDeepFM", "AutoInt"),
    "fuxictr": ("DeepFM", "DCN", "xDeepFM"),
    "torchfm": ("DeepFM", "DCN", "xDeepFM", "AutoInt"),
}
# Installed with dependencies.  requests: deepctr-torch imports it without declaring it.
# fuxictr pulls ray[data], polars and pyarrow (its preprocessing), which its layers import.
PIP_WITH_DEPS = ["deepctr-torch==0.3.0", "requests", "torchfm==0.7.0", "fuxictr==2.3.10", "h5py"]
# Installed --no-deps: tf-keras would pull the full `tensorflow` wheel next to tensorflow-cpu;
# deepctr's own deps (requests, h5py) are in the list above.
PIP_NO_DEPS = ["deepctr==0.9.4", "tf-keras=={tf_minor}.*"]

# targets of issue 5
TARGETS = {
    "deepfm_torch_rows_per_s": 45_000,
    "deepfm_tf_rows_per_s": 35_000,
    "deepfm_ratio": 3.0,
    "other_ratio": 2.0,
    "auc_margin": 0.002,
    "cuda_deepfm_rows_per_s": 1_000_000,
}


# ==============================================================================================
# dataset
def dataset_dir(args) -> str:
    if args.data_dir:
        return os.path.abspath(args.data_dir)
    name = f"criteo{args.fields}-v{args.vocab}-r{args.rows}-v{args.valid_rows}-s{args.seed}"
    return os.path.join(HERE, ".data", name)


def _self_ignoring_dir(path: str) -> None:
    """Create ``path`` with a ``.gitignore`` of ``*`` so git never sees what is inside."""
    os.makedirs(path, exist_ok=True)
    gi = os.path.join(path, ".gitignore")
    if not os.path.exists(gi):
        with open(gi, "w") as fh:
            fh.write("# written by benchmarks/train_speed.py: generated files, never committed\n*\n")


def ensure_dataset(args, log) -> str:
    path = dataset_dir(args)
    if os.path.exists(os.path.join(path, "schema.json")) and os.path.exists(os.path.join(path, "store", "data.mdb")):
        return path
    if not args.data_dir:
        _self_ignoring_dir(os.path.dirname(path))
    log(f"generating {args.rows} + {args.valid_rows} rows, {args.fields} fields x {args.vocab} ids -> {path}")
    t0 = time.perf_counter()
    try:
        from common.synthetic import write_synthetic
    except ImportError:       # common/synthetic.py not there: a plain random store
        write_synthetic = None
    if write_synthetic is not None:
        try:
            import tqdm  # noqa: F401  (write_synthetic's progress bar)
            progress = not args.no_progress
        except ImportError:
            progress = False
        write_synthetic(path, rows=args.rows + args.valid_rows, seed=args.seed,
                        split=(args.rows, args.valid_rows, 0), cardinalities=[args.vocab] * args.fields,
                        n_categorical=args.fields, n_numeric=0, progress=progress, overwrite=True,
                        name="bench-criteo-shaped")
    else:
        _write_plain_dataset(path, args)
    log(f"dataset ready in {time.perf_counter() - t0:.1f}s")
    return path


def _write_plain_dataset(path: str, args) -> None:
    """Fallback generator: Zipf ids, label from a random first-order + pairwise logit."""
    from common.io import atomic_directory
    from common.schema import Field, Schema
    from common.store import STORE_DIR, StoreWriter, layout_for

    fields = [Field(f"C{i + 1}", "categorical", vocab_size=args.vocab + 2) for i in range(args.fields)]
    schema = Schema(fields=fields, splits={"train": args.rows, "valid": args.valid_rows, "test": 0},
                    name="bench-criteo-shaped", format="random")
    rng = np.random.default_rng(args.seed)
    w = rng.normal(0, 0.5, (args.fields, args.vocab + 2)).astype(np.float32)
    v = rng.normal(0, 0.3, (args.fields, args.vocab + 2, 4)).astype(np.float32)
    with atomic_directory(path, overwrite=True) as tmp:
        wr = StoreWriter(os.path.join(tmp, STORE_DIR), layout_for(schema), schema.model_hash())
        for split, n in (("train", args.rows), ("valid", args.valid_rows)):
            for lo in range(0, n, 65536):
                m = min(65536, n - lo)
                cat = np.minimum(rng.zipf(1.2, (m, args.fields)), args.vocab) + 1
                f_idx = np.arange(args.fields)
                lin = w[f_idx, cat].sum(1)
                e = v[f_idx, cat]                                    # [m, F, 4]
                pair = 0.5 * ((e.sum(1) ** 2).sum(1) - (e ** 2).sum((1, 2)))
                z = lin + pair - 1.0
                z = (z - z.mean()) / (z.std() + 1e-6) - 1.1
                label = (rng.random(m) < 1 / (1 + np.exp(-z))).astype(np.float32)
                wr.append(split, {"cat": cat.astype(np.int32), "num": np.zeros((m, 0), np.float32),
                                  "seq": np.zeros((m, 0), np.int32), "label": label})
        wr.close()
        schema.save(tmp)


def export_numpy(data_dir: str, log) -> str:
    """The store's train/valid rows as .npy arrays for the peers (stored order, via iter_packed)."""
    from common.batching import iter_packed, open_dataset

    out = os.path.join(data_dir, "npy")
    done = os.path.join(out, "DONE")
    if os.path.exists(done):
        return out
    os.makedirs(out, exist_ok=True)
    schema, store = open_dataset(data_dir)
    for split in ("train", "valid"):
        cats, labels = [], []
        for packed in iter_packed(store, split, 65536, shuffle=False, arrays=("cat", "label")):
            cats.append(packed["cat"])
            labels.append(packed["label"][:, 0])
        np.save(os.path.join(out, f"{split}_cat.npy"), np.ascontiguousarray(np.concatenate(cats), dtype=np.int32))
        np.save(os.path.join(out, f"{split}_label.npy"), np.ascontiguousarray(np.concatenate(labels), np.float32))
    with open(os.path.join(out, "vocab.json"), "w") as fh:
        json.dump([f.vocab_size for f in schema.categorical], fh)
    with open(done, "w") as fh:
        fh.write("ok\n")
    log(f"exported numpy arrays for the peers -> {out}")
    return out


def dataset_info(data_dir: str) -> dict:
    from common.schema import Schema

    schema = Schema.load(data_dir)
    info = dict(path=data_dir, name=schema.name, format=schema.format, splits=schema.splits,
                categorical_fields=len(schema.categorical), numeric_fields=len(schema.numeric),
                vocab_sizes=sorted({f.vocab_size for f in schema.categorical}),
                total_vocab=schema.total_vocab)
    truth = os.path.join(data_dir, "truth.json")
    if os.path.exists(truth):
        with open(truth) as fh:
            t = json.load(fh)
        info["bayes_auc"] = {s: v.get("bayes_auc") for s, v in t.get("splits", {}).items() if v.get("rows")}
        info["ctr"] = {s: v.get("ctr") for s, v in t.get("splits", {}).items() if v.get("rows")}
    return info


# ==============================================================================================
# peers' virtualenv
def _tf_minor() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tf-nightly"):
        try:
            v = version(dist)
        except PackageNotFoundError:
            continue
        return ".".join(v.split(".")[:2])
    return None


def venv_python(venv: str) -> str:
    return os.path.join(venv, "Scripts" if os.name == "nt" else "bin", "python")


def ensure_peers_venv(args, log) -> dict:
    """Create / update the peers' virtualenv; returns what was installed (or why not)."""
    venv = os.path.abspath(args.peers_venv)
    tf_minor = _tf_minor()
    with_deps = list(PIP_WITH_DEPS)
    no_deps = [r.format(tf_minor=tf_minor) for r in PIP_NO_DEPS] if tf_minor else []
    info = dict(path=venv, system_site_packages=True, pip_with_deps=with_deps, pip_no_deps=no_deps,
                tensorflow_minor=tf_minor)
    if not tf_minor:
        info["note"] = "no TensorFlow installed: deepctr (TF) and tf-keras are not installed"
    py = venv_python(venv)
    marker = os.path.join(venv, ".bench-peers.json")
    want = json.dumps([with_deps, no_deps])
    if not os.path.exists(py):
        log(f"creating the peers' virtualenv {venv} (--system-site-packages)")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    _self_ignoring_dir(venv)
    have = open(marker).read() if os.path.exists(marker) else ""
    if have != want or args.reinstall_peers:
        pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        for cmd in ([*pip, *with_deps], [*pip, "--no-deps", *no_deps] if no_deps else None):
            if cmd is None:
                continue
            log("  " + " ".join(cmd[1:]))
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                info["install_error"] = (p.stderr or p.stdout)[-3000:]
                log("  pip failed:\n" + info["install_error"])
                return info
        with open(marker, "w") as fh:
            fh.write(want)
    p = subprocess.run([py, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                       capture_output=True, text=True)
    try:
        pkgs = {d["name"].lower(): d["version"] for d in json.loads(p.stdout)}
    except ValueError:
        pkgs = {}
    keep = ("deepctr", "deepctr-torch", "fuxictr", "torchfm", "tf-keras", "tf_keras", "torch", "tensorflow",
            "tensorflow-cpu", "keras", "numpy", "ray", "polars", "requests", "h5py", "scikit-learn")
    info["versions"] = {k: pkgs[k] for k in keep if k in pkgs}
    return info


def check_peers(venv: str, runners: list[str], env: dict, log) -> dict:
    p = subprocess.run([venv_python(venv), os.path.join(PEERS_DIR, "run_peer.py"), "--check", *runners],
                       capture_output=True, text=True, env=env, timeout=900)
    try:       # the last JSON line: deepctr's version-check thread may print after it
        out = last_json_line(p.stdout)
    except ValueError:
        out = None
    if out is None:
        out = {r: {"status": "error", "error": (p.stderr or p.stdout)[-2000:]} for r in runners}
    for r, v in out.items():
        log(f"  {r}: {v.get('status')} {v.get('version', '')} {v.get('error', '')}")
    return out


# ==============================================================================================
# configuration
def attention_dim(args, num_heads: int) -> int:
    """AutoInt's head size for every runner: ``--attention_dim``, by default embedding / heads.

    deepctr-torch has no head-size knob (its heads split the embedding), so only embedding / heads
    (8 at embedding 16, 2 heads) gives every peer the same attention as ours -- the benchmark's rule.
    """
    return int(args.attention_dim) if args.attention_dim else max(1, int(args.embed_size) // int(num_heads))


def model_config(name: str, args) -> dict:
    """Our config (common.configs) for ``name`` with the benchmark's overrides; peers get the same sizes."""
    from common.configs import config_to_dict, make_config, model_entry

    entry = model_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    over = {"embed_size": args.embed_size, "seed": args.seed}
    if "mlp" in fields and entry.name != "AutoInt":
        over["mlp"] = tuple(args.mlp)
    if "attention_dim" in fields:
        over["attention_dim"] = attention_dim(args, entry.config().num_heads)
    if "use_wide" in fields:     # every peer's AutoInt adds a first-order term (deepctr, deepctr-torch, torchfm)
        over["use_wide"] = True
    return config_to_dict(make_config(entry.name, **over))


def run_spec(args, model: str, cfg: dict, data_dir: str, npy_dir: str | None, vocab_sizes) -> dict:
    return dict(model=model, model_config=cfg, data_dir=data_dir, npy_dir=npy_dir, vocab_sizes=vocab_sizes,
                batch_size=args.batch_size, embed_size=cfg["embed_size"], mlp=list(cfg.get("mlp", ())),
                cross_layers=cfg.get("cross_layers", 3), cin_layers=list(cfg.get("cin_layers", (200, 200, 200))),
                cin_split_half=cfg.get("cin_split_half", True), attention_layers=cfg.get("attention_layers", 3),
                num_heads=cfg.get("num_heads", 2), attention_dim=cfg.get("attention_dim", 32), lr=args.lr,
                optimizer=args.optimizer, threads=args.threads, inter_op_threads=args.inter_op_threads,
                warmup=args.warmup, window=args.window, windows=args.windows, seed=args.seed,
                device=args.device, torch_compile=model in args.torch_compile)


# ==============================================================================================
# our child runs (``--child SPEC RESULT``): imports torch or tensorflow, never both
def _ours_torch(spec: dict) -> dict:
    from common.runtime import configure_process

    tuning = configure_process()           # what train_example_pytorch.py does first
    import torch

    torch.set_num_threads(int(spec["threads"]))
    try:
        torch.set_num_interop_threads(int(spec["inter_op_threads"]))
    except RuntimeError:
        pass
    torch.manual_seed(int(spec["seed"]))
    import zoo_torch
    from zoo_torch import data as zdata
    from zoo_torch.losses import get_loss
    from zoo_torch.optim import build_optimizer, make_optimizer_config
    from zoo_torch.step import TrainStep, predict
    from common.schema import Schema

    device = torch.device(spec["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    res = dict(runner="ours", backend="torch", model=spec["model"], library="ctr-zoo", framework="torch",
               framework_version=torch.__version__, device=str(device), optimizer=spec["optimizer"],
               lr=spec["lr"], batch_size=spec["batch_size"],
               threads=dict(intra_op_threads=torch.get_num_threads(),
                            inter_op_threads=torch.get_num_interop_threads()),
               rss_after_import_mb=_bench.current_rss_mb(), process_tuning=tuning)
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    data_dir = spec["data_dir"]
    schema = Schema.load(data_dir)
    model = zoo_torch.build_model(spec["model"], schema, **spec["model_config"]).to(device)
    opt = build_optimizer(model, make_optimizer_config(spec["optimizer"], float(spec["lr"])))
    step = TrainStep(model, opt, get_loss("BCE"), compile=bool(spec.get("torch_compile")))
    res["params"] = int(sum(p.numel() for p in model.parameters()))
    res["rss_after_build_mb"] = _bench.current_rss_mb()

    B = int(spec["batch_size"])
    # on a GPU the loader delivers batches there (page-locked copies and the row sort on a side stream)
    loader = zdata.batches(data_dir, "train", batch_size=B, shuffle=True, seed=int(spec["seed"]), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    plan = _bench.plan_windows(len(loader), spec["warmup"], spec["window"], spec["windows"])
    timer = _bench.StepTimer(plan, sync)
    loss_sum = torch.zeros((), device=device)
    on_gpu = device.type != "cpu"
    timer.begin()
    for batch in loader:
        n = batch["label"].shape[0]
        loss_sum += step(batch) * n
        timer.step_done(n)
    timer.end()
    res.update(timer.summary())
    res["plan"] = plan
    res["train_mean_loss"] = float(loss_sum) / max(1, res["train_rows"])
    fwd = step.forward
    res["torch_compile"] = bool(getattr(fwd, "active", False))
    if getattr(fwd, "reason", None):
        res["torch_compile_off"] = fwd.reason
    if on_gpu:
        res["gpu_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20

    probs, labels = predict(model, zdata.batches(data_dir, "valid", batch_size=B, shuffle=False, device=device))
    res.update(_bench.valid_metrics(labels, probs))
    return res


def _ours_tf(spec: dict) -> dict:
    from common.runtime import configure_process

    tuning = configure_process(malloc=False)   # what train_example_tensorflow.py does first
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(int(spec["threads"]))
    tf.config.threading.set_inter_op_parallelism_threads(int(spec["inter_op_threads"]))
    import zoo_tf
    from zoo_tf import data as zdata
    from zoo_tf.losses import get_loss
    from zoo_tf.optim import build_optimizer, make_optimizer_config
    from zoo_tf.step import TrainStep, predict
    from common.batching import num_batches
    from common.schema import Schema

    res = dict(runner="ours", backend="tf", model=spec["model"], library="ctr-zoo", framework="tensorflow",
               framework_version=tf.__version__, device="cpu", optimizer=spec["optimizer"], lr=spec["lr"],
               batch_size=spec["batch_size"],
               threads=dict(intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
                            inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads()),
               rss_after_import_mb=_bench.current_rss_mb(), process_tuning=tuning)
    data_dir = spec["data_dir"]
    schema = Schema.load(data_dir)
    model = zoo_tf.build_model(spec["model"], schema, **spec["model_config"])
    opt = build_optimizer(model, make_optimizer_config(spec["optimizer"], float(spec["lr"])))
    step = TrainStep(model, opt, get_loss("BCE"))
    res["params"] = int(zoo_tf.count_params(model))
    res["rss_after_build_mb"] = _bench.current_rss_mb()

    B = int(spec["batch_size"])
    ds = zdata.batches(data_dir, "train", batch_size=B, shuffle=True, seed=int(spec["seed"]),
                        row_plan=True)
    last = [None]

    def sync():
        if last[0] is not None:
            last[0].numpy()

    plan = _bench.plan_windows(num_batches(schema.splits["train"], B, False), spec["warmup"], spec["window"],
                               spec["windows"])
    timer = _bench.StepTimer(plan, sync)
    loss_sum = 0.0
    losses = []
    timer.begin()
    for batch in ds:
        loss = step(batch)
        last[0] = loss
        n = int(batch["label"].shape[0])
        losses.append((loss, n))
        timer.step_done(n)
    timer.end()
    for loss, n in losses:
        loss_sum += float(loss) * n
    res.update(timer.summary())
    res["plan"] = plan
    res["train_mean_loss"] = loss_sum / max(1, res["train_rows"])
    probs, labels = predict(model, zdata.batches(data_dir, "valid", batch_size=B, shuffle=False))
    res.update(_bench.valid_metrics(labels, probs))
    return res


def child_main(spec_path: str, result_path: str) -> int:
    def main(spec):
        return _ours_torch(spec) if spec["backend"] == "torch" else _ours_tf(spec)

    return _bench.run_child(main, spec_path, result_path)


# ==============================================================================================
# orchestration
# The process settings our entry points apply (common.runtime.configure_process), as environment
# variables so that a peer's process can get exactly the same: OpenMP threads sleep when idle, and
# glibc malloc serves blocks up to 256 MiB from its (reused) heap instead of fresh mmaps.
# A TensorFlow process gets only the OpenMP setting, as train_example_tensorflow.py does.
def tuning_env(tuned: bool, framework: str = "torch") -> dict:
    from common.runtime import MMAP_THRESHOLD, TRIM_THRESHOLD, TUNE_ENV

    if not tuned:
        return {TUNE_ENV: "0"}
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    if framework == "torch":
        env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
    return env


def child_env(extra: dict | None = None, drop=(), tuned: bool | None = None, framework: str = "torch") -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    for k in drop:
        env.pop(k, None)
    if tuned is not None:
        for k in ("OMP_WAIT_POLICY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            env.pop(k, None)
        env.update(tuning_env(tuned, framework))
    env.update(extra or {})
    return env


def run_one(cmd: list[str], spec: dict, env: dict, timeout: float, workdir: str, tag: str) -> dict:
    spec_path = os.path.join(workdir, f"{tag}.spec.json")
    result_path = os.path.join(workdir, f"{tag}.result.json")
    log_path = os.path.join(workdir, f"{tag}.log")
    with open(spec_path, "w") as fh:
        json.dump(spec, fh, indent=2)
    t0 = time.perf_counter()
    cpu0 = cpu_times()
    try:
        with open(log_path, "w") as logf:
            p = subprocess.run([*cmd, spec_path, result_path], stdout=logf, stderr=subprocess.STDOUT, env=env,
                               timeout=timeout, cwd=ROOT)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    res = {}
    if os.path.exists(result_path):
        with open(result_path) as fh:
            res = json.load(fh)
    if rc == "timeout":
        res.update(status="error", error=f"timed out after {timeout:.0f}s (--timeout)")
    elif not res:
        res = dict(status="error", error=f"child exited with {rc} and wrote no result")
    if res.get("status") != "ok":
        with open(log_path, errors="replace") as fh:
            res["log_tail"] = fh.read()[-3000:]
    res["process_seconds"] = time.perf_counter() - t0
    res["cpu_steal_pct"] = steal_pct(cpu0, cpu_times())
    return res


def cpu_times() -> list[int] | None:
    """The machine's aggregate CPU counters (/proc/stat ``cpu`` line, jiffies), or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            return [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_pct(before, after) -> float | None:
    """Percent of CPU time the hypervisor gave to other guests between two :func:`cpu_times` readings
    (``steal``, the 8th counter): a virtual machine's timings are only comparable when it is low."""
    if not before or not after or len(before) < 8 or len(after) < 8:
        return None
    total = sum(after[:8]) - sum(before[:8])
    return round(100.0 * (after[7] - before[7]) / total, 1) if total > 0 else None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info = dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count(),
                load_average_start=load_average())
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache", "Flags"):
                v = v.strip()
                if k.strip() == "Flags":
                    v = " ".join(f for f in v.split() if f.startswith("avx") or f in ("fma", "amx_tile"))
                info["lscpu_" + k.strip().lower().replace(" ", "_").replace("(", "").replace(")", "")] = v
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    info["mem_total_gib"] = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    for dist in ("torch", "tensorflow", "tensorflow-cpu", "numpy", "lmdb"):
        try:
            info[f"{dist}_version"] = version(dist)
        except PackageNotFoundError:
            pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT)
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return info


COMPILED_BY_DEFAULT = ("DeepFM",)     # --torch_compile's default: where compiling measured faster


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma list (default: %(default)s)")
    ap.add_argument("--backends", default="torch,tf",
                    help="our backends: torch,tf or none (default: %(default)s)")
    ap.add_argument("--peers", default="all",
                    help="all | none | comma list of " + ",".join(PEERS) + " (default: %(default)s)")
    ap.add_argument("--rows", type=int, default=None, help="training rows (default 400000; cuda 2000000)")
    ap.add_argument("--valid_rows", type=int, default=None, help="validation rows (default 50000)")
    ap.add_argument("--fields", type=int, default=39, help="categorical fields (default: %(default)s)")
    ap.add_argument("--vocab", type=int, default=100_000, help="ids per field (default: %(default)s)")
    ap.add_argument("--batch_size", type=int, default=None, help="default 4096 (cpu), 8192 (cuda)")
    ap.add_argument("--embed_size", type=int, default=16)
    ap.add_argument("--mlp", default="400,400,400", help="hidden sizes of DeepFM/DCN/xDeepFM (default: %(default)s)")
    ap.add_argument("--attention_dim", type=int, default=None,
                    help="AutoInt: size of each attention head for every runner (default: embed_size / heads, "
                         "8 -- deepctr-torch has no such knob, its heads split the embedding, so that is the "
                         "size at which every runner does the same work; our model's own default is 32)")
    ap.add_argument("--optimizer", default="LazyAdam", help="our optimiser (peers: their Adam)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--torch_compile", default=None,
                    help="our PyTorch runs of these models train under torch.compile (TrainStep(compile=True)): "
                         "comma list, 'all' or 'none' (default: DeepFM when --models runs it -- where it measured faster on "
                         "this machine: DeepFM +5-6 %%, DCN +2 %%, AutoInt -28 %%).  CPU only; the first "
                         "compiled step (10-30 s) falls in the warm-up")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for every runner")
    ap.add_argument("--inter_op_threads", type=int, default=2, help="inter-op threads for every runner")
    ap.add_argument("--process_tuning", default="all", choices=("all", "ours", "none"),
                    help="the process settings of our entry points (OMP_WAIT_POLICY=PASSIVE, glibc malloc "
                         "thresholds; common/runtime.py) for every runner (all: default, the fair comparison), "
                         "only for ours, or for nobody")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10; quick 3)")
    ap.add_argument("--window", type=int, default=None, help="steps per timed window (default 16, cuda 40; quick 6)")
    ap.add_argument("--windows", type=int, default=None, help="timed windows (default 5; quick 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="120k train / 20k valid rows, 3 warm-up steps, 3 windows of 6 steps")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "train_speed.json"))
    ap.add_argument("--data_dir", default="", help="dataset directory (default: benchmarks/.data/<key>)")
    ap.add_argument("--peers_venv", default=os.path.join(HERE, ".venv-peers"))
    ap.add_argument("--reinstall_peers", action="store_true", help="re-run pip in the peers' virtualenv")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run (default: %(default)s)")
    ap.add_argument("--no_progress", action="store_true")
    ap.add_argument("--note", default="", help="a line of text put at the top of the report")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return args
    cuda = args.device == "cuda"
    q = args.quick
    args.rows = args.rows or (120_000 if q else (2_000_000 if cuda else 400_000))
    args.valid_rows = args.valid_rows or (20_000 if q else 50_000)
    args.batch_size = args.batch_size or (8192 if cuda else 4096)
    args.warmup = args.warmup if args.warmup is not None else (3 if q else 10)
    args.window = args.window or (6 if q else (40 if cuda else 16))
    args.windows = args.windows or (3 if q else 5)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.backends = [] if args.backends.strip() in ("none", "") else \
        [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = sorted(set(args.backends) - set(BACKENDS))
    if bad:
        ap.error(f"unknown backend(s) {bad}; choose from {BACKENDS}")
    if args.peers == "all":
        args.peers = list(PEERS)
    elif args.peers in ("none", ""):
        args.peers = []
    else:
        args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
        bad = sorted(set(args.peers) - set(PEERS))
        if bad:
            ap.error(f"unknown peer(s) {bad}; choose from {', '.join(PEERS)}")
    if cuda:   # the GPU run measures our PyTorch side only
        args.backends, args.peers = ["torch"], []
    tc = args.torch_compile.strip() if args.torch_compile is not None else \
        ",".join(m for m in args.models if m in COMPILED_BY_DEFAULT)
    args.torch_compile = [] if cuda or tc in ("none", "") else \
        (list(args.models) if tc == "all" else [m.strip() for m in tc.split(",") if m.strip()])
    bad = sorted(set(args.torch_compile) - set(args.models))
    if bad:
        ap.error(f"--torch_compile names {bad}, which --models does not run ({', '.join(args.models)})")
    args.mlp = [int(x) for x in args.mlp.split(",") if x.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child)

    def log(msg):
        print(f"[train_speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    from common.configs import model_entry

    models = [model_entry(m).name for m in args.models]
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    data_dir = ensure_dataset(args, log)
    ds_info = dataset_info(data_dir)
    with open(os.path.join(data_dir, "schema.json")) as fh:
        vocab_sizes = [f["vocab_size"] for f in json.load(fh)["fields"] if f["kind"] == "categorical"]

    peers_env, peer_checks, npy_dir = None, {}, None
    wanted_peers = [p for p in args.peers if any(m in PEER_MODELS[p] for m in models)]
    if wanted_peers:
        npy_dir = export_numpy(data_dir, log)
        peers_env = ensure_peers_venv(args, log)
        if "install_error" in peers_env:
            peer_checks = {p: {"status": "error", "error": "pip install failed (see peers_env.install_error)"}
                           for p in wanted_peers}
        else:
            log("checking the peers import")
            peer_checks = check_peers(peers_env["path"], wanted_peers, child_env({"TF_USE_LEGACY_KERAS": "1"}), log)

    autoint = model_config("AutoInt", args)         # what every runner's AutoInt is configured with
    settings = dict(models=models, backends=args.backends, peers=args.peers, rows=args.rows,
                    valid_rows=args.valid_rows, fields=args.fields, vocab=args.vocab, batch_size=args.batch_size,
                    embed_size=args.embed_size, mlp=args.mlp,
                    attention_dim=autoint["attention_dim"], autoint_use_wide=autoint["use_wide"],
                    optimizer=args.optimizer, peer_optimizer="Adam",
                    lr=args.lr, device=args.device, threads=args.threads, inter_op_threads=args.inter_op_threads,
                    torch_compile=args.torch_compile,
                    warmup=args.warmup, window=args.window, windows=args.windows, seed=args.seed, quick=args.quick,
                    process_tuning=args.process_tuning,
                    process_tuning_env={"torch": tuning_env(True, "torch"),
                                        "tensorflow": tuning_env(True, "tensorflow")},
                    auc_after="one epoch over the training split (every runner sees the same rows)",
                    ours_data_path="LMDB store via zoo_torch.data.batches / zoo_tf.data.batches (shuffle=True)",
                    peers_data_path="in-memory numpy arrays exported from the same store (stored order)")
    runs = []
    workdir = tempfile.mkdtemp(prefix="train_speed-")
    try:
        for model in models:
            cfg = model_config(model, args)
            base = run_spec(args, model, cfg, data_dir, npy_dir, vocab_sizes)
            for backend in args.backends:
                spec = dict(base, runner="ours", backend=backend)
                tag = f"{model}-ours-{backend}"
                log(f"{model}: ours ({backend}, {args.device}) ...")
                env = child_env(drop=("TF_USE_LEGACY_KERAS",), tuned=args.process_tuning != "none",
                                framework="torch" if backend == "torch" else "tensorflow")
                res = run_one([sys.executable, os.path.abspath(__file__), "--child"], spec, env, args.timeout,
                              workdir, tag)
                label = f"ours ({backend}, compiled)" if res.get("torch_compile") else f"ours ({backend})"
                res.update(runner="ours", backend=backend, model=model, label=label)
                runs.append(res)
                log(_one_line(res))
            for peer in args.peers:
                display, framework, _req = PEERS[peer]
                rec = dict(runner=peer, model=model, label=display, framework=framework)
                if model not in PEER_MODELS[peer]:
                    runs.append(dict(rec, status="n/a", error=f"{display} does not have {model}"))
                    continue
                chk = peer_checks.get(peer, {})
                if chk.get("status") != "ok":
                    runs.append(dict(rec, status="error", error=f"peer unavailable: {chk.get('error', '?')}"))
                    continue
                log(f"{model}: {display} ...")
                spec = dict(base, runner=peer)
                extra = {"TF_USE_LEGACY_KERAS": "1"} if peer == "deepctr_tf" else {}
                res = run_one([venv_python(peers_env["path"]), os.path.join(PEERS_DIR, "run_peer.py")], spec,
                              child_env(extra, tuned=args.process_tuning == "all", framework=framework), args.timeout,
                              workdir,
                              f"{model}-{peer}")
                res.update(rec)
                runs.append(res)
                log(_one_line(res))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    machine["load_average_end"] = load_average()
    summary, targets = summarise(runs, models, args)
    report = dict(benchmark="train_speed", created=started, command=" ".join(["python", *sys.argv]), note=args.note,
                  settings=settings, machine=machine, dataset=ds_info, peers_env=peers_env, peer_checks=peer_checks,
                  runs=runs, summary=summary, targets=targets)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2, default=_bench._json_default)
    md_path = os.path.splitext(args.out)[0] + ".md"
    with open(md_path, "w") as fh:
        fh.write(markdown(report))
    log(f"wrote {args.out} and {md_path}")
    print(markdown_table(report))
    return 0


def _one_line(r: dict) -> str:
    if r.get("status") != "ok":
        return f"  -> {r.get('status')}: {r.get('error', '')}"
    return (f"  -> {r['rows_per_s']:,.0f} rows/s (windows {r['rows_per_s_min']:,.0f}-{r['rows_per_s_max']:,.0f}), "
            f"AUC {r['valid_auc']:.4f}, peak RSS {r['peak_rss_mb']:,.0f} MB, {r.get('process_seconds', 0):.0f}s")


# ==============================================================================================
# summary + targets
def summarise(runs: list[dict], models: list[str], args):
    ok = [r for r in runs if r.get("status") == "ok"]
    summary, targets = {}, []
    for model in models:
        peers = [r for r in ok if r["model"] == model and r["runner"] != "ours"]
        ours = [r for r in ok if r["model"] == model and r["runner"] == "ours"]
        fastest = max(peers, key=lambda r: r["rows_per_s"]) if peers else None
        best_auc = max((r["valid_auc"] for r in peers), default=None)
        s = dict(fastest_peer=fastest["label"] if fastest else None,
                 fastest_peer_rows_per_s=fastest["rows_per_s"] if fastest else None,
                 fastest_peer_peak_rss_mb=fastest["peak_rss_mb"] if fastest else None,
                 best_peer_auc=best_auc)
        summary[model] = s
        for r in runs:
            if r["model"] == model and r.get("status") == "ok" and fastest:
                r["ratio_to_fastest_peer"] = r["rows_per_s"] / fastest["rows_per_s"]
        for r in ours:
            be = r["backend"]
            who = f"{model} ours ({be}, {r.get('device', 'cpu')})"
            if args.device == "cuda":
                if model == "DeepFM":
                    t = TARGETS["cuda_deepfm_rows_per_s"]
                    targets.append(_target(f"{who} rows/s >= {t:,} (batch {args.batch_size})", r["rows_per_s"] >= t,
                                           r["rows_per_s"]))
                continue
            if model == "DeepFM":
                t = TARGETS[f"deepfm_{be}_rows_per_s"]
                targets.append(_target(f"{who} rows/s >= {t:,}", r["rows_per_s"] >= t, r["rows_per_s"]))
            ratio = TARGETS["deepfm_ratio"] if model == "DeepFM" else TARGETS["other_ratio"]
            if fastest:
                targets.append(_target(f"{who} >= {ratio:g}x fastest peer ({fastest['label']})",
                                       r["ratio_to_fastest_peer"] >= ratio, r["ratio_to_fastest_peer"]))
                targets.append(_target(f"{who} peak RSS <= fastest peer's ({fastest['peak_rss_mb']:,.0f} MB)",
                                       r["peak_rss_mb"] <= fastest["peak_rss_mb"], r["peak_rss_mb"]))
            if best_auc is not None:
                m = TARGETS["auc_margin"]
                targets.append(_target(f"{who} valid AUC >= best peer's - {m} ({best_auc - m:.4f})",
                                       r["valid_auc"] >= best_auc - m, r["valid_auc"]))
    return summary, targets


def _target(what: str, passed: bool, value) -> dict:
    return dict(target=what, passed=bool(passed), value=value)


# ==============================================================================================
# Markdown
def _fmt(x, spec=",.0f", none="-"):
    if x is None or (isinstance(x, float) and x != x):
        return none
    return format(x, spec)


def markdown_table(report: dict) -> str:
    lines = ["| model | runner | version | rows/s (median) | windows min-max | x fastest peer | valid AUC "
             "| valid logloss | peak RSS MB | RSS after import MB | CPU steal % | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["runs"]:
        ver = r.get("library_version") or ""
        if r["runner"] == "ours":
            ver = f"{r.get('framework', '')} {r.get('framework_version', '')}".strip()
            if r.get("device", "cpu") != "cpu":
                ver += f" / {r.get('gpu', r.get('device'))}"
        status = r.get("status", "?")
        if status != "ok":
            status = f"{status}: {str(r.get('error', ''))[:160]}".replace("|", "/").replace("\n", " ")
        elif r.get("incomplete"):
            status = "ok (" + r["incomplete"] + ")"
        if r.get("config_note"):
            status += f" -- {r['config_note']}"
        rng = (f"{_fmt(r.get('rows_per_s_min'))}-{_fmt(r.get('rows_per_s_max'))}"
               if r.get("rows_per_s_min") is not None else "-")
        lines.append(
            f"| {r['model']} | {r.get('label', r['runner'])} | {ver} | {_fmt(r.get('rows_per_s'))} "
            f"| {rng} "
            f"| {_fmt(r.get('ratio_to_fastest_peer'), '.2f')} | {_fmt(r.get('valid_auc'), '.4f')} "
            f"| {_fmt(r.get('valid_logloss'), '.4f')} | {_fmt(r.get('peak_rss_mb'))} "
            f"| {_fmt(r.get('rss_after_import_mb'))} | {_fmt(r.get('cpu_steal_pct'), '.1f')} | {status} |")
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    s, m, d = report["settings"], report["machine"], report["dataset"]
    recorded = s.get("process_tuning_env") or {}
    tuned_envs = "; ".join(f"{name} processes: " + ", ".join(f"{k}={v}" for k, v in (recorded.get(fw) or {}).items())
                           for name, fw in (("PyTorch", "torch"), ("TensorFlow", "tensorflow")))
    out = ["# Training speed (benchmarks/train_speed.py)", ""]
    if report.get("note"):
        out += [report["note"], ""]
    if s.get("quick"):
        out += ["**Quick mode** (smaller data, fewer windows): a smoke test, not the reference measurement.", ""]
    out += [f"- Command: `{report['command']}`",
            f"- Date: {report['created']}; commit {m.get('git_commit', '?')}",
            f"- Machine: {m.get('lscpu_model_name', '?')}, {m.get('cpus')} CPUs, {m.get('mem_total_gib', '?')} GiB; "
            f"load average at start {m.get('load_average_start')}, at end {m.get('load_average_end')}",
            f"- Software: Python {m.get('python')}, torch {m.get('torch_version', '-')}, "
            f"TensorFlow {m.get('tensorflow_version', m.get('tensorflow-cpu_version', '-'))}, "
            f"numpy {m.get('numpy_version', '-')}",
            f"- Data: {d.get('categorical_fields')} categorical fields x vocab {d.get('vocab_sizes')}, "
            f"{d['splits'].get('train'):,} train / {d['splits'].get('valid'):,} valid rows"
            + (f"; Bayes-optimal valid AUC {d['bayes_auc'].get('valid'):.4f}" if d.get("bayes_auc", {}).get("valid")
               else ""),
            f"- Config: batch {s['batch_size']}, embedding {s['embed_size']}, MLP {s['mlp']} (AutoInt: attention"
            f"{' + first-order term' if s['autoint_use_wide'] else ' only'}, head size {s['attention_dim']}), "
            f"lr {s['lr']}, ours {s['optimizer']} / peers Adam, no L2, no dropout, device {s['device']}",
            f"- Threads: {s['threads']} intra-op, {s['inter_op_threads']} inter-op for every runner",
            "- Our PyTorch runs under torch.compile (`--torch_compile`, label \"compiled\"): "
            + (", ".join(s.get("torch_compile") or []) or "none"),
            "- Process settings (`--process_tuning " + str(s.get("process_tuning", "none")) + "`): "
            + {"all": "every runner, peers included, runs with our entry points' settings "
                      f"(common/runtime.py; {tuned_envs})",
               "ours": "only our runs get our entry points' settings (common/runtime.py); peers run with "
                       "the system defaults",
               "none": "nobody gets them (system defaults)"}.get(s.get("process_tuning", "none"), "?"),
            "- CPU steal %: share of the machine's CPU time the hypervisor gave to other guests during the "
            "run (/proc/stat); timings taken with a high steal are low and noisy",
            f"- Timing: one epoch; rows/s = median of {s['windows']} windows x {s['window']} steps after "
            f"{s['warmup']} warm-up steps (data feeding included); AUC after {s['auc_after']}",
            f"- Ours read {s['ours_data_path']}; peers read {s['peers_data_path']}",
            ""]
    pe = report.get("peers_env")
    if pe:
        vers = ", ".join(f"{k} {v}" for k, v in sorted((pe.get("versions") or {}).items()))
        out += [f"- Peers' virtualenv: `{pe['path']}` (system site packages); {vers}", ""]
    la, cpus = m.get("load_average_start"), m.get("cpus") or 1
    if la and max(la[0], (m.get("load_average_end") or [0])[0]) > 0.5 * cpus:
        out += [f"**The machine was busy** (load average {la[0]} at start, "
                f"{(m.get('load_average_end') or ['?'])[0]} at end, on {cpus} CPUs): these timings are noisy "
                "and lower than on an idle machine; do not quote them as reference figures.", ""]
    out += ["## Results", "", markdown_table(report)]
    if report.get("targets"):
        out += ["## Targets (issue 5)", "", "| target | value | pass |", "|---|---:|---|"]
        for t in report["targets"]:
            v = t["value"]
            vs = _fmt(v, ".4f") if isinstance(v, float) and v < 10 else _fmt(v)
            out.append(f"| {t['target']} | {vs} | {'PASS' if t['passed'] else 'FAIL'} |")
        out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
