"""The PyTorch side on a CUDA GPU computes what it computes on the CPU (run on a GPU machine; CI has none).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

Three checks, each recorded in the JSON with its measured figures and pass/fail:

1. ``loader``: ``zoo_torch.data.batches(..., device="cuda")`` (page-locked copies and the row sort on a
   side stream) yields exactly the CPU loader's batches -- every categorical, numeric and sequence
   field, the labels, the global table rows and their sort (uniq, order, starts) -- over two shuffled
   epochs and a rank-1-of-2 shard of a random dataset.
2. ``zoo``: every registered model, from the same random weights and on the same batches, trained
   ``--steps`` LazyAdam and Adagrad steps on the CPU and on the GPU -- the bars of the torch/TF
   parity suite's training check (tests/parity_utils.py), with the GPU in place of TensorFlow: first
   logits within 1e-5, validation AUC within 1e-3, final weights within 1e-4 (worst tensor, relative
   to its largest magnitude) or, for a tensor over that, within 10x float32's own drift (the same CPU
   steps in float64; Adam turns the round-off of a near-zero gradient into a step of ~lr) and never
   over 1e-2.  TF32 stays off (torch's default), so both run float32 math.
3. ``entry_point``: ``train_example_pytorch.py --gpu_ids 0`` against the same command on the CPU
   (the flags of tests/test_distributed.py: 20 Adagrad steps with L2): final checkpoint weights
   within 1e-5 relative, and the run reports the GPU as its device.

Exit status 1 if any check fails.  Multi-GPU paths (nn.DataParallel, DDP with nccl) need two GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "tests")) if p not in sys.path]   # tests/: the shared helpers

import torch  # noqa: E402

import zoo_torch  # noqa: E402
from common.batching import categorical_offsets, row_plan  # noqa: E402
from common.metrics import auc  # noqa: E402
from conftest import subprocess_env, write_random_dataset  # noqa: E402
from test_distributed import FLAGS as DIST_FLAGS, STEPS as DIST_STEPS, _final_weights as final_weights  # noqa: E402
from parity_base import (SENSITIVITY_FACTOR, TRAIN_CONFIG, WEIGHT_CAP, random_weights, rel,  # noqa: E402
                         small_config, to_float64)
from zoo_torch import data as zdata  # noqa: E402
from zoo_torch.losses import get_loss  # noqa: E402
from zoo_torch.optim import build_optimizer, make_optimizer_config  # noqa: E402
from zoo_torch.step import TrainStep, predict  # noqa: E402

LOGIT_TOL, WEIGHT_TOL, AUC_TOL, ENTRY_TOL = 1e-5, 1e-4, 1e-3, 1e-5
OPTIMIZERS = (("LazyAdam", 1e-3), ("Adagrad", 1e-2))


def check_loader(data: str, dev) -> dict:
    schema, _ = zdata.open_dataset(data)
    offsets = categorical_offsets(schema)
    batches = compared = 0
    for kw in (dict(shuffle=True, seed=3, epoch=0), dict(shuffle=True, seed=3, epoch=1),
               dict(shuffle=False, rank=1, world_size=2)):
        cpu = zdata.batches(data, "train", batch_size=96, **kw)
        gpu = zdata.batches(data, "train", batch_size=96, device=dev, **kw)
        for a, b in zip(cpu, gpu, strict=True):
            assert set(a) == set(b), (sorted(a), sorted(b))
            for k in a:
                assert b[k].device.type == "cuda" and b[k].dtype == a[k].dtype, k
                assert torch.equal(a[k], b[k].cpu()), f"field {k} differs"
                compared += 1
            cat = np.stack([a[f.name].numpy() for f in schema.categorical], 1)
            want = row_plan(cat, offsets)
            got = (b.cat_rows, *b.row_sort)
            for w, g, what in zip(want, got, ("rows", "uniq", "order", "starts")):
                assert np.array_equal(w, g.cpu().numpy().reshape(w.shape)), f"{what} differs"
            batches += 1
    return dict(status="pass", batches=batches, tensors_compared=compared)


def _train(name, schema, w0, oc, batches, dev, float64=False):
    """One TrainStep per batch of ``batches`` (a list) from ``w0`` on ``dev``: (weights, first logits, model)."""
    m = zoo_torch.build_model(name, schema, **small_config(name, **TRAIN_CONFIG))
    zoo_torch.set_weights(m, w0)
    m = m.to(dev)
    if float64:
        m.double()
        batches = [to_float64(b) for b in batches]
    m.eval()
    with torch.no_grad():
        first = m(batches[0]).double().cpu().numpy()
    step = TrainStep(m, build_optimizer(m, oc), get_loss("BCE"))
    for b in batches:
        step(b)
    return zoo_torch.get_weights(m), first, m


def check_zoo(data: str, dev, steps: int) -> dict:
    """Every model, each optimiser: the GPU run against the CPU run (the bars of tests/parity_utils.py's
    training check, with the GPU in place of TensorFlow; a tensor over 1e-4 must stay within 10x float32's
    own drift, measured by the same CPU steps in float64, and never over 1e-2)."""
    schema, _ = zdata.open_dataset(data)

    def take(device):
        out = []
        while len(out) < steps:
            for b in zdata.batches(data, "train", batch_size=64, shuffle=True, seed=len(out), device=device):
                out.append(b)
                if len(out) == steps:
                    break
        return out

    cpu_batches, gpu_batches = take(None), take(dev)
    out = {}
    for name in zoo_torch.list_models():
        w0 = random_weights(zoo_torch.build_model(name, schema, **small_config(name, **TRAIN_CONFIG)), seed=6)
        res = {}
        for opt, lr in OPTIMIZERS:
            oc = make_optimizer_config(opt, lr)
            wc, fc, mc = _train(name, schema, w0, oc, cpu_batches, "cpu")
            wg, fg, mg = _train(name, schema, w0, oc, gpu_batches, dev)
            pc, y = predict(mc, zdata.batches(data, "valid", batch_size=256, shuffle=False))
            pg, yg = predict(mg, zdata.batches(data, "valid", batch_size=256, shuffle=False, device=dev))
            cross = {k: rel(wc[k], wg[k]) for k in wc}
            worst = max(cross, key=cross.get)
            r = dict(logit_delta=float(np.abs(fg - fc).max()), weight_rel=cross[worst], worst=worst,
                     moved=max(rel(w0[k], wc[k]) for k in wc), auc_delta=abs(auc(y, pc) - auc(yg, pg)))
            ok = r["logit_delta"] <= LOGIT_TOL and r["auc_delta"] <= AUC_TOL and r["moved"] > 1e-2 \
                and np.array_equal(y, yg)
            over = {k: v for k, v in cross.items() if v > WEIGHT_TOL}
            if over:          # how far does float32 round-off alone move these tensors?
                w64 = _train(name, schema, w0, oc, cpu_batches, "cpu", float64=True)[0]
                own = {k: rel(w64[k], wc[k]) for k in over}
                r["float32_drift"] = {k: own[k] for k in over}
                ok = ok and all(v <= min(WEIGHT_CAP, SENSITIVITY_FACTOR * own[k]) for k, v in over.items())
            r["status"] = "pass" if ok else "FAIL"
            res[opt] = r
        res["status"] = "pass" if all(v["status"] == "pass" for k, v in res.items() if k != "status") else "FAIL"
        out[name] = res
        print(f"[gpu_check] zoo {name}: {res}", file=sys.stderr, flush=True)
    return out


def check_entry_point(data: str, tmp: str) -> dict:
    res, weights = {}, {}
    for where, extra in (("cpu", []), ("gpu", ["--gpu_ids", "0"])):
        out = os.path.join(tmp, f"entry-{where}")
        p = subprocess.run([sys.executable, os.path.join(ROOT, "train_example_pytorch.py"), "--data", data,
                            "--model_save_dir", out, *DIST_FLAGS, *extra], capture_output=True, text=True,
                           env=subprocess_env(pathlib.Path(tmp)), timeout=600)
        if p.returncode:
            return dict(status="FAIL", where=where, stderr=p.stderr[-3000:])
        res[where] = json.loads(p.stdout.strip().splitlines()[-1])
        weights[where] = final_weights(out)
    cross = {k: rel(weights["cpu"][k], weights["gpu"][k]) for k in weights["cpu"]}
    w_name = max(cross, key=cross.get)
    w_rel = cross[w_name]
    dev = res["gpu"].get("device", "")
    ok = w_rel <= ENTRY_TOL and "cuda" in str(dev) and res["gpu"]["steps"] == DIST_STEPS
    return dict(status="pass" if ok else "FAIL", weight_rel=w_rel, worst=w_name, device=dev,
                test_auc_cpu=res["cpu"]["test_auc"], test_auc_gpu=res["gpu"]["test_auc"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_check.json"))
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0)
    result = dict(started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), torch=torch.__version__,
                  gpu=torch.cuda.get_device_name(dev), tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        write_random_dataset(data, rows=(1408, 300, 200), seed=7)
        checks = {}
        for name, fn in (("loader", lambda: check_loader(data, dev)),
                         ("zoo", lambda: check_zoo(data, dev, args.steps)),
                         ("entry_point", lambda: check_entry_point(data, tmp))):
            t0 = time.perf_counter()
            try:
                checks[name] = fn()
            except AssertionError as exc:
                checks[name] = dict(status="FAIL", error=str(exc))
            checks[name + "_seconds"] = round(time.perf_counter() - t0, 1)
            print(f"[gpu_check] {name}: {checks[name] if name != 'zoo' else ''}", file=sys.stderr, flush=True)
    result["checks"] = checks
    statuses = [checks["loader"]["status"], checks["entry_point"]["status"]]
    statuses += [r["status"] for r in checks["zoo"].values()] if "status" not in checks["zoo"] \
        else [checks["zoo"]["status"]]
    result["status"] = "pass" if all(s == "pass" for s in statuses) else "FAIL"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(dict(status=result["status"], out=args.out)))
    return 0 if result["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
