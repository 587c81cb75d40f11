"""Entry point of one peer run, executed by the peers' virtualenv interpreter.

    <venv>/bin/python benchmarks/peers/run_peer.py SPEC.json RESULT.json     one measured run
    <venv>/bin/python benchmarks/peers/run_peer.py --check RUNNER            import check, prints JSON

SPEC.json is written by ``benchmarks/train_speed.py`` (keys: runner, model,
npy_dir, batch_size, embed_size, mlp, cross_layers, cin_layers, cin_split_half,
attention_layers, num_heads, attention_dim, lr, threads, inter_op_threads,
warmup, window, windows, seed, vocab_sizes).  Each runner module
``<runner>_peer.py`` defines ``MODELS`` (the models the library has),
``check() -> dict`` and ``run(spec) -> dict``; only the runner's own library is
imported, so every process's peak memory is its own library's.

This file and its runner modules never import the repository's code.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _bench  # noqa: E402

RUNNERS = ("deepctr_torch", "deepctr_tf", "fuxictr", "torchfm")


def runner_module(name: str):
    if name not in RUNNERS:
        raise SystemExit(f"unknown peer runner {name!r} (known: {', '.join(RUNNERS)})")
    return importlib.import_module(f"{name}_peer")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--check":
        out = {}
        for name in (argv[1:] or RUNNERS):
            try:
                out[name] = runner_module(name).check()
                out[name]["status"] = "ok"
            except Exception as exc:  # reported, not raised: the benchmark records it
                out[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out))
        return 0
    if len(argv) != 2:
        raise SystemExit(__doc__)
    spec_path, result_path = argv
    spec = _bench.read_spec(spec_path)
    mod = runner_module(spec["runner"])
    return _bench.run_child(mod.run, spec_path, result_path)


if __name__ == "__main__":
    sys.exit(main())
