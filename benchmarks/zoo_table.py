"""The zoo table: every registered model in both backends -- size, speed and cross-backend parity.

    python benchmarks/zoo_table.py                  # all models, both backends (~20-30 min on 2 CPU cores)
    python benchmarks/zoo_table.py --quick          # fewer/shorter windows -> results/zoo_table_quick.*
    python benchmarks/zoo_table.py --models DeepFM,DCN --backends torch --no_parity

Writes ``--out`` (JSON, default benchmarks/results/zoo_table.json; ``--quick``:
zoo_table_quick.json) and the Markdown table next to it (``.md``).

Per model (``common.configs.MODELS``) and backend:

- **params**: ``zoo_torch.count_params`` / ``zoo_tf.count_params`` of the model
  built with its DEFAULT config on the default synthetic schema
  (``common.synthetic.default_dataset()``: 26 categorical fields of 3..100k ids
  + 13 numeric, generated once into ``$CTR_ZOO_CACHE``).
- **fwd+bwd rows/s**: forward in training mode + BCE loss + ``model.penalty``
  + backward (torch: ``loss.backward()`` with the gradients reset to None before
  each step; TF: one ``tf.function`` with the batch signature of
  ``zoo_tf.data.element_spec`` returning the loss and the gradients), batch
  ``--batch_size`` (4096), NO optimiser step.  ``--batches`` shuffled training
  batches are read through ``zoo_*.data.batches`` before timing and cycled (no
  data loading in the timed region).  rows/s = median over ``--windows``
  windows after ``--warmup`` warm-up steps; a window is at least ``--window``
  steps and at least ``--min_window_s`` seconds (its step count is fixed by an
  untimed calibration run after the warm-up, the same for every window); min
  and max are kept.  Each (model, backend) runs in its own process
  (``--threads`` intra-op and inter-op threads), so its peak RSS is its own.
- **parity** (one process, both backends): the checks of tests/test_parity.py,
  imported from tests/parity_utils.py and run unchanged on the test suite's
  random dataset (conftest.write_random_dataset) with the tests' small configs:
  max |logit_torch - logit_tf| in eval and train mode (bar 1e-5), the worst
  relative gradient difference (bar 1e-4), the worst relative weight difference
  after 50 Adam / LazyAdam steps (bar 1e-4, or 10x float32's own drift), and
  whether all four checks (forward, gradient, training, weight round trip) pass.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
for _p in (ROOT,):
    if _p not in sys.path:
        sys.path.insert(0, _p)

BACKENDS = ("torch", "tf")
RESULTS = os.path.join(HERE, "results")


# ==============================================================================================
# child: speed of one (model, backend)
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _windows(step, rows: int, warmup: int, window: int, windows: int, min_window_s: float, sync=None) -> dict:
    """``warmup`` untimed steps, a calibration (1, 2, 4 ... steps until a run lasts 0.2 * ``min_window_s``),
    then ``windows`` timed windows of n steps each: n = the larger of ``window`` and the number of steps that
    fill ``min_window_s`` at the calibrated speed."""
    def run(k):
        t = time.perf_counter()
        for _ in range(k):
            step()
        if sync:
            sync()
        return time.perf_counter() - t

    for _ in range(warmup):
        step()
    k = 1
    while True:
        dt = run(k)
        if dt >= 0.2 * min_window_s or k >= 4096:
            break
        k *= 2
    last = dt / k
    n = max(int(window), math.ceil(min_window_s / max(last, 1e-9)))
    rates, seconds = [], []
    for _ in range(windows):
        dt = run(n)
        seconds.append(dt)
        rates.append(rows * n / dt)
    return {"rows_per_s": statistics.median(rates), "rows_per_s_min": min(rates), "rows_per_s_max": max(rates),
            "steps_per_window": n, "window_seconds": seconds, "calibrated_step_seconds": last}


def speed_torch(spec: dict) -> dict:
    import torch

    import zoo_torch
    from common.schema import Schema
    from zoo_torch.data import batches
    from zoo_torch.losses import get_loss

    torch.set_num_threads(spec["threads"])
    try:
        torch.set_num_interop_threads(spec["threads"])
    except RuntimeError:
        pass
    schema = Schema.load(spec["data"])
    data = []
    for b in batches(spec["data"], "train", spec["batch_size"], shuffle=True, seed=0, prefetch=0):
        b.pop("prob", None)
        data.append(b)
        if len(data) == spec["batches"]:
            break
    model = zoo_torch.build_model(spec["model"], schema)
    model.train()
    params = zoo_torch.count_params(model)
    loss_fn = get_loss("BCE")
    it = [0]

    def step():
        b = data[it[0] % len(data)]
        it[0] += 1
        for p in model.parameters():
            p.grad = None
        logits = model(b)
        loss = loss_fn(logits, b["label"]) + model.penalty(logits.shape[0])
        loss.backward()

    res = _windows(step, spec["batch_size"], spec["warmup"], spec["window"], spec["windows"], spec["min_window_s"])
    return {"params": int(params), "threads": torch.get_num_threads(), "version": torch.__version__, **res}


def speed_tf(spec: dict) -> dict:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
    tf.config.threading.set_inter_op_parallelism_threads(spec["threads"])
    import zoo_tf
    from common.schema import Schema
    from zoo_tf.data import batches, element_spec
    from zoo_tf.losses import get_loss

    schema = Schema.load(spec["data"])
    sig = element_spec(schema)
    data = []
    for b in batches(spec["data"], "train", spec["batch_size"], shuffle=True, seed=0, prefetch=0):
        data.append({k: b[k] for k in sig})
        if len(data) == spec["batches"]:
            break
    model = zoo_tf.build_model(spec["model"], schema)
    params = zoo_tf.count_params(model)
    variables = list(zoo_tf.trainable_named(model).values())
    loss_fn = get_loss("BCE")

    @tf.function(input_signature=[sig], reduce_retracing=True)
    def fwd_bwd(batch):
        with tf.GradientTape() as tape:
            logits = model(batch, training=True)
            loss = loss_fn(logits, batch["label"]) + model.penalty(tf.shape(logits)[0])
        return loss, tape.gradient(loss, variables)

    it = [0]
    out = [None]

    def step():
        b = data[it[0] % len(data)]
        it[0] += 1
        out[0] = fwd_bwd(b)

    def sync():
        if out[0] is not None:
            out[0][0].numpy()

    res = _windows(step, spec["batch_size"], spec["warmup"], spec["window"], spec["windows"], spec["min_window_s"],
                   sync=sync)
    return {"params": int(params), "threads": spec["threads"], "version": tf.__version__, **res}


# ==============================================================================================
# child: parity of every model (both backends in one process)
def parity_all(spec: dict) -> dict:
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    import numpy as np  # noqa: F401
    import torch

    torch.set_num_threads(spec["threads"])
    import parity_utils as pu
    from conftest import write_random_dataset

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "random")
        write_random_dataset(path)          # the `random_dataset` fixture of the test suite
        data = pu.parity_data(path)
        checks = {"forward": pu.forward_check, "gradient": pu.gradient_check, "training": pu.training_check,
                  "roundtrip": pu.roundtrip_check}
        for name in spec["models"]:
            rec = {"figures": {}, "passed": {}, "errors": {}}
            for cname, fn in checks.items():
                figs: dict = {}
                t = time.perf_counter()
                try:
                    fn(name, data, figs)
                    rec["passed"][cname] = True
                except (AssertionError, pytest_failed()) as exc:
                    rec["passed"][cname] = False
                    rec["errors"][cname] = f"{type(exc).__name__}: {exc}"[:500]
                except Exception as exc:   # a crash is a failed check too, with its traceback tail
                    rec["passed"][cname] = False
                    rec["errors"][cname] = traceback.format_exc()[-800:]
                rec["figures"][cname] = figs
                rec.setdefault("seconds", {})[cname] = time.perf_counter() - t
            out[name] = rec
            print(f"parity {name}: " + ", ".join(f"{c} {'ok' if p else 'FAIL'}" for c, p in rec["passed"].items()),
                  file=sys.stderr, flush=True)
    return out


def pytest_failed():
    import pytest

    return pytest.fail.Exception


def child_main(kind: str, spec_path: str, result_path: str) -> int:
    with open(spec_path) as fh:
        spec = json.load(fh)
    t = time.perf_counter()
    try:
        if kind == "speed":
            res = speed_torch(spec) if spec["backend"] == "torch" else speed_tf(spec)
        else:
            res = parity_all(spec)
        res = {"ok": True, **res}
    except Exception:
        res = {"ok": False, "error": traceback.format_exc()[-3000:]}
    res["peak_rss_mb"] = _peak_rss_mb()
    res["process_seconds"] = time.perf_counter() - t
    with open(result_path, "w") as fh:
        json.dump(res, fh)
    return 0


def run_child(kind: str, spec: dict, timeout: float, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sp, rp = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(sp, "w") as fh:
            json.dump(spec, fh)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, sp, rp]
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
        if not os.path.exists(rp):
            return {"ok": False, "error": f"exit status {p.returncode}; stderr tail:\n{p.stderr[-3000:]}"}
        with open(rp) as fh:
            res = json.load(fh)
        res["wall_seconds"] = time.perf_counter() - t
        if not res.get("ok"):
            res["stderr_tail"] = p.stderr[-2000:]
        return res


# ==============================================================================================
# parent
def parse_args(argv=None):
    from common.configs import MODELS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated registered models (default: all)")
    ap.add_argument("--backends", default="torch,tf")
    ap.add_argument("--batch_size", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=4, help="distinct batches cycled through while timing")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps, >= 1 (default 3; --quick 1)")
    ap.add_argument("--window", type=int, default=None, help="minimum steps per timed window (default 2; --quick 1)")
    ap.add_argument("--min_window_s", type=float, default=None,
                    help="a window has at least the steps that take this long at the calibrated speed "
                         "(default 2.0; --quick 0.5)")
    ap.add_argument("--windows", type=int, default=None, help="timed windows (default 5; --quick 3)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op and inter-op threads of every run")
    ap.add_argument("--quick", action="store_true", help="fewer and shorter windows (a smoke test)")
    ap.add_argument("--no_parity", action="store_true", help="skip the parity checks")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/zoo_table[_quick].json)")
    ap.add_argument("--note", default="", help="a line at the top of the Markdown report")
    a = ap.parse_args(argv)
    for k, full, quick in (("warmup", 3, 1), ("window", 2, 1), ("windows", 5, 3), ("min_window_s", 2.0, 0.5)):
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    if a.out is None:
        a.out = os.path.join(RESULTS, "zoo_table_quick.json" if a.quick else "zoo_table.json")
    a.models = [m for m in a.models.split(",") if m]
    unknown = [m for m in a.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; registered: {', '.join(MODELS)}")
    a.backends = [b for b in a.backends.split(",") if b]
    if any(b not in BACKENDS for b in a.backends):
        ap.error(f"--backends: choose from {BACKENDS}")
    return a


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(*sys.argv[2:5])
    args = parse_args(argv)
    from benchmarks.train_speed import load_average, machine_info
    from common.schema import Schema
    from common.synthetic import default_dataset

    def log(msg):
        print(f"[zoo_table {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    machine = machine_info()
    data = default_dataset(progress=True)
    schema = Schema.load(data)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS=str(args.threads))
    speed = {}
    for name in args.models:
        for backend in args.backends:
            spec = dict(model=name, backend=backend, data=data, batch_size=args.batch_size, batches=args.batches,
                        warmup=args.warmup, window=args.window, windows=args.windows,
                        min_window_s=args.min_window_s, threads=args.threads)
            res = run_child("speed", spec, args.timeout, env)
            speed[f"{name}/{backend}"] = res
            log(f"{name} {backend}: " + (f"{res['rows_per_s']:,.0f} rows/s, {res['params']:,} params, "
                                         f"peak RSS {res['peak_rss_mb']:,.0f} MB" if res.get("ok")
                                         else "FAILED " + res.get("error", "")[-300:]))
    parity = None
    if not args.no_parity:
        log("parity checks (tests/parity_utils.py) for every model ...")
        parity = run_child("parity", dict(models=args.models, threads=args.threads), args.timeout, env)
        if not parity.get("ok"):
            log("parity FAILED: " + parity.get("error", "")[-500:])
    machine["load_average_end"] = load_average()
    cmd = "python benchmarks/zoo_table.py" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")
    omp = {k: os.environ[k] for k in ("OMP_WAIT_POLICY",) if os.environ.get(k)}
    if omp:
        cmd = " ".join(f"{k}={v}" for k, v in omp.items()) + " " + cmd
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": cmd, "note": args.note, "machine": machine, "environment": omp,
        "settings": {k: getattr(args, k) for k in ("models", "backends", "batch_size", "batches", "warmup", "window",
                                                   "windows", "min_window_s", "threads", "quick")},
        "dataset": {"path": data, "name": os.path.basename(data), "splits": schema.splits,
                    "categorical_fields": len(schema.categorical), "numeric_fields": len(schema.numeric),
                    "vocab_sizes": [f.vocab_size for f in schema.categorical]},
        "speed": speed, "parity": parity,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1, default=float)
        fh.write("\n")
    md_path = os.path.splitext(args.out)[0] + ".md"
    with open(md_path, "w") as fh:
        fh.write(markdown(report))
    log(f"wrote {args.out} and {md_path}")
    return 0


# ==============================================================================================
# report
def _num(x, spec=",.0f"):
    return "-" if x is None else format(x, spec)


def _sci(x):
    return "-" if x is None else ("0" if x == 0 else f"{x:.1e}")


def parity_row(p: dict | None) -> list[str]:
    if not p:
        return ["-"] * 5
    f = p["figures"]
    fw, gr, tr = f.get("forward", {}), f.get("gradient", {}), f.get("training", {})
    failed = [c for c, ok in p["passed"].items() if not ok]
    status = "all 4 pass" if not failed else "FAIL: " + ", ".join(failed)
    return [_sci(fw.get("logit_eval")), _sci(fw.get("logit_train")), _sci(gr.get("grad_rel")),
            _sci(tr.get("weight_rel")), status]


def markdown(report: dict) -> str:
    s, m, d = report["settings"], report["machine"], report["dataset"]
    out = ["# The zoo table (benchmarks/zoo_table.py)", ""]
    if report.get("note"):
        out += [report["note"], ""]
    if s.get("quick"):
        out += ["**Quick mode** (fewer, shorter windows): a smoke test, not the reference measurement.", ""]
    la0, la1 = m.get("load_average_start"), m.get("load_average_end")
    out += [
        f"- Command: `{report['command']}`",
        "- Parity figures alone: `python -m pytest -q tests/test_parity.py` runs the same checks "
        "(`ZOO_PARITY_REPORT=path` appends their numbers)",
        f"- Date: {report['created']}; commit {m.get('git_commit', '?')}",
        f"- Machine: {m.get('lscpu_model_name', '?')}, {m.get('cpus')} CPUs ({m.get('lscpu_threads_per_core', '?')} "
        f"thread per core; {m.get('lscpu_flags', '')}), {m.get('mem_total_gib', '?')} GiB, no GPU used; "
        f"load average at start {la0}, at end {la1}",
        f"- Software: Python {m.get('python')}, torch {m.get('torch_version', '-')}, "
        f"TensorFlow {m.get('tensorflow_version', m.get('tensorflow-cpu_version', '-'))}, "
        f"numpy {m.get('numpy_version', '-')}",
        f"- Schema: `common.synthetic.default_dataset()` ({d['name']}): {d['categorical_fields']} categorical "
        f"fields (vocabularies {min(d['vocab_sizes'])}-{max(d['vocab_sizes']):,}) + {d['numeric_fields']} numeric; "
        "every model with its DEFAULT config (common/configs.py)",
        f"- Speed: forward (train mode) + BCE + penalty + backward, batch {s['batch_size']}, no optimiser step; "
        f"{s['batches']} batches read beforehand and cycled; rows/s = median of {s['windows']} windows after "
        f"{s['warmup']} warm-up steps, a window being >= {s['window']} steps and >= {s['min_window_s']} s "
        f"(steps per window fixed by a calibration run after the warm-up); {s['threads']} intra-op + {s['threads']} "
        "inter-op threads" + (f" ({', '.join(f'{k}={v}' for k, v in report.get('environment', {}).items())})"
                              if report.get("environment") else "")
        + "; one process per (model, backend), peak RSS is that process's",
        "- Parity: the checks of tests/test_parity.py (tests/parity_utils.py) on the test suite's random dataset "
        "(4 categorical, 2 numeric, 1 sequence field; small configs): max |logit Δ| eval / train mode "
        "(bar 1e-5), worst relative gradient Δ (bar 1e-4), worst relative weight Δ after 50 Adam and 50 LazyAdam "
        "steps (bar 1e-4 or 10x float32's own drift)",
        ""]
    cpus = m.get("cpus") or 1
    if la0 and max(la0[0], (la1 or [0])[0]) > 0.5 * cpus:
        out += [f"**The machine was shared** (load average {la0[0]} at start, {(la1 or ['?'])[0]} at end, on "
                f"{cpus} CPUs): the timings are noisy and lower than on an idle machine.", ""]
    out += ["| model | params (torch) | params (tf) | fwd+bwd rows/s torch | fwd+bwd rows/s tf | peak RSS MB torch / tf "
            "| logit Δ eval | logit Δ train | grad rel Δ | 50-step weight rel Δ | parity checks |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    parity = (report.get("parity") or {})
    for name in s["models"]:
        cells = [name]
        sp = {b: report["speed"].get(f"{name}/{b}") for b in BACKENDS}
        for b in BACKENDS:
            r = sp[b]
            cells.append(_num(r.get("params")) if r and r.get("ok") else ("-" if r is None else "FAILED"))
        for b in BACKENDS:
            r = sp[b]
            if r and r.get("ok"):
                cells.append(f"{r['rows_per_s']:,.0f} ({r['rows_per_s_min']:,.0f}-{r['rows_per_s_max']:,.0f})")
            else:
                cells.append("-" if r is None else "FAILED")
        cells.append(" / ".join(_num(sp[b].get("peak_rss_mb")) if sp[b] else "-" for b in BACKENDS))
        cells += parity_row(parity.get(name) if parity.get("ok") else None)
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    fails = [(k, v.get("error", "")) for k, v in report["speed"].items() if not v.get("ok")]
    for name, p in (parity.items() if parity.get("ok") else []):
        if isinstance(p, dict) and p.get("errors"):
            fails += [(f"{name} parity {c}", e) for c, e in p["errors"].items()]
    if report.get("parity") and not parity.get("ok"):
        fails.append(("parity", parity.get("error", "")))
    if fails:
        out += ["## Failures", ""] + [f"- {k}: `{e.strip().splitlines()[-1] if e.strip() else '?'}`"
                                       for k, e in fails] + [""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
