"""The planted synthetic dataset: determinism, shape, CTR, stored true probabilities, Zipf skew, truth.json."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from common.batching import iter_numpy_batches, open_dataset
from common.metrics import auc, logloss
from common.schema import Schema
from common.synthetic import (DEFAULT_DATASET, PlantedModel, default_dataset, load_truth, planted_model,
                              write_synthetic)

ROWS = 12_000
CARDS = [3, 10, 50, 200, 1000, 100_000, 1_000_000, 20]   # incl. ids beyond the parameter table


def _make(path, **kw):
    args = dict(rows=ROWS, seed=7, cardinalities=CARDS, n_numeric=4, chunk_rows=1000, progress=False,
                table_size=4096)
    args.update(kw)
    return write_synthetic(str(path), **args)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "a"
    _make(path)
    return str(path)


def _read_all(path, split):
    schema, store = open_dataset(path)
    return store.read_rows(split, 0, store.rows(split))


def test_schema_layout_and_split_rows(ds):
    schema = Schema.load(ds)
    assert schema.format == "synthetic"
    assert [f.name for f in schema.fields] == [f"C{i + 1}" for i in range(len(CARDS))] + ["I1", "I2", "I3", "I4"]
    assert schema.feature_names == [f.name for f in schema.fields]           # store layout order
    assert [f.vocab_size for f in schema.categorical] == [k + 2 for k in CARDS]
    assert schema.splits == {"train": 9600, "valid": 1200, "test": 1200}
    assert schema.settings["seed"] == 7 and schema.settings["cardinalities"] == CARDS
    _, store = open_dataset(ds)
    assert {s.name for s in store.layout} >= {"cat", "num", "label", "prob"}
    for split, n in schema.splits.items():
        assert store.rows(split) == n
        assert max(store.chunk_rows(split)) <= 1000


def test_ids_within_vocab_and_padding_convention(ds):
    schema = Schema.load(ds)
    for split in ("train", "valid", "test"):
        a = _read_all(ds, split)
        cat = a["cat"]
        assert cat.dtype == np.int32
        vocab = np.array([f.vocab_size for f in schema.categorical])
        assert (cat >= 0).all() and (cat < vocab).all()
        assert not (cat == 1).any()                                         # OOV never drawn
        assert np.isfinite(a["num"]).all()
    cat = _read_all(ds, "train")["cat"]
    assert (cat[:, 0] >= 2).sum() > 0 and set(np.unique(cat[:, 0])) <= {0, 2, 3, 4}
    # the largest field's ids reach far beyond the 4096-row parameter table
    assert cat[:, 6].max() > 4096


def test_determinism(ds, tmp_path):
    _make(tmp_path / "same")
    _make(tmp_path / "other", seed=8)
    _make(tmp_path / "rechunked", chunk_rows=777)
    a = _read_all(ds, "train")
    b = _read_all(str(tmp_path / "same"), "train")
    c = _read_all(str(tmp_path / "other"), "train")
    d = _read_all(str(tmp_path / "rechunked"), "train")
    for k in ("cat", "num", "label", "prob"):
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], d[k])               # independent of the store's chunking
    assert (a["cat"] != c["cat"]).mean() > 0.3
    assert not np.array_equal(a["prob"], c["prob"])
    assert load_truth(ds)["splits"] == load_truth(str(tmp_path / "same"))["splits"]


def test_ctr_near_base_and_labels_follow_prob(tmp_path):
    path = tmp_path / "ctr"
    _make(path, rows=40_000, base_ctr=0.1, seed=3)
    a = _read_all(str(path), "train")
    p, y = a["prob"][:, 0].astype(np.float64), a["label"][:, 0]
    assert set(np.unique(y)) == {0.0, 1.0}
    assert p.min() > 0 and p.max() < 1
    assert abs(p.mean() - 0.1) < 0.01                       # bias calibrated to base_ctr
    se = np.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(y.mean() - p.mean()) < 5 * se                 # labels ~ Bernoulli(prob)
    # calibration: in every decile of prob the click rate matches the mean prob
    order = np.argsort(p)
    for part in np.array_split(order, 10):
        assert abs(y[part].mean() - p[part].mean()) < 5 * np.sqrt(p[part].mean() / len(part)) + 0.005
    assert auc(y, p) > 0.65                                  # the planted signal is real


def test_default_ctr_is_a_quarter(ds):
    truth = load_truth(ds)
    tr = truth["splits"]["train"]
    assert abs(tr["mean_prob"] - 0.25) < 0.02
    assert abs(tr["ctr"] - 0.25) < 0.03


def test_truth_json_matches_stored_data(ds):
    truth = load_truth(ds)
    assert set(truth) >= {"splits", "settings", "planted", "generator_version"}
    for split in ("train", "valid", "test"):
        t = truth["splits"][split]
        assert set(t) >= {"rows", "bayes_auc", "bayes_logloss", "ctr", "mean_prob"}
        a = _read_all(ds, split)
        y, p = a["label"][:, 0], a["prob"][:, 0]
        assert t["rows"] == len(y)
        assert t["bayes_auc"] == pytest.approx(auc(y, p), abs=1e-12)
        assert t["bayes_logloss"] == pytest.approx(logloss(y, p), rel=1e-9)
        assert t["ctr"] == pytest.approx(float(y.astype(np.float64).mean()), abs=1e-12)
        assert 0.6 < t["bayes_auc"] < 0.95
    assert truth["settings"]["cardinalities"] == CARDS


def test_prob_is_a_function_of_the_stored_features(ds):
    """The stored prob is exactly the planted model applied to the stored features."""
    schema = Schema.load(ds)
    model = planted_model(schema.settings)
    a = _read_all(ds, "valid")
    np.testing.assert_array_equal(model.prob(a["cat"], a["num"]), a["prob"][:, 0])
    # ...and it is a genuinely non-additive model: the pairwise/high-order terms carry variance
    terms = model.terms(a["cat"], a["num"])
    var = {k: float(np.var(model.scale[k] * v)) for k, v in terms.items()}
    assert var["pairwise"] > 0.3 * var["first_order"]
    assert var["higher_order"] > 0 and var["mlp"] > 0


def test_bayes_beats_any_other_scoring(ds):
    a = _read_all(ds, "test")
    y, p = a["label"][:, 0], a["prob"][:, 0].astype(np.float64)
    truth = load_truth(ds)["splits"]["test"]
    rng = np.random.default_rng(0)
    noisy = p + rng.normal(0, 0.05, len(p))
    assert auc(y, noisy) < truth["bayes_auc"]
    shrunk = 0.5 * p + 0.5 * p.mean()
    assert logloss(y, shrunk) > truth["bayes_logloss"]


def test_zipf_skew(tmp_path):
    path = tmp_path / "zipf"
    _make(path, rows=30_000, missing_rate=0.0)
    cat = _read_all(str(path), "train")["cat"]
    col = cat[:, CARDS.index(1_000_000)]
    ids, counts = np.unique(col, return_counts=True)
    top = counts.max()
    assert ids[np.argmax(counts)] == 2                       # id 2 = the most frequent value
    assert top > 0.05 * len(col)
    assert top > 100 * np.median(counts)
    assert len(ids) > 2000                                   # and a long tail of rare ids
    # frequency decreases with the id (Zipf rank + 1)
    c = np.bincount(col, minlength=12)
    assert c[2] > c[3] > c[5] > c[10]


def test_missing_values_are_index_zero(tmp_path):
    path = tmp_path / "miss"
    _make(path, rows=5000, missing_rate=[0.0, 0.5] + [0.0] * (len(CARDS) - 2), numeric_missing_rate=0.0)
    cat = _read_all(str(path), "train")["cat"]
    assert not (cat[:, 0] == 0).any()
    assert 0.45 < (cat[:, 1] == 0).mean() < 0.55


def test_existing_directory_needs_overwrite(ds):
    with pytest.raises(FileExistsError):
        _make(ds)
    truth = load_truth(ds)
    assert truth["settings"]["seed"] == 7                    # untouched


def test_planted_model_rejects_bad_settings():
    from common.errors import UserError

    with pytest.raises(UserError):
        PlantedModel([10, 10], base_ctr=1.5)
    with pytest.raises(UserError):
        PlantedModel([10, 10], effects={"quadratic": 1.0})
    with pytest.raises(UserError):
        PlantedModel([10, 10], zipf_exponent=[1.1, 1.2, 1.3])


def test_loader_passes_prob_through(ds):
    b = next(iter_numpy_batches(ds, "train", 256, shuffle=True, seed=1))
    assert set(b) >= {"C1", "I1", "label", "prob"}
    assert b["prob"].shape == (256,) and b["prob"].dtype == np.float32


def test_default_dataset_is_cached_and_race_safe(tmp_path):
    cache = str(tmp_path / "cache")
    code = ("import sys; sys.path.insert(0, %r); from common.synthetic import default_dataset; "
            "print(default_dataset(%r, rows=6000, progress=False))" % (os.getcwd(), cache))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    path = paths.pop()
    assert os.path.dirname(path) == cache
    assert [x for x in os.listdir(cache) if not x.startswith(".")] == [os.path.basename(path)]
    assert not [x for x in os.listdir(cache) if ".tmp-" in x]          # losers cleaned up
    schema = Schema.load(path)
    assert sum(schema.splits.values()) == 6000
    assert schema.settings["cardinalities"] == list(DEFAULT_DATASET["cardinalities"])
    mtime = os.stat(os.path.join(path, "schema.json")).st_mtime_ns
    assert default_dataset(cache, rows=6000, progress=False) == path          # reused, not rebuilt
    assert os.stat(os.path.join(path, "schema.json")).st_mtime_ns == mtime
    assert default_dataset(cache, rows=7000, progress=False) != path          # other parameters: other dir


def test_default_dataset_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CTR_ZOO_CACHE", str(tmp_path / "envcache"))
    path = default_dataset(rows=3000, progress=False)
    assert path.startswith(str(tmp_path / "envcache"))
    assert json.load(open(os.path.join(path, "truth.json")))["splits"]["train"]["rows"] == 2400
