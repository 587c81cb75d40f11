"""Raw Criteo-format TSV files for benchmarks (no real data needed).

Each line: ``label \\t I1..I13 \\t C1..C26`` -- the Criteo display-advertising
challenge layout: an integer label, 13 integer count features that may be empty,
26 categorical features of 8 lowercase hex characters that may be empty.  Ids
are Zipf-distributed per field (cardinalities as in Criteo, capped), missing
rates approximate Criteo's, and the label has a mild first-order dependence on
a few fields (about 25% clicks).

    python benchmarks/criteo_raw.py OUT.tsv --rows 1000000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common.synthetic import CRITEO_CARDINALITIES  # noqa: E402

# approximate fraction of empty values per column in the Criteo day files
INT_MISSING = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.001, 0.04, 0.45, 0.04, 0.77, 0.22)
CAT_MISSING = (0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.03, 0.0, 0.03, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0,
               0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44)
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def _mix32(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, low 32 bits."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _hex8(v: np.ndarray) -> np.ndarray:
    """uint32 [n] -> bytes [n] of 8 lowercase hex digits (vectorised)."""
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    nib = (v[:, None] >> shifts) & np.uint32(15)
    return np.ascontiguousarray(_HEX[nib]).view("S8")[:, 0]


def _zipf_ranks(rng, n: int, K: int, s: float) -> np.ndarray:
    """Ranks 1..K with P(k) ~ k^-s (inverse CDF of the truncated power law)."""
    u = rng.random(n)
    x = (1.0 + u * ((K + 1.0) ** (1.0 - s) - 1.0)) ** (1.0 / (1.0 - s))
    return np.clip(np.floor(x), 1, K).astype(np.int64)


def write_criteo_tsv(path: str, rows: int, seed: int = 0, max_cardinality: int = 1_000_000, zipf: float = 1.2,
                     chunk_rows: int = 100_000, progress: bool = False) -> dict:
    """Write ``rows`` Criteo-format lines to ``path``; returns {rows, bytes, seconds}."""
    cards = [min(int(k), int(max_cardinality)) for k in CRITEO_CARDINALITIES]
    prng = np.random.default_rng([seed, 1])
    salts = prng.integers(0, 2**62, 26, dtype=np.uint64)
    # a mild planted first-order signal on a few small fields and one count
    w = {f: prng.normal(0, 0.6, cards[f] + 1) for f in (0, 4, 5, 13, 16, 19)}
    int_mu = prng.uniform(0.0, 3.0, 13)
    int_sd = prng.uniform(0.5, 1.5, 13)
    t0 = time.perf_counter()
    written = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rows, unit="rows", unit_scale=True, desc=os.path.basename(path), file=sys.stderr)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        for b, start in enumerate(range(0, rows, chunk_rows)):
            n = min(chunk_rows, rows - start)
            rng = np.random.default_rng([seed, 2, b])
            cols: list = [None] * 40
            logit = np.full(n, -1.7)
            for j in range(13):
                z = rng.standard_normal(n)
                v = np.floor(np.exp(int_mu[j] + int_sd[j] * z)).astype(np.int64)
                if j == 1:
                    v -= 1                          # I2 has small negative values in Criteo
                if j == 0:
                    logit += 0.3 * (z > 0.5)
                s = v.astype("S12")
                s[rng.random(n) < INT_MISSING[j]] = b""
                cols[1 + j] = s.tolist()
            for f in range(26):
                rank = _zipf_ranks(rng, n, cards[f], zipf)
                if f in w:
                    logit += w[f][rank]
                h = _hex8(_mix32(rank.astype(np.uint64) ^ salts[f]))
                h[rng.random(n) < CAT_MISSING[f]] = b""
                cols[14 + f] = h.tolist()
            label = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
            cols[0] = np.where(label, b"1", b"0").tolist()
            fh.write(b"\n".join([b"\t".join(r) for r in zip(*cols)]))
            fh.write(b"\n")
            written += n
            if bar is not None:
                bar.update(n)
    os.replace(tmp, path)
    if bar is not None:
        bar.close()
    return {"rows": written, "bytes": os.path.getsize(path), "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_cardinality", type=int, default=1_000_000)
    p.add_argument("--zipf", type=float, default=1.2)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = p.parse_args(argv)
    r = write_criteo_tsv(a.output, a.rows, a.seed, a.max_cardinality, a.zipf, progress=sys.stderr.isatty())
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['rows']} rows, {r['bytes'] / 1e6:.1f} MB in {r['seconds']:.1f}s -> {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
