"""The machine's ceiling for DeepFM on the CPU: rows/s of the forward + backward + Adam step of the
MLP alone (plain ``torch.nn``, no embeddings, no data loading), the bound issue 5 quotes as
"75-90k rows/s at ~300 GFLOP/s" for its machine.  Compare train_speed.py's DeepFM with it.

    python benchmarks/mlp_ceiling.py --out benchmarks/results/mlp_ceiling.json

Input width = fields x embedding (39 x 16 = 624), hidden 400-400-400, output 1, batch 4096, fused
Adam, float32; the median of ``--windows`` windows of ``--window`` steps after ``--warmup`` steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fields", type=int, default=39)
    ap.add_argument("--embed_size", type=int, default=16)
    ap.add_argument("--mlp", default="400,400,400")
    ap.add_argument("--batch_size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--window", type=int, default=15)
    ap.add_argument("--windows", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "mlp_ceiling.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    from common.io import atomic_write_text
    from common.runtime import configure_process

    configure_process()
    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dims = [args.fields * args.embed_size] + [int(x) for x in args.mlp.split(",") if x.strip()]
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    mlp = nn.Sequential(*layers, nn.Linear(dims[-1], 1))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3, fused=True)
    B = args.batch_size
    xs = [torch.randn(B, dims[0], requires_grad=True) for _ in range(4)]   # the embeddings need dL/dx
    y = (torch.rand(B) < 0.25).float()
    loss_fn = nn.BCEWithLogitsLoss()

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss_fn(mlp(xs[i % 4]).squeeze(-1), y).backward()
        opt.step()

    for i in range(args.warmup):
        step(i)
    rates = []
    for w in range(args.windows):
        t0 = time.perf_counter()
        for i in range(args.window):
            step(i)
        rates.append(B * args.window / (time.perf_counter() - t0))
    macs = sum(a * b for a, b in zip(dims, dims[1:] + [1]))
    flop_per_row = 3 * 2 * macs              # forward, input gradient, weight gradient
    med = statistics.median(rates)
    res = dict(what="forward + backward + fused Adam of the DeepFM MLP alone", dims=dims + [1], batch_size=B,
               threads=args.threads, torch=torch.__version__, rows_per_s=med, windows=rates,
               gflop_per_s=med * flop_per_row / 1e9, flop_per_row=flop_per_row)
    atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("rows_per_s", "gflop_per_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
