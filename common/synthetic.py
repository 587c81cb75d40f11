"""Planted synthetic CTR data: Criteo-shaped rows drawn from a KNOWN click model.

The zoo's embedded default dataset and its yardstick: since every row's true
click probability is known, ``truth.json`` records the Bayes-optimal AUC and
logloss per split, i.e. the best any model can possibly score on that split.

Rows (Criteo shape): ``n_categorical`` categorical fields ``C1..`` with Zipf
distributed ids and ``n_numeric`` numeric fields ``I1..`` (log-normal counts,
stored as standardised ``log1p(count)``).  Index 0 = missing, 1 = OOV (never
drawn), real ids start at 2 (``vocab_size = cardinality + 2``); the most
frequent id of a field is 2, the next 3, and so on (Zipf rank + 1).

The planted click model (all parameters drawn from ``seed``)::

    logit = b + sum_f w_f[x_f] + sum_j a_j x_j                          first order
              + sum_{i<j} <v_i, v_j>      v_f = V_f[x_f] (categorical),   FM pairwise, rank r
                                          v_j = x_j u_j   (numeric)
              + sum_{(f,g,h) in triples} t_f[x_f] t_g[x_g] t_h[x_h]        higher-order crosses
              + w2 . tanh(W1 [e_f[x_f] ; ... ; x_j ; ...] + b1)            small random MLP
    p     = sigmoid(logit),   label ~ Bernoulli(p)

Each of the four terms is rescaled so that its standard deviation over the data
is ``effects[term]``, and the bias ``b`` is found by bisection so that the mean
click probability is ``base_ctr`` (both on a seeded calibration sample).  A
field's effect strength decays with its cardinality (``(1 + K/card_ref) **
-card_damping``): high-cardinality fields exist but carry little signal, as
rare ids cannot be learned from a finite sample anyway.

Per-id parameters live in one float32 table per field of at most
``table_size`` rows; ids beyond it take the parameters of a hashed table row,
so a 10^6-id field costs a few MB.  Rows are generated in blocks of
:data:`BLOCK_ROWS` from ``default_rng([seed, split, block])``: the data does not
depend on ``chunk_rows`` and memory stays bounded for any number of rows.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import numpy as np

from common.errors import UserError
from common.io import atomic_directory, atomic_write_text
from common.metrics import auc, logloss
from common.schema import SCHEMA_FILE, Field, Schema
from common.store import STORE_DIR, StoreWriter, layout_for

__all__ = ["write_synthetic", "default_dataset", "load_truth", "PlantedModel", "CRITEO_CARDINALITIES",
           "DEFAULT_DATASET", "TRUTH_FILE", "GENERATOR_VERSION"]

GENERATOR_VERSION = 1
TRUTH_FILE = "truth.json"
BLOCK_ROWS = 1 << 16
SPLIT_NAMES = ("train", "valid", "test")

# Criteo (display advertising challenge) cardinalities of C1..C26, capped at 10^6.
CRITEO_CARDINALITIES = (1460, 583, 1000000, 1000000, 305, 24, 12517, 633, 3, 93145, 5683, 1000000, 3194,
                        27, 14992, 1000000, 10, 5652, 2173, 4, 1000000, 18, 15, 286181, 105, 142572)

DEFAULT_EFFECTS = {"first_order": 0.6, "pairwise": 0.8, "higher_order": 0.25, "mlp": 0.25}

# The embedded default dataset (``default_dataset()``): learnable in a short CPU training.
DEFAULT_DATASET = dict(
    rows=400_000,
    seed=2024,
    cardinalities=(120, 60, 100000, 20000, 40, 12, 800, 150, 3, 3000, 400, 50000, 250,
                   10, 1500, 10000, 8, 600, 200, 4, 30000, 15, 20, 5000, 80, 2000),
)

CALIBRATION_ROWS = 50_000

# Knobs of the planted click model (PlantedModel / write_synthetic keyword arguments).
MODEL_OPTIONS = dict(
    zipf_exponent=1.2,          # P(rank k) ~ k^-s per categorical field (scalar or one per field)
    latent_rank=4,              # r of the planted pairwise (FM) latent vectors
    effects=None,               # std of each logit term, default DEFAULT_EFFECTS
    missing_rate=None,          # per categorical field (scalar or list); None = Criteo-like random
    numeric_missing_rate=None,  # per numeric field; None = random
    card_ref=2000.0,            # first-order strength of a field ~ (1 + K/card_ref)^-card_damping
    card_damping=0.3,
    pair_card_ref=100.0,        # pairwise strength of a field ~ (1 + K/pair_card_ref)^-pair_card_damping
    pair_card_damping=0.5,
    rank_ref=100.0,             # an id's effects ~ (1 + (rank-1)/rank_ref)^-rank_damping
    rank_damping=0.5,
    n_triples=4,                # third-order crosses over moderate-cardinality fields
    mlp_fields=6,               # categorical fields read by the random MLP term
    mlp_numeric=3,              # numeric fields read by it
    mlp_dim=4,                  # per-id embedding size read by it
    mlp_hidden=16,
    table_size=1 << 16,         # max parameter rows per field; ids beyond share hashed tail rows
)


# ----------------------------------------------------------------------------------------------
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of uint64 values (vectorised; wraps modulo 2**64)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _as_list(value, n: int, what: str) -> list[float]:
    if np.isscalar(value):
        return [float(value)] * n
    out = [float(v) for v in value]
    if len(out) != n:
        raise UserError(f"{what}: expected {n} values, got {len(out)}")
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))   # stable for any z


class PlantedModel:
    """The generator: samples features and computes their true click probability.

    Deterministic in its settings; ``prob(cat, num)`` recomputes the stored
    ``prob`` from a batch's stored features.
    """

    def __init__(self, cardinalities, n_numeric: int = 13, seed: int = 0, base_ctr: float = 0.25, **options):
        unknown = sorted(set(options) - set(MODEL_OPTIONS))
        if unknown:
            raise UserError(f"unknown synthetic option(s) {unknown}; known: {sorted(MODEL_OPTIONS)}")
        o = {**MODEL_OPTIONS, **options}
        self.options = o
        zipf_exponent, latent_rank, effects = o["zipf_exponent"], o["latent_rank"], o["effects"]
        missing_rate, numeric_missing_rate = o["missing_rate"], o["numeric_missing_rate"]
        card_ref, card_damping = float(o["card_ref"]), float(o["card_damping"])
        pair_card_ref, pair_card_damping = float(o["pair_card_ref"]), float(o["pair_card_damping"])
        rank_ref, rank_damping = float(o["rank_ref"]), float(o["rank_damping"])
        n_triples, mlp_fields, mlp_numeric = o["n_triples"], o["mlp_fields"], o["mlp_numeric"]
        mlp_dim, mlp_hidden, table_size = o["mlp_dim"], o["mlp_hidden"], int(o["table_size"])
        self.card = [int(k) for k in cardinalities]
        if any(k < 1 for k in self.card):
            raise UserError("cardinalities must be >= 1")
        if not 0.0 < base_ctr < 1.0:
            raise UserError(f"base_ctr must be in (0, 1), got {base_ctr}")
        if table_size < 4:
            raise UserError("table_size must be >= 4")
        C, J, r = len(self.card), int(n_numeric), int(latent_rank)
        if C + J == 0:
            raise UserError("need at least one field")
        self.C, self.J, self.r = C, J, r
        self.seed, self.base_ctr = int(seed), float(base_ctr)
        self.effects = {**DEFAULT_EFFECTS, **(effects or {})}
        unknown = set(self.effects) - set(DEFAULT_EFFECTS)
        if unknown:
            raise UserError(f"unknown effect(s) {sorted(unknown)}; known: {sorted(DEFAULT_EFFECTS)}")
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0x5EED])

        self.zipf = np.array(_as_list(zipf_exponent, C, "zipf_exponent"), np.float64)
        if np.any(self.zipf <= 0):
            raise UserError("zipf_exponent must be > 0")
        if missing_rate is None:   # Criteo-like: some fields are often empty
            missing_rate = np.where(rng.random(C) < 0.3, rng.uniform(0.02, 0.4, C), 0.0)
        if numeric_missing_rate is None:
            numeric_missing_rate = np.where(rng.random(J) < 0.5, rng.uniform(0.02, 0.4, J), 0.0)
        self.missing = np.array(_as_list(missing_rate, C, "missing_rate") if C else [], np.float64)
        self.num_missing = np.array(_as_list(numeric_missing_rate, J, "numeric_missing_rate") if J else [],
                                    np.float64)

        # --- per-id parameters, one concatenated table per kind, field f at offset[f] ----------
        #     W [rows] first-order weight, V [r, rows] latent vectors (pairwise term),
        #     T [rows] scalars of the triple crosses, E [mlp_dim, rows] embeddings read by the MLP
        self.mlp_dim = int(mlp_dim)
        self.table_rows = [min(k + 2, int(table_size)) for k in self.card]
        self.offsets = np.r_[0, np.cumsum(self.table_rows)[:-1]].astype(np.int64) if C else np.zeros(0, np.int64)
        total = int(sum(self.table_rows))
        damp1 = [(1.0 + k / card_ref) ** -card_damping for k in self.card]
        damp2 = [(1.0 + k / pair_card_ref) ** -pair_card_damping for k in self.card]
        self.W = np.empty(total, np.float32)
        self.V = np.empty((r, total), np.float32)
        self.T = np.empty(total, np.float32)
        self.E = np.empty((self.mlp_dim, total), np.float32)
        for f in range(C):
            sl = slice(int(self.offsets[f]), int(self.offsets[f]) + self.table_rows[f])
            s1 = damp1[f] * math.exp(0.35 * rng.standard_normal())
            s2 = damp2[f] * math.exp(0.35 * rng.standard_normal())
            rows = self.table_rows[f]
            # effects shrink with the id's Zipf rank (row - 1): rare ids behave closer to average
            g = ((1.0 + np.maximum(np.arange(rows) - 2.0, 0.0) / rank_ref) ** -rank_damping).astype(np.float32)
            self.W[sl] = s1 * g * rng.standard_normal(rows, dtype=np.float32)
            self.V[:, sl] = s2 / math.sqrt(max(r, 1)) * g * rng.standard_normal((r, rows), dtype=np.float32)
            self.T[sl] = g * rng.standard_normal(rows, dtype=np.float32)
            self.E[:, sl] = g * rng.standard_normal((self.mlp_dim, rows), dtype=np.float32)
        self.salts = rng.integers(0, 2**62, C, dtype=np.uint64) if C else np.zeros(0, np.uint64)

        # --- numeric fields: count = floor(exp(mu + sd z)), x = standardised log1p(count) -------
        self.num_mu = rng.uniform(0.0, 3.0, J)
        self.num_sd = rng.uniform(0.5, 1.5, J)
        self.num_a = (rng.standard_normal(J) * np.exp(0.35 * rng.standard_normal(J))).astype(np.float32)
        self.num_u = (rng.standard_normal((J, r)) / math.sqrt(max(r, 1))
                      * np.exp(0.35 * rng.standard_normal((J, 1)))).astype(np.float32)
        self.num_mean = np.zeros(J)
        self.num_std = np.ones(J)

        # --- higher-order crosses and the MLP read moderate-cardinality fields -------------------
        moderate = [f for f in range(C) if 5 <= self.card[f] <= 1000] or list(range(C))
        self.triples = []
        if C >= 3:
            pool = moderate if len(moderate) >= 3 else list(range(C))
            for _ in range(int(n_triples)):
                self.triples.append(tuple(int(i) for i in rng.choice(pool, 3, replace=False)))
        self.mlp_fields = [int(i) for i in rng.choice(moderate, min(int(mlp_fields), len(moderate)), replace=False)] \
            if C and mlp_fields else []
        self.mlp_numeric = list(range(min(int(mlp_numeric), J)))
        fan_in = len(self.mlp_fields) * self.mlp_dim + len(self.mlp_numeric)
        self.mlp_hidden = int(mlp_hidden) if fan_in else 0
        self.W1 = (rng.standard_normal((fan_in, self.mlp_hidden)) * 2.0 / math.sqrt(max(fan_in, 1))).astype(np.float32)
        self.b1 = (0.5 * rng.standard_normal(self.mlp_hidden)).astype(np.float32)
        self.W2 = (rng.standard_normal(self.mlp_hidden) / math.sqrt(max(self.mlp_hidden, 1))).astype(np.float32)

        # --- calibration: term scales, then the bias for the target CTR -------------------------
        self.scale = {k: 1.0 for k in DEFAULT_EFFECTS}
        self.bias = 0.0
        cal = self.sample_features(np.random.default_rng([self.seed & 0xFFFFFFFF, 0xCA11B]), CALIBRATION_ROWS,
                                   standardise=False)
        raw_num = cal["raw_num"]
        for j in range(J):
            present = ~np.isnan(raw_num[:, j])
            v = raw_num[present, j]
            self.num_mean[j] = float(v.mean()) if v.size else 0.0
            self.num_std[j] = float(v.std()) if v.size and v.std() > 0 else 1.0
        num = self._standardise(raw_num)
        terms = self._terms(cal["cat_t"], num)
        self.term_std = {}
        for k, v in terms.items():
            sd = float(np.std(v))
            self.term_std[k] = sd
            self.scale[k] = self.effects[k] / sd if sd > 0 else 0.0
        z = sum(self.scale[k] * terms[k].astype(np.float64) for k in terms)
        self.bias = self._calibrate_bias(z, self.base_ctr)
        self.logit_std = float(np.std(z))

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _calibrate_bias(z: np.ndarray, target: float) -> float:
        lo, hi = -30.0, 30.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if _sigmoid(mid + z).mean() < target:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def _standardise(self, raw_num: np.ndarray) -> np.ndarray:
        x = (raw_num - self.num_mean) / self.num_std
        return np.nan_to_num(x, nan=0.0).astype(np.float32)   # missing -> the mean

    def sample_features(self, rng: np.random.Generator, n: int, standardise: bool = True) -> dict:
        """``cat_t`` int32 [C, n] (Zipf ids + 2, 0 = missing; field-major) and ``num`` float32 [n, J]."""
        C, J = self.C, self.J
        cat_t = np.zeros((C, n), np.int32)
        if C:
            # inverse CDF of the power law x^-s truncated to [1, K+1); rank = floor(x) in [1, K]
            x = rng.random((C, n), dtype=np.float32)
            x64 = np.empty(n)
            for f in range(C):
                s, K1 = self.zipf[f], self.card[f] + 1.0
                row = x64
                row[:] = x[f]
                if abs(1.0 - s) > 1e-9:
                    row *= K1 ** (1.0 - s) - 1.0
                    row += 1.0
                    np.power(row, 1.0 / (1.0 - s), out=row)
                else:
                    np.power(K1, row, out=row)
                np.clip(row, 1.0, float(self.card[f]), out=row)
                cat_t[f] = row          # truncation = floor (row >= 1)
            cat_t += 1
            for f in np.flatnonzero(self.missing > 0):
                cat_t[f, rng.random(n, dtype=np.float32) < self.missing[f]] = 0
        raw = np.zeros((n, J))
        if J:
            z = rng.standard_normal((n, J))
            raw = np.log1p(np.floor(np.exp(self.num_mu + self.num_sd * z)))
            raw[rng.random((n, J)) < self.num_missing] = np.nan
        out = {"cat_t": cat_t}
        if standardise:
            out["num"] = self._standardise(raw)
        else:
            out["raw_num"] = raw
        return out

    def table_index(self, cat_t: np.ndarray) -> np.ndarray:
        """Rows [C, n] of the concatenated parameter tables for ids ``cat_t`` [C, n] (ids beyond a
        field's table take the parameters of a hashed row in the tail half of it)."""
        gi = cat_t.astype(np.int64)
        for f in range(self.C):
            T = self.table_rows[f]
            ids = gi[f]
            if self.card[f] + 2 > T:
                big = ids >= T
                if big.any():
                    h = _splitmix64(ids[big].astype(np.uint64) ^ self.salts[f])
                    ids[big] = (h % np.uint64(T - T // 2)).astype(np.int64) + T // 2
            ids += self.offsets[f]
        return gi

    def terms(self, cat: np.ndarray, num: np.ndarray) -> dict:
        """The four unscaled logit terms (float32 [n] each) of rows ``cat`` [n, C], ``num`` [n, J]."""
        return self._terms(np.ascontiguousarray(np.asarray(cat).T), np.asarray(num, np.float32))

    def _terms(self, cat_t: np.ndarray, num: np.ndarray) -> dict:
        n = cat_t.shape[1]
        gi = self.table_index(cat_t)                                 # [C, n]
        first = np.take(self.W, gi).sum(0, dtype=np.float32)
        vsum = np.zeros((self.r, n), np.float32)
        vsq = np.zeros(n, np.float32)
        for k in range(self.r):
            v = np.take(self.V[k], gi)                               # [C, n]
            vsum[k] = v.sum(0)
            v *= v
            vsq += v.sum(0)
        if self.J:
            numt = np.ascontiguousarray(num.T)                       # [J, n]
            first += self.num_a @ numt
            vsum += self.num_u.T @ numt
            vsq += np.einsum("ij,ij->i", self.num_u, self.num_u) @ (numt * numt)
        vsum *= vsum
        pair = 0.5 * (vsum.sum(0) - vsq)
        high = np.zeros(n, np.float32)
        for tr in self.triples:
            high += np.take(self.T, gi[list(tr)]).prod(0)
        if self.mlp_hidden:
            parts = [np.take(self.E, gi[f], axis=1) for f in self.mlp_fields]       # [mlp_dim, n] each
            inp = np.concatenate(parts + [numt[self.mlp_numeric]] if self.J else parts, 0)
            mlp = self.W2 @ np.tanh(self.W1.T @ inp + self.b1[:, None])
        else:
            mlp = np.zeros(n, np.float32)
        return {"first_order": first, "pairwise": pair, "higher_order": high, "mlp": mlp.astype(np.float32)}

    def _logit(self, cat_t: np.ndarray, num: np.ndarray) -> np.ndarray:
        t = self._terms(cat_t, num)
        z = np.full(cat_t.shape[1], self.bias, np.float64)
        for k, v in t.items():
            z += self.scale[k] * v.astype(np.float64)
        return z

    def logit(self, cat: np.ndarray, num: np.ndarray) -> np.ndarray:
        """True logit (float64 [n]) of rows ``cat`` [n, C], ``num`` [n, J]."""
        return self._logit(np.ascontiguousarray(np.asarray(cat).T), np.asarray(num, np.float32))

    def prob(self, cat: np.ndarray, num: np.ndarray) -> np.ndarray:
        """True click probability (float32, exactly as stored) of rows with these features."""
        return _sigmoid(self.logit(cat, num)).astype(np.float32)

    def sample(self, rng: np.random.Generator, n: int) -> dict:
        """n rows: ``cat``, ``num``, ``prob`` [n, 1] and ``label`` [n, 1] ~ Bernoulli(prob)."""
        feats = self.sample_features(rng, n)
        p = _sigmoid(self._logit(feats["cat_t"], feats["num"])).astype(np.float32)
        label = (rng.random(n, dtype=np.float32) < p).astype(np.float32)
        return {"cat": feats["cat_t"].T, "num": feats["num"], "seq": np.zeros((n, 0), np.int32),
                "label": label[:, None], "prob": p[:, None]}

    def describe(self) -> dict:
        return {"bias": self.bias, "term_scale": dict(self.scale), "raw_term_std": self.term_std,
                "logit_std": self.logit_std, "triples": [list(t) for t in self.triples],
                "mlp_fields": self.mlp_fields, "mlp_numeric": self.mlp_numeric,
                "numeric_mean": self.num_mean.tolist(), "numeric_std": self.num_std.tolist()}


# ----------------------------------------------------------------------------------------------
def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if np.isscalar(v):
        return v.item() if hasattr(v, "item") else v
    return [_jsonable(x) for x in v]


def _split_rows(rows: int, split) -> dict[str, int]:
    fr = [float(x) for x in split]
    if len(fr) != 3 or any(x < 0 for x in fr) or sum(fr) <= 0:
        raise UserError(f"split must be three non-negative fractions (train, valid, test), got {split}")
    tot = sum(fr)
    n_train = int(round(rows * fr[0] / tot))
    n_valid = int(round(rows * fr[1] / tot))
    n_valid = min(n_valid, rows - n_train)
    return {"train": n_train, "valid": n_valid, "test": rows - n_train - n_valid}


def write_synthetic(output_dir: str, rows: int = 1_000_000, seed: int = 0, split=(0.8, 0.1, 0.1),
                    base_ctr: float = 0.25, cardinalities=None, n_numeric: int = 13, n_categorical: int = 26,
                    chunk_rows: int = 4096, progress: bool = True, overwrite: bool = False,
                    name: str = "synthetic", **model_options) -> Schema:
    """Write a planted synthetic dataset directory (schema.json, store/ with ``prob``, truth.json).

    ``rows`` are cut into train/valid/test by the ``split`` fractions (normalised
    to sum 1, so absolute counts work too).  ``cardinalities``: ids per
    categorical field (default: Criteo's, capped at 10^6, cycled to
    ``n_categorical``).  ``model_options`` are the knobs of :class:`PlantedModel`
    (``zipf_exponent``, ``latent_rank``, ``effects``, ``missing_rate``,
    ``rank_ref`` ...).  All settings are recorded in ``schema.settings`` and in
    ``truth.json``.  Raises FileExistsError if ``output_dir`` exists and not
    ``overwrite``; the directory appears complete or not at all.
    """
    rows = int(rows)
    if rows < 1:
        raise UserError(f"rows must be >= 1, got {rows}")
    if cardinalities is None:
        cardinalities = [CRITEO_CARDINALITIES[i % len(CRITEO_CARDINALITIES)] for i in range(int(n_categorical))]
    cardinalities = [int(k) for k in cardinalities]
    if len(cardinalities) != int(n_categorical):
        if n_categorical != 26:   # explicitly asked for a different count than given
            raise UserError(f"cardinalities has {len(cardinalities)} values but n_categorical={n_categorical}")
        n_categorical = len(cardinalities)
    unknown = sorted(set(model_options) - set(MODEL_OPTIONS))
    if unknown:
        raise UserError(f"unknown synthetic option(s) {unknown}; known: {sorted(MODEL_OPTIONS)}")
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} exists (pass overwrite=True to replace it)")
    splits = _split_rows(rows, split)

    opts = {**MODEL_OPTIONS, **model_options}
    opts["effects"] = {**DEFAULT_EFFECTS, **(opts["effects"] or {})}
    settings = dict(generator="common.synthetic", generator_version=GENERATOR_VERSION, rows=rows, seed=int(seed),
                    split=[float(x) for x in split], base_ctr=float(base_ctr), cardinalities=cardinalities,
                    n_numeric=int(n_numeric), n_categorical=int(n_categorical), block_rows=BLOCK_ROWS,
                    **{k: _jsonable(v) for k, v in opts.items()})
    model = planted_model(settings)

    fields = [Field(f"C{i + 1}", "categorical", vocab_size=k + 2, source=f"C{i + 1}",
                    encoder={"type": "synthetic", "cardinality": k, "zipf_exponent": float(model.zipf[i]),
                             "missing_rate": float(model.missing[i])})
              for i, k in enumerate(cardinalities)]
    fields += [Field(f"I{j + 1}", "numeric", source=f"I{j + 1}",
                     encoder={"type": "synthetic", "transform": "log1p_standardise",
                              "mean": float(model.num_mean[j]), "std": float(model.num_std[j]),
                              "missing_rate": float(model.num_missing[j])})
               for j in range(int(n_numeric))]
    schema = Schema(fields=fields, splits=splits, name=name, format="synthetic", settings=settings,
                    extra={"truth": TRUTH_FILE})
    layout = layout_for(schema, with_prob=True)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rows, unit="rows", unit_scale=True, desc=f"synthetic {os.path.basename(output_dir)}",
                   file=sys.stderr, mininterval=0.5)
    truth_splits = {}
    try:
        with atomic_directory(output_dir, overwrite=overwrite) as tmp:
            wr = StoreWriter(os.path.join(tmp, STORE_DIR), layout, schema.model_hash(), chunk_rows=chunk_rows)
            for si, sname in enumerate(SPLIT_NAMES):
                n = splits[sname]
                probs, labels = [], []
                for b, start in enumerate(range(0, n, BLOCK_ROWS)):
                    m = min(BLOCK_ROWS, n - start)
                    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 1 + si, b])
                    arrays = model.sample(rng, m)
                    wr.append(sname, arrays)
                    probs.append(arrays["prob"][:, 0])
                    labels.append(arrays["label"][:, 0].astype(np.uint8))
                    if bar is not None:
                        bar.update(m)
                truth_splits[sname] = _split_truth(np.concatenate(probs) if probs else np.zeros(0, np.float32),
                                                   np.concatenate(labels) if labels else np.zeros(0, np.uint8))
            wr.close(extra_meta={"synthetic": True})
            truth = {"generator": "common.synthetic", "generator_version": GENERATOR_VERSION,
                     "splits": truth_splits, "settings": settings, "planted": model.describe()}
            atomic_write_text(os.path.join(tmp, TRUTH_FILE), json.dumps(truth, indent=2) + "\n")
            schema.save(tmp)
    finally:
        if bar is not None:
            bar.close()
    schema.path = output_dir
    return schema


def _split_truth(p: np.ndarray, y: np.ndarray) -> dict:
    n = int(y.size)
    return {"rows": n,
            "bayes_auc": auc(y, p) if n else float("nan"),
            "bayes_logloss": logloss(y, p) if n else float("nan"),
            "ctr": float(y.mean()) if n else float("nan"),
            "mean_prob": float(p.astype(np.float64).mean()) if n else float("nan")}


def planted_model(settings: dict) -> PlantedModel:
    """The :class:`PlantedModel` of a dataset's ``schema.settings`` (or truth.json ``settings``)."""
    keys = ("cardinalities", "n_numeric", "seed", "base_ctr") + tuple(MODEL_OPTIONS)
    return PlantedModel(**{k: settings[k] for k in keys if k in settings})


def load_truth(dataset_dir: str) -> dict:
    """``truth.json`` of a synthetic dataset: ``truth["splits"][split]["bayes_auc"]`` etc."""
    p = os.path.join(dataset_dir, TRUTH_FILE)
    try:
        with open(p) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise UserError("no truth.json: not a synthetic dataset", path=dataset_dir) from None


# ----------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    return os.environ.get("CTR_ZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ctr_zoo")


def _is_complete(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, x))
               for x in (SCHEMA_FILE, TRUTH_FILE, os.path.join(STORE_DIR, "data.mdb")))


def default_dataset(cache_dir: str | None = None, rows: int | None = None, progress: bool = True) -> str:
    """Path of the embedded default dataset, generated once into the cache and reused afterwards.

    The directory name is a hash of the generator version and parameters, so a
    change of either makes a new dataset.  Two processes racing to create it are
    safe: each builds in its own temporary directory and the first atomic rename
    wins; the loser uses the winner's copy.
    """
    params = dict(DEFAULT_DATASET)
    if rows is not None:
        params["rows"] = int(rows)
    params["cardinalities"] = list(params["cardinalities"])
    key = hashlib.sha1(json.dumps([GENERATOR_VERSION, params], sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir or default_cache_dir()
    path = os.path.join(root, f"synthetic-{params['rows']}-{key}")
    if _is_complete(path):
        return path
    if progress:
        print(f"generating the default synthetic dataset ({params['rows']} rows) into {path} "
              f"(once; it is cached)", file=sys.stderr, flush=True)
    try:
        write_synthetic(path, progress=progress, overwrite=False, **params)
    except OSError:   # FileExistsError / ENOTEMPTY: another process finished first
        if not _is_complete(path):
            raise
    return path
