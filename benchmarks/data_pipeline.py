"""Data-pipeline benchmark: raw Criteo TSV -> ``python -m data_prep`` -> both loaders.

    python benchmarks/data_pipeline.py [--rows 1000000] [--mem_rows 4000000 | --mem_rows 0]
                                       [--out benchmarks/results/data_pipeline.json]

Measures, each in its own subprocess so that memory figures stay separate:

1. preprocessing: ``python -m data_prep --format criteo --input F --output D`` on a
   generated raw file of ``--rows`` lines: wall time -> rows/s, and the child's
   peak RSS (``os.wait4`` rusage of exactly that child);
2. the same on ``--mem_rows`` lines, to compare peak memory (a streaming pipeline
   should need about the same memory for 4x the rows); ``--mem_rows 0`` skips it;
3. ``zoo_torch.data.batches`` and ``zoo_tf.data.batches`` over the train split at
   ``--batch_size`` (shuffled, as in training): every batch is touched (all of its
   tensors are read).  Rows/s of the first pass (which includes opening the store
   and verifying its checksums) and of a second pass are reported.

Goals (from the issue): preprocessing >= 300k rows/s, each loader >= 1M rows/s,
peak memory at 4M rows within 20% of that at 1M rows.  Results go to ``--out``
(JSON) and a short table on stdout.

Every measurement also records the CPU time (user + system) of its process and the
load average around it: on a shared machine the wall time depends on the other
processes, the CPU time much less.  ``--repeat N`` runs the preprocessing N times and
reports the fastest run (the others are kept in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GOALS = {"prep_rows_per_s": 300_000, "loader_rows_per_s": 1_000_000, "mem_ratio_max": 1.2}


def log(msg: str) -> None:
    print(f"[data_pipeline] {msg}", file=sys.stderr, flush=True)


def run_measured(cmd: list[str], log_path: str, env: dict | None = None) -> dict:
    """Run ``cmd``; return wall seconds, exit code and the peak RSS (MiB) of this child alone."""
    t0 = time.perf_counter()
    with open(log_path, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    rss_kb = ru.ru_maxrss if sys.platform != "darwin" else ru.ru_maxrss / 1024
    with open(log_path, "rb") as fh:
        tail = fh.read()[-4000:].decode("utf-8", "replace")
    return {"cmd": " ".join(cmd), "returncode": p.returncode, "seconds": wall, "peak_rss_mb": rss_kb / 1024,
            "cpu_seconds": ru.ru_utime + ru.ru_stime, "log_tail": tail if p.returncode else ""}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def bench_prep(raw: str, out_dir: str, rows: int, workdir: str, tag: str, repeat: int = 1) -> dict:
    cmd = [sys.executable, "-m", "data_prep", "--format", "criteo", "--input", raw, "--output", out_dir,
           "--overwrite", "--no_progress"]
    runs = []
    for i in range(max(1, repeat)):
        log(f"data_prep on {rows} rows ..." + (f" (run {i + 1} of {repeat})" if repeat > 1 else ""))
        load = os.getloadavg()[0]
        r = run_measured(cmd, os.path.join(workdir, f"prep_{tag}.log"), _env())
        r["loadavg_before"] = load
        r["rows"] = rows
        r["rows_per_s"] = rows / r["seconds"] if r["returncode"] == 0 else None
        if r["returncode"] != 0:
            log(f"data_prep failed (exit {r['returncode']}):\n{r['log_tail']}")
            return r
        log(f"data_prep: {r['seconds']:.1f}s = {r['rows_per_s']:,.0f} rows/s (CPU {r['cpu_seconds']:.1f}s, "
            f"load {load:.1f}), peak RSS {r['peak_rss_mb']:.0f} MiB")
        runs.append(r)
    best = dict(min(runs, key=lambda x: x["seconds"]))
    if len(runs) > 1:
        best["runs"] = [{k: x[k] for k in ("seconds", "cpu_seconds", "peak_rss_mb", "loadavg_before", "rows_per_s")}
                        for x in runs]
    return best


# ---------------------------------------------------------------- loader child processes
def _loader_child(backend: str, data: str, batch_size: int, passes: int) -> dict:
    """Runs inside the subprocess: iterate the train split ``passes`` times, touching every batch."""
    t_import = time.perf_counter()
    if backend == "torch":
        import torch

        from zoo_torch.data import batches

        def make(epoch):
            return batches(data, "train", batch_size, shuffle=True, seed=0, epoch=epoch)

        def touch(b):
            n = 0
            for v in b.values():
                n += int(v.shape[0])
            return n // len(b), float(b["label"][0])
        info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    elif backend == "tf":
        import tensorflow as tf

        from zoo_tf.data import batches

        def make(epoch):
            return batches(data, "train", batch_size, shuffle=True, seed=0, epoch=epoch)

        def touch(b):
            n = 0
            for v in b.values():
                n += int(v.shape[0])
            return n // len(b), float(b["label"][0])
        info = {"tensorflow": tf.__version__}
    else:
        raise SystemExit(f"unknown backend {backend}")
    import_s = time.perf_counter() - t_import
    out = {"backend": backend, "batch_size": batch_size, "import_seconds": import_s, **info, "passes": []}
    for epoch in range(passes):
        t0 = time.perf_counter()
        loader = make(epoch)
        t_open = time.perf_counter() - t0
        rows = nb = 0
        t1 = time.perf_counter()
        for b in loader:
            n, _ = touch(b)
            rows += n
            nb += 1
        t_iter = time.perf_counter() - t1
        total = t_open + t_iter
        out["passes"].append({"epoch": epoch, "rows": rows, "batches": nb, "open_seconds": t_open,
                              "iter_seconds": t_iter, "rows_per_s": rows / total if total else None,
                              "iter_rows_per_s": rows / t_iter if t_iter else None})
    return out


def bench_loader(backend: str, data: str, batch_size: int, passes: int, workdir: str) -> dict:
    log(f"{backend} loader over the train split, batch {batch_size}, {passes} passes ...")
    res_path = os.path.join(workdir, f"loader_{backend}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--_loader", backend, "--_data", data,
           "--batch_size", str(batch_size), "--_passes", str(passes), "--_result", res_path]
    r = run_measured(cmd, os.path.join(workdir, f"loader_{backend}.log"), _env())
    if r["returncode"] != 0 or not os.path.exists(res_path):
        log(f"{backend} loader failed (exit {r['returncode']}):\n{r['log_tail']}")
        return {"backend": backend, "error": r["log_tail"][-1500:], "returncode": r["returncode"]}
    with open(res_path) as fh:
        res = json.load(fh)
    res["peak_rss_mb"] = r["peak_rss_mb"]
    res["process_seconds"] = r["seconds"]
    res["process_cpu_seconds"] = r["cpu_seconds"]
    best = max(p["rows_per_s"] for p in res["passes"])
    res["rows_per_s"] = best
    log(f"{backend} loader: " + ", ".join(f"pass {p['epoch']}: {p['rows_per_s']:,.0f} rows/s "
                                          f"(open {p['open_seconds']:.2f}s)" for p in res["passes"]))
    return res


def write_raw(path: str, rows: int, seed: int) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "criteo_raw.py"), path, "--rows", str(rows),
           "--seed", str(seed), "--json"]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, cwd=ROOT, env=_env()).stdout
    return json.loads(out.decode().strip().splitlines()[-1])


# ---------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="raw rows for the speed runs")
    p.add_argument("--mem_rows", type=int, default=4_000_000,
                   help="raw rows of the memory-comparison run (0 = skip it)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "data_pipeline.json"))
    p.add_argument("--batch_size", type=int, default=4096)
    p.add_argument("--passes", type=int, default=2, help="loader passes over the train split")
    p.add_argument("--backends", default="torch,tf", help="loaders to measure (comma list; '' = none)")
    p.add_argument("--workdir", default=None, help="where raw files and datasets go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="preprocessing runs per size (the fastest is reported)")
    # internal: loader child process
    p.add_argument("--_loader", help=argparse.SUPPRESS)
    p.add_argument("--_data", help=argparse.SUPPRESS)
    p.add_argument("--_passes", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a._loader:
        res = _loader_child(a._loader, a._data, a.batch_size, a._passes)
        with open(a._result, "w") as fh:
            json.dump(res, fh)
        return 0

    if a.rows < 1:
        p.error("--rows must be >= 1")
    # NB: this driver imports nothing heavy (no numpy): on Linux a child's ru_maxrss starts
    # from its parent's peak RSS (vfork + exec), so a light parent keeps the figures honest.

    workdir = a.workdir or tempfile.mkdtemp(prefix="ctr_zoo_data_bench_")
    os.makedirs(workdir, exist_ok=True)
    result = {"benchmark": "data_pipeline", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                       "loadavg_start": list(os.getloadavg())},
              "goals": GOALS, "rows": a.rows, "mem_rows": a.mem_rows, "batch_size": a.batch_size}
    try:
        sizes = [a.rows] + ([a.mem_rows] if a.mem_rows else [])
        result["raw"], result["prep"] = {}, {}
        for n in sizes:
            tag = f"{n}"
            raw = os.path.join(workdir, f"criteo_{n}.tsv")
            if not os.path.exists(raw):
                log(f"writing {n} raw Criteo lines -> {raw}")
                result["raw"][tag] = write_raw(raw, n, a.seed)
                log(f"  {result['raw'][tag]['bytes'] / 1e6:.0f} MB in {result['raw'][tag]['seconds']:.1f}s")
            result["prep"][tag] = bench_prep(raw, os.path.join(workdir, f"ds_{n}"), n, workdir, tag, a.repeat)
            if n != a.rows:
                shutil.rmtree(os.path.join(workdir, f"ds_{n}"), ignore_errors=True)
        base = result["prep"][str(a.rows)]
        if a.mem_rows and base["returncode"] == 0 and result["prep"][str(a.mem_rows)]["returncode"] == 0:
            result["mem_ratio"] = result["prep"][str(a.mem_rows)]["peak_rss_mb"] / base["peak_rss_mb"]
        result["loaders"] = {}
        data = os.path.join(workdir, f"ds_{a.rows}")
        if base["returncode"] == 0:
            for backend in [b for b in a.backends.split(",") if b]:
                result["loaders"][backend] = bench_loader(backend, data, a.batch_size, a.passes, workdir)
        result["host"]["loadavg_end"] = list(os.getloadavg())
        result["host"]["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["goals_met"] = goals_met(result)
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    print(table(result))
    print(f"results: {a.out}")
    return 0


def goals_met(r: dict) -> dict:
    out = {}
    base = r["prep"].get(str(r["rows"]), {})
    out["prep_rows_per_s"] = bool(base.get("rows_per_s") and base["rows_per_s"] >= GOALS["prep_rows_per_s"])
    for b, res in r.get("loaders", {}).items():
        out[f"{b}_loader_rows_per_s"] = bool(res.get("rows_per_s") and
                                             res["rows_per_s"] >= GOALS["loader_rows_per_s"])
    if "mem_ratio" in r:
        out["mem_ratio"] = r["mem_ratio"] <= GOALS["mem_ratio_max"]
    return out


def table(r: dict) -> str:
    lines = [f"{'measurement':<34} {'value':>16} {'goal':>14}  ok", "-" * 70]
    ok = r.get("goals_met", {})

    def row(name, value, goal="", flag=None):
        mark = "" if flag is None else ("yes" if flag else "NO")
        lines.append(f"{name:<34} {value:>16} {goal:>14}  {mark}")

    for tag, pr in r["prep"].items():
        if pr.get("returncode") == 0:
            row(f"data_prep {int(tag):,} rows", f"{pr['rows_per_s']:,.0f} rows/s",
                f">= {GOALS['prep_rows_per_s']:,}" if int(tag) == r["rows"] else "",
                ok.get("prep_rows_per_s") if int(tag) == r["rows"] else None)
            row(f"  CPU (user+sys)", f"{pr['cpu_seconds']:,.1f} s")
            row(f"  peak RSS", f"{pr['peak_rss_mb']:,.0f} MiB")
        else:
            row(f"data_prep {int(tag):,} rows", f"FAILED ({pr.get('returncode')})")
    if "mem_ratio" in r:
        row(f"peak RSS {r['mem_rows']:,} / {r['rows']:,}", f"{r['mem_ratio']:.2f}x",
            f"<= {GOALS['mem_ratio_max']}", ok.get("mem_ratio"))
    for b, res in r.get("loaders", {}).items():
        if "error" in res:
            row(f"{b} loader", "FAILED")
            continue
        row(f"{b} loader (batch {res['batch_size']})", f"{res['rows_per_s']:,.0f} rows/s",
            f">= {GOALS['loader_rows_per_s']:,}", ok.get(f"{b}_loader_rows_per_s"))
        row(f"  peak RSS", f"{res['peak_rss_mb']:,.0f} MiB")
    la, le = r["host"].get("loadavg_start"), r["host"].get("loadavg_end")
    lines.append(f"(host: {r['host']['cpus']} cpus, load average {la[0]:.1f} at start, "
                 f"{le[0] if le else float('nan'):.1f} at end)" if la else "")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
