"""AutoLossGen's checks on a loss formula, in numpy (no backend needed).

Validity check (the paper's second phase)
    A loss must push predictions the right way.  With ``n = 1000`` predictions
    ``p ~ U(eps, 1 - eps)`` (seeded, ``eps = 1e-6``), count the points where
    ``dl/dp < -tol`` with ``y = 1`` and where ``dl/dp > tol`` with ``y = 0``
    (``tol = 1e-6``, the paper's threshold; derivatives are analytic, from
    :meth:`common.loss_formula.Program.value_and_grad`).  The formula passes
    when these ``2n`` sign tests succeed MORE than 60% of the time AND the
    formula uses the label ``y`` at all (a formula ignoring ``y`` fails, as in
    the paper's script).

Cheap rejection (before any training, in the search loop)
    The gradient of the batch-mean loss with respect to 20 predictions
    ``p ~ U(0.1, 0.9)`` (seeded) with labels ``y = 1, 0, 1, 0, ...`` is the
    candidate's *gradient signature*.  Reject (reward -1) when the formula does
    not involve ``p`` ("no_gradient"), when the loss or the signature is not
    finite ("nan"), or when its infinity-norm is below 1e-4 ("zero_gradient").
    :class:`SignatureCache` maps signatures to rewards: a candidate whose
    signature is within 1e-4 (infinity norm) of an already-scored one reuses its
    reward (the paper's rule).  Binary labels make formulas that agree on
    ``y in {0, 1}`` (``y`` vs ``y*y``) share a signature.

CLI::

    python -m common.loss_check --formula "max((y+e)/(p+e), (p+e)/(y+e))" [--formula MaxR ...]
    python -m common.loss_check --csv found.csv [--column formula]

prints one line per formula (PASS/FAIL, the two sign-test percentages, the
total) and exits 0 when all pass, 1 when any fails, 2 on a malformed formula or
file (one ``error: ...`` line).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from dataclasses import dataclass

import numpy as np

from common.errors import FlagError, UserError, cli_errors
from common.loss_formula import EPS, Formula, compile_program, resolve

VALIDITY_POINTS = 1000
VALIDITY_THRESHOLD = 0.6
VALIDITY_TOL = 1e-6
VALIDITY_SEED = 0
REJECT_POINTS = 20
REJECT_SEED = 0
ZERO_GRAD_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# Validity
# --------------------------------------------------------------------------------------------
@dataclass
class Validity:
    formula: str
    pos_frac: float          # share of y = 1 points with dl/dp < -tol
    neg_frac: float          # share of y = 0 points with dl/dp > tol
    uses_label: bool
    threshold: float = VALIDITY_THRESHOLD

    @property
    def total_frac(self) -> float:
        return 0.5 * (self.pos_frac + self.neg_frac)

    @property
    def passed(self) -> bool:
        return self.uses_label and self.total_frac > self.threshold

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        extra = "" if self.uses_label else "  (ignores the label y)"
        return (f"{status}  y=1: {100 * self.pos_frac:5.1f}%  y=0: {100 * self.neg_frac:5.1f}%  "
                f"total: {100 * self.total_frac:5.1f}%  {self.formula}{extra}")


def validity_check(formula, n: int = VALIDITY_POINTS, seed: int = VALIDITY_SEED,
                   threshold: float = VALIDITY_THRESHOLD, tol: float = VALIDITY_TOL,
                   eps: float | None = None) -> Validity:
    """The paper's validity check (module docstring); ``formula``: anything ``resolve`` accepts."""
    f = resolve(formula, eps)
    prog = compile_program(f)
    rng = np.random.default_rng(seed)
    p = rng.uniform(EPS, 1.0 - EPS, n)
    _, g1 = prog.value_and_grad(p, np.ones_like(p))
    _, g0 = prog.value_and_grad(p, np.zeros_like(p))
    return Validity(str(f), float(np.mean(g1 < -tol)), float(np.mean(g0 > tol)), prog.uses_y, threshold)


# --------------------------------------------------------------------------------------------
# Cheap rejection and gradient signatures
# --------------------------------------------------------------------------------------------
def rejection_points(n: int = REJECT_POINTS, seed: int = REJECT_SEED):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.1, 0.9, n)
    y = (np.arange(n) % 2 == 0).astype(np.float64)
    return p, y


@dataclass
class CheapCheck:
    ok: bool
    reason: str                       # "" | "no_gradient" | "nan" | "zero_gradient"
    signature: np.ndarray | None      # d mean-loss / d p at the rejection points

    @property
    def key(self) -> str:
        return signature_key(self.signature) if self.signature is not None else ""


def cheap_check(formula, points=None, tol: float = ZERO_GRAD_TOL, eps: float | None = None) -> CheapCheck:
    prog = compile_program(formula, eps)
    p, y = points if points is not None else rejection_points()
    if not prog.uses_p:
        return CheapCheck(False, "no_gradient", None)
    v, g = prog.value_and_grad(p, y)
    sig = g / len(p)
    if not (np.all(np.isfinite(v)) and np.all(np.isfinite(sig))):
        return CheapCheck(False, "nan", None)
    if float(np.max(np.abs(sig))) < tol:
        return CheapCheck(False, "zero_gradient", sig)
    return CheapCheck(True, "", sig)


def signature_key(sig) -> str:
    """Short stable id of a signature (for logs; matching uses the 1e-4 tolerance)."""
    q = np.round(np.asarray(sig, np.float64) / ZERO_GRAD_TOL).astype(np.int64)
    return hashlib.sha1(q.tobytes()).hexdigest()[:12]


class SignatureCache:
    """Rewards of scored candidates keyed by gradient signature (inf-norm tolerance ``tol``)."""

    def __init__(self, tol: float = ZERO_GRAD_TOL):
        self.tol = tol
        self.sigs: list[np.ndarray] = []
        self.rewards: list[float] = []
        self.formulas: list[str] = []
        self._mat = None

    def __len__(self) -> int:
        return len(self.sigs)

    def lookup(self, sig):
        """(reward, formula it came from) of the first stored signature within tolerance, or None."""
        if not self.sigs:
            return None
        if self._mat is None:
            self._mat = np.stack(self.sigs)
        d = np.max(np.abs(self._mat - np.asarray(sig)[None, :]), axis=1)
        hit = np.nonzero(d < self.tol)[0]
        if hit.size == 0:
            return None
        i = int(hit[0])
        return self.rewards[i], self.formulas[i]

    def add(self, sig, reward: float, formula: str = "") -> None:
        self.sigs.append(np.asarray(sig, np.float64).copy())
        self.rewards.append(float(reward))
        self.formulas.append(formula)
        self._mat = None

    def to_json(self) -> list:
        return [[s.tolist(), r, f] for s, r, f in zip(self.sigs, self.rewards, self.formulas)]

    @classmethod
    def from_json(cls, items, tol: float = ZERO_GRAD_TOL) -> "SignatureCache":
        c = cls(tol)
        for s, r, f in items:
            c.add(np.asarray(s, np.float64), r, f)
        return c


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _read_csv(path: str, column: str) -> list[tuple[str, int]]:
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", path=path) from None
    with fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise UserError(f"no column {column!r} (columns: {', '.join(reader.fieldnames or [])})", path=path, line=1)
        out = []
        for row in reader:
            text = (row.get(column) or "").strip()
            if not text:
                raise UserError(f"empty {column!r}", path=path, line=reader.line_num)
            out.append((text, reader.line_num))
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.loss_check",
                                 description="AutoLossGen validity check of loss formulas (sign of dl/dp).")
    ap.add_argument("--formula", action="append", default=[], help="formula, name (MaxR, SumR, LogMin, BCE ...) "
                    "or 'formula:<expr>'; repeatable; write --formula=EXPR when EXPR starts with '-'")
    ap.add_argument("--csv", help="CSV file with a column of formulas (e.g. a search log or formula file)")
    ap.add_argument("--column", default="formula", help="CSV column holding the formulas (default: formula)")
    ap.add_argument("--points", type=int, default=VALIDITY_POINTS, help="random predictions per label (default 1000)")
    ap.add_argument("--threshold", type=float, default=VALIDITY_THRESHOLD, help="pass when the share of correct "
                    "signs is above this (default 0.6)")
    ap.add_argument("--seed", type=int, default=VALIDITY_SEED)
    ap.add_argument("--eps", type=float, default=None, help=f"formula epsilon e (default {EPS})")
    args = ap.parse_args(argv)
    with cli_errors():
        if not args.formula and not args.csv:
            raise FlagError("formula", "give --formula and/or --csv")
        if args.points <= 0:
            raise FlagError("points", f"must be positive, got {args.points}")
        items: list[tuple[Formula, str]] = []
        for text in args.formula:
            try:
                items.append((resolve(text, args.eps), text))
            except UserError as exc:
                raise FlagError("formula", exc.message) from None
        if args.csv:
            for text, line in _read_csv(args.csv, args.column):
                try:
                    items.append((resolve(text, args.eps), text))
                except UserError as exc:
                    raise UserError(exc.message, path=args.csv, line=line) from None
        failed = 0
        for f, text in items:
            v = validity_check(f, n=args.points, seed=args.seed, threshold=args.threshold)
            v.formula = text if f.name else f.text
            print(v.line(), flush=True)
            failed += not v.passed
        print(f"{len(items) - failed}/{len(items)} passed", flush=True)
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
