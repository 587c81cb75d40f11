"""`python -m data_prep` on the real sample files: split sizes, vocabularies (checked against
an independent pandas computation), decoded rows vs the raw lines, bad input, determinism."""
from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, SHARED_DATA

from common.batching import iter_packed, open_dataset
from common.encoders import OOV_TOKEN, Decoder, Vocabulary, bucket_token, load_encoders
from common.schema import Schema
from data_prep.cli import main

CRITEO10K = os.path.join(SHARED_DATA, "criteo_10k_head_autorec", "train-10k.txt")
CRITEO_CSV = os.path.join(SHARED_DATA, "criteo_sample_deepctr", "criteo_sample.txt")
AVAZU = os.path.join(SHARED_DATA, "avazu_sample_deepctr", "avazu_sample.txt")
ML_DIR = os.path.join(SHARED_DATA, "ml100k01-1-5")
ML = {s: os.path.join(ML_DIR, f"ml100k01-1-5.{s}.csv") for s in ("train", "validation", "test")}
UDATA = os.path.join(SHARED_DATA, "movielens100k", "u.data")
TAOBAO = {s: os.path.join(SHARED_DATA, "taobao_ad_tiny_fuxictr", f"{s}_sample.csv") for s in ("train", "valid", "test")}
CRITEO_NAMES = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]

UDATA_SPEC = {"delimiter": "\t", "header": False, "columns": ["user", "item", "rating", "timestamp"],
              "label": {"column": "rating", "threshold": 3, "name": "label"},
              "categorical": ["user", "item"], "drop": ["timestamp"]}
ML_SPEC = {"delimiter": "\t", "label": "label", "categorical": ["uid", "iid"]}
TAOBAO_SPEC = {"label": "clk",
               "categorical": ["userid", "adgroup_id", "pid", "cate_id", "campaign_id", "customer", "brand",
                               "cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
                               "shopping_level", "occupation", "new_user_class_level"],
               "numeric": ["price"],
               "sequence": [{"column": "click_sequence", "separator": "^", "max_len": 3, "vocab": "adgroup_id"}],
               "drop": ["time_stamp"]}


# ----- helpers ----------------------------------------------------------------------------------
def prep(out, *args) -> Schema:
    assert main(["--output", str(out), "--no_progress", *map(str, args)]) == 0
    return Schema.load(str(out))


def write_spec(tmp_path, spec, name="spec.json"):
    p = tmp_path / name
    p.write_text(json.dumps(spec, indent=1))
    return p


def all_rows(ds, split):
    schema, store = open_dataset(str(ds))
    try:
        if split not in store.splits():
            return []
        return Decoder(schema).decode_packed(store.read_rows(split, 0, store.rows(split)))
    finally:
        store.close()


def packed(ds, split):
    schema, store = open_dataset(str(ds))
    try:
        return store.read_rows(split, 0, store.rows(split))
    finally:
        store.close()


def vocab_of(ds, field):
    return load_encoders(str(ds))[field].vocab


def expected_vocab(values, min_count):
    """Independent fit: tokens with count >= min_count, by count desc then token."""
    vc = pd.Series([v for v in values if v is not None and v == v and v != ""], dtype=object).value_counts()
    kept = sorted(((t, int(c)) for t, c in vc.items() if c >= min_count), key=lambda tc: (-tc[1], tc[0]))
    return [t for t, _ in kept]


def criteo_bucket(raw):
    """Re-implementation of the documented Criteo bucket tokens."""
    if raw == "":
        return None
    v = int(float(raw))
    return f"b{int(math.floor(math.log(v) ** 2))}" if v > 2 else str(v)


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "data_prep", "--no_progress", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def assert_cli_error(tmp_path, out, args, path, line):
    r = run_cli("--output", out, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), lines[0]
    where = f"{path}:{line}:" if line is not None else f"{path}:"
    assert where in lines[0], (where, lines[0])
    assert "Traceback" not in r.stderr
    assert not os.path.exists(out)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith("." + os.path.basename(str(out)))]
    assert leftovers == []
    return lines[0]


# ----- criteo ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def criteo_all_train(tmp_path_factory):
    """criteo_10k with every row in train and min_count 1: stored rows are the file's rows in order."""
    out = tmp_path_factory.mktemp("c") / "ds"
    return prep(out, "--format", "criteo", "--input", CRITEO10K, "--split", "1,0,0", "--min_count", "1"), out


@pytest.fixture(scope="module")
def criteo_raw():
    return pd.read_csv(CRITEO10K, sep="\t", header=None, names=CRITEO_NAMES, dtype=str, keep_default_na=False)


def test_criteo_rows_decode_to_the_raw_lines(criteo_all_train, criteo_raw):
    schema, out = criteo_all_train
    assert schema.splits == {"train": 10000, "valid": 0, "test": 0}
    assert [f.name for f in schema.fields] == CRITEO_NAMES[1:]
    assert all(f.kind == "categorical" for f in schema.fields)
    rows = all_rows(out, "train")
    assert len(rows) == 10000
    for i in [0, 1, 2, 17, 4999, 9998, 9999]:
        raw, row = criteo_raw.iloc[i], rows[i]
        assert row["label"] == float(raw["label"])
        for c in CRITEO_NAMES[14:]:
            assert row[c] == (raw[c] or None), (i, c)
        for c in CRITEO_NAMES[1:14]:
            assert row[c] == criteo_bucket(raw[c]), (i, c)
    labels = packed(out, "train")["label"][:, 0]
    np.testing.assert_array_equal(labels, criteo_raw["label"].astype(np.float32).to_numpy())


def test_criteo_vocabularies_match_pandas(tmp_path, criteo_raw):
    s = prep(tmp_path / "ds", "--format", "criteo", "--input", CRITEO10K, "--split", "1,0,0")   # min_count 10
    for c in ["C1", "C3", "C6", "C12", "C20", "C26"]:
        exp = expected_vocab(criteo_raw[c].tolist(), 10)
        v = vocab_of(tmp_path / "ds", c)
        assert v.tokens == exp, c
        assert s.field(c).vocab_size == len(exp) + 2
        assert v.min_count == 10
    for c in ["I1", "I2", "I5", "I13"]:
        exp = expected_vocab([criteo_bucket(x) for x in criteo_raw[c]], 10)
        assert vocab_of(tmp_path / "ds", c).tokens == exp, c
    # rare values are out of vocabulary, empty fields are index 0
    cat = packed(tmp_path / "ds", "train")["cat"]
    j = [f.name for f in s.categorical].index("C3")
    counts = criteo_raw["C3"].map(criteo_raw["C3"].value_counts())
    np.testing.assert_array_equal(cat[:, j] == 0, (criteo_raw["C3"] == "").to_numpy())
    np.testing.assert_array_equal(cat[:, j] == 1, ((counts < 10) & (criteo_raw["C3"] != "")).to_numpy())


def test_criteo_default_split_sizes_and_train_only_fit(tmp_path, criteo_raw):
    s = prep(tmp_path / "ds", "--format", "criteo", "--input", CRITEO10K)
    assert s.splits == {"train": 8000, "valid": 1000, "test": 1000}     # exact in every block of 10 rows
    assert s.settings["split"] == [0.8, 0.1, 0.1] and s.settings["seed"] == 0
    v = vocab_of(tmp_path / "ds", "C3")
    full = expected_vocab(criteo_raw["C3"].tolist(), 10)
    # the vocabulary is fitted on 80% of the rows: counts are those of train rows only
    assert sum(v.counts) + v.oov_count + v.missing_count == 8000
    assert len(v.tokens) <= len(full)
    i1 = vocab_of(tmp_path / "ds", "I1")                                  # a bucketised numeric
    assert sum(i1.counts) + i1.oov_count + i1.missing_count == 8000
    # train rows decode to values whose train counts are exactly the fitted counts
    rows = all_rows(tmp_path / "ds", "train")
    got = pd.Series([r["C3"] for r in rows], dtype=object).value_counts()
    assert {t: int(got[t]) for t in v.tokens} == dict(zip(v.tokens, v.counts))
    assert int(got.get(OOV_TOKEN, 0)) == v.oov_count
    labels = np.concatenate([packed(tmp_path / "ds", sp)["label"][:, 0] for sp in ("train", "valid", "test")])
    assert labels.sum() == (criteo_raw["label"] == "1").sum()


def test_criteo_csv_variant_equals_tab_variant(tmp_path):
    """The DeepCTR CSV-with-header sample (integers written as 260.0) and the same rows written in the
    original tab format give identical datasets."""
    df = pd.read_csv(CRITEO_CSV, dtype=str, keep_default_na=False)
    assert len(df) == 200
    tab = df.copy()
    for c in CRITEO_NAMES[1:14]:
        tab[c] = [str(int(float(x))) if x else "" for x in tab[c]]
    raw = tmp_path / "criteo_tab.txt"
    raw.write_text("\n".join("\t".join(r) for r in tab.itertuples(index=False)) + "\n")
    a = prep(tmp_path / "a", "--format", "criteo", "--input", CRITEO_CSV, "--min_count", "2")
    b = prep(tmp_path / "b", "--format", "criteo", "--input", raw, "--min_count", "2")
    assert a.splits == b.splits == {"train": 160, "valid": 20, "test": 20}
    assert a.model_hash() == b.model_hash()
    for sp in ("train", "valid", "test"):
        pa, pb = packed(tmp_path / "a", sp), packed(tmp_path / "b", sp)
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k])
    # vocabulary sizes against pandas on the rows that went to train: decode the train rows' labels+C1
    s = prep(tmp_path / "c", "--format", "criteo", "--input", CRITEO_CSV, "--split", "1,0,0", "--min_count", "2")
    for c in ("C1", "C2", "C14", "C19", "I3", "I12"):
        vals = df[c].tolist() if c.startswith("C") else [criteo_bucket(x) for x in df[c]]
        assert s.field(c).vocab_size == len(expected_vocab(vals, 2)) + 2, c
    rows = all_rows(tmp_path / "c", "train")
    i3 = pd.Series([criteo_bucket(x) for x in df["I3"]], dtype=object)
    i3_counts, c3_counts = i3.value_counts(), df["C3"].value_counts()
    for i in range(200):
        tok = i3[i]
        assert rows[i]["I3"] == (None if tok is None else tok if i3_counts[tok] >= 2 else OOV_TOKEN)
        c3 = df["C3"][i]
        assert rows[i]["C3"] == (None if not c3 else c3 if c3_counts[c3] >= 2 else OOV_TOKEN)


def test_gzip_input_gives_the_same_dataset(tmp_path):
    gz = tmp_path / "criteo.txt.gz"
    with open(CRITEO10K, "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    a = prep(tmp_path / "a", "--format", "criteo", "--input", CRITEO10K, "--rows", "3000")
    b = prep(tmp_path / "b", "--format", "criteo", "--input", gz, "--rows", "3000")
    assert a.splits == b.splits and sum(a.splits.values()) == 3000
    for sp in ("train", "valid", "test"):
        pa, pb = packed(tmp_path / "a", sp), packed(tmp_path / "b", sp)
        np.testing.assert_array_equal(pa["cat"], pb["cat"])


def test_determinism_and_seed(tmp_path):
    args = ["--format", "criteo", "--input", CRITEO10K, "--rows", "4000", "--min_count", "3"]
    a = prep(tmp_path / "a", *args, "--seed", "7")
    b = prep(tmp_path / "b", *args, "--seed", "7")
    c = prep(tmp_path / "c", *args, "--seed", "8")
    for sp in ("train", "valid", "test"):
        pa, pb = packed(tmp_path / "a", sp), packed(tmp_path / "b", sp)
        for k in pa:
            assert pa[k].tobytes() == pb[k].tobytes()
    for f in sorted(os.listdir(tmp_path / "a" / "vocab")):
        assert (tmp_path / "a" / "vocab" / f).read_bytes() == (tmp_path / "b" / "vocab" / f).read_bytes()
    assert a.to_dict() == b.to_dict() | {"name": a.name}
    mdb = [(tmp_path / x / "store" / "data.mdb").read_bytes() for x in ("a", "b")]
    assert mdb[0] == mdb[1]                                                          # byte-identical store
    assert sorted(os.listdir(tmp_path / "a")) == ["schema.json", "store", "vocab"]     # no scratch files left
    # parsing the text again in pass 2 instead of replaying pass 1's scratch file: same dataset
    nc = prep(tmp_path / "nc", *args, "--seed", "7", "--no_cache")
    assert nc.to_dict() == a.to_dict() | {"name": nc.name}
    for sp in ("train", "valid", "test"):
        pa, pn = packed(tmp_path / "a", sp), packed(tmp_path / "nc", sp)
        for k in pa:
            assert pa[k].tobytes() == pn[k].tobytes()
    # another seed: same sizes, other rows in train
    assert a.splits == c.splits
    assert not np.array_equal(packed(tmp_path / "a", "train")["cat"], packed(tmp_path / "c", "train")["cat"])


def test_stratified_split_keeps_the_click_rate(tmp_path, criteo_raw):
    s = prep(tmp_path / "ds", "--format", "criteo", "--input", CRITEO10K, "--stratify", "--split", "0.7,0.2,0.1")
    pos = int((criteo_raw["label"] == "1").sum())
    neg = 10000 - pos
    for sp, frac in (("train", 0.7), ("valid", 0.2), ("test", 0.1)):
        lab = packed(tmp_path / "ds", sp)["label"][:, 0]
        assert abs(lab.sum() - frac * pos) <= 10          # exact per class up to the last partial block
        assert abs((lab == 0).sum() - frac * neg) <= 10
        assert len(lab) == s.splits[sp]


def test_standardize_numeric(tmp_path, criteo_raw):
    s = prep(tmp_path / "ds", "--format", "criteo", "--input", CRITEO10K, "--numeric", "standardize",
             "--split", "1,0,0")
    assert [f.name for f in s.numeric] == CRITEO_NAMES[1:14]
    num = packed(tmp_path / "ds", "train")["num"]
    enc = load_encoders(str(tmp_path / "ds"))
    for j, c in enumerate(CRITEO_NAMES[1:14]):
        x = pd.to_numeric(criteo_raw[c].replace("", np.nan))
        assert enc[c].mean == pytest.approx(x.mean(), rel=1e-9)
        assert enc[c].std == pytest.approx(x.std(ddof=0), rel=1e-9)
        exp = ((x - x.mean()) / x.std(ddof=0)).fillna(0.0).to_numpy(np.float32)
        np.testing.assert_allclose(num[:, j], exp, rtol=1e-5, atol=1e-5)


# ----- avazu -------------------------------------------------------------------------------------
def test_avazu_hour_fields_and_vocab(tmp_path):
    s = prep(tmp_path / "ds", "--format", "avazu", "--input", AVAZU, "--split", "1,0,0")
    df = pd.read_csv(AVAZU, dtype=str, keep_default_na=False)
    names = [f.name for f in s.fields]
    assert "id" not in names and "click" not in names and "hour" not in names
    assert {"hour_of_day", "weekday", "site_id", "device_ip", "C21"} <= set(names)
    assert s.labels == ["click"] and s.splits["train"] == 100
    for c in df.columns:
        if c not in ("id", "click", "hour"):
            assert s.field(c).vocab_size == df[c].nunique() + 2, c
    rows = all_rows(tmp_path / "ds", "train")
    when = pd.to_datetime("20" + df["hour"], format="%Y%m%d%H")
    for i in (0, 50, 99):
        assert rows[i]["hour_of_day"] == str(when[i].hour)
        assert rows[i]["weekday"] == str(when[i].weekday())      # 2014-10-21 is a Tuesday -> "1"
        assert rows[i]["device_ip"] == df["device_ip"][i]
        assert rows[i]["click"] == float(df["click"][i])
    assert rows[0]["weekday"] == "1"


# ----- csv: MovieLens / ml100k / Taobao --------------------------------------------------------
def test_ml100k_separate_files_fit_on_train_only(tmp_path):
    spec = write_spec(tmp_path, ML_SPEC)
    s = prep(tmp_path / "ds", "--format", "csv", "--spec", spec, "--input", ML["train"],
             "--valid", ML["validation"], "--test", ML["test"])
    assert s.splits == {"train": 94638, "valid": 2334, "test": 3028}
    tr = {k: pd.read_csv(p, sep="\t", dtype=str) for k, p in ML.items()}
    for c in ("uid", "iid"):
        v = vocab_of(tmp_path / "ds", c)
        assert v.tokens == expected_vocab(tr["train"][c].tolist(), 1)
        assert s.field(c).vocab_size == tr["train"][c].nunique() + 2
    for sp, key in (("valid", "validation"), ("test", "test")):
        rows = all_rows(tmp_path / "ds", sp)
        df = tr[key]
        assert len(rows) == len(df)
        seen = set(tr["train"]["iid"])
        for i in range(0, len(df), 97):
            exp = df["iid"][i] if df["iid"][i] in seen else OOV_TOKEN
            assert rows[i]["iid"] == exp
            assert rows[i]["uid"] in (df["uid"][i], OOV_TOKEN)
            assert rows[i]["label"] == float(df["label"][i])
        lab = packed(tmp_path / "ds", sp)["label"][:, 0]
        assert lab.sum() == (df["label"] == "1").sum() == 942
    # an item only in the test file is out of vocabulary
    only_test = set(tr["test"]["iid"]) - set(tr["train"]["iid"])
    if only_test:
        rows = all_rows(tmp_path / "ds", "test")
        assert any(r["iid"] == OOV_TOKEN for r in rows)


def test_udata_threshold_label_and_split_membership(tmp_path):
    spec = write_spec(tmp_path, UDATA_SPEC)
    s = prep(tmp_path / "ds", "--format", "csv", "--spec", spec, "--input", UDATA, "--seed", "3")
    assert s.splits == {"train": 80000, "valid": 10000, "test": 10000}
    raw = pd.read_csv(UDATA, sep="\t", header=None, names=["user", "item", "rating", "ts"], dtype=str)
    raw["label"] = (raw["rating"].astype(int) > 3).astype(float)
    key = raw["user"] + "/" + raw["item"]
    assert key.is_unique
    pos = {k: i for i, k in enumerate(key)}
    rows = all_rows(tmp_path / "ds", "train")
    idx = np.array([pos[r["user"] + "/" + r["item"]] for r in rows])      # train values are never OOV
    assert (np.diff(idx) > 0).all()                                       # file order is kept
    np.testing.assert_array_equal([r["label"] for r in rows], raw["label"].to_numpy()[idx])
    train = raw.iloc[idx]
    # vocabularies are the train rows' values only
    for c in ("user", "item"):
        v = vocab_of(tmp_path / "ds", c)
        assert v.tokens == expected_vocab(train[c].tolist(), 1)
        assert v.counts == sorted(v.counts, reverse=True)
    # valid and test partition the other rows, each in file order (values unseen in train -> OOV)
    rest = raw.drop(index=raw.index[idx])
    users, items = set(train["user"]), set(train["item"])
    rest_t = [(u if u in users else OOV_TOKEN, i if i in items else OOV_TOKEN, lab)
              for u, i, lab in zip(rest["user"], rest["item"], rest["label"])]
    parts = {sp: [(r["user"], r["item"], r["label"]) for r in all_rows(tmp_path / "ds", sp)]
             for sp in ("valid", "test")}
    assert sorted(parts["valid"] + parts["test"]) == sorted(rest_t)
    for part in parts.values():
        it = iter(rest_t)
        assert all(any(x == y for y in it) for x in part)                 # a subsequence of the file
    assert any(t[1] == OOV_TOKEN for t in rest_t)
    assert vocab_of(tmp_path / "ds", "item").tokens != expected_vocab(raw["item"].tolist(), 1)


def test_taobao_sequence_shares_item_vocab(tmp_path):
    spec = write_spec(tmp_path, TAOBAO_SPEC)
    s = prep(tmp_path / "ds", "--format", "csv", "--spec", spec, "--input", TAOBAO["train"],
             "--valid", TAOBAO["valid"], "--test", TAOBAO["test"])
    assert s.splits == {"train": 100, "valid": 100, "test": 100}
    seq, item = s.field("click_sequence"), s.field("adgroup_id")
    assert seq.kind == "sequence" and seq.max_len == 3
    assert seq.embedding_group == "adgroup_id" and seq.vocab_size == item.vocab_size
    assert s.field("price").kind == "numeric"
    df = pd.read_csv(TAOBAO["train"], dtype=str, keep_default_na=False)
    items = [t for x in df["click_sequence"] for t in [t for t in x.split("^") if t][-3:]]   # kept items
    v = vocab_of(tmp_path / "ds", "adgroup_id")
    assert v.tokens == expected_vocab(df["adgroup_id"].tolist() + items, 1)
    rows = all_rows(tmp_path / "ds", "train")
    price = df["price"].astype(float)
    for i in range(100):
        r = rows[i]
        exp_seq = [t for t in df["click_sequence"][i].split("^") if t][-3:]
        assert r["click_sequence"] == exp_seq                      # the most recent 3, oldest first
        assert r["brand"] == (df["brand"][i] or None)
        assert r["clk"] == float(df["clk"][i])
        assert r["price"] == pytest.approx(price[i], rel=1e-5)
    enc = load_encoders(str(tmp_path / "ds"))["price"]
    assert enc.mean == pytest.approx(price.mean()) and enc.std == pytest.approx(price.std(ddof=0))
    p = packed(tmp_path / "ds", "train")["seq"]
    assert p.shape == (100, 3) and (p[[len(x) == 0 for x in df["click_sequence"]]] == 0).all()
    # padding only at the end
    nz = p != 0
    assert (nz[:, 1:] <= nz[:, :-1]).all()


# ----- libfm, quoting, CRLF --------------------------------------------------------------------------
def test_libfm_position_fields(tmp_path):
    rng = np.random.default_rng(0)
    lines, raw = [], []
    for _ in range(300):
        ids = [int(rng.integers(0, 5)), 10 + int(rng.integers(0, 40)), 100 + int(rng.integers(0, 3))]
        lab = int(rng.choice([-1, 1]))
        raw.append((lab, ids))
        lines.append(" ".join([str(lab)] + [f"{i}:1" for i in ids]))
    p = tmp_path / "frappe.libfm.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    s = prep(tmp_path / "ds", "--format", "libfm", "--input", p, "--split", "1,0,0")
    assert [f.name for f in s.fields] == ["f1", "f2", "f3"]
    rows = all_rows(tmp_path / "ds", "train")
    for i in (0, 7, 299):
        lab, ids = raw[i]
        assert rows[i]["label"] == (1.0 if lab == 1 else 0.0)
        assert [rows[i][f"f{k}"] for k in (1, 2, 3)] == [str(x) for x in ids]
    assert s.field("f3").vocab_size == len({ids[2] for _, ids in raw}) + 2


def test_quoted_fields_crlf_and_multi_label(tmp_path):
    text = ('y,z,name,city,score\r\n'
            '1,0,"Smith, J",Paris,1.5\r\n'
            '0,1,"Doe ""Jr""",Rome,2.5\r\n'
            '1,1,Plain,,3.5\r\n'
            '\r\n')
    p = tmp_path / "q.csv"
    p.write_bytes(text.encode())
    spec = write_spec(tmp_path, {"label": ["y", {"column": "z", "name": "conv"}],
                                 "categorical": ["name", "city"], "numeric": ["score"]})
    s = prep(tmp_path / "ds", "--format", "csv", "--spec", spec, "--input", p, "--split", "1,0,0")
    assert s.labels == ["y", "conv"]
    rows = all_rows(tmp_path / "ds", "train")
    assert [r["name"] for r in rows] == ["Smith, J", 'Doe "Jr"', "Plain"]
    assert [r["city"] for r in rows] == ["Paris", "Rome", None]
    assert [(r["y"], r["conv"]) for r in rows] == [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
    assert [round(r["score"], 5) for r in rows] == [1.5, 2.5, 3.5]


# ----- bad input ---------------------------------------------------------------------------------------
def _criteo_lines(n):
    with open(CRITEO10K) as fh:
        return [next(fh) for _ in range(n)]


def test_bad_input_exits_2_with_one_line(tmp_path):
    lines = _criteo_lines(6)
    out = tmp_path / "out"
    # wrong number of fields on line 4
    p = tmp_path / "fields.txt"
    p.write_text("".join(lines[:3]) + "\t".join(lines[3].split("\t")[:-1]) + "\n" + "".join(lines[4:]))
    msg = assert_cli_error(tmp_path, out, ["--format", "criteo", "--input", p], p, 4)
    assert "fields" in msg
    # non-numeric integer column on line 5
    p = tmp_path / "nonnum.txt"
    f = lines[4].split("\t")
    f[3] = "12x"
    p.write_text("".join(lines[:4]) + "\t".join(f) + "".join(lines[5:]))
    assert "'12x'" in assert_cli_error(tmp_path, out, ["--format", "criteo", "--input", p], p, 5)
    # label that is not 0/1 on line 2 (csv variant: the header is line 1)
    p = tmp_path / "label.csv"
    src = open(CRITEO_CSV).read().split("\n")
    p.write_text("\n".join([src[0], "2" + src[1][1:]] + src[2:]))
    assert "0 or 1" in assert_cli_error(tmp_path, out, ["--format", "criteo", "--input", p], p, 2)
    # empty file; header-only file
    p = tmp_path / "empty.txt"
    p.write_text("")
    assert_cli_error(tmp_path, out, ["--format", "criteo", "--input", p], p, 1)
    p = tmp_path / "header.csv"
    p.write_text(src[0] + "\n")
    assert_cli_error(tmp_path, out, ["--format", "criteo", "--input", p], p, 2)
    # missing file
    p = tmp_path / "nope.txt"
    assert "no such file" in assert_cli_error(tmp_path, out, ["--format", "criteo", "--input", p], p, None)
    # truncated gzip: the error names the first line that was not completely decompressed
    full = open(CRITEO10K, "rb").read()
    comp = gzip.compress(full)
    cut = comp[:len(comp) // 3]
    got = zlib.decompressobj(31).decompress(cut)
    line = got.count(b"\n") + 1
    assert 100 < line < 9000
    p = tmp_path / "trunc.txt.gz"
    p.write_bytes(cut)
    assert "truncated" in assert_cli_error(tmp_path, out, ["--format", "criteo", "--input", p], p, line)
    # a spec naming a column that does not exist (reported at its line in the spec)
    spec = tmp_path / "spec.json"
    spec.write_text('{\n "delimiter": "\\t",\n "label": "label",\n "categorical": ["uid",\n   "nosuchcol"]\n}\n')
    msg = assert_cli_error(tmp_path, out, ["--format", "csv", "--spec", spec, "--input", ML["test"]], spec, 5)
    assert "nosuchcol" in msg
    # a bad line in the test file (read only in pass 2) still leaves nothing behind
    bad_test = tmp_path / "test.csv"
    bad_test.write_text("uid\tiid\tlabel\n1\t2\t1\n3\t4\n")
    spec2 = write_spec(tmp_path, ML_SPEC, "ml.json")
    assert_cli_error(tmp_path, out, ["--format", "csv", "--spec", spec2, "--input", ML["validation"],
                                     "--test", bad_test], bad_test, 3)
    # a bad flag is one line too
    r = run_cli("--format", "criteo", "--input", CRITEO10K, "--output", out, "--split", "0.5,0.5")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--split" in r.stderr


def test_on_bad_line_skip_records_lines(tmp_path):
    lines = _criteo_lines(30)
    bad = dict(lines=list(lines))
    bad["lines"][4] = "\t".join(lines[4].split("\t")[:20]) + "\n"            # line 5: too few fields
    f = lines[9].split("\t")
    f[2] = "x"
    bad["lines"][9] = "\t".join(f)                                           # line 10: not an integer
    bad["lines"][19] = "7" + lines[19][1:]                                   # line 20: label 7
    p = tmp_path / "some_bad.txt"
    p.write_text("".join(bad["lines"]))
    s = prep(tmp_path / "ds", "--format", "criteo", "--input", p, "--on_bad_line", "skip", "--split", "1,0,0",
             "--min_count", "1")
    assert s.skipped_lines["count"] == 3
    assert s.skipped_lines["first"] == [5, 10, 20]
    assert sum(s.splits.values()) == 27
    assert any("label" in d for d in s.skipped_lines["details"])
    rows = all_rows(tmp_path / "ds", "train")
    keep = [ln for i, ln in enumerate(lines) if i not in (4, 9, 19)]
    assert [r["C1"] for r in rows] == [ln.split("\t")[14] or None for ln in keep]
    nc = prep(tmp_path / "nc", "--format", "criteo", "--input", p, "--on_bad_line", "skip", "--split", "1,0,0",
              "--min_count", "1", "--no_cache")
    assert nc.skipped_lines == s.skipped_lines and nc.splits == s.splits
    # separate files: bad lines of the train file (recorded in pass 1) and of the test file (pass 2)
    tr, te = tmp_path / "tr.csv", tmp_path / "te.csv"
    tr.write_text("uid\tiid\tlabel\n1\t2\t1\n1\t3\n2\t2\t0\n")
    te.write_text("uid\tiid\tlabel\n1\t2\t5\n2\t9\t1\n")
    spec = write_spec(tmp_path, ML_SPEC)
    for extra in ([], ["--no_cache"]):
        m = prep(tmp_path / f"ml{len(extra)}", "--format", "csv", "--spec", spec, "--input", tr, "--test", te,
                 "--on_bad_line", "skip", *extra)
        assert m.splits == {"train": 2, "valid": 0, "test": 1}
        assert m.skipped_lines["count"] == 2 and m.skipped_lines["first"] == [3, 2]
        assert m.skipped_lines["per_file"] == {str(tr): 1, str(te): 1}
    # with error mode the same file fails at the first bad line
    r = run_cli("--format", "criteo", "--input", p, "--output", tmp_path / "o2")
    assert r.returncode == 2 and f"{p}:5:" in r.stderr


def test_existing_output_needs_overwrite(tmp_path):
    args = ["--format", "criteo", "--input", CRITEO10K, "--rows", "500"]
    prep(tmp_path / "ds", *args)
    r = run_cli("--output", tmp_path / "ds", *args)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    s = prep(tmp_path / "ds", *args, "--overwrite", "--seed", "1")
    assert s.settings["seed"] == 1


# ----- encoders ----------------------------------------------------------------------------------------
def test_encoder_helpers():
    assert [bucket_token(x) for x in (-1, 0, 1, 2, 3, 7, 260)] == ["-1", "0", "1", "2", "b1", "b3", "b30"]
    v = Vocabulary.fit({"b": 3, "a": 3, "c": 5, "d": 1}, min_count=2)
    assert v.tokens == ["c", "a", "b"] and v.oov_count == 1 and v.size == 5
    np.testing.assert_array_equal(v.encode(["a", "d", None, "c"]), [3, 1, 0, 2])
    assert [v.decode(i) for i in (0, 1, 2)] == [None, OOV_TOKEN, "c"]


def test_batches_over_a_prepared_dataset(tmp_path):
    spec = write_spec(tmp_path, TAOBAO_SPEC)
    s = prep(tmp_path / "ds", "--format", "csv", "--spec", spec, "--input", TAOBAO["train"],
             "--valid", TAOBAO["valid"], "--test", TAOBAO["test"], "--chunk_rows", "16")
    schema, store = open_dataset(str(tmp_path / "ds"))
    assert store.num_chunks("train") == 7
    got = list(iter_packed(store, "train", 32, shuffle=True, seed=1))
    assert sum(len(b["label"]) for b in got) == 100
    assert got[0]["seq"].shape[1] == 3 and got[0]["cat"].shape[1] == len(s.categorical)
    # field-dict batches (what the backends see) decode to the same rows as the packed arrays
    from common.batching import iter_numpy_batches

    rows = [r for b in iter_numpy_batches(str(tmp_path / "ds"), "train", 32, shuffle=False)
            for r in Decoder(schema).decode_batch(b)]
    ref = all_rows(tmp_path / "ds", "train")
    assert len(rows) == 100
    for r, q in zip(rows, ref):
        assert r["label"] == q["clk"]
        assert all(r[f.name] == q[f.name] for f in schema.fields)


def test_split_assignment_is_a_function_of_seed_and_row_number():
    from data_prep.split import TEST, TRAIN, VALID, Splitter, block_layout

    assert block_layout((0.8, 0.1, 0.1)) == (10, (8, 1, 1))
    assert block_layout((0.7, 0.15, 0.15)) == (20, (14, 3, 3))
    n = 10_000
    whole = Splitter((0.8, 0.1, 0.1), seed=5).assign(None, n)
    sp = Splitter((0.8, 0.1, 0.1), seed=5)
    rng = np.random.default_rng(0)
    parts, done = [], 0
    while done < n:                                  # any chunking gives the same assignment
        k = min(int(rng.integers(1, 777)), n - done)
        parts.append(sp.assign(None, k))
        done += k
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    counts = np.bincount(whole, minlength=3)
    assert counts.tolist() == [8000, 1000, 1000]
    assert (np.bincount(whole[:10], minlength=3) == [8, 1, 1]).all()         # exact in every block of 10
    other = Splitter((0.8, 0.1, 0.1), seed=6).assign(None, n)
    assert (other != whole).mean() > 0.1
    # stratified: exact proportions per class
    labels = (rng.random(n) < 0.2).astype(float)
    st = Splitter((0.8, 0.1, 0.1), seed=1, stratify=True).assign(labels, n)
    for c in (0.0, 1.0):
        per = np.bincount(st[labels == c], minlength=3)
        total = int((labels == c).sum())
        assert abs(per[TRAIN] - 0.8 * total) <= 8 and abs(per[VALID] - 0.1 * total) <= 1
        assert per.sum() == total and per[TEST] >= 0


# ----- parallel parsing, spilled counts, the hash table -------------------------------------------------
def assert_same_dataset(a, b, ignore=()):
    """Byte-identical stores and vocabularies; the same schema apart from name, settings
    and ``ignore``."""
    assert (a / "store" / "data.mdb").read_bytes() == (b / "store" / "data.mdb").read_bytes()
    assert sorted(os.listdir(a / "vocab")) == sorted(os.listdir(b / "vocab"))
    for f in sorted(os.listdir(a / "vocab")):
        assert (a / "vocab" / f).read_bytes() == (b / "vocab" / f).read_bytes(), f
    sa, sb = Schema.load(str(a)).to_dict(), Schema.load(str(b)).to_dict()
    for d in (sa, sb):
        for k in ("name", "settings", *ignore):
            d.pop(k)
    assert sa == sb
    assert sorted(os.listdir(b)) == ["schema.json", "store", "vocab"]        # no scratch files left


def test_threads_blocks_and_spilled_counts_give_identical_datasets(tmp_path, monkeypatch):
    """Worker threads (which guess each block's first row number), small blocks, the --rows
    cut inside a block, and token counts spilled to disk change nothing in the output."""
    from data_prep.columns import CountSpill

    spills = []
    real_spill = CountSpill.spill
    monkeypatch.setattr(CountSpill, "spill", lambda self: (spills.append(1), real_spill(self))[1])
    base = ["--format", "criteo", "--input", CRITEO10K, "--min_count", "2"]
    prep(tmp_path / "ref", *base, "--workers", "1", "--chunk_mb", "64")       # one block, in-memory counts
    assert not spills
    variants = {"threads": ["--workers", "3", "--chunk_mb", "0.0625"],
                "spill": ["--count_mb", "0.01", "--chunk_mb", "0.0625"],
                "spill_nocache": ["--count_mb", "0.01", "--no_cache", "--chunk_mb", "0.1", "--workers", "2"]}
    for name, extra in variants.items():
        n0 = len(spills)
        prep(tmp_path / name, *base, *extra)
        assert (len(spills) > n0) == ("spill" in name), name
        assert_same_dataset(tmp_path / "ref", tmp_path / name)
    prep(tmp_path / "rows_ref", *base, "--rows", "7001", "--workers", "1", "--chunk_mb", "64")
    prep(tmp_path / "rows", *base, "--rows", "7001", "--chunk_mb", "0.0625")
    assert_same_dataset(tmp_path / "rows_ref", tmp_path / "rows")


def test_blank_and_skipped_lines_do_not_shift_the_split(tmp_path):
    """Rows are numbered without blank and skipped lines, also when the worker threads'
    guess of a block's first row number (from its line number) is off."""
    with open(CRITEO10K) as fh:
        lines = fh.readlines()[:4000]
    noisy, bad = [], 0
    for i, ln in enumerate(lines):
        if i % 97 == 5:
            noisy.append("\n")
        if i % 389 == 7:
            noisy.append("1\t2\t3\n")
            bad += 1
        noisy.append(ln)
    (tmp_path / "clean.txt").write_text("".join(lines))
    (tmp_path / "noisy.txt").write_text("".join(noisy))
    args = ["--format", "criteo", "--min_count", "2", "--chunk_mb", "0.0625", "--on_bad_line", "skip"]
    prep(tmp_path / "a", *args, "--input", tmp_path / "clean.txt")
    s = prep(tmp_path / "b", *args, "--input", tmp_path / "noisy.txt")
    assert s.skipped_lines["count"] == bad > 5
    assert_same_dataset(tmp_path / "a", tmp_path / "b", ignore=("skipped_lines", "extra"))


def test_key_table_lookup():
    from data_prep.columns import KeyTable

    rng = np.random.default_rng(0)
    keys = np.unique(np.concatenate([rng.integers(0, 2**64 - 1, 3000, dtype=np.uint64, endpoint=True),
                                     np.arange(500, dtype=np.uint64),             # dense runs: long probes
                                     np.arange(500, dtype=np.uint64) << np.uint64(56)]))
    keys = keys[rng.permutation(len(keys))]
    t = KeyTable(keys)
    others = rng.integers(0, 2**64 - 1, 3000, dtype=np.uint64, endpoint=True)
    q = np.concatenate([keys, others, keys[:100]])
    where = {int(k): i for i, k in enumerate(keys)}
    np.testing.assert_array_equal(t.lookup(q), [where.get(int(k), -1) for k in q])
    v = KeyTable(keys, np.arange(len(keys), dtype=np.int32) * 3 + 7, default=-5)
    np.testing.assert_array_equal(v.lookup(q), [where[int(k)] * 3 + 7 if int(k) in where else -5 for k in q])
    d = KeyTable(np.array([5, 7, 5, 0], np.uint64))                               # repeated key: the first wins
    np.testing.assert_array_equal(d.lookup(np.array([5, 7, 0, 1], np.uint64)), [0, 1, 3, -1])
    assert len(KeyTable(np.zeros(0, np.uint64)).lookup(np.array([0, 3], np.uint64))) == 2


def test_spilled_counts_equal_in_memory_counts(tmp_path):
    """CountSpill: counts past the budget go to hash partitions on disk (recursively split
    when a partition is still too big); the fitted vocabulary is exactly the in-memory one."""
    from data_prep.columns import CountSpill, KeyCounter, unique_counts
    from data_prep.reader import string_keys

    rng = np.random.default_rng(1)
    pool = [format(int(x), "x") for x in rng.integers(0, 16**7, 6000)]          # 1-7 byte tokens
    longs = [f"long-token-{i:05d}" for i in range(400)]                          # > 8 bytes: string counts
    mem, disk = KeyCounter("utf-8"), KeyCounter("utf-8")
    spill = CountSpill(str(tmp_path / "counts"), 0, parts=4)
    spill.budget = 300
    spill.register(disk)
    for _ in range(40):
        toks = [pool[i] for i in np.minimum(rng.zipf(1.3, 700), len(pool)) - 1]
        keys, short = string_keys(toks, "utf-8")
        keys = np.concatenate([keys[short], np.zeros(5, np.uint64)])             # key 0: missing values
        lt = [longs[i] for i in np.minimum(rng.zipf(1.5, 30), len(longs)) - 1]
        seq = {pool[int(i)]: int(c) for i, c in zip(rng.integers(0, 50, 20), rng.integers(1, 4, 20))}
        for c in (mem, disk):
            c.add_counts(*unique_counts(keys))
            c.add_strings(lt)
            c.add_string_counts(seq)
        spill.maybe_spill()
    assert spill.spills > 3
    spill.reduce([3])
    assert not [f for f in os.listdir(tmp_path / "counts")]                       # partitions merged and removed
    (va, ka), (vb, kb) = mem.fit(3), disk.fit(3)
    assert va.to_dict() == vb.to_dict() and len(va.tokens) > 100
    assert any(t.startswith("long-token") for t in va.tokens)
    np.testing.assert_array_equal(ka, kb)
