"""AutoLossGen loss search (Li et al., SIGIR'22): backend-free driver, REINFORCE bookkeeping, checkpoints.

The backend supplies two things:

* a controller (``zoo_torch.controller.Controller`` / ``zoo_tf.controller.Controller``)
  with ``sample(rng) -> (LossDAG, log_prob, entropy)``,
  ``update(dags, advantages) -> info`` (one REINFORCE step, see below),
  ``state_arrays() -> {name: ndarray}`` / ``load_state_arrays(d)`` (weights + optimiser state);
* ``evaluate_candidate(formula: str) -> float``: train a COPY of the current model for
  one epoch with ``compile_formula(formula)`` and return its validation AUC (the real
  model is untouched).  ``formula`` is the candidate in the string syntax of
  :mod:`common.loss_formula`; it reproduces the sampled DAG exactly.

One search round (:func:`run_search`), per sampled candidate ``i``:

1. cheap rejection (:func:`common.loss_check.cheap_check`): no dependence on ``p``,
   a non-finite gradient or a gradient inf-norm < 1e-4 -> reward -1, no training;
2. a gradient signature within 1e-4 of an already-scored candidate reuses its reward;
3. otherwise ``auc = evaluate_candidate(formula)`` (non-finite -> reward -1);
4. ``auc < b - 1e-5`` (b = the moving baseline, started at the round's starting
   validation AUC) -> reward -1 ("below_baseline"); otherwise reward = auc and the
   candidate is *accepted*;
5. ``r = reward + 1e-4 * entropy(sample)`` (entropy bonus); for accepted candidates
   the baseline moves: ``b <- b - 0.01 * (b - r)``; advantage ``r - b``;
6. every ``num_aggregate = 10`` candidates the controller takes one step on
   ``-(1/10) sum_i advantage_i * log_prob_i`` (Adam, lr 1e-3, betas (0, 0.999),
   gradient global-norm clip 5; :class:`NumpyAdam`, identical for both backends).

These rules follow the paper's code (``BaseRunner.train``).  Every candidate is a
row of the CSV log (:data:`LOG_COLUMNS`); accepted candidates (with their
validity check) go to the formula file, best first; after every candidate the
state is checkpointed (``<checkpoint>`` JSON + ``<checkpoint>.<step>.npz``
controller arrays), and ``run_search`` with the same paths resumes exactly
(same candidates, same rewards, same controller weights) after an interruption.

:func:`search_epoch` is the paper's outer step: search a round from the current
model, then (``train_with_optim``) train the real model one epoch with the best
candidate if its trial AUC is not below the starting AUC.

:func:`run_loss_search` is the ``--search_loss`` mode of the train examples
(``zoo_torch/search_loss.py``, ``zoo_tf/search_loss.py`` supply the
:class:`LossSearchHooks`): ``--search_epochs`` rounds, one CSV log, one formula
file, resumable state files and a summary.  Testing aid: with the environment
variable ``CTR_ZOO_SEARCH_KILL_AFTER=N`` the process SIGKILLs itself right after
its N-th candidate has been checkpointed (to test resumption).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Protocol

import numpy as np

from common.errors import StoreError
from common.io import atomic_write_bytes, atomic_write_text
from common.loss_check import SignatureCache, cheap_check, rejection_points, validity_check
from common.loss_formula import DEFAULT_NUM_NODES, DEFAULT_SEARCH_OPS, EPS, OPS, LossDAG, to_string

CHECKPOINT_VERSION = 1
LOG_COLUMNS = ["round", "step", "formula", "status", "reason", "auc", "reward", "baseline", "advantage", "entropy",
               "log_prob", "signature", "reused_from", "controller_update", "dag", "wall_s"]
FORMULA_COLUMNS = ["formula", "reward", "round", "step", "valid", "pos_pct", "neg_pct", "dag"]
FORMULA_FILE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Controller definition shared by both backends
# --------------------------------------------------------------------------------------------
@dataclass
class ControllerConfig:
    """The LSTM controller (ENAS style).  Canonical weight names (both backends):

    ``lstm.w_ih [H, 4H]``, ``lstm.w_hh [H, 4H]``, ``lstm.bias [4H]`` (gate order i, f, g, o),
    ``g_emb [1, H]`` (first input), ``input_emb [3, H]`` (the fixed nodes p, y, 1),
    ``op_emb [n_ops, H]``, ``w_soft [H, n_ops]``, ``w_attn1 [H, H]``, ``w_attn2 [H, H]``,
    ``v_attn [H, 1]``; all ``uniform:0.1`` except the LSTM bias (zeros).

    Decoding: the LSTM first reads ``input_emb[0..2]`` (their hidden states are the
    anchors of nodes 0..2).  For each operator node, one LSTM step on the previous
    input gives ``op logits = 1.5 tanh(h W_soft)``; the chosen operator's embedding
    is fed to a second LSTM step whose state ``h`` queries the earlier nodes with
    additive attention ``1.5 tanh(v^T tanh(W_1 h_j + W_2 h))``; a binary operator
    draws its second input from the same logits with the first one masked out.
    The next input is the mean of the chosen anchors; ``h`` is the new node's anchor.
    """
    lstm_size: int = 64
    num_nodes: int = DEFAULT_NUM_NODES
    ops: tuple[str, ...] = DEFAULT_SEARCH_OPS
    tanh_constant: float = 1.5
    init_range: float = 0.1
    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.999)
    adam_eps: float = 1e-8
    clip_norm: float = 5.0
    seed: int = 0

    def __post_init__(self):
        self.ops = tuple(self.ops)
        bad = [o for o in self.ops if o not in OPS or not OPS[o].searchable]
        if bad or not self.ops:
            raise ValueError(f"unknown search operator(s) {bad}; searchable: {', '.join(o for o in OPS if OPS[o].searchable)}")
        if self.num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ops"], d["betas"] = list(self.ops), list(self.betas)
        return d


MASK_VALUE = -1e9     # added to the logit of an input already taken by a binary operator


def sample_index(probs, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from ``probs`` (same numbers -> same index in both backends)."""
    p = np.asarray(probs, np.float64).reshape(-1)
    c = np.cumsum(p / p.sum())
    return int(min(np.searchsorted(c, rng.random(), side="right"), len(p) - 1))


class NumpyAdam:
    """Adam (torch conventions) with global-norm gradient clipping, on numpy weight dicts."""

    def __init__(self, lr: float = 1e-3, betas=(0.0, 0.999), eps: float = 1e-8, clip_norm: float | None = 5.0):
        self.lr, self.betas, self.eps, self.clip_norm = lr, tuple(betas), eps, clip_norm
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, weights: dict, grads: dict):
        """New weights (float32) and the global gradient norm before clipping."""
        g64 = {k: np.asarray(g, np.float64) for k, g in grads.items()}
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in g64.values()))
        scale = 1.0
        if self.clip_norm and norm > self.clip_norm:
            scale = self.clip_norm / (norm + 1e-6)
        self.t += 1
        b1, b2 = self.betas
        out = dict(weights)
        for k, g in g64.items():
            g = g * scale
            m = b1 * self.m.get(k, 0.0) + (1 - b1) * g
            v = b2 * self.v.get(k, 0.0) + (1 - b2) * g * g
            self.m[k], self.v[k] = m, v
            mhat = m / (1 - b1 ** self.t)
            vhat = v / (1 - b2 ** self.t)
            out[k] = (np.asarray(weights[k], np.float64) - self.lr * mhat / (np.sqrt(vhat) + self.eps)).astype(np.float32)
        return out, norm

    def state_arrays(self, prefix: str = "opt/") -> dict:
        d = {f"{prefix}t": np.asarray(self.t, np.int64)}
        d.update({f"{prefix}m/{k}": np.asarray(v) for k, v in self.m.items()})
        d.update({f"{prefix}v/{k}": np.asarray(v) for k, v in self.v.items()})
        return d

    def load_state_arrays(self, d: dict, prefix: str = "opt/") -> None:
        self.t = int(d.get(f"{prefix}t", 0))
        self.m = {k[len(prefix) + 2:]: np.asarray(v, np.float64) for k, v in d.items() if k.startswith(prefix + "m/")}
        self.v = {k[len(prefix) + 2:]: np.asarray(v, np.float64) for k, v in d.items() if k.startswith(prefix + "v/")}


# --------------------------------------------------------------------------------------------
# The search round
# --------------------------------------------------------------------------------------------
@dataclass
class SearchConfig:
    num_aggregate: int = 10         # candidates per controller update
    entropy_weight: float = 1e-4    # entropy bonus added to the reward
    baseline_decay: float = 0.01    # b <- b - decay * (b - r)   (the paper's 1 - bl_dec, bl_dec = 0.99)
    skip_lim: float = 1e-5          # tolerance of the below-baseline rule
    zero_grad_tol: float = 1e-4     # cheap rejection and signature matching
    reject_points: int = 20
    reject_seed: int = 0
    seed: int = 0                   # the sampling generator
    eps: float = EPS                # epsilon of the searched formulas


@dataclass
class SearchResult:
    best_formula: str | None
    best_reward: float
    best_step: int
    start_auc: float
    baseline: float
    steps: int
    evaluated: int = 0
    reused: int = 0
    rejected: int = 0
    below_baseline: int = 0
    updates: int = 0
    accepted: dict = field(default_factory=dict)     # formula -> {"reward", "step", "dag"}


class Controller(Protocol):
    def sample(self, rng: np.random.Generator): ...
    def update(self, dags, advantages): ...
    def state_arrays(self) -> dict: ...
    def load_state_arrays(self, d: dict) -> None: ...


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(x) if math.isfinite(x) else str(x)
    return str(x)


class _State:
    def __init__(self, start_auc: float, cfg: SearchConfig):
        self.step = 0
        self.start_auc = float(start_auc)
        self.baseline = float(start_auc)
        self.rng = np.random.default_rng(cfg.seed)
        self.cache = SignatureCache(cfg.zero_grad_tol)
        self.pending: list = []            # [dag_json, advantage] since the last update
        self.best = {"formula": None, "reward": -math.inf, "step": -1}
        self.accepted: dict = {}
        self.counts = {"evaluated": 0, "reused": 0, "rejected": 0, "below_baseline": 0, "updates": 0}
        self.csv_rows = 0
        self.arrays_file = ""

    def to_json(self) -> dict:
        return {"version": CHECKPOINT_VERSION, "step": self.step, "start_auc": self.start_auc,
                "baseline": self.baseline, "rng": self.rng.bit_generator.state, "cache": self.cache.to_json(),
                "pending": self.pending, "best": self.best, "accepted": self.accepted, "counts": self.counts,
                "csv_rows": self.csv_rows, "arrays_file": self.arrays_file}

    @classmethod
    def from_json(cls, d: dict, cfg: SearchConfig) -> "_State":
        s = cls(d["start_auc"], cfg)
        s.step, s.baseline = int(d["step"]), float(d["baseline"])
        s.rng.bit_generator.state = d["rng"]
        s.cache = SignatureCache.from_json(d["cache"], cfg.zero_grad_tol)
        s.pending, s.best, s.accepted = d["pending"], d["best"], d["accepted"]
        s.counts, s.csv_rows, s.arrays_file = d["counts"], int(d["csv_rows"]), d["arrays_file"]
        return s


def _save_checkpoint(path: str, state: _State, controller) -> None:
    arrays = controller.state_arrays()
    base = os.path.basename(path)
    name = f"{base}.{state.step}.npz"
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(os.path.join(os.path.dirname(os.path.abspath(path)), name), buf.getvalue())
    old = state.arrays_file
    state.arrays_file = name
    atomic_write_text(path, json.dumps(state.to_json()) + "\n")
    if old and old != name:
        try:
            os.unlink(os.path.join(os.path.dirname(os.path.abspath(path)), old))
        except OSError:
            pass


def _load_checkpoint(path: str, controller, cfg: SearchConfig) -> _State:
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
        if d.get("version") != CHECKPOINT_VERSION:
            raise StoreError(f"unsupported search checkpoint version {d.get('version')!r}", path=path)
        state = _State.from_json(d, cfg)
        arrays_path = os.path.join(os.path.dirname(os.path.abspath(path)), state.arrays_file)
        with np.load(arrays_path) as z:
            controller.load_state_arrays({k: z[k] for k in z.files})
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(f"cannot resume the loss search: {exc}", path=path) from None
    return state


def _reset_csv(path: str, keep_rows: int | None) -> None:
    """Write the header (fresh start) or keep the header and the first ``keep_rows`` rows (resume)."""
    rows: list[list[str]] = []
    if keep_rows and os.path.exists(path):
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))[1:keep_rows + 1]
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(LOG_COLUMNS)
    w.writerows(rows)
    atomic_write_text(path, out.getvalue())


def _merge_accepted(prior: dict | None, accepted: dict) -> dict:
    """Accepted formulas of earlier rounds and of this one: per formula the entry with the best reward."""
    out = {k: dict(v) for k, v in (prior or {}).items()}
    for k, v in accepted.items():
        if k not in out or v["reward"] > out[k]["reward"]:
            out[k] = dict(v)
    return out


def _ranked(accepted: dict) -> list[tuple[str, dict]]:
    return sorted(accepted.items(), key=lambda kv: (-kv[1]["reward"], kv[1].get("round", 0), kv[1]["step"], kv[0]))


def formula_records(accepted: dict) -> list[dict]:
    """The accepted formulas, best validation AUC first, as JSON-able records."""
    return [{"formula": f, "valid_auc": float(i["reward"]), "round": int(i.get("round", 0)), "step": int(i["step"]),
             "passed_validity": bool(i["valid"]), "pos_pct": round(100 * float(i["pos"]), 1),
             "neg_pct": round(100 * float(i["neg"]), 1), "dag": i["dag"]} for f, i in _ranked(accepted)]


def _write_formula_file(path: str, accepted: dict) -> None:
    """The accepted formulas, best first: JSON (``{"version", "formulas": [records]}``) when ``path``
    ends with ``.json``, otherwise CSV with :data:`FORMULA_COLUMNS` (readable by
    ``python -m common.loss_check --csv``)."""
    if path.lower().endswith(".json"):
        doc = {"version": FORMULA_FILE_VERSION, "formulas": formula_records(accepted)}
        atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
        return
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(FORMULA_COLUMNS)
    for formula, info in _ranked(accepted):
        w.writerow([formula, _fmt(info["reward"]), info.get("round", 0), info["step"], int(info["valid"]),
                    f"{100 * info['pos']:.1f}", f"{100 * info['neg']:.1f}", info["dag"]])
    atomic_write_text(path, out.getvalue())


def run_search(controller, evaluate_candidate: Callable[[str], float], budget: int, *, baseline_auc: float,
               log_csv: str | None = None, checkpoint_path: str | None = None, formula_file: str | None = None,
               config: SearchConfig | None = None, resume: bool = True,
               log: Callable[[str], None] | None = None, round_index: int = 0, log_keep_rows: int = 0,
               prior_accepted: dict | None = None,
               on_candidate: Callable[[dict], None] | None = None) -> SearchResult:
    """One AutoLossGen search round of ``budget`` sampled candidates (see the module docstring).

    ``baseline_auc``: validation AUC of the current model (the round's starting
    baseline).  With ``checkpoint_path`` and ``resume``, an existing checkpoint
    is continued (the CSV log is cut back to the checkpointed rows first).
    Returns a :class:`SearchResult`; ``best_formula`` is None when no candidate
    reached the baseline.

    Several rounds can share one log and one formula file: ``round_index`` is
    written to the log's ``round`` column, the first ``log_keep_rows`` data rows
    of ``log_csv`` (earlier rounds) are kept, and ``prior_accepted`` (earlier
    rounds' accepted formulas, as in ``SearchResult.accepted``) is merged into
    the formula file.  ``on_candidate(row)`` is called with each candidate's log
    row (a dict of :data:`LOG_COLUMNS`) after its checkpoint is written.
    """
    cfg = config or SearchConfig()
    state = None
    if checkpoint_path and resume and os.path.exists(checkpoint_path):
        state = _load_checkpoint(checkpoint_path, controller, cfg)
        if log:
            log(f"autolossgen: resuming at candidate {state.step} from {checkpoint_path}")
    if state is None:
        state = _State(baseline_auc, cfg)
    if log_csv:
        _reset_csv(log_csv, log_keep_rows + (state.csv_rows if state.step else 0))
        state.csv_rows = state.step
    points = rejection_points(cfg.reject_points, cfg.reject_seed)

    while state.step < budget:
        t0 = time.perf_counter()
        dag, log_prob, entropy = controller.sample(state.rng)
        formula = to_string(dag.to_expr())
        chk = cheap_check(dag, points, cfg.zero_grad_tol, eps=cfg.eps)
        auc, reused_from, reason, accepted = None, "", "", False
        if not chk.ok:
            status, reason, reward = "rejected", chk.reason, -1.0
            state.counts["rejected"] += 1
        else:
            hit = state.cache.lookup(chk.signature)
            if hit is not None:
                status, (auc, reused_from) = "reused", hit
                state.counts["reused"] += 1
            else:
                status = "evaluated"
                auc = float(evaluate_candidate(formula))
                state.cache.add(chk.signature, auc, formula)
                state.counts["evaluated"] += 1
            if not math.isfinite(auc):
                reason, reward = "not_finite", -1.0
            elif auc < state.baseline - cfg.skip_lim:
                reason, reward = "below_baseline", -1.0
                state.counts["below_baseline"] += 1
            else:
                reward, accepted = auc, True
                prev = state.accepted.get(formula)
                if prev is None or auc > prev["reward"]:
                    v = validity_check(dag, eps=cfg.eps)          # the paper's second phase, for the formula file
                    state.accepted[formula] = {"reward": auc, "round": round_index, "step": state.step,
                                               "dag": dag.to_json(),
                                               "valid": v.passed, "pos": v.pos_frac, "neg": v.neg_frac}
                if auc > state.best["reward"]:
                    state.best = {"formula": formula, "reward": auc, "step": state.step}
        r = reward + cfg.entropy_weight * float(entropy)
        if accepted:
            state.baseline -= cfg.baseline_decay * (state.baseline - r)
        advantage = r - state.baseline
        state.pending.append([dag.to_json(), advantage])
        updated = ""
        if len(state.pending) >= cfg.num_aggregate:
            info = controller.update([LossDAG.from_json(d) for d, _ in state.pending], [a for _, a in state.pending])
            state.pending = []
            state.counts["updates"] += 1
            updated = _fmt(float(info.get("grad_norm", float("nan")))) if isinstance(info, dict) else "1"
        row = [round_index, state.step, formula, status, reason, _fmt(auc), _fmt(reward), _fmt(state.baseline),
               _fmt(advantage), _fmt(float(entropy)), _fmt(float(log_prob)), chk.key, reused_from, updated,
               dag.to_json(), f"{time.perf_counter() - t0:.3f}"]
        state.step += 1
        if log_csv:
            with open(log_csv, "a", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(row)
            state.csv_rows = state.step
        if formula_file and accepted:
            _write_formula_file(formula_file, _merge_accepted(prior_accepted, state.accepted))
        if checkpoint_path:
            _save_checkpoint(checkpoint_path, state, controller)
        if log:
            log(f"autolossgen [{state.step}/{budget}] {status:9s} {reason or 'ok':14s} "
                f"auc={_fmt(auc) or '-':>8s} b={state.baseline:.5f}  {formula}")
        if on_candidate:
            on_candidate(dict(zip(LOG_COLUMNS, row)))

    if formula_file and not os.path.exists(formula_file):
        _write_formula_file(formula_file, _merge_accepted(prior_accepted, state.accepted))
    c = state.counts
    return SearchResult(state.best["formula"], float(state.best["reward"]), int(state.best["step"]),
                        state.start_auc, state.baseline, state.step, c["evaluated"], c["reused"], c["rejected"],
                        c["below_baseline"], c["updates"], dict(state.accepted))


# --------------------------------------------------------------------------------------------
# One epoch of the paper's outer loop
# --------------------------------------------------------------------------------------------
class SearchHooks(Protocol):
    """What a trainer provides to :func:`search_epoch`."""

    def validation_auc(self) -> float:
        """Validation AUC of the real model now."""

    def trial_auc(self, formula: str) -> float:
        """Train a copy of the real model one epoch with ``formula``; its validation AUC (real model untouched)."""

    def train_epoch(self, formula: str | None) -> float:
        """Train the real model one epoch with ``formula`` (None: the configured loss); validation AUC after."""


def search_epoch(controller, hooks: SearchHooks, budget: int = 100, *, train_with_optim: bool = True,
                 rej_lim: float = 1e-5, log_csv: str | None = None, checkpoint_path: str | None = None,
                 formula_file: str | None = None, config: SearchConfig | None = None, resume: bool = True,
                 log: Callable[[str], None] | None = None, **round_options) -> dict:
    """Search a round from the current model, then train the real model one epoch.

    With ``train_with_optim`` the epoch uses the round's best candidate when its
    trial AUC is >= the starting AUC - ``rej_lim`` (the paper); otherwise (and
    without ``train_with_optim``) it uses the configured loss.  (The paper's code
    instead keeps sampling fresh candidates for the real model until one does
    not lower the AUC; that unbounded loop is not reproduced.)  ``round_options``
    (``round_index``, ``log_keep_rows``, ``prior_accepted``, ``on_candidate``) go
    to :func:`run_search`.
    """
    start = float(hooks.validation_auc())
    res = run_search(controller, hooks.trial_auc, budget, baseline_auc=start, log_csv=log_csv,
                     checkpoint_path=checkpoint_path, formula_file=formula_file, config=config, resume=resume,
                     log=log, **round_options)
    use = None
    if train_with_optim and res.best_formula is not None and res.best_reward >= res.start_auc - rej_lim:
        use = res.best_formula
    after = float(hooks.train_epoch(use))
    return {"start_auc": res.start_auc, "best_formula": res.best_formula, "best_reward": res.best_reward,
            "trained_with": use, "auc_after": after, "result": res}


# --------------------------------------------------------------------------------------------
# The ``--search_loss`` mode of the train examples (backend-free part)
# --------------------------------------------------------------------------------------------
SEARCH_LOG = "search_log.csv"
SEARCH_STATE = "search_state.json"
SEARCH_RESULTS = "search_results.json"
SEARCH_MODEL = "search_model.npz"
FORMULA_FILE = "formulas.json"
ROUND_CHECKPOINT = "search_round-{:03d}.json"
STATE_VERSION = 1
KILL_ENV = "CTR_ZOO_SEARCH_KILL_AFTER"     # testing aid: SIGKILL this process after N candidates
# search options that may change between a run and its resumption (the rest must match)
RESUMABLE_OPTIONS = ("search_budget", "search_epochs", "formula_path")


class LossSearchHooks(SearchHooks, Protocol):
    """What a backend's ``search_loss`` module provides to :func:`run_loss_search`.

    On top of :class:`SearchHooks`: ``name`` (the backend), ``schema_hash``,
    ``set_epoch(epoch)`` (the data epoch that the next trials and the next real
    epoch read), ``evaluate(split) -> {"auc", "logloss", "rows"}`` of the real
    model, ``get_weights()``, and ``state_arrays()`` / ``load_state_arrays(d)``:
    the real model, its optimiser and RNG state as numpy arrays.
    """

    name: str
    schema_hash: str

    def set_epoch(self, epoch: int) -> None: ...
    def evaluate(self, split: str) -> dict: ...
    def get_weights(self) -> dict: ...
    def state_arrays(self) -> dict: ...
    def load_state_arrays(self, arrays: dict) -> None: ...


def controller_config(args) -> ControllerConfig:
    """The controller of ``--controller_*`` (``args``: a TrainArgs with ``search["mode"] == "loss"``)."""
    o = args.search["options"]
    kw = dict(lstm_size=int(o["controller_hidden"]), num_nodes=int(o["controller_nodes"]), lr=float(o["controller_lr"]),
              clip_norm=float(o["controller_clip"]), seed=int(args.seed))
    if o.get("controller_ops"):
        kw["ops"] = tuple(o["controller_ops"])
    return ControllerConfig(**kw)


def search_config(args, round_index: int = 0) -> SearchConfig:
    """The search-round settings of ``--controller_*``; the sampling seed differs per round."""
    o = args.search["options"]
    return SearchConfig(num_aggregate=int(o["controller_aggregate"]), entropy_weight=float(o["controller_entropy"]),
                        baseline_decay=float(o["controller_baseline_decay"]),
                        seed=int(args.seed) * 1000 + int(round_index))


def search_paths(args) -> dict:
    d = args.model_save_dir
    fp = args.search["options"].get("formula_path") or os.path.join(d, FORMULA_FILE)
    return {"dir": d, "log": os.path.join(d, SEARCH_LOG), "state": os.path.join(d, SEARCH_STATE),
            "results": os.path.join(d, SEARCH_RESULTS), "model": os.path.join(d, SEARCH_MODEL),
            "formulas": os.path.abspath(os.path.expanduser(fp))}


def loss_search_fingerprint(args, backend: str, schema_hash: str) -> dict:
    from common.train_utils import run_fingerprint

    fp = run_fingerprint(args, backend, schema_hash, 1)
    fp["search"] = {k: v for k, v in sorted(args.search["options"].items()) if k not in RESUMABLE_OPTIONS}
    return json.loads(json.dumps(fp, sort_keys=True, default=list))


def _round_files(save_dir: str) -> list[str]:
    import glob

    return sorted(glob.glob(os.path.join(glob.escape(save_dir), "search_round-*.json*")))


def _remove(paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


def _save_state(paths: dict, state: dict, arrays: dict) -> None:
    """The outer state: JSON + an npz of the real model (``real/``) and the controller (``ctrl/``)."""
    name = f"{SEARCH_STATE}.{state['rounds_done']}.npz"
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(os.path.join(paths["dir"], name), buf.getvalue())
    old, state["arrays_file"] = state.get("arrays_file"), name
    atomic_write_text(paths["state"], json.dumps(state) + "\n")
    if old and old != name:
        _remove([os.path.join(paths["dir"], old)])


def _load_state(paths: dict) -> tuple[dict, dict]:
    try:
        with open(paths["state"], encoding="utf-8") as fh:
            state = json.load(fh)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported version {state.get('version')!r}")
        with np.load(os.path.join(paths["dir"], state["arrays_file"]), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"cannot resume the loss search: {exc} (pass --noresume to start over)",
                         path=paths["state"]) from None
    return state, arrays


def _prefixed(arrays: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def log_counts(rows: list[dict], eps: float = EPS) -> dict:
    """Counts over the candidate log (all rounds)."""
    st = [r["status"] for r in rows]
    accepted = [r for r in rows if r["status"] != "rejected" and not r["reason"]]
    trained = sorted({r["formula"] for r in rows if r["status"] != "rejected"})
    valid = sum(validity_check(f, eps=eps).passed for f in trained)
    reasons: dict = {}
    for r in rows:
        if r["status"] == "rejected":
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {"candidates": len(rows), "rejected_cheaply": st.count("rejected"), "rejected_why": reasons,
            "reused": st.count("reused"), "evaluated": st.count("evaluated"),
            "below_baseline": sum(r["reason"] == "below_baseline" for r in rows),
            "not_finite": sum(r["reason"] == "not_finite" for r in rows),
            "accepted": len(accepted), "distinct_trained_formulas": len(trained),
            "distinct_trained_passed_validity": int(valid),
            "search_wall_s": round(sum(float(r["wall_s"] or 0) for r in rows), 3)}


def trial_args(args):
    """The trial copy's :class:`common.train_utils.TrainArgs`: the same run without the L2 penalty
    (the paper trains candidates unregularised)."""
    cfg = {**args.model_config, "l2": 0.0, "l2_embedding": 0.0}
    return replace(args, model_config=cfg)


def run_loss_search(args, hooks: LossSearchHooks, controller, *, progress: bool | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
    """``--search_loss``: ``--search_epochs`` rounds of :func:`search_epoch` with files in ``--model_save_dir``.

    Files: ``search_log.csv`` (every candidate of every round, :data:`LOG_COLUMNS`),
    the formula file (``--formula_path``, default ``formulas.json``; ``.csv`` for
    the CSV layout), ``search_state.json`` + ``.npz`` (the state after the last
    completed round: real model, optimiser, RNG, controller), ``search_round-NNN.json``
    + ``.npz`` (the round in progress, :func:`run_search`'s checkpoint),
    ``search_results.json`` and ``search_model.npz`` (the real model at the end,
    canonical weights).  Rerunning the same command resumes where it stopped
    (``--noresume`` starts over); a finished search reports its result again, and
    a larger ``--search_epochs`` continues it.  Returns the summary (the result line).
    """
    from common.errors import FlagError
    from common.train_utils import host_rng_arrays, restore_host_rng, save_weights, write_json

    t_start = time.perf_counter()
    log = log or (lambda m: None)
    progress = args.progress if progress is None else progress
    opts = args.search["options"]
    budget, rounds = int(opts["search_budget"]), int(opts["search_epochs"])
    paths = search_paths(args)
    if os.path.isdir(paths["formulas"]):
        raise FlagError("formula_path", f"{paths['formulas']} is a directory; give a file name (.json or .csv)")
    os.makedirs(paths["dir"], exist_ok=True)
    fp = loss_search_fingerprint(args, hooks.name, hooks.schema_hash)
    ccfg = controller_config(args)

    state = None
    if args.resume and os.path.exists(paths["state"]):
        state, arrays = _load_state(paths)
        if state.get("fingerprint") != fp:
            theirs = state.get("fingerprint") or {}
            diff = sorted(k for k in set(fp) | set(theirs) if fp.get(k) != theirs.get(k))
            raise FlagError("model_save_dir", f"{paths['dir']} holds a loss search of a different run (differs in: "
                                              f"{', '.join(diff)}); pass --noresume to start over or choose another "
                                              f"--model_save_dir")
        hooks.load_state_arrays(_prefixed(arrays, "real/"))
        controller.load_state_arrays(_prefixed(arrays, "ctrl/"))
        restore_host_rng(_prefixed(arrays, "host/"))
        _remove(p for p in _round_files(paths["dir"])
                if not os.path.basename(p).startswith(ROUND_CHECKPOINT.format(state["rounds_done"])))
        where = ROUND_CHECKPOINT.format(state["rounds_done"])
        cont = os.path.exists(os.path.join(paths["dir"], where))
        if state["rounds_done"] >= rounds:
            log(f"the loss search in {paths['dir']} has finished ({state['rounds_done']} round(s)): reporting its "
                f"result (pass --noresume to search again, or more --search_epochs to continue)")
        else:
            log(f"resuming the loss search in {paths['dir']} at round {state['rounds_done']}"
                + (f" (from {where})" if cont else ""))
    if state is None:
        _remove(_round_files(paths["dir"]) + [paths["log"], paths["results"], paths["model"], paths["formulas"]]
                + [os.path.join(paths["dir"], f) for f in os.listdir(paths["dir"]) if f.startswith(SEARCH_STATE)])
        state = {"version": STATE_VERSION, "fingerprint": fp, "rounds_done": 0, "history": [], "accepted": {},
                 "log_rows": 0, "arrays_file": ""}
        _save_state(paths, state, {**{f"real/{k}": v for k, v in hooks.state_arrays().items()},
                                   **{f"ctrl/{k}": v for k, v in controller.state_arrays().items()},
                                   **{f"host/{k}": v for k, v in host_rng_arrays().items()}})

    bar = None
    if progress and state["rounds_done"] < rounds:
        from tqdm import tqdm

        bar = tqdm(total=rounds * budget, initial=min(state["log_rows"], rounds * budget), unit="cand",
                   desc=f"loss search {args.model}", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    seen = [0]

    def on_candidate(row: dict) -> None:
        seen[0] += 1
        if bar is not None:
            bar.n = min(state["log_rows"] + int(row["step"]) + 1, bar.total)
            bar.set_postfix(round=row["round"], last=row["status"][:4], auc=(row["auc"] or "-")[:7], refresh=False)
            bar.refresh()
        else:
            log(f"round {row['round']} candidate {int(row['step']) + 1}/{budget}: {row['status']} "
                f"{row['reason'] or ''} auc={row['auc'] or '-'} wall={row['wall_s']}s  {row['formula']}")
        if kill_after and seen[0] >= kill_after:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    class _Timed:                   # times the real model's epochs
        def __init__(self):
            self.train_s = 0.0

        def validation_auc(self):
            return hooks.validation_auc()

        def trial_auc(self, formula):
            return hooks.trial_auc(formula)

        def train_epoch(self, formula):
            t = time.perf_counter()
            try:
                return hooks.train_epoch(formula)
            finally:
                self.train_s = time.perf_counter() - t

    try:
        for r in range(state["rounds_done"], rounds):
            hooks.set_epoch(r)
            timed = _Timed()
            ck = os.path.join(paths["dir"], ROUND_CHECKPOINT.format(r))
            out = search_epoch(controller, timed, budget, train_with_optim=bool(opts["train_with_optim"]),
                               log_csv=paths["log"], checkpoint_path=ck, formula_file=paths["formulas"],
                               config=search_config(args, r), resume=True, round_index=r,
                               log_keep_rows=state["log_rows"], prior_accepted=state["accepted"],
                               on_candidate=on_candidate)
            res: SearchResult = out["result"]
            state["accepted"] = _merge_accepted(state["accepted"], res.accepted)
            state["log_rows"] += res.steps
            state["history"].append({"round": r, "candidates": res.steps, "start_auc": res.start_auc,
                                     "best_formula": res.best_formula,
                                     "best_auc": res.best_reward if res.best_formula else None,
                                     "final_baseline": res.baseline, "evaluated": res.evaluated,
                                     "reused": res.reused, "rejected_cheaply": res.rejected,
                                     "below_baseline": res.below_baseline, "controller_updates": res.updates,
                                     "trained_with": out["trained_with"], "valid_auc_after": out["auc_after"],
                                     "train_epoch_s": round(timed.train_s, 3)})
            state["rounds_done"] = r + 1
            _save_state(paths, state, {**{f"real/{k}": v for k, v in hooks.state_arrays().items()},
                                       **{f"ctrl/{k}": v for k, v in controller.state_arrays().items()},
                                       **{f"host/{k}": v for k, v in host_rng_arrays().items()}})
            _remove(_round_files(paths["dir"]))
            log(f"round {r}: start AUC {res.start_auc:.5f}, best {res.best_formula} "
                f"({res.best_reward:.5f}), trained with {out['trained_with'] or args.loss}: "
                f"valid AUC {out['auc_after']:.5f}")
    finally:
        if bar is not None:
            bar.close()

    # ---- summary ----
    if not os.path.exists(paths["formulas"]):
        _write_formula_file(paths["formulas"], state["accepted"])
    counts = log_counts(_read_rows(paths["log"]))
    records = formula_records(state["accepted"])
    best = records[0] if records else None
    best_valid = next((f for f in records if f["passed_validity"]), None)
    valid, test = hooks.evaluate("valid"), hooks.evaluate("test")
    save_weights(paths["model"], hooks.get_weights(),
                 {"model": args.model, "model_config": args.model_config, "search": "loss",
                  "valid_auc": valid["auc"], "rounds": state["rounds_done"]})
    summary = {"backend": hooks.name, "model": args.model, "mode": "search_loss", "rounds": state["rounds_done"],
               "budget": budget, **{k: v for k, v in counts.items() if k != "search_wall_s"},
               "accepted_formulas": len(records),
               "passed_validity": sum(f["passed_validity"] for f in records),
               "best_formula": best["formula"] if best else None, "best_auc": best["valid_auc"] if best else None,
               "best_valid_formula": best_valid["formula"] if best_valid else None,
               "best_valid_auc": best_valid["valid_auc"] if best_valid else None,
               "start_auc": state["history"][0]["start_auc"] if state["history"] else None,
               "valid_auc": valid["auc"], "test_auc": test["auc"], "test_logloss": test["logloss"],
               "search_wall_s": counts["search_wall_s"],
               "train_wall_s": round(sum(h["train_epoch_s"] for h in state["history"]), 3),
               "wall_s": round(time.perf_counter() - t_start, 3),
               "log_csv": paths["log"], "formula_path": paths["formulas"], "results": paths["results"],
               "checkpoint": paths["model"]}
    write_json(paths["results"], {**summary, "history": state["history"], "formulas": records,
                                  "controller": ccfg.to_dict(), "search_config": asdict(search_config(args)),
                                  "fingerprint": fp, "args": args.to_dict()})
    return summary
