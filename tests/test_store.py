"""The chunked LMDB store and the backend-free batch order (common/store.py, common/batching.py)."""
from __future__ import annotations

import json
import os

import lmdb
import numpy as np
import pytest

from common.batching import iter_numpy_batches, iter_packed, num_batches, open_dataset
from common.errors import StoreError, UserError
from common.schema import Field, Schema
from common.store import (DEFAULT_CHUNK_ROWS, FORMAT_VERSION, META_KEY, STORE_DIR, Store, StoreWriter, chunk_key,
                          encode_chunk, layout_for)


def _schema(n_cat=3, n_num=2, seq_len=4):
    fields = [Field(f"c{i}", "categorical", vocab_size=50) for i in range(n_cat)]
    fields += [Field(f"n{i}", "numeric") for i in range(n_num)]
    if seq_len:
        fields.append(Field("s", "sequence", vocab_size=50, embedding_group="c0", max_len=seq_len))
    return Schema(fields=fields)


def _arrays(n, schema, start=0, seed=0):
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, 50, (n, len(schema.categorical))).astype(np.int32)
    cat[:, 0] = np.arange(start, start + n)          # row id
    return {"cat": cat, "num": rng.normal(size=(n, len(schema.numeric))).astype(np.float32),
            "seq": rng.integers(0, 50, (n, sum(f.max_len for f in schema.sequence))).astype(np.int32),
            "label": rng.integers(0, 2, (n, 1)).astype(np.float32)}


def _write(path, splits, chunk_rows=1000, schema=None):
    schema = schema or _schema()
    schema.splits = dict(splits)
    os.makedirs(path, exist_ok=True)
    wr = StoreWriter(os.path.join(path, STORE_DIR), layout_for(schema), schema.model_hash(), chunk_rows=chunk_rows)
    data = {}
    for split, n in splits.items():
        data[split] = _arrays(n, schema, seed=len(split))
        # append in uneven pieces: the writer re-cuts them into chunks
        cuts = [0, min(7, n), min(n // 2 + 3, n), n]
        for a, b in zip(cuts, cuts[1:]):
            wr.append(split, {k: v[a:b] for k, v in data[split].items()})
    wr.close()
    schema.save(path)
    return schema, data


# ----- store ---------------------------------------------------------------------------------------
def test_round_trip_and_chunking(tmp_path):
    schema, data = _write(str(tmp_path / "ds"), {"train": 10000, "valid": 300, "test": 1},
                          chunk_rows=DEFAULT_CHUNK_ROWS)
    s2, store = open_dataset(str(tmp_path / "ds"))
    assert s2.model_hash() == schema.model_hash()
    assert store.splits() == ["train", "valid", "test"]
    assert DEFAULT_CHUNK_ROWS == 4096
    assert store.chunk_rows("train") == [4096, 4096, 1808] and store.num_chunks("valid") == 1
    assert store.rows("test") == 1
    for split, arrays in data.items():
        got = store.read_rows(split, 0, store.rows(split))
        for k, v in arrays.items():
            np.testing.assert_array_equal(got[k], v)
            assert got[k].dtype == v.dtype
    mid = store.read_rows("train", 4000, 8200)      # across two chunk boundaries
    np.testing.assert_array_equal(mid["cat"][:, 0], np.arange(4000, 8200))
    assert store.chunk("train", 2)["label"].shape == (1808, 1)
    with pytest.raises(StoreError, match="split 'nope'"):
        store.rows("nope")
    store.close()


def _find_chunk_offset(mdb: bytes, payload: bytes) -> int:
    probe = payload[len(payload) // 2: len(payload) // 2 + 64]
    off = mdb.find(probe)
    assert off >= 0 and mdb.find(probe, off + 1) < 0
    return off


def test_corrupt_chunk_is_named(tmp_path):
    path = str(tmp_path / "ds")
    schema, data = _write(path, {"train": 3000, "valid": 10}, chunk_rows=1000)
    lay = layout_for(schema)
    payload = encode_chunk(lay, {k: v[1000:2000] for k, v in data["train"].items()}, 1000)
    mdb_path = os.path.join(path, STORE_DIR, "data.mdb")
    raw = bytearray(open(mdb_path, "rb").read())
    off = _find_chunk_offset(bytes(raw), payload)
    raw[off] ^= 0xFF
    with open(mdb_path, "r+b") as fh:
        fh.write(raw)
    with pytest.raises(StoreError, match=r"chunk train/00000001 fails its checksum"):
        Store(path)
    with pytest.raises(StoreError):
        list(iter_numpy_batches(path, "train", 100))


def test_missing_chunk_is_named(tmp_path):
    path = str(tmp_path / "ds")
    _write(path, {"train": 2100}, chunk_rows=1000)
    env = lmdb.open(os.path.join(path, STORE_DIR), subdir=True)
    with env.begin(write=True) as txn:
        assert txn.delete(chunk_key("train", 2))
    env.close()
    with pytest.raises(StoreError, match=r"chunk train/00000002 is missing"):
        Store(path)


def _rewrite_meta(path, fn):
    env = lmdb.open(os.path.join(path, STORE_DIR), subdir=True)
    with env.begin(write=True) as txn:
        meta = json.loads(txn.get(META_KEY))
        txn.put(META_KEY, fn(meta))
    env.close()


def test_other_format_version_and_foreign_stores(tmp_path):
    path = str(tmp_path / "v2")
    _write(path, {"train": 10})
    _rewrite_meta(path, lambda m: json.dumps({**m, "format_version": FORMAT_VERSION + 1}).encode())
    with pytest.raises(StoreError, match=f"format version {FORMAT_VERSION + 1} is not supported"):
        Store(path)
    # metadata of another program
    path = str(tmp_path / "tagless")
    _write(path, {"train": 10})
    _rewrite_meta(path, lambda m: json.dumps({"hello": 1}).encode())
    with pytest.raises(StoreError, match="another program"):
        Store(path)
    path = str(tmp_path / "notjson")
    _write(path, {"train": 10})
    _rewrite_meta(path, lambda m: b"\x00\x01binary")
    with pytest.raises(StoreError, match="not JSON"):
        Store(path)
    # a plain LMDB with other keys
    path = str(tmp_path / "foreign")
    os.makedirs(os.path.join(path, STORE_DIR))
    env = lmdb.open(os.path.join(path, STORE_DIR), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"user:1", b"alice")
        txn.put(b"user:2", b"bob")
    env.close()
    with pytest.raises(StoreError, match="no metadata key"):
        Store(path)
    # a store that does not belong to its schema.json
    path = str(tmp_path / "mismatch")
    _write(path, {"train": 10})
    other = _schema(n_cat=4)
    other.save(path)
    with pytest.raises(StoreError, match="schema hash"):
        open_dataset(path)
    # a schema.json of another version
    path = str(tmp_path / "schemav")
    _write(path, {"train": 10})
    d = json.load(open(os.path.join(path, "schema.json")))
    d["version"] = 99
    json.dump(d, open(os.path.join(path, "schema.json"), "w"))
    with pytest.raises(StoreError, match="schema version 99"):
        open_dataset(path)


def test_not_a_dataset_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for p in (str(empty), str(tmp_path / "nope")):
        with pytest.raises(StoreError):
            open_dataset(p)
        with pytest.raises(StoreError):
            Store(p)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        open_dataset(str(f))
    # schema but no store
    _schema().save(str(empty))
    with pytest.raises(StoreError, match="data.mdb missing"):
        open_dataset(str(empty))
    # errors are one-line user errors
    try:
        open_dataset(str(tmp_path / "nope"))
    except StoreError as exc:
        assert isinstance(exc, UserError) and "\n" not in exc.format() and str(tmp_path / "nope") in exc.format()


# ----- batching -------------------------------------------------------------------------------------
def _rowids(batches):
    """Rows are identified by their numeric columns (continuous random values)."""
    return [tuple(r) for b in batches for r in np.asarray(b["num"]).round(6).tolist()]


@pytest.fixture(scope="module")
def ds(random_dataset):
    schema, store = open_dataset(random_dataset)
    all_ids = {sp: _rowids([store.read_rows(sp, 0, store.rows(sp))]) for sp in ("train", "valid", "test")}
    for ids in all_ids.values():
        assert len(set(ids)) == len(ids)
    return store, all_ids


def test_shuffle_is_seeded_and_covers_every_row_once(ds):
    store, ids = ds
    a = list(iter_packed(store, "train", 50, shuffle=True, seed=3, epoch=0))
    b = list(iter_packed(store, "train", 50, shuffle=True, seed=3, epoch=0))
    c = list(iter_packed(store, "train", 50, shuffle=True, seed=4, epoch=0))
    d = list(iter_packed(store, "train", 50, shuffle=True, seed=3, epoch=1))
    assert _rowids(a) == _rowids(b)
    assert _rowids(a) != _rowids(c) and _rowids(a) != _rowids(d)
    for run in (a, c, d):
        assert sorted(_rowids(run)) == sorted(ids["train"])
        assert [len(x["label"]) for x in run] == [50] * 12
    plain = list(iter_packed(store, "train", 64, shuffle=False))
    assert _rowids(plain) == ids["train"]              # stored order without shuffling
    assert [len(x["label"]) for x in plain] == [64] * 9 + [24]


@pytest.mark.parametrize("world_size,batch_size", [(2, 64), (3, 60), (4, 40)])
def test_shards_disjoint_covering_equal(ds, world_size, batch_size):
    store, ids = ds
    shards = [list(iter_packed(store, "train", batch_size, True, 5, 2, r, world_size)) for r in range(world_size)]
    lens = [[len(b["label"]) for b in s] for s in shards]
    assert all(x == lens[0] for x in lens)
    all_ids = [_rowids(s) for s in shards]
    flat = [x for s in all_ids for x in s]
    assert len(flat) == len(set(flat)) == 600          # 600 rows: no final padding needed here
    assert set(flat) == set(ids["train"])
    # rank r holds slice r of each global batch
    full = list(iter_packed(store, "train", batch_size, True, 5, 2))
    per = batch_size // world_size
    for r in range(world_size):
        np.testing.assert_array_equal(shards[r][0]["num"], full[0]["num"][r * per:(r + 1) * per])


def test_final_partial_batch_is_padded_or_dropped(ds):
    store, ids = ds
    W, B = 3, 63                                        # valid has 200 rows = 3*63 + 11
    shards = [list(iter_packed(store, "valid", B, False, 0, 0, r, W)) for r in range(W)]
    assert [len(b["label"]) for b in shards[0]] == [21, 21, 21, 4]
    assert all([len(b["label"]) for b in s] == [21, 21, 21, 4] for s in shards)
    flat = [x for s in shards for x in _rowids(s)]
    assert set(flat) == set(ids["valid"]) and len(flat) == 201      # one row repeated as padding
    dropped = [list(iter_packed(store, "valid", B, False, 0, 0, r, W, drop_last=True)) for r in range(W)]
    flat = [x for s in dropped for x in _rowids(s)]
    assert len(flat) == len(set(flat)) == 189
    assert num_batches(200, 63, True) == 3 and num_batches(200, 63, False) == 4
    full = list(iter_packed(store, "valid", 64, drop_last=True, seed=1))
    assert [len(b["label"]) for b in full] == [64, 64, 64]


@pytest.mark.parametrize("start", [0, 1, 3, 7, 11])
def test_start_batch_resumes_exactly(ds, start):
    store, _ = ds
    for kw in (dict(shuffle=True, seed=9, epoch=4), dict(shuffle=False), dict(shuffle=True, rank=1, world_size=2)):
        full = list(iter_packed(store, "train", 50, **kw))
        rest = list(iter_packed(store, "train", 50, start_batch=start, **kw))
        assert len(rest) == len(full) - start
        for x, y in zip(full[start:], rest):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])


def test_bad_batching_arguments(ds):
    store, _ = ds
    for kw in (dict(batch_size=0), dict(batch_size=10, world_size=3, rank=0), dict(batch_size=10, rank=2,
                                                                                     world_size=2)):
        with pytest.raises(UserError):
            list(iter_packed(store, "train", **kw))
    with pytest.raises(UserError):
        list(iter_packed(store, "nope", 10))


def test_torch_and_tf_loaders_yield_identical_batches(random_dataset):
    import torch  # noqa: F401
    import zoo_tf.data as tfd
    import zoo_torch.data as ptd

    cases = [dict(split="train", batch_size=64, shuffle=True, seed=1),
             dict(split="train", batch_size=50, shuffle=True, seed=2, epoch=3, start_batch=2),
             dict(split="valid", batch_size=63, shuffle=False, rank=2, world_size=3),
             dict(split="test", batch_size=32, shuffle=True, seed=0, rank=1, world_size=2, drop_last=True)]
    for kw in cases:
        a = [{k: v.numpy() for k, v in b.items()} for b in ptd.batches(random_dataset, **kw)]
        b = [{k: v.numpy() for k, v in x.items()} for x in tfd.batches(random_dataset, **kw)]
        ref = list(iter_numpy_batches(random_dataset, **kw))
        assert len(a) == len(b) == len(ref) > 0
        for x, y, z in zip(a, b, ref):
            assert list(x) == list(y) == list(z)
            for k in x:
                assert x[k].dtype == y[k].dtype == z[k].dtype, k
                np.testing.assert_array_equal(x[k], y[k])
                np.testing.assert_array_equal(x[k], z[k])
        assert a[0]["hist"].shape[1] == 5 and a[0]["label"].dtype == np.float32


def test_commit_size_does_not_change_the_store(tmp_path):
    """Rows are staged per split and put chunk by chunk; how often the write transaction
    is committed changes nothing that a reader sees."""
    schema = _schema()
    data = {s: _arrays(n, schema, seed=i) for i, (s, n) in enumerate({"train": 2500, "valid": 130}.items())}
    metas = []
    for commit in (1, 1 << 30):
        path = str(tmp_path / f"c{commit}")
        wr = StoreWriter(os.path.join(path, STORE_DIR), layout_for(schema), schema.model_hash(), chunk_rows=300,
                         commit_bytes=commit)
        for a, b in ((0, 1), (1, 299), (299, 301), (301, 1700), (1700, 2500)):     # across chunk ends
            for split, arrays in data.items():
                wr.append(split, {k: v[a:b] for k, v in arrays.items()})
        metas.append(wr.close())
        schema.save(path)
        store = Store(path)
        for split, arrays in data.items():
            got = store.read_rows(split, 0, store.rows(split))
            for k, v in arrays.items():
                np.testing.assert_array_equal(got[k], v)
    assert metas[0] == metas[1]
    assert metas[0]["splits"]["train"]["chunk_rows"] == [300] * 8 + [100]


def test_tf_loader_without_numeric_or_sequence_fields(tmp_path):
    """Zero-width packed arrays (no numeric / sequence fields, as in bucketised Criteo) and
    batches handed to tf.data in groups: still the torch loader's batches."""
    from conftest import write_random_dataset

    import torch  # noqa: F401
    import zoo_tf.data as tfd
    import zoo_torch.data as ptd

    path = str(tmp_path / "ds")
    write_random_dataset(path, rows=(1000, 50, 0), n_num=0, seq=False, chunk_rows=96)
    for kw in (dict(split="train", batch_size=64, seed=3), dict(split="train", batch_size=100, shuffle=False),
               dict(split="valid", batch_size=8, rank=1, world_size=2)):
        a = [{k: v.numpy() for k, v in b.items()} for b in ptd.batches(path, **kw)]
        for group in (1, 3, 8):
            b = [{k: v.numpy() for k, v in x.items()} for x in tfd.batches(path, group=group, **kw)]
            assert len(a) == len(b) > 0
            for x, y in zip(a, b):
                assert list(x) == list(y) == ["c0", "c1", "c2", "c3", "label"]
                for k in x:
                    assert x[k].dtype == y[k].dtype
                    np.testing.assert_array_equal(x[k], y[k])
    assert list(tfd.batches(path, "test", 16)) == []
