"""Backend-free training machinery shared by ``zoo_torch.trainer`` and ``zoo_tf.trainer``.

The training loop itself lives here (:func:`run_training`); a backend supplies
the math through the small :class:`Backend` interface (one train step, an
evaluation, its state as numpy arrays).  Both entry points therefore behave
identically: same schedule of evaluations and checkpoints, same early
stopping / learning-rate decay, same output files.

Files in ``--model_save_dir``::

    ckpt-<step:09d>.npz   resume checkpoints (the newest ``keep`` are kept), written atomically:
                          weights, optimiser state, RNG states, data position, trainer state
    best.npz              weights of the best validation AUC so far (+ model name / config)
    metrics.json          flags, evaluation history, best and test metrics, the result line
    tensorboard/          TensorBoard scalars (train loss, valid AUC / logloss, rows/s, lr)

A checkpoint is one ``.npz`` (no pickle): arrays under ``w/<weight>``,
``opt/...``, ``rng/...`` plus ``__meta__``, a JSON document (uint8 array).
``best.npz`` uses the same layout with weights only, so its weights can be
loaded by either backend (canonical names are shared).

Resume: restarting the same command finds the newest readable checkpoint whose
run fingerprint (model, its config, dataset, batch size, world size,
optimiser, loss, seed, backend) matches and continues from the exact data
position with the saved optimiser and RNG states, so the final weights equal
those of an uninterrupted run.  A checkpoint of a *different* run is an error
(``--noresume`` starts over).  Rerunning a *finished* run trains nothing and
reports its result again (a larger ``--epochs`` continues it).
"""
from __future__ import annotations

from common.batching import prefetch  # noqa: F401  (re-exported for the trainers)
import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import random
import re
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from common.errors import FlagError
from common.io import atomic_write_bytes, atomic_write_text

CHECKPOINT_PREFIX = "ckpt-"
CHECKPOINT_SUFFIX = ".npz"
BEST_FILE = "best.npz"
METRICS_FILE = "metrics.json"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_FORMAT = "ctr-zoo-checkpoint"
CHECKPOINT_VERSION = 1
BACKEND_NAMES = ("pytorch", "tensorflow")


# ----------------------------------------------------------------------------------------------
# validated arguments
@dataclass
class TrainArgs:
    """Everything a trainer needs (what ``common.flags.parse_args`` produces from the command line)."""

    model: str = "DeepFM"
    data: str = ""
    model_config: dict = field(default_factory=dict)   # overrides passed to build_model (seed included)
    epochs: int = 10
    batch_size: int = 4096
    optimizer: str = "Adam"
    optimizer_options: dict = field(default_factory=dict)
    loss: str = "BCE"
    lr: float = 1e-3
    gpu_ids: list = field(default_factory=list)
    model_save_dir: str = ""
    seed: int = 0
    patience: int = 2
    eval_every: int = 0
    checkpoint_every: int = 500
    cpu_replicas: int = 0
    max_steps: int = 0
    lr_decay_factor: float = 0.5
    lr_decay_patience: int = 1
    min_lr: float = 1e-6
    keep_checkpoints: int = 2
    eval_batch_size: int = 0
    resume: bool = True
    progress: bool = True
    export: list = field(default_factory=list)
    threads: int = 0
    compile: bool = False             # PyTorch: train under torch.compile (zoo_torch.step.CompiledForward)
    search: dict | None = None        # common.search_flags.SearchArgs.to_dict() for --search_loss / --search_arch

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


def default_save_dir(model: str, backend: str) -> str:
    return os.path.join(".", "checkpoints", model, backend)


# ----------------------------------------------------------------------------------------------
# early stopping + learning-rate decay on plateau
class Plateau:
    """Early stopping on a metric that should grow (validation AUC) and LR decay on plateau.

    ``update(metric)`` after every evaluation returns ``(improved, new_lr or None, stop)``:

    - improved: ``metric > best + min_delta`` (the first evaluation always improves);
    - after ``lr_patience`` consecutive evaluations without improvement the learning
      rate is multiplied by ``factor`` (floored at ``min_lr``; ``factor >= 1`` or
      ``lr_patience == 0`` disables decay), and the decay counter restarts;
    - after ``patience`` evaluations without improvement ``stop`` is True
      (``patience == 0`` disables early stopping).

    A NaN metric never improves.  The state is a JSON-able dict (``state_dict``).
    """

    def __init__(self, lr: float, patience: int = 2, factor: float = 0.5, lr_patience: int = 1,
                 min_lr: float = 0.0, min_delta: float = 0.0):
        self.patience, self.factor, self.lr_patience = int(patience), float(factor), int(lr_patience)
        self.min_lr, self.min_delta = float(min_lr), float(min_delta)
        self.lr = float(lr)
        self.best = -math.inf
        self.best_step = -1
        self.bad = 0            # evaluations since the last improvement
        self.bad_since_decay = 0
        self.stopped = False

    def update(self, metric: float, step: int = -1):
        metric = float(metric)
        improved = not math.isnan(metric) and metric > self.best + self.min_delta
        new_lr = None
        if improved:
            self.best, self.best_step = metric, int(step)
            self.bad = self.bad_since_decay = 0
        else:
            self.bad += 1
            self.bad_since_decay += 1
            if self.lr_patience > 0 and self.factor < 1.0 and self.bad_since_decay >= self.lr_patience:
                lr = max(self.lr * self.factor, self.min_lr)
                self.bad_since_decay = 0
                if lr < self.lr:
                    self.lr = new_lr = lr
            if self.patience > 0 and self.bad >= self.patience:
                self.stopped = True
        return improved, new_lr, self.stopped

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": None if self.best == -math.inf else self.best, "best_step": self.best_step,
                "bad": self.bad, "bad_since_decay": self.bad_since_decay, "stopped": self.stopped}

    def load_state_dict(self, d: dict) -> None:
        self.lr = float(d["lr"])
        self.best = -math.inf if d["best"] is None else float(d["best"])
        self.best_step = int(d["best_step"])
        self.bad, self.bad_since_decay = int(d["bad"]), int(d["bad_since_decay"])
        self.stopped = bool(d["stopped"])


# ----------------------------------------------------------------------------------------------
# checkpoint files
def checkpoint_path(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"{CHECKPOINT_PREFIX}{int(step):09d}{CHECKPOINT_SUFFIX}")


def list_checkpoints(save_dir: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the resume checkpoints in ``save_dir``, oldest first."""
    out = []
    pat = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(\d+)" + re.escape(CHECKPOINT_SUFFIX) + "$")
    for p in glob.glob(os.path.join(glob.escape(save_dir), f"{CHECKPOINT_PREFIX}*{CHECKPOINT_SUFFIX}")):
        m = pat.match(os.path.basename(p))
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune_checkpoints(save_dir: str, keep: int) -> None:
    ck = list_checkpoints(save_dir)
    for _, p in ck[:max(len(ck) - max(int(keep), 1), 0)]:
        try:
            os.unlink(p)
        except OSError:
            pass


def remove_checkpoints(save_dir: str) -> None:
    for _, p in list_checkpoints(save_dir):
        try:
            os.unlink(p)
        except OSError:
            pass


def _json_array(obj) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, sort_keys=True).encode("utf-8"), dtype=np.uint8)


def encode_checkpoint(arrays: dict[str, np.ndarray], meta: dict) -> bytes:
    """One ``.npz`` holding ``arrays`` and ``meta`` (JSON) -- no pickled objects."""
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    if "__meta__" in payload:
        raise ValueError("'__meta__' is reserved")
    payload["__meta__"] = _json_array({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **meta})
    buf = io.BytesIO()
    np.savez(buf, **payload)
    return buf.getvalue()


def write_checkpoint(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write a checkpoint atomically (temporary file + rename: it is complete or absent)."""
    atomic_write_bytes(path, encode_checkpoint(arrays, meta))


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, meta)`` of a checkpoint; ValueError if it is not one of ours or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile.BadZipFile, OSError, ValueError ...
        raise ValueError(f"{path}: unreadable checkpoint ({exc})") from None
    raw = arrays.pop("__meta__", None)
    try:
        meta = json.loads(bytes(raw).decode("utf-8")) if raw is not None else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a ctr-zoo checkpoint")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {meta.get('version')} is not supported")
    return arrays, meta


def split_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """``{name: array}`` of the arrays stored as ``prefix + name``."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def with_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {prefix + k: v for k, v in arrays.items()}


def save_weights(path: str, weights: dict[str, np.ndarray], meta: dict) -> None:
    """Weights-only checkpoint (``best.npz``), loadable by either backend."""
    write_checkpoint(path, with_prefix(weights, "w/"), {"kind": "weights", **meta})


def load_weights(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """``(weights, meta)`` of any checkpoint (weights-only or a resume checkpoint)."""
    arrays, meta = read_checkpoint(path)
    return split_prefix(arrays, "w/"), meta


# ----------------------------------------------------------------------------------------------
# RNG states (numpy / python) as arrays
def host_rng_arrays() -> dict[str, np.ndarray]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, pstate, gauss = random.getstate()
    return {"rng/numpy_keys": np.asarray(keys, np.uint32),
            "rng/numpy_pos": np.asarray([pos, has_gauss], np.int64),
            "rng/numpy_cached": np.asarray([cached], np.float64),
            "rng/python_state": np.asarray(pstate, np.int64),
            "rng/python_extra": np.asarray([version, 0 if gauss is None else 1,
                                            0 if gauss is None else struct.unpack("<q", struct.pack("<d", gauss))[0]],
                                           np.int64)}


def restore_host_rng(arrays: dict[str, np.ndarray]) -> None:
    if "rng/numpy_keys" in arrays:
        pos, has_gauss = (int(x) for x in arrays["rng/numpy_pos"])
        np.random.set_state(("MT19937", arrays["rng/numpy_keys"].astype(np.uint32), pos, has_gauss,
                             float(arrays["rng/numpy_cached"][0])))
    if "rng/python_state" in arrays:
        version, has_gauss, g = (int(x) for x in arrays["rng/python_extra"])
        gauss = struct.unpack("<d", struct.pack("<q", g))[0] if has_gauss else None
        random.setstate((version, tuple(int(x) for x in arrays["rng/python_state"]), gauss))


def seed_host_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(int(seed) & 0xFFFFFFFF)


# ----------------------------------------------------------------------------------------------
# TensorBoard scalars without TensorFlow
class ScalarWriter:
    """Writes TensorBoard scalar events (``events.out.tfevents.*``) with no TensorFlow/torch import.

    Uses only the ``tensorboard`` package's protobufs and its CRC helper (importing
    ``tensorboard.summary.writer`` or ``torch.utils.tensorboard`` would import
    TensorFlow).  Without the ``tensorboard`` package it silently does nothing.
    """

    def __init__(self, logdir: str):
        self.logdir = logdir
        self._fh = None
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
        except Exception:  # pragma: no cover - tensorboard missing
            return
        self._event_pb2, self._summary_pb2, self._crc = event_pb2, summary_pb2, masked_crc32c
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0"
        self.path = os.path.join(logdir, name)
        self._fh = open(self.path, "ab")
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._fh.write(header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._fh is None:
            return
        vals = [self._summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                for k, v in values.items() if v is not None and math.isfinite(float(v))]
        if vals:
            self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                              summary=self._summary_pb2.Summary(value=vals)))
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the event files under ``logdir`` (for tests and reports): tag -> [(step, value)]."""
    from tensorboard.compat.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for p in sorted(glob.glob(os.path.join(glob.escape(logdir), "events.out.tfevents.*"))):
        with open(p, "rb") as fh:
            data = fh.read()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            body = data[pos + 12:pos + 12 + n]
            pos += 12 + n + 4
            ev = event_pb2.Event.FromString(body)
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out


# ----------------------------------------------------------------------------------------------
# run description
def run_fingerprint(args: TrainArgs, backend: str, schema_hash: str, world_size: int) -> dict:
    """What must be equal for a checkpoint to be resumed by this run."""
    return {"backend": backend, "model": args.model, "model_config": _jsonable(args.model_config),
            "data": os.path.abspath(args.data), "schema": schema_hash, "batch_size": int(args.batch_size),
            "world_size": int(world_size), "optimizer": args.optimizer,
            "optimizer_options": _jsonable(args.optimizer_options), "lr": float(args.lr), "loss": args.loss,
            "seed": int(args.seed)}


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(x):
    return json.loads(json.dumps(x, sort_keys=True, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def read_truth(dataset_dir: str) -> dict | None:
    """Per-split Bayes-optimal metrics of a synthetic dataset (``truth.json``), or None."""
    p = os.path.join(dataset_dir, "truth.json")
    if not os.path.exists(p):
        return None
    try:
        with open(p) as fh:
            t = json.load(fh)
        return t.get("splits") or None
    except (OSError, ValueError):
        return None


def result_line(result: dict) -> str:
    """The final stdout line: one JSON object (NaN/inf written as null)."""
    return json.dumps(_clean_nan(result))


def write_json(path: str, obj: dict) -> None:
    """Atomically write ``obj`` as indented JSON (NaN/inf as null)."""
    atomic_write_text(path, json.dumps(_clean_nan(obj), indent=2) + "\n")


def _clean_nan(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean_nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean_nan(x) for x in v]
    return v


# ----------------------------------------------------------------------------------------------
# the backend interface
class Backend:
    """What a framework must provide to :func:`run_training` (see zoo_torch/trainer.py, zoo_tf/trainer.py).

    ``world_size`` is the number of data shards (replicas) the global batch is
    split over; ``is_chief`` is the one process that writes files.
    """

    name = "backend"
    devices = "cpu"           # where this process trains, in words (the result line's "device")
    is_chief = True
    can_broadcast = False     # True: broadcast() sends the chief's object to every process
    world_size = 1
    schema = None

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def train_batches(self, epoch: int, start_batch: int) -> Iterable:
        """Items for :meth:`train_step`, one per global batch of the epoch, from batch ``start_batch``."""
        raise NotImplementedError

    def train_step(self, item):
        """One optimisation step; returns the batch's mean loss (a tensor is fine: see :meth:`to_floats`)."""
        raise NotImplementedError

    def item_rows(self, item) -> int:
        """Rows of the GLOBAL batch this item belongs to."""
        raise NotImplementedError

    def to_floats(self, losses: list) -> list[float]:
        """Convert returned losses to floats (waits for the device)."""
        return [float(x) for x in losses]

    def evaluate(self, split: str, collective: bool = True) -> dict:
        """``{"auc", "logloss", "rows"}`` on a split.  With ``collective`` every process calls it and
        gets the same answer; otherwise only the chief calls it."""
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        raise NotImplementedError

    def get_weights(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything to resume exactly (weights ``w/``, optimiser ``opt/``, RNG ``rng/``)."""
        raise NotImplementedError

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def broadcast(self, obj):
        """The chief's ``obj`` on every process (identity for one process)."""
        return obj

    def export(self, fmt: str, out_dir: str) -> str:
        raise ValueError(f"export format {fmt!r} is not supported by {self.name}")

    def close(self) -> None:
        pass


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resume_checkpoint(save_dir: str, fp: dict, resume: bool) -> tuple[str | None, str]:
    """``(path or None, note)``: the checkpoint to resume, after checking it belongs to this run.

    Raises FlagError (--model_save_dir) when the newest readable checkpoint is of a different run.
    """
    if not resume or not os.path.isdir(save_dir):
        return None, ""
    for step, path in reversed(list_checkpoints(save_dir)):
        try:
            _, meta = read_checkpoint(path)
        except ValueError as exc:
            _log(f"warning: skipping {exc}")
            continue
        theirs = meta.get("fingerprint", {})
        if theirs != fp:
            diff = sorted(k for k in set(fp) | set(theirs) if fp.get(k) != theirs.get(k))
            raise FlagError("model_save_dir", f"{save_dir} holds checkpoints of a different run (differs in: "
                                              f"{', '.join(diff)}); pass --noresume to start over or choose "
                                              f"another --model_save_dir")
        if meta.get("trainer", {}).get("finished"):
            return path, (f"the run in {save_dir} has finished (step {step}): reporting its result without "
                          f"training (pass --noresume to train again, or more --epochs to continue)")
        return path, f"resuming from {path} (step {step})"
    return None, ""


def check_save_dir(save_dir: str) -> None:
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise FlagError("model_save_dir", f"{save_dir} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(save_dir))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.access(parent, os.W_OK):
        raise FlagError("model_save_dir", f"{save_dir}: not writable")


# ----------------------------------------------------------------------------------------------
# the loop
def run_training(args: TrainArgs, backend: Backend, model_meta: dict | None = None) -> dict | None:
    """Train with ``backend`` according to ``args``; returns the result dict on the chief (None elsewhere).

    Order of work at a step where several things are due: evaluation (+ best
    weights) first, then the resume checkpoint, so that a checkpoint always
    contains the effect of the evaluations up to its step.
    """
    chief = backend.is_chief
    save_dir = args.model_save_dir
    schema = backend.schema
    fp = run_fingerprint(args, backend.name, schema.model_hash(), backend.world_size)
    model_meta = dict(model_meta or {})

    # ---- resume decision: the chief decides and broadcasts, or (no broadcast) everyone reads it ----
    def everyone(fn):
        if backend.can_broadcast:
            return backend.broadcast(fn() if chief else None)
        return fn()

    def decide():
        try:
            return ("ok",) + resume_checkpoint(save_dir, fp, args.resume)
        except FlagError as exc:
            return ("error", exc.path.lstrip("-"), exc.message)

    decision = everyone(decide)
    if decision[0] == "error":
        raise FlagError(decision[1], decision[2])
    _, resume_path, note = decision

    spe = backend.steps_per_epoch()
    if spe <= 0:
        raise FlagError("batch_size", f"the train split has no batch of {args.batch_size} rows")
    plateau = Plateau(args.lr, args.patience, args.lr_decay_factor, args.lr_decay_patience, args.min_lr)
    st = {"epoch": 0, "batch": 0, "step": 0, "history": [], "finished": False, "rows_trained": 0,
          "best": None}
    resumed_from = None
    if resume_path is not None:
        arrays, meta = ({}, {})
        if chief or not backend.can_broadcast:
            arrays, meta = read_checkpoint(resume_path)
        trainer = everyone(lambda: meta["trainer"])
        backend.load_state_arrays(arrays)
        restore_host_rng(arrays) if arrays else None
        st.update({k: trainer[k] for k in st if k in trainer})
        plateau.load_state_dict(trainer["plateau"])
        backend.set_lr(plateau.lr)
        resumed_from = st["step"]
    if chief:
        if note:
            _log(note)
        os.makedirs(save_dir, exist_ok=True)
        if resume_path is None:        # a fresh run: nothing of an earlier run may be mistaken for ours
            remove_checkpoints(save_dir)
            if os.path.exists(os.path.join(save_dir, BEST_FILE)):
                os.unlink(os.path.join(save_dir, BEST_FILE))
    tb = ScalarWriter(os.path.join(save_dir, TENSORBOARD_DIR)) if chief else None
    best_path = os.path.join(save_dir, BEST_FILE)

    pending: list = []            # losses not yet converted
    window: list[float] = []      # losses since the last evaluation
    session_rows = 0
    session_time = 0.0
    t_phase = [None]

    def start_phase():
        t_phase[0] = time.perf_counter()

    def stop_phase():
        nonlocal session_time
        if pending:
            window.extend(backend.to_floats(pending))
            pending.clear()
        if t_phase[0] is not None:
            session_time += time.perf_counter() - t_phase[0]
            t_phase[0] = None

    def rows_per_s():
        return session_rows / session_time if session_time > 0 else float("nan")

    def do_eval():
        stop_phase()
        m = backend.evaluate("valid", collective=True)
        train_loss = float(np.mean(window)) if window else float("nan")
        window.clear()
        improved, new_lr, stop = plateau.update(m["auc"], st["step"])
        rec = {"step": st["step"], "epoch": round(st["epoch"] + st["batch"] / spe, 4),
               "train_loss": train_loss, "valid_auc": m["auc"], "valid_logloss": m["logloss"],
               "lr": plateau.lr if new_lr is None else new_lr, "train_rows_per_s": rows_per_s(),
               "improved": improved}
        st["history"].append(rec)
        if improved:
            st["best"] = {"step": st["step"], "epoch": rec["epoch"], "valid_auc": m["auc"],
                          "valid_logloss": m["logloss"]}
            if chief:
                save_weights(best_path, backend.get_weights(),
                             {**model_meta, "fingerprint": fp, "step": st["step"], "valid_auc": m["auc"],
                              "valid_logloss": m["logloss"]})
        if new_lr is not None:
            backend.set_lr(new_lr)
            if chief:
                _log(f"validation AUC has not improved for {plateau.lr_patience} evaluation(s): lr -> {new_lr:g}")
        if chief:
            tb.scalars(st["step"], {"train/loss": train_loss, "valid/auc": m["auc"], "valid/logloss": m["logloss"],
                                    "train/rows_per_s": rec["train_rows_per_s"], "train/lr": rec["lr"]})
            _log(f"step {st['step']} epoch {rec['epoch']:.2f}: train loss {train_loss:.5f}  valid AUC "
                 f"{m['auc']:.5f}  logloss {m['logloss']:.5f}" + ("  (best)" if improved else ""))
        return stop

    def do_checkpoint(finished: bool = False):
        stop_phase()
        if not chief:
            return
        arrays = backend.state_arrays()
        arrays.update(host_rng_arrays())
        trainer = {**st, "finished": finished, "plateau": plateau.state_dict()}
        write_checkpoint(checkpoint_path(save_dir, st["step"]), arrays,
                         {"kind": "resume", "fingerprint": fp, "trainer": trainer, **model_meta})
        prune_checkpoints(save_dir, args.keep_checkpoints)

    def write_metrics(extra: dict | None = None):
        if chief:
            write_json(os.path.join(save_dir, METRICS_FILE),
                       {"backend": backend.name, "model": args.model, "args": args.to_dict(),
                        "fingerprint": fp, "history": st["history"], "best": st["best"], **(extra or {})})

    def evaluated_now():
        return bool(st["history"]) and st["history"][-1]["step"] == st["step"]

    stopped_early = plateau.stopped
    last_ckpt_step = resumed_from if resumed_from is not None else -1
    done = stopped_early or st["epoch"] >= args.epochs or (args.max_steps and st["step"] >= args.max_steps)

    while not done:
        epoch, start = st["epoch"], st["batch"]
        bar = None
        if chief and args.progress:
            from tqdm import tqdm

            bar = tqdm(total=spe, initial=start, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
                       file=sys.stderr, mininterval=1.0, dynamic_ncols=True, leave=False)
        start_phase()
        for item in backend.train_batches(epoch, start):
            if t_phase[0] is None:
                start_phase()
            pending.append(backend.train_step(item))
            session_rows += backend.item_rows(item)
            st["rows_trained"] += backend.item_rows(item)
            st["step"] += 1
            st["batch"] += 1
            if bar is not None:
                bar.update(1)
                if st["step"] % 50 == 0:
                    stop_phase()
                    bar.set_postfix(loss=f"{np.mean(window[-50:]):.4f}" if window else "nan")
            if args.eval_every and st["step"] % args.eval_every == 0:
                if do_eval():
                    stopped_early = True
                    break
            if args.checkpoint_every and st["step"] % args.checkpoint_every == 0:
                do_checkpoint()
                last_ckpt_step = st["step"]
            if args.max_steps and st["step"] >= args.max_steps:
                break
        stop_phase()
        if bar is not None:
            bar.close()
        if st["batch"] >= spe:      # the epoch is complete
            st["epoch"] += 1
            st["batch"] = 0
            if not args.eval_every and not evaluated_now():
                stopped_early = do_eval() or stopped_early
        done = stopped_early or st["epoch"] >= args.epochs or bool(args.max_steps and st["step"] >= args.max_steps)
        if not done and last_ckpt_step != st["step"]:
            do_checkpoint()
            last_ckpt_step = st["step"]
        write_metrics()

    if not evaluated_now():
        do_eval()
    do_checkpoint(finished=True)
    if not chief:
        backend.close()
        return None

    # ---- final test evaluation with the best weights ----
    if os.path.exists(best_path):
        weights, _ = load_weights(best_path)
        backend.set_weights(weights)
    test = backend.evaluate("test", collective=False)
    epochs_done = round(st["epoch"] + st["batch"] / spe, 4)
    result = {"backend": backend.name, "model": args.model, "test_auc": test["auc"], "test_logloss": test["logloss"],
              "valid_auc": st["best"]["valid_auc"] if st["best"] else float("nan"),
              "best_step": st["best"]["step"] if st["best"] else None,
              "epochs": int(epochs_done) if epochs_done == int(epochs_done) else epochs_done,
              "steps": st["step"], "train_rows_per_s": rows_per_s(), "rows_trained": st["rows_trained"],
              "world_size": backend.world_size, "device": backend.devices, "stopped_early": bool(stopped_early),
              "resumed_from_step": resumed_from,
              "checkpoint": os.path.abspath(best_path) if os.path.exists(best_path) else None,
              "metrics": os.path.abspath(os.path.join(save_dir, METRICS_FILE))}
    truth = read_truth(args.data)
    if truth and "test" in truth:
        t = truth["test"]
        result["bayes_auc"] = t.get("bayes_auc")
        result["auc_gap"] = (t["bayes_auc"] - test["auc"]) if t.get("bayes_auc") is not None else None
        if t.get("bayes_logloss") is not None:
            result["bayes_logloss"] = t["bayes_logloss"]
            result["logloss_gap"] = test["logloss"] - t["bayes_logloss"]
    exports = {}
    for fmt in args.export:
        exports[fmt] = os.path.abspath(backend.export(fmt, os.path.join(save_dir, "export")))
    if exports:
        result["exports"] = exports
    tb.scalars(st["step"], {"test/auc": test["auc"], "test/logloss": test["logloss"]})
    tb.close()
    write_metrics({"test": test, "result": result})
    backend.close()
    return result
