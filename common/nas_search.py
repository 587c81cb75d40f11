"""The NASRec / SiGeo architecture search driver (backend-free): ``--search_arch`` of both train examples.

    python train_example_pytorch.py --search_arch --search_space small --n_blocks 7 --warmup_fraction 0.1 \\
        --zeroshot sigeo --n_generations 240 --init_population 128 --sample_size 64 --n_childs 8 \\
        --model_save_dir ./checkpoints/nas
    python train_example_pytorch.py --model NASRec --supernet_config ./checkpoints/nas/rank1_<hash>.json

``zoo_torch.search_arch`` / ``zoo_tf.search_arch`` supply the math through
:class:`ArchBackend`; everything else -- the data order, the learning-rate
schedule, checkpoints, the scoring rules, head fine-tuning, the evolution and
the files -- is here, so both backends run the same search.

Phases
------
1. **Supernet warm-up** (:func:`warmup`).  The supernet of the search space
   (common.nas_space, zoo_*/supernet.py) is trained on the first
   ``ceil(warmup_fraction * rows / batch)`` batches of each of ``warmup_epochs``
   shuffled passes over the train split (``warmup_fraction 0``: no training,
   zero-shot at initialisation).  Every step draws a path
   (:class:`common.nas_space.PathSampler`): the whole supernet with probability
   decaying linearly from 1 to 0 over the first ``full_fraction`` (10%) of the
   steps, else one any-path subnet.  Optimiser: the published NASRec/SiGeo setting,
   **Adagrad, lr 0.12, batch 512**, unless ``--optimizer``, ``--lr`` or
   ``--batch_size`` are given (see :func:`settings_from_args`); the learning rate
   follows a cosine schedule with a linear warm-up over the first 10% of the
   steps (:func:`cosine_lr`).  Loss: BCE + the model's L2 penalty.
2. **Regularized evolution** (:func:`common.evolution.evolve`), every child scored
   (lower is better) with the weights it inherits from the warmed supernet:

   ===========  ==================================================================
   ``sigeo``    ``-zico_coef*ZiCo - fr_coef*FR + loss_coef*loss``
   ``zico``     ``-ZiCo``
   ``fr``       ``-FR`` (Fisher-Rao norm)
   ``loss``     mean training loss
   ``none``     fine-tune only the final linear layer ``finetune_steps`` steps,
                then the validation logloss (:func:`finetune_head`)
   ===========  ==================================================================

   The zero-shot proxies (common.evolution.proxies_from_gradients) use the
   gradients of ``proxy_batches`` training batches: the first batches of the train
   split shuffled with seed ``seed + 1`` (the same batches for every candidate).
   Head fine-tuning reads the batches of that same order and restarts from the
   supernet's head for every candidate (the supernet is never changed).
3. The top-k subnets go to ``<model_save_dir>/rank<r>_<token hash>.json``
   (+ ``top_k.json``); one JSON summary line is printed last on stdout.

Files in ``--model_save_dir``::

    search.json              the run's fingerprint, status and the last summary
    supernet-warmup.npz      resume checkpoint of the warm-up (weights, optimiser, path sampler, step)
    supernet.npz             the warmed supernet (weights only; written when the warm-up ends)
    evolution_state.json     evolution state + every score so far (+ .journal), see common.evolution
    candidates.csv           one row per evaluated candidate (index, generation, hash, score, wall_s,
                             config, extra = all proxies / fine-tuning figures)
    rank<r>_<hash>.json      the top-k subnet configs (``--model NASRec --supernet_config <file>``)
    top_k.json               their ranks, hashes, scores and files

Resume: run the same command again.  The warm-up continues from its last
checkpoint (same data position, optimiser state and path stream) and the
evolution replays its cached scores, so an interrupted search ends exactly where
an uninterrupted one does; a finished one just reports its result again.  A
``--model_save_dir`` holding a search with other settings is an error
(``--noresume`` starts over).
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from common.batching import iter_packed, num_batches, open_dataset, unpack
from common.errors import FlagError
from common.evolution import CSV_FIELDS, STATE_VERSION as EVOLUTION_STATE_VERSION, Candidate, evolve, save_top_k, \
    top_candidates
from common.io import atomic_write_text
from common.metrics import auc as auc_metric
from common.nas_space import SearchSpace, SubnetConfig
from common.optim import OptimizerConfig, make_optimizer_config

SEARCH_FILE = "search.json"
WARMUP_CKPT = "supernet-warmup.npz"
SUPERNET_FILE = "supernet.npz"
STATE_FILE = "evolution_state.json"
CSV_FILE = "candidates.csv"
TOP_K_FILE = "top_k.json"
SEARCH_VERSION = 1

# the published setting (NASRec / SiGeo): Adagrad, lr 0.12, batch 512, cosine schedule with 10% warm-up
PUBLISHED = {"optimizer": "Adagrad", "lr": 0.12, "batch_size": 512}
# TrainArgs defaults: a value equal to these counts as "not given" unless the search options say otherwise
TRAINER_DEFAULTS = {"optimizer": "Adam", "lr": 1e-3, "batch_size": 4096}
ZEROSHOT_SCORES = {"sigeo": ("sigeo", 1.0), "zico": ("zico", -1.0), "fr": ("fisher_rao", -1.0),
                   "loss": ("loss", 1.0)}


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
@dataclass
class ArchSearchSettings:
    data: str
    save_dir: str
    backend: str
    space: SearchSpace
    model_config: dict = field(default_factory=dict)   # NASRec options of the supernet (embed_size, seed, l2 ...)
    batch_size: int = 512
    optimizer: str = "Adagrad"
    lr: float = 0.12
    seed: int = 0
    warmup_fraction: float = 1.0
    warmup_epochs: int = 1
    full_fraction: float = 0.1          # the whole supernet is drawn with probability 1 -> 0 over this share
    lr_warmup_ratio: float = 0.1        # linear learning-rate warm-up share of the cosine schedule
    zeroshot: str = "sigeo"
    proxy_batches: int = 4
    finetune_steps: int = 200
    init_population: int = 128
    sample_size: int = 64
    n_childs: int = 8
    n_generations: int = 240
    top_k: int = 5
    zico_coef: float = 1.0
    fr_coef: float = 1.0
    loss_coef: float = 0.0
    eval_batch_size: int = 0
    checkpoint_every: int = 500
    progress: bool = True
    resume: bool = True
    threads: int = 0
    gpu_ids: list = field(default_factory=list)

    def optimizer_config(self) -> OptimizerConfig:
        return make_optimizer_config(self.optimizer, self.lr)

    def fingerprint(self, schema_hash: str) -> dict:
        """What must be equal for a saved search to be resumed by this run."""
        fp = {"version": SEARCH_VERSION, "backend": self.backend, "data": os.path.abspath(self.data),
              "schema": schema_hash, "space": self.space.to_dict(), "model_config": _jsonable(self.model_config)}
        for k in ("batch_size", "optimizer", "lr", "seed", "warmup_fraction", "warmup_epochs", "full_fraction",
                  "lr_warmup_ratio", "zeroshot", "init_population", "sample_size", "n_childs", "n_generations"):
            fp[k] = getattr(self, k)
        if self.zeroshot == "none":
            fp.update(finetune_steps=self.finetune_steps, eval_batch_size=self.eval_batch_size)
        else:
            fp["proxy_batches"] = self.proxy_batches
            if self.zeroshot == "sigeo":
                fp.update(zico_coef=self.zico_coef, fr_coef=self.fr_coef, loss_coef=self.loss_coef)
        return fp


def _jsonable(x):
    return json.loads(json.dumps(x, sort_keys=True, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _explicit(args, options: dict, name: str) -> bool:
    """Was the trainer flag ``name`` given?  ``options["given"]`` (flag -> bool) when the flag parser
    records it, else: its value differs from the trainer default."""
    given = options.get("given") or {}
    if name in given:
        return bool(given[name])
    return getattr(args, name) != TRAINER_DEFAULTS[name]


def settings_from_args(args, backend: str) -> ArchSearchSettings:
    """:class:`ArchSearchSettings` from a ``TrainArgs`` with ``search["mode"] == "arch"``; FlagError for
    combinations the search cannot run."""
    o = dict((args.search or {}).get("options") or {})
    mc = dict(args.model_config)
    if mc.get("supernet_config"):
        raise FlagError("supernet_config", "--search_arch searches the subnets itself; drop --supernet_config "
                                           "(give it to --model NASRec to train a found subnet)")
    mc.pop("supernet_config", None)
    if args.loss != "BCE":
        raise FlagError("loss", f"the architecture search trains and scores with BCE, got --loss {args.loss}")
    if args.export:
        raise FlagError("export", "--search_arch writes subnet configs, not models; export a trained NASRec")
    if args.cpu_replicas > 1 or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise FlagError("search_arch", "the architecture search runs in one process on one device")
    if len(args.gpu_ids) > 1:
        raise FlagError("gpu_ids", "the architecture search uses one device; give at most one GPU id")
    zeroshot = o.get("zeroshot", "sigeo")
    if zeroshot != "none" and int(o.get("proxy_batches", 4)) < 2:
        raise FlagError("proxy_batches", f"the zero-shot proxies need gradients of at least 2 batches, "
                                         f"got {o.get('proxy_batches')}")
    explicit = {n: _explicit(args, o, n) for n in ("optimizer", "lr", "batch_size")}
    if explicit["optimizer"] or explicit["lr"]:
        optimizer, lr = args.optimizer, float(args.lr)
    else:
        optimizer, lr = PUBLISHED["optimizer"], PUBLISHED["lr"]
    batch_size = int(args.batch_size) if explicit["batch_size"] else PUBLISHED["batch_size"]
    space_kw = {"num_blocks": int(o.get("n_blocks", 7))}
    for k in ("dense_widths", "sparse_widths", "merge_features", "max_inputs", "attention_heads"):
        if o.get(k):
            space_kw[k] = tuple(o[k]) if isinstance(o[k], (list, tuple)) else o[k]
    try:
        space = SearchSpace.named(o.get("search_space", "small"), **space_kw)
    except ValueError as exc:
        raise FlagError("search_space", str(exc)) from None
    try:
        make_optimizer_config(optimizer, lr)
    except ValueError as exc:
        raise FlagError("optimizer", str(exc)) from None
    return ArchSearchSettings(
        data=args.data, save_dir=args.model_save_dir, backend=backend, space=space, model_config=mc,
        batch_size=batch_size, optimizer=optimizer, lr=lr, seed=int(args.seed),
        warmup_fraction=float(o.get("warmup_fraction", 1.0)), warmup_epochs=int(o.get("warmup_epochs", 1)),
        zeroshot=zeroshot, proxy_batches=int(o.get("proxy_batches", 4)),
        finetune_steps=int(o.get("finetune_steps", 200)), init_population=int(o.get("init_population", 128)),
        sample_size=int(o.get("sample_size", 64)), n_childs=int(o.get("n_childs", 8)),
        n_generations=int(o.get("n_generations", 240)), top_k=int(o.get("top_k", 5)),
        zico_coef=float(o.get("zico_coef", 1.0)), fr_coef=float(o.get("fr_coef", 1.0)),
        loss_coef=float(o.get("loss_coef", 0.0)), eval_batch_size=int(args.eval_batch_size or 0),
        checkpoint_every=int(args.checkpoint_every), progress=bool(args.progress), resume=bool(args.resume),
        threads=int(args.threads or 0), gpu_ids=list(args.gpu_ids))


# ---------------------------------------------------------------------------------------------
# schedule and data
# ---------------------------------------------------------------------------------------------
def cosine_lr(step: int, total: int, base: float, warmup_ratio: float = 0.1) -> float:
    """Learning rate of 0-based step ``step`` of ``total``: linear warm-up ``base*(step+1)/w`` over the
    first ``w = ceil(warmup_ratio*total)`` steps, then ``base*(1+cos(pi*(step-w)/(total-w)))/2``."""
    if total <= 0:
        return base
    w = int(math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0
    if step < w:
        return base * (step + 1) / w
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, total - w)))


def warmup_plan(train_rows: int, batch_size: int, fraction: float, epochs: int) -> tuple[int, int]:
    """(steps per pass, total steps) of the warm-up on ``fraction`` of the train split."""
    if fraction <= 0 or train_rows <= 0:
        return 0, 0
    per = min(num_batches(train_rows, batch_size, False), max(1, math.ceil(fraction * train_rows / batch_size)))
    return per, per * max(int(epochs), 0)


def scoring_batches(store, schema, split: str, batch_size: int, n: int | None, seed: int) -> list[dict]:
    """``n`` numpy batches (None: the whole split) -- ``split`` shuffled with ``seed`` pass after pass
    (train), or in stored order (valid/test)."""
    out: list[dict] = []
    shuffle = split == "train"
    epoch = 0
    while n is None or len(out) < n:
        got = 0
        for packed in iter_packed(store, split, batch_size, shuffle, seed, epoch):
            out.append(unpack(schema, packed))
            got += 1
            if n is not None and len(out) >= n:
                break
        if n is None or got == 0:
            break
        epoch += 1
    return out


# ---------------------------------------------------------------------------------------------
# what a backend provides
# ---------------------------------------------------------------------------------------------
class ArchBackend:
    """The math of one framework (zoo_torch/search_arch.py, zoo_tf/search_arch.py).

    Constructed as ``Backend(settings, schema, full_steps)``: a supernet over ``settings.space`` built
    with ``settings.model_config`` (seed included), a PathSampler seeded with ``settings.seed``
    drawing the whole supernet over the first ``full_steps`` steps, and an optimiser
    ``settings.optimizer_config()``."""

    name = "backend"

    def to_batch(self, batch: dict):
        """A numpy batch dict as the framework's tensors."""
        raise NotImplementedError

    def train_step(self, batch, lr: float) -> float:
        """One supernet step on a sampled path with learning rate ``lr``; the batch's mean BCE."""
        raise NotImplementedError

    def sampler_state(self) -> dict:
        raise NotImplementedError

    def set_sampler_state(self, state: dict) -> None:
        raise NotImplementedError

    def state_arrays(self) -> dict:
        """Weights ``w/<name>``, optimiser ``opt/...``, framework RNG ``rng/...`` (numpy)."""
        raise NotImplementedError

    def load_state_arrays(self, arrays: dict) -> None:
        raise NotImplementedError

    def get_weights(self) -> dict:
        raise NotImplementedError

    def set_weights(self, weights: dict) -> None:
        raise NotImplementedError

    def proxies(self, cfg: SubnetConfig, batches: list) -> dict:
        """Zero-shot proxies (zoo_*/proxies.zero_shot_proxies) of ``cfg``'s subnet view."""
        raise NotImplementedError

    def head_inputs(self, cfg: SubnetConfig, batch) -> np.ndarray:
        """The subnet's active features entering the final linear layer, numpy ``[B, F]``."""
        raise NotImplementedError

    def active_head(self, cfg: SubnetConfig) -> tuple[np.ndarray, float]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# head fine-tuning (numpy: identical in both backends)
# ---------------------------------------------------------------------------------------------
def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _bce(z, y) -> float:
    """Mean BCE from logits (stable)."""
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


class _NumpyRule:
    """One optimiser rule of common/optim.py on a few dense numpy arrays (the head's kernel and bias)."""

    def __init__(self, cfg: OptimizerConfig, params: list[np.ndarray]):
        self.cfg, self.t = cfg, 0
        self.slots = [{s: np.full_like(p, cfg.slot_init(s)) for s in cfg.slot_names()} for p in params]

    def step(self, params, grads, lr):
        c = self.cfg
        self.t += 1
        for p, g, sl in zip(params, grads, self.slots):
            if c.base == "Adam":
                sl["m"] = c.beta1 * sl["m"] + (1 - c.beta1) * g
                sl["v"] = c.beta2 * sl["v"] + (1 - c.beta2) * g * g
                p -= lr * (sl["m"] / (1 - c.beta1 ** self.t)) / (np.sqrt(sl["v"] / (1 - c.beta2 ** self.t)) + c.eps)
            elif c.base == "Adagrad":
                sl["accumulator"] += g * g
                p -= lr * g / (np.sqrt(sl["accumulator"]) + c.eps)
            else:
                if c.momentum > 0:
                    sl["momentum"] = c.momentum * sl["momentum"] + g
                    g = sl["momentum"]
                p -= lr * g


def finetune_head(features: Iterable[tuple[np.ndarray, np.ndarray]], valid: list[tuple[np.ndarray, np.ndarray]],
                  kernel: np.ndarray, bias: float, opt: OptimizerConfig, lr: float) -> dict:
    """Train only a linear head ``logit = x . kernel + bias`` (float64) on ``features`` (one ``(x, y)``
    per step, mean BCE, rule ``opt`` at constant ``lr``) and score it on ``valid``: validation
    logloss / AUC, and the mean fine-tuning loss."""
    w, b = np.asarray(kernel, np.float64).copy(), np.asarray([bias], np.float64)
    rule = _NumpyRule(opt, [w, b])
    losses = []
    for x, y in features:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        z = x @ w + b[0]
        losses.append(_bce(z, y))
        r = (_sigmoid(z) - y) / len(y)
        rule.step([w, b], [x.T @ r, np.asarray([r.sum()])], lr)
    zs, ys = [], []
    for x, y in valid:
        zs.append(np.asarray(x, np.float64) @ w + b[0])
        ys.append(np.asarray(y, np.float64))
    z, y = np.concatenate(zs), np.concatenate(ys)
    p = _sigmoid(z)
    return {"valid_logloss": _bce(z, y), "valid_auc": float(auc_metric(y, p)),
            "finetune_loss": float(np.mean(losses)) if losses else float("nan"), "finetune_steps": len(losses)}


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _bar(enabled: bool, **kw):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(file=sys.stderr, mininterval=1.0, dynamic_ncols=True, **kw)


def search_files(save_dir: str) -> list[str]:
    """Every file a search writes into ``save_dir`` (what ``--noresume`` removes)."""
    names = [SEARCH_FILE, WARMUP_CKPT, SUPERNET_FILE, STATE_FILE, STATE_FILE + ".journal", CSV_FILE, TOP_K_FILE]
    out = [os.path.join(save_dir, n) for n in names]
    if os.path.isdir(save_dir):
        out += [os.path.join(save_dir, n) for n in sorted(os.listdir(save_dir))
                if n.startswith("rank") and n.endswith(".json")]
    return out


def prepare_dir(settings: ArchSearchSettings, fp: dict) -> dict:
    """Check (or reset with ``--noresume``) the save directory; returns the saved search record."""
    save = settings.save_dir
    path = os.path.join(save, SEARCH_FILE)
    if not settings.resume:
        for p in search_files(save):
            if os.path.exists(p):
                os.unlink(p)
    record = None
    if os.path.exists(path):
        try:
            with open(path) as fh:
                record = json.load(fh)
        except (OSError, ValueError):
            raise FlagError("model_save_dir", f"{path} is unreadable; pass --noresume to start over") from None
        theirs = record.get("fingerprint") or {}
        if theirs != fp:
            diff = sorted(k for k in set(fp) | set(theirs) if fp.get(k) != theirs.get(k))
            raise FlagError("model_save_dir", f"{save} holds an architecture search with other settings (differs "
                                              f"in: {', '.join(diff)}); pass --noresume to start over or choose "
                                              f"another --model_save_dir")
    elif any(os.path.exists(p) for p in search_files(save)[1:6]):
        raise FlagError("model_save_dir", f"{save} holds search files without {SEARCH_FILE}; pass --noresume to "
                                          f"start over or choose another --model_save_dir")
    if record is None:
        record = {"version": SEARCH_VERSION, "fingerprint": fp, "status": "warmup"}
        os.makedirs(save, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return record


def _write_record(settings, record) -> None:
    from common.train_utils import _clean_nan

    atomic_write_text(os.path.join(settings.save_dir, SEARCH_FILE), json.dumps(_clean_nan(record), indent=1) + "\n")


def warmup(settings: ArchSearchSettings, backend: ArchBackend, store, schema, fp: dict) -> dict:
    """Phase 1 (resumable); returns ``{"steps", "seconds", "final_loss", "resumed_from_step"}``."""
    from common.train_utils import (load_weights, read_checkpoint, save_weights, write_checkpoint)

    save = settings.save_dir
    final = os.path.join(save, SUPERNET_FILE)
    ckpt = os.path.join(save, WARMUP_CKPT)
    if os.path.exists(final):
        weights, meta = load_weights(final)
        if meta.get("fingerprint") != fp:
            raise FlagError("model_save_dir", f"{final} belongs to another search; pass --noresume to start over")
        backend.set_weights(weights)
        return dict(meta["warmup"], resumed_from_step=meta["warmup"]["steps"])
    per, total = warmup_plan(store.rows("train"), settings.batch_size, settings.warmup_fraction,
                             settings.warmup_epochs)
    step, elapsed, losses, resumed = 0, 0.0, [], None
    if os.path.exists(ckpt):
        try:
            arrays, meta = read_checkpoint(ckpt)
        except ValueError as exc:
            raise FlagError("model_save_dir", f"{exc}; pass --noresume to start over") from None
        if meta.get("fingerprint") != fp:
            raise FlagError("model_save_dir", f"{ckpt} belongs to another search; pass --noresume to start over")
        backend.load_state_arrays(arrays)
        backend.set_sampler_state(meta["sampler"])
        step, elapsed, losses = int(meta["step"]), float(meta["seconds"]), list(meta.get("recent_losses", []))
        resumed = step
        _log(f"resuming the supernet warm-up from {ckpt} (step {step}/{total})")

    def checkpoint():
        arrays = backend.state_arrays()
        write_checkpoint(ckpt, arrays, {"kind": "nas-warmup", "fingerprint": fp, "step": step,
                                        "seconds": elapsed + time.perf_counter() - t0,
                                        "sampler": backend.sampler_state(), "recent_losses": losses[-50:]})

    bar = _bar(settings.progress and total > 0, total=total, initial=step, desc="supernet warm-up", unit="step")
    t0 = time.perf_counter()
    while step < total:
        epoch, start = divmod(step, per)
        for packed in iter_packed(store, "train", settings.batch_size, True, settings.seed, epoch,
                                  start_batch=start):
            lr = cosine_lr(step, total, settings.lr, settings.lr_warmup_ratio)
            loss = backend.train_step(backend.to_batch(unpack(schema, packed)), lr)
            losses.append(loss)
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{lr:.3g}")
            if step >= total or step % per == 0:
                break
            if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                checkpoint()
        if step < total:            # the end of a pass
            checkpoint()
    if bar is not None:
        bar.close()
    seconds = elapsed + time.perf_counter() - t0
    info = {"steps": step, "steps_per_pass": per, "seconds": seconds,
            "final_loss": float(np.mean(losses[-50:])) if losses else None}
    save_weights(final, backend.get_weights(), {"model": "NASRecSuperNet", "fingerprint": fp, "warmup": info,
                                                "space": settings.space.to_dict()})
    if os.path.exists(ckpt):
        os.unlink(ckpt)
    if total:
        _log(f"supernet warm-up: {step} steps in {seconds:.1f}s, last-50-step loss {info['final_loss']:.5f}")
    return dict(info, resumed_from_step=resumed)


def make_score_fn(settings: ArchSearchSettings, backend: ArchBackend, store, schema):
    """``score(cfg) -> (score, extra)`` for the chosen ``--zeroshot`` (module docstring)."""
    z = settings.zeroshot
    if z in ZEROSHOT_SCORES:
        key, sign = ZEROSHOT_SCORES[z]
        batches = [backend.to_batch(b) for b in
                   scoring_batches(store, schema, "train", settings.batch_size, settings.proxy_batches,
                                   settings.seed + 1)]

        def score(cfg):
            p = backend.proxies(cfg, batches)
            return sign * float(p[key]), p
        return score
    if z != "none":
        raise ValueError(f"unknown --zeroshot {z!r}")
    train = [(backend.to_batch(b), np.asarray(b["label"])) for b in
             scoring_batches(store, schema, "train", settings.batch_size, settings.finetune_steps, settings.seed + 1)]
    valid = [(backend.to_batch(b), np.asarray(b["label"])) for b in
             scoring_batches(store, schema, "valid", settings.eval_batch_size or settings.batch_size, None, 0)]
    opt = settings.optimizer_config()

    def score(cfg):
        kernel, bias = backend.active_head(cfg)
        feats = ((backend.head_inputs(cfg, b), y) for b, y in train)
        vfeats = [(backend.head_inputs(cfg, b), y) for b, y in valid]
        r = finetune_head(feats, vfeats, kernel, bias, opt, settings.lr)
        return r["valid_logloss"], r
    return score


def _check_state(path: str, settings: ArchSearchSettings) -> None:
    """FlagError unless a saved evolution state is readable and belongs to these settings."""
    if not os.path.exists(path):
        return
    try:
        with open(path) as fh:
            st = json.load(fh)
        ok = (st.get("version") == EVOLUTION_STATE_VERSION
              and SearchSpace.from_dict(st["space"]) == settings.space
              and st["settings"] == {"init_population": settings.init_population, "sample_size": settings.sample_size,
                                     "n_childs": settings.n_childs, "n_generations": settings.n_generations})
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise FlagError("model_save_dir", f"{path} is unreadable or belongs to another search; pass --noresume "
                                          f"to start over")


def run_search(settings: ArchSearchSettings, make_backend) -> dict:
    """The whole search (module docstring); ``make_backend(settings, schema, full_steps)`` -> ArchBackend.
    Returns the summary (also printed by :func:`main`)."""
    t_start = time.perf_counter()
    schema, store = open_dataset(settings.data)
    per, total = warmup_plan(store.rows("train"), settings.batch_size, settings.warmup_fraction,
                             settings.warmup_epochs)
    if settings.zeroshot != "none":
        have = num_batches(store.rows("train"), settings.batch_size, False)
        if have < 2:
            raise FlagError("batch_size", f"the train split ({store.rows('train')} rows) has fewer than 2 batches "
                                          f"of {settings.batch_size} rows for the zero-shot proxies")
    fp = settings.fingerprint(schema.model_hash())
    record = prepare_dir(settings, fp)
    backend = make_backend(settings, schema, int(round(settings.full_fraction * total)))
    warm = warmup(settings, backend, store, schema, fp)
    record.update(status="evolution", warmup=warm)
    _write_record(settings, record)

    score_fn = make_score_fn(settings, backend, store, schema)
    n_total = settings.init_population + settings.n_generations * settings.n_childs
    bar = _bar(settings.progress, total=n_total, desc=f"evolution ({settings.zeroshot})", unit="cand")
    counts = {"new": 0, "cached": 0}
    best = [math.inf]

    def on_evaluated(c: Candidate, cached: bool):
        counts["cached" if cached else "new"] += 1
        if math.isfinite(c.score):
            best[0] = min(best[0], c.score)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(gen=c.generation + 1, best=f"{best[0]:.5g}", refresh=False)

    t_evo = time.perf_counter()
    save = settings.save_dir
    _check_state(os.path.join(save, STATE_FILE), settings)
    try:
        result = evolve(score_fn, settings.space, init_population=settings.init_population,
                        sample_size=settings.sample_size, n_childs=settings.n_childs,
                        n_generations=settings.n_generations, rng=settings.seed,
                        state_path=os.path.join(save, STATE_FILE), log_csv=os.path.join(save, CSV_FILE),
                        progress=False, top_k=settings.top_k, on_evaluated=on_evaluated)
    finally:
        if bar is not None:
            bar.close()
    evo_s = time.perf_counter() - t_evo
    paths = save_top_k(result, save, settings.top_k)
    for p in search_files(save):        # rank files of an earlier, larger --top_k
        base = os.path.basename(p)
        if base.startswith("rank") and p not in paths:
            os.unlink(p)
    best_c = result.best
    history = result.history
    summary = {
        "backend": settings.backend, "model": "NASRec", "search_space": settings.space.name,
        "num_blocks": settings.space.num_blocks, "zeroshot": settings.zeroshot,
        "best_config": os.path.abspath(paths[0]) if paths else None, "best_score": best_c.score,
        "best_token_hash": best_c.token_hash, "best_extra": best_c.extra,
        "top_k": [os.path.abspath(p) for p in paths], "top_k_scores": [c.score for c in result.top],
        "evaluated": len(history), "evaluated_this_run": counts["new"], "from_saved_state": counts["cached"],
        "generations": settings.n_generations, "init_population": settings.init_population,
        "warmup_steps": warm["steps"], "warmup_s": warm["seconds"],
        "warmup_resumed_from_step": warm.get("resumed_from_step"),
        "evaluation_s": float(sum(c.wall_s for c in history)), "evolution_wall_s_this_run": evo_s,
        "search_s": warm["seconds"] + float(sum(c.wall_s for c in history)),
        "wall_s": time.perf_counter() - t_start,
        "optimizer": settings.optimizer, "lr": settings.lr, "batch_size": settings.batch_size,
        "csv": os.path.abspath(os.path.join(save, CSV_FILE)),
        "state": os.path.abspath(os.path.join(save, STATE_FILE)),
        "supernet": os.path.abspath(os.path.join(save, SUPERNET_FILE)),
    }
    record.update(status="done", summary=summary)
    _write_record(settings, record)
    return summary


def read_candidates(csv_path: str) -> list[dict]:
    """The rows of a search's ``candidates.csv`` (score as float, config/extra parsed)."""
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["score"] = float(r["score"])
        r["config"] = json.loads(r["config"])
        r["extra"] = json.loads(r["extra"])
    return rows


def main(args, backend: str, make_backend) -> dict:
    """``--search_arch`` entry (called by zoo_*/search_arch.main); prints the summary line last."""
    from common.train_utils import result_line

    settings = settings_from_args(args, backend)
    summary = run_search(settings, make_backend)
    print(result_line(summary), flush=True)
    return summary


__all__ = ["ArchSearchSettings", "ArchBackend", "settings_from_args", "cosine_lr", "warmup_plan", "scoring_batches",
           "finetune_head", "run_search", "warmup", "make_score_fn", "read_candidates", "main", "search_files",
           "PUBLISHED", "CSV_FIELDS", "top_candidates"]
