"""Regularized evolution over NASRec subnets, and the zero-shot proxy arithmetic (backend-free).

Regularized evolution (Real et al. 2019, as used by NASRec)
-----------------------------------------------------------
1. Evaluate ``init_population`` distinct random subnets (any-path sampling).
2. For each of ``n_generations`` generations: draw ``sample_size`` members of the
   population without replacement; the parent is the best (lowest score) of them;
   make ``n_childs`` children, each by ``num_mutations(g, G)`` single-key mutations of
   the parent (more early, one at the end), re-mutating until its token hash was never
   evaluated; evaluate them, append them, and remove as many of the oldest members.
3. Return the top-k of every evaluated candidate.

Scores are minimised (validation logloss, or the SiGeo score which is already a
"lower is better" quantity).  ``score_fn(config)`` returns a float or ``(float, dict)``;
non-finite scores rank last.

Resumable: ``state_path`` (JSON) holds the state at the start of the current phase (the
rng state, population, visited hashes) plus a cache of every evaluation; a resumed run
replays the phase deterministically, taking scores from the cache, so it ends exactly
where an uninterrupted run would.  ``log_csv`` gets one row per evaluated candidate
(index, generation, token hash, score, wall seconds, config JSON, extra JSON).

Zero-shot proxies (SiGeo, Zheng et al. 2023; ZiCo, Li et al. 2023)
-------------------------------------------------------------------
From per-batch gradients g_b (b = 1..n, n >= 2) of the training loss at weights theta:

    ZiCo        = sum_params log( sum_{elements, std_b g > 0} mean_b |g_b| / std_b g_b )
    Fisher-Rao  = log( | sum_params sum_b g_b . theta | + 1e-10 )
    mean |grad| = sum_b sum_params |g_b| / (n * number of parameter elements)
    loss        = mean_b loss_b
    SiGeo       = -zico_coef * ZiCo - fr_coef * FR + loss_coef * loss      (lower is better)

(std with ddof=1 as torch.std in the reference implementation; "modules" = weight tensors.)
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from common.nas_space import (SearchSpace, SubnetConfig, detokenize, mutate, num_mutations, sample_subnet,
                              token_hash, tokenize)

STATE_VERSION = 1
CSV_FIELDS = ["index", "generation", "token_hash", "score", "wall_s", "config", "extra"]


# ---------------------------------------------------------------------------------------------
# zero-shot proxies from gradients
# ---------------------------------------------------------------------------------------------
def _dense_stack(per_batch, theta_shape):
    """per_batch: list of (rows or None, values) -> (G [n, ...], row index or None)."""
    if all(r is None for r, _ in per_batch):
        return np.stack([np.asarray(v, np.float64) for _, v in per_batch]), None
    rows = [np.asarray(r, np.int64) if r is not None else np.arange(theta_shape[0]) for r, _ in per_batch]
    union = np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
    g = np.zeros((len(per_batch), len(union)) + tuple(theta_shape[1:]), np.float64)
    for b, ((_, v), r) in enumerate(zip(per_batch, rows)):
        np.add.at(g[b], np.searchsorted(union, r), np.asarray(v, np.float64))
    return g, union


def proxies_from_gradients(grads: list[dict], theta: dict, losses, zico_coef: float = 1.0, fr_coef: float = 1.0,
                           loss_coef: float = 0.0, n_elements: int | None = None) -> dict:
    """Zero-shot proxies from ``grads`` (one dict per batch: weight name -> (rows or None, values);
    rows = row indices of a row-sparse gradient, duplicates summed; missing name = zero gradient),
    ``theta`` (weight name -> numpy array; at least every weight with a gradient), the per-batch
    losses, and ``n_elements`` = the model's number of trainable parameters (default: theta's)."""
    n = len(grads)
    if n < 2:
        raise ValueError("the zero-shot proxies need gradients from at least 2 batches")
    total = n_elements if n_elements is not None else sum(int(np.prod(np.shape(t))) for t in theta.values())
    zico, fr, abs_sum = 0.0, 0.0, 0.0
    names = sorted(set().union(*[set(gb) for gb in grads]))
    missing = [k for k in names if k not in theta]
    if missing:
        raise ValueError(f"no weights given for gradient(s) {missing[:5]}")
    for name in names:
        per = [gb.get(name) for gb in grads]
        th = np.asarray(theta[name], np.float64)
        sparse = any(p is not None and p[0] is not None for p in per)
        zero = (np.zeros(0, np.int64), np.zeros((0,) + th.shape[1:])) if sparse else (None, np.zeros(th.shape))
        per = [zero if p is None else p for p in per]
        g, rows = _dense_stack(per, th.shape)
        th_used = th if rows is None else th[rows]
        absg = np.abs(g)
        abs_sum += float(absg.sum())
        std = g.std(0, ddof=1)
        nz = std > 0
        s = float((absg.mean(0)[nz] / std[nz]).sum())
        if s > 0:
            zico += math.log(s)
        fr += float((g.sum(0) * th_used).sum())
    fisher_rao = math.log(abs(fr) + 1e-10)
    loss = float(np.mean(np.asarray(losses, np.float64)))
    return {
        "loss": loss,
        "fisher_rao": fisher_rao,
        "mean_abs_grad": abs_sum / (n * max(total, 1)),
        "zico": zico,
        "sigeo": -zico_coef * zico - fr_coef * fisher_rao + loss_coef * loss,
    }


# ---------------------------------------------------------------------------------------------
# regularized evolution
# ---------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    token_hash: str
    config: SubnetConfig
    score: float
    wall_s: float = 0.0
    generation: int = -1           # -1 = initial population
    index: int = 0                 # evaluation order
    extra: dict = field(default_factory=dict)

    @property
    def rank_key(self) -> float:
        return self.score if math.isfinite(self.score) else math.inf

    def to_dict(self) -> dict:
        return {"token_hash": self.token_hash, "config": self.config.to_dict(), "score": self.score,
                "wall_s": self.wall_s, "generation": self.generation, "index": self.index, "extra": self.extra}


@dataclass
class EvolutionResult:
    top: list[Candidate]
    history: list[Candidate]
    population: list[Candidate]

    @property
    def best(self) -> Candidate:
        return self.top[0]


def _blocks_json(cfg: SubnetConfig) -> str:
    return json.dumps([b.to_dict() for b in cfg.blocks], sort_keys=True, separators=(",", ":"))


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else rng)


def top_candidates(history, k: int) -> list[Candidate]:
    return sorted(history, key=lambda c: (c.rank_key, c.index))[:k]


class _Store:
    """Evaluation cache (token hash -> tokens, score, wall_s, generation, extra), the CSV log, and the
    resumable state: ``state_path`` (JSON: phase boundary + cache) and ``state_path.journal`` (one JSON
    line per evaluation since the last boundary, so no finished evaluation is lost)."""

    def __init__(self, state_path, log_csv):
        self.state_path, self.log_csv = state_path, log_csv
        self.journal = state_path + ".journal" if state_path else None
        self.cache: dict = {}
        self.logged: set[str] = set()
        if log_csv and os.path.exists(log_csv):
            with open(log_csv, newline="") as fh:
                self.logged = {row["token_hash"] for row in csv.DictReader(fh)}

    def load(self):
        """(settings, space dict, boundary) of a saved state, or None; fills the cache."""
        if not self.state_path or not os.path.exists(self.state_path):
            return None
        with open(self.state_path) as fh:
            st = json.load(fh)
        if st.get("version") != STATE_VERSION:
            raise ValueError(f"{self.state_path}: unsupported evolution state version {st.get('version')}")
        self.cache = st["cache"]
        if os.path.exists(self.journal):
            with open(self.journal) as fh:
                for line in fh:
                    try:
                        e = json.loads(line)
                    except json.JSONDecodeError:      # a torn last line
                        break
                    self.cache[e.pop("token_hash")] = e
        return st["settings"], st["space"], st["boundary"]

    def save(self, settings, space, boundary):
        if not self.state_path:
            return
        from common.io import atomic_write_text
        atomic_write_text(self.state_path, json.dumps({"version": STATE_VERSION, "settings": settings,
                                                       "space": space.to_dict(), "boundary": boundary,
                                                       "cache": self.cache}, default=_jsonable))
        with open(self.journal, "w"):
            pass

    def record(self, h, entry):
        self.cache[h] = entry
        if self.journal:
            with open(self.journal, "a") as fh:
                fh.write(json.dumps({"token_hash": h, **entry}, default=_jsonable) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def log(self, cand: Candidate):
        if not self.log_csv or cand.token_hash in self.logged:
            return
        new = not os.path.exists(self.log_csv) or os.path.getsize(self.log_csv) == 0
        os.makedirs(os.path.dirname(os.path.abspath(self.log_csv)), exist_ok=True)
        with open(self.log_csv, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerow({"index": cand.index, "generation": cand.generation, "token_hash": cand.token_hash,
                        "score": repr(cand.score), "wall_s": f"{cand.wall_s:.6f}", "config": _blocks_json(cand.config),
                        "extra": json.dumps(cand.extra, sort_keys=True, default=_jsonable)})
        self.logged.add(cand.token_hash)


def _score(out) -> tuple[float, dict]:
    score, extra = (out if isinstance(out, tuple) else (out, {}))
    return float(score), dict(extra or {})


def evolve(score_fn: Callable[[SubnetConfig], Any], space: SearchSpace, init_population: int = 128,
           sample_size: int = 64, n_childs: int = 8, n_generations: int = 240, rng=None,
           state_path: str | None = None, log_csv: str | None = None, progress: bool = True, top_k: int = 5,
           max_retries: int = 1000, on_evaluated: Callable[[Candidate, bool], None] | None = None) -> EvolutionResult:
    """Regularized evolution (module docstring).  ``rng``: a numpy Generator or an int seed.
    A run resumed from ``state_path`` must use the same space and settings.  ``on_evaluated(candidate,
    cached)`` is called for every candidate as it joins the history (``cached``: its score came from
    the saved state of an earlier, interrupted run), e.g. to drive a progress bar."""
    if init_population < 1 or n_childs < 1 or sample_size < 1 or n_generations < 0:
        raise ValueError("init_population, sample_size and n_childs must be >= 1, n_generations >= 0")
    rng = _as_rng(rng)
    settings = {"init_population": init_population, "sample_size": sample_size, "n_childs": n_childs,
                "n_generations": n_generations}
    store = _Store(state_path, log_csv)
    saved = store.load()
    history: list[Candidate] = []
    by_hash: dict[str, Candidate] = {}

    def candidate(h, generation) -> Candidate:
        e = store.cache[h]
        cfg = detokenize(e["tokens"], space)
        return Candidate(h, cfg, float(e["score"]), float(e["wall_s"]), generation, len(history),
                         dict(e.get("extra") or {}))

    def evaluate(cfg, h, generation) -> Candidate:
        cached = h in store.cache
        if not cached:                    # else: replaying a resumed phase
            t0 = time.perf_counter()
            score, extra = _score(score_fn(cfg))
            store.record(h, {"tokens": tokenize(cfg), "score": score if math.isfinite(score) else repr(score),
                             "wall_s": time.perf_counter() - t0, "generation": generation, "extra": extra})
        cand = candidate(h, generation)
        history.append(cand)
        by_hash[h] = cand
        store.log(cand)
        if on_evaluated is not None:
            on_evaluated(cand, cached)
        return cand

    def boundary(generation, population, visited):
        b = {"generation": generation, "rng": rng.bit_generator.state,
             "population": [c.token_hash for c in population], "visited": sorted(visited),
             "history": [c.token_hash for c in history]}
        store.save(settings, space, b)

    if saved is not None:
        s_settings, s_space, bnd = saved
        if SearchSpace.from_dict(s_space) != space:
            raise ValueError(f"{state_path}: the saved search space differs from this run's")
        if s_settings != settings:
            raise ValueError(f"{state_path}: saved settings {s_settings} differ from this run's {settings}")
        rng.bit_generator.state = bnd["rng"]
        start_gen = int(bnd["generation"])
        for h in bnd["history"]:
            cand = candidate(h, int(store.cache[h]["generation"]))
            history.append(cand)
            by_hash[h] = cand
            if on_evaluated is not None:
                on_evaluated(cand, True)
        population = [by_hash[h] for h in bnd["population"]]
        visited = set(bnd["visited"])
    else:
        start_gen, population, visited = -1, [], set()

    if start_gen == -1:
        boundary(-1, population, visited)
        tries = 0
        while len(population) < init_population and tries < max_retries * init_population:
            tries += 1
            cfg = sample_subnet(space, rng)
            h = token_hash(tokenize(cfg))
            if h in visited:
                continue
            visited.add(h)
            population.append(evaluate(cfg, h, -1))
        start_gen = 0
        if progress:
            _report(-1, n_generations, history, population)

    for g in range(start_gen, n_generations):
        boundary(g, population, visited)
        idx = rng.choice(len(population), size=min(sample_size, len(population)), replace=False)
        parent = min((population[int(i)] for i in idx), key=lambda c: (c.rank_key, c.index))
        nm = num_mutations(g, n_generations)
        children = []
        for _ in range(n_childs):
            for _attempt in range(max_retries):
                cfg, _ = mutate(parent.config, rng, nm)
                h = token_hash(tokenize(cfg))
                if h not in visited:
                    visited.add(h)
                    children.append(evaluate(cfg, h, g))
                    break
        population = population[len(children):] + children
        if progress:
            _report(g, n_generations, history, population)
    boundary(n_generations, population, visited)
    return EvolutionResult(top_candidates(history, top_k), history, population)


def save_top_k(result: EvolutionResult, out_dir: str, k: int | None = None) -> list[str]:
    """Write the top-k subnets as ``rank<r>_<token hash>.json`` (NASRec ``supernet_config`` files)
    plus ``top_k.json`` (rank, hash, score, file); returns the subnet file paths."""
    from common.io import atomic_write_text

    os.makedirs(out_dir, exist_ok=True)
    top = result.top if k is None else top_candidates(result.history, k)
    paths, summary = [], []
    for r, c in enumerate(top, 1):
        path = os.path.join(out_dir, f"rank{r}_{c.token_hash}.json")
        c.config.save(path)
        paths.append(path)
        summary.append({"rank": r, "token_hash": c.token_hash, "score": c.score, "file": os.path.basename(path),
                        "generation": c.generation, "extra": c.extra})
    atomic_write_text(os.path.join(out_dir, "top_k.json"), json.dumps(summary, indent=1, default=_jsonable) + "\n")
    return paths


def _report(g, n_generations, history, population):
    best = top_candidates(history, 1)
    pop_best = min((c.rank_key for c in population), default=math.inf)
    label = "initial population" if g < 0 else f"generation {g + 1}/{n_generations}"
    print(f"[evolution] {label}: evaluated {len(history)}, best {best[0].score if best else float('nan'):.6g}, "
          f"population best {pop_best:.6g}", file=sys.stderr, flush=True)


def random_search(score_fn: Callable[[SubnetConfig], Any], space: SearchSpace, n: int, rng=None,
                  top_k: int = 5, max_retries: int = 1000) -> EvolutionResult:
    """Baseline: ``n`` distinct random subnets, top-k by score."""
    rng = _as_rng(rng)
    seen, history = set(), []
    tries = 0
    while len(history) < n and tries < max_retries * max(n, 1):
        tries += 1
        cfg = sample_subnet(space, rng)
        h = cfg.token_hash()
        if h in seen:
            continue
        seen.add(h)
        t0 = time.perf_counter()
        score, extra = _score(score_fn(cfg))
        history.append(Candidate(h, cfg, score, time.perf_counter() - t0, -1, len(history), extra))
    return EvolutionResult(top_candidates(history, top_k), history, list(history))
