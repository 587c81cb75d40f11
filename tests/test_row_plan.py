"""The loaders' row plan (categorical rows sorted ahead of the step) and the process settings.

The plan is a speed device only: a step on a batch that carries it must train exactly like
a step on the same batch without it, and the step must really skip its own sort.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from common.batching import categorical_offsets, iter_numpy_batches, open_dataset, row_plan, segment_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cat_dataset(tmp_path_factory):
    """Categorical + numeric fields only: the sparse gradients' indices are exactly the planned rows
    (a sequence field's lookups would add their own rows to the same tables)."""
    from conftest import write_random_dataset

    path = str(tmp_path_factory.mktemp("plan") / "ds")
    write_random_dataset(path, rows=(700, 50, 0), n_cat=5, n_num=2, seq=False, seed=3)
    return path


@pytest.mark.parametrize("seed", range(5))
def test_row_plan_is_a_sort_with_runs(seed):
    rng = np.random.default_rng(seed)
    b, c = int(rng.integers(1, 300)), int(rng.integers(1, 7))
    cat = rng.integers(0, int(rng.integers(1, 50)), size=(b, c)).astype(np.int32)
    offsets = np.cumsum(rng.integers(1, 60, size=c)).astype(np.int64)
    rows, uniq, order, starts = row_plan(cat, offsets)
    assert rows.dtype == np.int64 and rows.shape == (b, c)
    np.testing.assert_array_equal(rows, cat.astype(np.int64) + offsets)
    flat = rows.ravel()
    srt = flat[order]
    assert np.all(np.diff(srt) >= 0) and sorted(order.tolist()) == list(range(flat.size))
    np.testing.assert_array_equal(uniq, np.unique(flat))
    np.testing.assert_array_equal(srt[starts], uniq)
    seg = segment_ids(starts, flat.size)
    np.testing.assert_array_equal(uniq[seg], srt)                  # every sorted position -> its row
    # the per-row gradient sums a row-sparse optimiser needs
    vals = rng.normal(size=(flat.size, 3))
    sums = np.zeros((uniq.size, 3))
    np.add.at(sums, seg, vals[order])
    ref = np.stack([vals[flat == u].sum(0) for u in uniq])
    np.testing.assert_allclose(sums, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["rows", "negative", "int32", "one", "huge_range", "all_equal"])
def test_sort_runs_is_the_stable_sort(case):
    """Packed-key sort and the argsort fallback (values too far apart to pack) give the stable sort."""
    from common.batching import sort_runs

    rng = np.random.default_rng(7)
    flat = {"rows": rng.integers(0, 3_900_000, 5000),
            "negative": rng.integers(-40, 40, 3001),
            "int32": rng.integers(5, 90, 777).astype(np.int32),
            "one": np.array([12345678901], np.int64),
            "huge_range": np.array([2 ** 62, -2 ** 62, 5, 5, 2 ** 62, 0, -2 ** 62, 5], np.int64),
            "all_equal": np.full(100, 3, np.int64)}[case]
    uniq, order, starts = sort_runs(flat)
    np.testing.assert_array_equal(order, np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(uniq, np.unique(flat))
    assert uniq.dtype == flat.dtype and order.dtype == starts.dtype == np.int64
    np.testing.assert_array_equal(flat[order][starts], uniq)
    assert starts[0] == 0 and np.all(np.diff(starts) > 0) and starts.size == uniq.size
    # the device version (the GPU loader's and the optimiser's sort on a GPU) gives the same arrays
    import torch

    from zoo_torch.optim import sort_runs_torch

    for got, want in zip(sort_runs_torch(torch.from_numpy(flat)), (uniq, order, starts)):
        np.testing.assert_array_equal(got.numpy(), want)
        assert got.dtype == torch.from_numpy(want).dtype


def test_same_rows_trusts_the_same_memory_and_compares_values_otherwise():
    import torch

    from zoo_torch.optim import _same_rows

    a = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    flat = a.reshape(-1)
    assert _same_rows(flat, a.view(-1))                          # the same memory: no values read
    assert _same_rows(flat, flat.clone())                        # equal values in other memory (CPU)
    assert not _same_rows(flat, flat.clone().add_(1))
    assert not _same_rows(flat, flat[:6]) and not _same_rows(flat, flat.to(torch.int32))
    col, head = a[:, 0], flat[:3]                                # same address and shape, other strides
    assert col.data_ptr() == head.data_ptr() and not _same_rows(col, head)


def test_row_plan_of_an_empty_batch():
    rows, uniq, order, starts = row_plan(np.zeros((0, 3), np.int32), np.arange(3, dtype=np.int64))
    assert rows.shape == (0, 3) and uniq.size == order.size == starts.size == 0
    assert segment_ids(starts, 0).size == 0


def test_torch_batches_carry_the_plan(random_dataset):
    import zoo_torch.data as ptd

    schema, _ = open_dataset(random_dataset)
    offsets = categorical_offsets(schema)
    ref = list(iter_numpy_batches(random_dataset, "train", 64, shuffle=True, seed=4))
    got = list(ptd.batches(random_dataset, "train", 64, shuffle=True, seed=4))
    assert len(got) == len(ref) > 1
    for b, r in zip(got, ref):
        cat = np.stack([r[f.name] for f in schema.categorical], 1)
        rows, uniq, order, starts = row_plan(cat, offsets)
        np.testing.assert_array_equal(b.cat_rows.numpy(), rows)
        for x, y in zip(b.row_sort, (uniq, order, starts)):
            np.testing.assert_array_equal(x.numpy(), y)
        assert b.row_key == (tuple(f.name for f in schema.categorical), tuple(int(o) for o in offsets))
    plain = list(ptd.batches(random_dataset, "train", 64, shuffle=True, seed=4, row_plan=False))
    assert len(plain) == len(got) and all(b.cat_rows is None and b.row_sort is None for b in plain)
    for a, b in zip(plain, got):
        assert list(a) == list(b) and all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize("optimizer", ["LazyAdam", "Adam", "Adagrad", "SGD"])
def test_torch_step_with_plan_equals_step_without(cat_dataset, optimizer, monkeypatch):
    import torch

    import zoo_torch
    import zoo_torch.data as ptd
    import zoo_torch.optim as zopt
    from zoo_torch.losses import get_loss
    from zoo_torch.step import TrainStep

    schema, _ = open_dataset(cat_dataset)
    batches = list(ptd.batches(cat_dataset, "train", 64, shuffle=True, seed=1))[:6]
    weights = []
    for use_plan in (True, False):
        zopt.publish_row_sort(torch.zeros(0), None)     # no plan left over from earlier steps
        torch.manual_seed(0)
        model = zoo_torch.build_model("DeepFM", schema, embed_size=4, mlp=(8,), seed=0)
        opt = zopt.build_optimizer(model, zopt.make_optimizer_config(optimizer, 0.05))
        step = TrainStep(model, opt, get_loss("BCE"))
        sorts = []
        real_sort = zopt.sort_runs
        monkeypatch.setattr(zopt, "sort_runs", lambda a: sorts.append(1) or real_sort(a))
        for b in batches:
            step(b if use_plan else dict(b))           # a plain dict copy has no plan
        monkeypatch.setattr(zopt, "sort_runs", real_sort)
        weights.append(({n: p.detach().clone() for n, p in model.named_parameters()}, len(sorts)))
    (with_plan, sorts_plan), (without, sorts_none) = weights
    assert sorts_plan == 0 and sorts_none == len(batches)     # once per step (tables share the sort)
    for n in with_plan:
        assert torch.equal(with_plan[n], without[n]), n


def test_tf_batches_with_plan_and_step(cat_dataset):
    import tensorflow as tf

    import zoo_tf
    import zoo_tf.data as tfd
    from zoo_tf.losses import get_loss
    from zoo_tf.optim import build_optimizer, make_optimizer_config
    from zoo_tf.step import TrainStep

    schema, _ = open_dataset(cat_dataset)
    offsets = categorical_offsets(schema)
    plain = list(tfd.batches(cat_dataset, "train", 64, shuffle=True, seed=2, prefetch=0))
    planned = list(tfd.batches(cat_dataset, "train", 64, shuffle=True, seed=2, prefetch=0, row_plan=True))
    assert len(plain) == len(planned) > 1
    for a, b in zip(plain, planned):
        assert set(b) == set(a) | set(tfd.PLAN_KEYS)
        for k in a:
            np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
        cat = np.stack([a[f.name].numpy() for f in schema.categorical], 1)
        ref = tfd.numpy_plan(cat, offsets)
        for k in tfd.PLAN_KEYS:
            np.testing.assert_array_equal(b[k].numpy(), ref[k])

    weights, graphs = [], []
    for batches in (planned, plain):
        tf.keras.utils.set_random_seed(0)
        model = zoo_tf.build_model("DeepFM", schema, embed_size=4, mlp=(8,), seed=0)
        step = TrainStep(model, build_optimizer(model, make_optimizer_config("SGD", 0.05)), get_loss("BCE"))
        for b in batches[:4]:
            step(b)
        weights.append({n: v.numpy() for n, v in zoo_tf.trainable_named(model).items()})
        fn = step._step_plan if batches is planned else step._step
        ops = [op.type for op in fn.get_concrete_function().graph.get_operations()]
        graphs.append((ops.count("Unique"), ops.count("SegmentSum")))
    # two sparse tables (linear, embedding): tf.unique each without the plan, the plan's sort with it
    assert graphs == [(0, 2), (2, 0)]
    for n in weights[0]:   # same sums, another summation order
        np.testing.assert_allclose(weights[0][n], weights[1][n], rtol=1e-5, atol=1e-6, err_msg=n)


def _run_python(code: str, env_extra: dict) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_configure_process_sets_malloc_and_omp():
    code = ("import json, os; from common.runtime import configure_process; r = configure_process(); "
            "r['env'] = os.environ.get('OMP_WAIT_POLICY'); print(json.dumps(r))")
    on = _run_python(code, {})
    assert on["env"] == "PASSIVE" and on["omp_wait_policy"] == "PASSIVE"
    if platform.libc_ver()[0] == "glibc":
        assert on["malloc"] == "glibc" and on["mmap_threshold"] == 1 << 28
    off = _run_python(code, {"CTR_ZOO_PROCESS_TUNING": "0"})
    assert off["malloc"] == "default" and off["env"] is None
    kept = _run_python(code, {"OMP_WAIT_POLICY": "ACTIVE"})
    assert kept["env"] == "ACTIVE"
    tf_like = _run_python(code.replace("configure_process()", "configure_process(malloc=False)"), {})
    assert tf_like["malloc"] == "default" and tf_like["env"] == "PASSIVE"


_EVAL_MEMORY_CODE = """
import json
from common.runtime import configure_process, evaluation_memory
configure_process()
import numpy as np

def rss_mb():
    with open('/proc/self/status') as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith('VmRSS')) / 1024

def returned_on_free():
    a = np.ones((64 << 20) // 8)          # 64 MiB, written
    before = rss_mb()
    del a
    return before - rss_mb()

out = {'train': returned_on_free()}
with evaluation_memory():
    out['eval'] = returned_on_free()
out['after'] = returned_on_free()
print(json.dumps(out))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not sys.platform.startswith("linux"),
                    reason="glibc malloc tuning and /proc only exist on Linux with glibc")
def test_evaluation_memory_gives_large_blocks_back_and_restores_training_thresholds():
    """Training keeps a freed 64 MiB block in the heap (reused next step); inside evaluation_memory the
    same block is its own mapping and goes back to the system on free; afterwards training's rule holds."""
    r = _run_python(_EVAL_MEMORY_CODE, {})
    assert r["train"] < 8 and r["after"] < 8, r
    assert r["eval"] > 56, r


def test_full_table_advises_huge_pages_for_large_tables_only(monkeypatch):
    import torch

    import zoo_torch.layers.base as base
    from common.runtime import HUGE_PAGE_MIN_BYTES, advise_huge_pages

    calls = []
    monkeypatch.setattr(base, "advise_huge_pages", lambda a, n: calls.append((a, n)) or advise_huge_pages(a, n))
    big = base.full_table((HUGE_PAGE_MIN_BYTES // 4 // 8 + 1, 8), 0.5)
    small = base.full_table((10, 3), -1.0)
    assert torch.all(big == 0.5) and torch.all(small == -1.0) and big.dtype == torch.float32
    assert calls == [(big.data_ptr(), big.numel() * 4), (small.data_ptr(), 120)]
    # below the threshold nothing is advised; a big range is accepted where the kernel offers THP
    assert advise_huge_pages(small.data_ptr(), 120) is False
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(thp) and "[never]" not in open(thp).read():
        assert advise_huge_pages(big.data_ptr(), big.numel() * 4) is True
    # the optimiser's slots of a large table are made the same way
    import zoo_torch.optim as zopt

    monkeypatch.setattr(zopt, "full_table", lambda shape, value, like: calls.append(("slot", value)) or
                        base.full_table(shape, value, like))
    p = torch.nn.Parameter(torch.zeros(4, 2))
    m = torch.nn.Module()
    m.w = p
    n = len(calls)
    zopt.build_optimizer(m, zopt.make_optimizer_config("Adagrad", 0.1))
    assert calls[n:] == [("slot", 0.0), (calls[n + 1][0], 32)]      # Adagrad's accumulator, 4 x 2 floats
