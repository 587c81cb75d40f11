"""Raw Criteo-format text with realistic shapes, for throughput / memory measurements.

``python -m data_prep.fake --rows 1000000 --output /tmp/criteo_1m.txt [--seed 0] [--gzip]``
writes ``label, I1..I13, C1..C26`` tab-separated lines like the original Criteo
release: heavy-tailed integer counts (20% missing, I2 may be -1), 8-hex-digit hashed
categoricals drawn from Zipf-like distributions with Criteo-like cardinalities
(5% missing).  This is *not* the synthetic dataset of ``common.synthetic`` (no click
model); it only exercises the raw-text path of ``python -m data_prep``.
"""
from __future__ import annotations

import argparse
import gzip

import numpy as np
import pandas as pd

# rough Criteo Kaggle cardinalities (capped), one per C column
CARDINALITIES = [1400, 550, 1_000_000, 200_000, 300, 20, 12000, 600, 3, 60000, 5000, 1_000_000, 3000, 27, 12000,
                 500_000, 10, 5000, 2000, 4, 700_000, 17, 15, 100_000, 100, 50_000]


def fake_criteo_frame(rows: int, rng: np.random.Generator) -> pd.DataFrame:
    cols = {"label": (rng.random(rows) < 0.25).astype(np.int8).astype(str)}
    for i in range(13):
        v = np.floor(rng.exponential(5.0 * (i + 1), rows)).astype(np.int64) - (1 if i == 1 else 0)
        s = v.astype(str).astype(object)
        s[rng.random(rows) < 0.2] = ""
        cols[f"I{i + 1}"] = s
    for j, card in enumerate(CARDINALITIES):
        ids = np.minimum(np.floor(rng.pareto(1.2, rows) * card / 50), card - 1).astype(np.uint64)
        h = ((ids * np.uint64(2654435761) + np.uint64(j * 97)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        s = pd.Series(h).map("{:08x}".format).to_numpy(dtype=object)
        s[rng.random(rows) < 0.05] = ""
        cols[f"C{j + 1}"] = s
    return pd.DataFrame(cols)


def write_fake_criteo(path: str, rows: int, seed: int = 0, compress: bool = False, piece: int = 200_000) -> str:
    rng = np.random.default_rng(seed)
    opener = gzip.open if compress else open
    with opener(path, "wt", newline="") as fh:
        for start in range(0, rows, piece):
            df = fake_criteo_frame(min(piece, rows - start), rng)
            df.to_csv(fh, sep="\t", header=False, index=False, lineterminator="\n")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.fake", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gzip", action="store_true")
    a = p.parse_args(argv)
    write_fake_criteo(a.output, a.rows, a.seed, a.gzip)


if __name__ == "__main__":
    main()
