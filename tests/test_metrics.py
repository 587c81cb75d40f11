"""common.metrics against scikit-learn, on random data with and without ties."""
import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from common.metrics import MetricAccumulator, auc, evaluate, logloss, logloss_from_logits, sigmoid


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_sklearn_continuous(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 5000))
    y = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(np.float32)
    s = rng.normal(size=n) + y * rng.uniform(0, 2)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("levels", [1, 2, 3, 7, 50])
def test_auc_matches_sklearn_with_ties(levels):
    rng = np.random.default_rng(levels)
    n = 3000
    y = rng.integers(0, 2, n)
    s = rng.integers(0, levels, n) + 0.3 * y * rng.integers(0, 2, n)   # heavy ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    if levels == 1:   # all scores tied except where nudged: still exact
        assert 0.5 <= auc(y, s) <= 1


def test_auc_small_cases_by_hand():
    assert auc([0, 1], [0.1, 0.9]) == 1.0
    assert auc([1, 0], [0.1, 0.9]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    # pairs: (p=.8 vs n=.3) win, (p=.8 vs n=.8) tie, (p=.2 vs .3) lose, (p=.2 vs .8) lose -> 1.5/4
    assert auc([1, 0, 1, 0], [0.8, 0.3, 0.2, 0.8]) == pytest.approx(1.5 / 4)


def test_auc_is_invariant_to_monotone_transform_and_order():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    s = rng.normal(size=1000) + y
    perm = rng.permutation(1000)
    a = auc(y, s)
    assert auc(y, sigmoid(s)) == pytest.approx(a, abs=1e-12)
    assert auc(y[perm], s[perm]) == pytest.approx(a, abs=1e-12)
    assert auc(y, -s) == pytest.approx(1 - a, abs=1e-12)


def test_auc_one_class_is_nan_and_bad_input_raises():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError):
        auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        auc([0, 1], [0.1, float("nan")])


def test_auc_large_is_fast_and_exact():
    rng = np.random.default_rng(1)
    n = 1_000_000
    y = rng.random(n) < 0.25
    s = np.round(rng.normal(size=n) + y, 2)   # many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_logloss_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    y = rng.integers(0, 2, n)
    p = rng.uniform(0.001, 0.999, n)
    assert logloss(y, p) == pytest.approx(log_loss(y, p, labels=[0, 1]), rel=1e-10)
    z = np.log(p / (1 - p))
    assert logloss_from_logits(y, z) == pytest.approx(log_loss(y, p, labels=[0, 1]), rel=1e-9)


def test_logloss_clips_and_logits_are_stable():
    assert logloss([1, 0], [0.0, 1.0], eps=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert math.isfinite(logloss_from_logits([1, 0], [-1000.0, 1000.0]))
    assert logloss_from_logits([1, 0], [-1000.0, 1000.0]) == pytest.approx(1000.0)
    assert logloss_from_logits([1, 0], [1000.0, -1000.0]) == pytest.approx(0.0, abs=1e-12)


def test_sigmoid():
    z = np.array([-800.0, -5.0, 0.0, 3.0, 800.0])
    s = sigmoid(z)
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s[1:4], 1 / (1 + np.exp(-z[1:4])), rtol=1e-12)
    assert s[0] == 0.0 and s[-1] == 1.0
    assert sigmoid(0.0) == 0.5
    assert sigmoid(np.float32(2.0)).dtype == np.float32


def test_accumulator_equals_one_shot_metrics():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 5000).astype(np.float32)
    z = rng.normal(size=5000) + y
    acc = MetricAccumulator(from_logits=True)
    for i in range(0, 5000, 777):
        acc.update(y[i:i + 777], z[i:i + 777])
    r = acc.result()
    assert r["rows"] == 5000
    assert r["auc"] == pytest.approx(roc_auc_score(y, z), abs=1e-12)
    assert r["logloss"] == pytest.approx(log_loss(y, sigmoid(z)), rel=1e-9)
    assert r["ctr"] == pytest.approx(y.mean())
    assert r["mean_pred"] == pytest.approx(sigmoid(z).mean())
    e = evaluate(y, sigmoid(z))
    assert e["auc"] == pytest.approx(r["auc"], abs=1e-12)
    assert e["logloss"] == pytest.approx(r["logloss"], rel=1e-6)
    acc.reset()
    assert acc.rows == 0 and math.isnan(acc.result()["auc"])


def test_accumulator_accepts_tensor_like_objects():
    class FakeTensor:   # what torch/TF tensors look like to the accumulator
        def __init__(self, a):
            self.a = np.asarray(a)

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.a

    acc = MetricAccumulator()
    acc.update(FakeTensor([0, 1, 1]), FakeTensor([0.2, 0.7, 0.9]))
    assert acc.result()["auc"] == 1.0
    with pytest.raises(ValueError):
        acc.update([0, 1], [0.5])
