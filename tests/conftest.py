"""Shared fixtures: a small random dataset (categorical + numeric + sequence fields) in the real store format."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common.io import atomic_directory  # noqa: E402
from common.schema import Field, Schema  # noqa: E402
from common.store import STORE_DIR, StoreWriter, layout_for  # noqa: E402

SHARED_DATA = os.environ.get("CTR_ZOO_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))


def subprocess_env(tmp_path, **extra) -> dict:
    """Environment for an entry-point subprocess: its own data cache, one OpenMP thread, quiet TF, and
    no distributed-launch variables inherited from the caller."""
    env = dict(os.environ)
    env.update(CTR_ZOO_CACHE=str(tmp_path / "cache"), TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1", **extra)
    for k in ("TF_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def last_json(stdout: str) -> dict:
    """The entry points' contract: the LAST stdout line is one JSON object."""
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert lines, "no stdout"
    return json.loads(lines[-1])


def sigkill_when(p: subprocess.Popen, ready, what: str, timeout: float, poll: float = 0.01) -> None:
    """SIGKILL the running ``p`` as soon as ``ready()`` holds (fails if it ends first or ``timeout`` passes)."""
    deadline = time.time() + timeout
    try:
        while not ready():
            assert p.poll() is None, f"the run ended before {what}: {p.stderr.read()[-3000:]}"
            assert time.time() < deadline, f"no {what}"
            time.sleep(poll)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL


def write_random_dataset(path, rows=(600, 200, 200), n_cat=4, n_num=2, seq=True, chunk_rows=128, seed=0):
    """A random dataset whose label depends on the features (so models can learn a little)."""
    rng = np.random.default_rng(seed)
    vocab = [int(v) for v in rng.integers(5, 60, n_cat)]
    fields = [Field(f"c{i}", "categorical", vocab_size=vocab[i]) for i in range(n_cat)]
    fields += [Field(f"n{i}", "numeric") for i in range(n_num)]
    if seq:
        fields.append(Field("hist", "sequence", vocab_size=vocab[0], embedding_group="c0", max_len=5))
    schema = Schema(fields=fields, splits=dict(zip(("train", "valid", "test"), rows)), name="random", format="random")
    w = [rng.normal(0, 1, v) for v in vocab]
    with atomic_directory(path, overwrite=True) as tmp:
        wr = StoreWriter(os.path.join(tmp, STORE_DIR), layout_for(schema), schema.model_hash(), chunk_rows=chunk_rows)
        for split, n in schema.splits.items():
            cat = np.stack([rng.integers(1, v, n) for v in vocab], 1).astype(np.int32)
            num = rng.normal(0, 1, (n, n_num)).astype(np.float32)
            sq = np.zeros((n, 5 if seq else 0), np.int32)
            if seq:
                lens = rng.integers(0, 6, n)
                for r in range(n):
                    sq[r, :lens[r]] = rng.integers(1, vocab[0], lens[r])
            logit = sum(w[i][cat[:, i]] for i in range(n_cat)) + (num.sum(1) if n_num else 0)
            label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
            wr.append(split, {"cat": cat, "num": num, "seq": sq, "label": label})
        wr.close()
        schema.save(tmp)
    return schema


@pytest.fixture(scope="session")
def random_dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "random")
    write_random_dataset(path)
    return path
