"""NASRec search space, tokens, sampling, mutation, regularized evolution and rank correlations (backend-free)."""
from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest

from common.evolution import evolve, proxies_from_gradients, random_search, save_top_k
from common.nas_space import (BLOCK_KEYS, FULL, BlockConfig, PathSampler, SearchSpace, SubnetConfig, as_path,
                              dedup, default_subnet, detokenize, full_path, is_valid, load_subnet_config, mutate,
                              num_connections, num_mutations, sample_subnet, token_hash, tokenize, validate)
from common.rank_corr import kendall_tau, rankdata, spearman

SMALL = SearchSpace.small()
FULL_SPACE = SearchSpace.full()


def _diff(a: SubnetConfig, b: SubnetConfig):
    return [(i, k) for i, (x, y) in enumerate(zip(a.blocks, b.blocks)) for k in BLOCK_KEYS
            if getattr(x, k) != getattr(y, k)]


# ----------------------------------------------------------------------------------------------
# space, sampling, validation
# ----------------------------------------------------------------------------------------------
def test_spaces_match_the_paper():
    assert SMALL.dense_ops == ("fc", "dot") and SMALL.sparse_ops == ("efc",)
    assert FULL_SPACE.dense_ops == ("fc", "dot", "gating", "sum") and FULL_SPACE.sparse_ops == ("efc", "attention")
    for sp in (SMALL, FULL_SPACE):
        assert sp.num_blocks == 7 and sp.max_inputs == 4 and sp.merge_features == 8
        assert sp.dense_widths == (16, 32, 64, 128, 256, 512, 768, 1024)
        assert sp.sparse_widths == (16, 32, 48, 64)
    assert FULL_SPACE.dot_features == round(math.sqrt(2 * 1024))
    assert FULL_SPACE.heads(16) == 8 and FULL_SPACE.heads(12) == 6 and FULL_SPACE.heads(7) == 7
    assert SearchSpace.named("nasrec-small") == SMALL
    with pytest.raises(ValueError):
        SearchSpace(dense_ops=("fc", "conv"))


@pytest.mark.parametrize("space", [SMALL, FULL_SPACE], ids=["small", "full"])
def test_random_subnets_are_valid_and_cover_the_space(space):
    rng = np.random.default_rng(0)
    cfgs = [sample_subnet(space, rng) for _ in range(400)]
    for c in cfgs:
        validate(c)
    blocks = [b for c in cfgs for b in c.blocks]
    assert {b.dense_op for b in blocks} == set(space.dense_ops)
    assert {b.sparse_op for b in blocks} == set(space.sparse_ops)
    assert {b.dense_width for b in blocks} == set(space.dense_widths)
    assert {b.sparse_width for b in blocks} == set(space.sparse_widths)
    assert {b.dense_to_sparse for b in blocks} == {0, 1} and {b.sparse_to_dense for b in blocks} == {0, 1}
    # block 0 can only read the stem; the last block any 1..4 of its 7 sources
    assert all(c.blocks[0].dense_in == (0,) and c.blocks[0].left == 0 for c in cfgs)
    last = [len(c.blocks[-1].dense_in) for c in cfgs] + [len(c.blocks[-1].sparse_in) for c in cfgs]
    assert min(last) == 1 and max(last) == 4
    # 1 + Binomial(3, 0.5): mean 2.5, P(1) = P(4) = 1/8
    assert abs(np.mean(last) - 2.5) < 0.1
    assert abs(np.mean(np.asarray(last) == 4) - 0.125) < 0.04


def test_num_connections_rule():
    rng = np.random.default_rng(1)
    for n, hi in ((1, 1), (2, 2), (3, 3), (4, 4), (7, 4)):
        ks = [num_connections(n, rng) for _ in range(2000)]
        assert min(ks) == 1 and max(ks) == hi
        assert abs(np.mean(ks) - (1 + 0.5 * min(n - 1, 3))) < 0.06
    assert max(num_connections(7, rng, max_inputs=2) for _ in range(200)) == 2


def test_validate_rejects_configs_outside_the_space():
    good = default_subnet(SearchSpace.full(num_blocks=3))
    validate(good)
    bad_changes = [
        dict(dense_width=100), dict(sparse_width=8), dict(dense_op="conv"), dict(sparse_op="fc"),
        dict(dense_in=()), dict(dense_in=(0, 5)), dict(left=3), dict(right=-1), dict(sparse_to_dense=2),
    ]
    for ch in bad_changes:
        assert not is_valid(good.replace_block(2, **ch)), ch
    # a Full-space op is not part of NASRec-Small
    small3 = SearchSpace.small(num_blocks=3)
    with pytest.raises(ValueError):
        validate(SubnetConfig(small3, good.blocks))
    # too many inputs
    sp = SearchSpace.full(num_blocks=6)
    cfg = sample_subnet(sp, np.random.default_rng(0))
    assert not is_valid(cfg.replace_block(5, dense_in=(0, 1, 2, 3, 4)))
    assert is_valid(cfg.replace_block(5, dense_in=(1, 2, 3, 4)))
    with pytest.raises(ValueError):
        validate(SubnetConfig(sp, cfg.blocks[:-1]))


# ----------------------------------------------------------------------------------------------
# tokens, JSON, hashing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", [SMALL, FULL_SPACE], ids=["small", "full"])
def test_token_and_json_round_trip(space, tmp_path):
    rng = np.random.default_rng(2)
    for _ in range(50):
        c = sample_subnet(space, rng)
        t = tokenize(c)
        assert all(isinstance(x, int) for x in t)
        assert len(t) == sum(8 + 2 * (i + 1) for i in range(space.num_blocks))
        assert detokenize(t, space) == c
        assert SubnetConfig.from_json(c.to_json()) == c
        assert load_subnet_config(c.to_dict()) == c
        assert c.token_hash() == token_hash(t)
    p = tmp_path / "subnet.json"
    c.save(str(p))
    assert load_subnet_config(str(p)) == c
    assert json.loads(p.read_text())["space"]["name"] == space.name
    with pytest.raises(ValueError):
        detokenize(t[:-1], space)
    with pytest.raises(FileNotFoundError):
        load_subnet_config(str(tmp_path / "missing.json"))


def test_hash_identifies_configs_and_dedups():
    rng = np.random.default_rng(3)
    space = SearchSpace.small(num_blocks=2, dense_widths=(16, 32), sparse_widths=(8,))   # 9216 configs
    cfgs = [sample_subnet(space, rng) for _ in range(300)]
    hashes = [c.token_hash() for c in cfgs]
    distinct = {c.to_json() for c in cfgs}
    assert len(set(hashes)) == len(distinct) < 300        # collisions only for identical configs
    d = dedup(cfgs + cfgs[:10])
    assert len(d) == len(distinct)
    assert [c.token_hash() for c in d] == list(dict.fromkeys(hashes))
    # every single-key change changes the hash
    base = cfgs[0]
    assert base.replace_block(1, left=1 - base.blocks[1].left).token_hash() != base.token_hash()


# ----------------------------------------------------------------------------------------------
# mutation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", [SMALL, FULL_SPACE], ids=["small", "full"])
def test_mutation_changes_exactly_one_key_and_stays_valid(space):
    rng = np.random.default_rng(4)
    parent = sample_subnet(space, rng)
    seen_keys = set()
    for _ in range(400):
        child, changed = mutate(parent, rng, 1)
        validate(child)
        assert len(changed) == 1
        assert _diff(parent, child) == changed
        seen_keys.add(changed[0][1])
    possible = set(BLOCK_KEYS) - ({"sparse_op"} if len(space.sparse_ops) == 1 else set())
    assert seen_keys == possible
    # several mutations: at most that many keys change, child valid
    for _ in range(50):
        child, changed = mutate(parent, rng, 4)
        validate(child)
        assert len(changed) == 4 and set(_diff(parent, child)) <= set(changed)


def test_more_mutations_early():
    sched = [num_mutations(g, 240) for g in range(240)]
    assert sched[0] == 6 and sched[-1] == 1
    assert all(a >= b for a, b in zip(sched, sched[1:]))
    assert [num_mutations(g, 10) for g in range(10)] == [1] * 10


# ----------------------------------------------------------------------------------------------
# supernet path sampler
# ----------------------------------------------------------------------------------------------
def test_path_sampler_schedule_and_resume():
    space = SearchSpace.full(num_blocks=4)
    s = PathSampler(space, full_steps=1000, seed=5)
    assert s.full_probability(0) == 1.0 and s.full_probability(500) == 0.5 and s.full_probability(1000) == 0.0
    n_full = []
    for _ in range(1200):
        blocks, cfg = s.sample()
        if cfg is None:
            assert blocks == full_path(space)
        else:
            validate(cfg)
            assert blocks == as_path(cfg)
        n_full.append(cfg is None)
    # expected number of full paths in the first 1000 steps: sum(1 - t/1000) = 500.5
    assert 440 < sum(n_full[:1000]) < 560 and not any(n_full[1000:])
    # state round trip continues the same sequence; a same-seed sampler draws the same paths
    st = json.loads(json.dumps(s.state()))
    a = [s.sample()[0] for _ in range(5)]
    s2 = PathSampler(space, full_steps=1000, seed=0)
    s2.set_state(st)
    assert [s2.sample()[0] for _ in range(5)] == a
    s3, s4 = PathSampler(space, 10, 9), PathSampler(space, 10, 9)
    assert [s3.sample()[0] for _ in range(20)] == [s4.sample()[0] for _ in range(20)]
    fp = full_path(space)
    assert fp[3].dense_ops == space.dense_ops and fp[3].dense_in == (0, 1, 2, 3) and fp[3].left == (0, 1, 2, 3)
    assert FULL == "full"


# ----------------------------------------------------------------------------------------------
# regularized evolution
# ----------------------------------------------------------------------------------------------
TOY_SPACE = SearchSpace.full(num_blocks=4, dense_widths=(16, 32, 64, 128), sparse_widths=(8, 16, 24, 32))
TOY_TARGET = sample_subnet(TOY_SPACE, np.random.default_rng(123))


def toy_score(cfg: SubnetConfig) -> float:
    """Number of (block, key) pairs that differ from a hidden target (optimum 0)."""
    return float(len(_diff(cfg, TOY_TARGET)))


def test_evolution_beats_random_search_on_a_toy_objective():
    evo_best, rnd_best = [], []
    for seed in range(3):
        r = evolve(toy_score, TOY_SPACE, init_population=16, sample_size=8, n_childs=4, n_generations=30,
                   rng=seed, progress=False)
        n = len(r.history)
        assert n == 16 + 30 * 4
        assert len({c.token_hash for c in r.history}) == n          # no candidate evaluated twice
        assert len(r.population) == 16
        rr = random_search(toy_score, TOY_SPACE, n, rng=seed)
        evo_best.append(r.best.score)
        rnd_best.append(rr.best.score)
        assert r.best.score == min(c.score for c in r.history)
        assert [c.score for c in r.top] == sorted(c.score for c in r.history)[:5]
    assert np.mean(evo_best) < np.mean(rnd_best) - 3, (evo_best, rnd_best)


def test_evolution_is_deterministic_logs_every_candidate_and_resumes(tmp_path):
    kw = dict(init_population=10, sample_size=5, n_childs=3, n_generations=6, progress=False)
    ref = evolve(toy_score, TOY_SPACE, rng=7, **kw)
    assert [c.token_hash for c in evolve(toy_score, TOY_SPACE, rng=7, **kw).history] == \
        [c.token_hash for c in ref.history]

    class Stop(Exception):
        pass

    state, log = str(tmp_path / "evo.json"), str(tmp_path / "evo.csv")
    calls = []

    def failing(cfg):
        if len(calls) == 17:          # dies in generation 2 (10 initial + 3 + 3 + 1)
            raise Stop
        calls.append(cfg.token_hash())
        return toy_score(cfg), {"calls": len(calls)}

    with pytest.raises(Stop):
        evolve(failing, TOY_SPACE, rng=7, state_path=state, log_csv=log, **kw)
    resumed_calls = []

    def counting(cfg):
        resumed_calls.append(cfg.token_hash())
        return toy_score(cfg), {"calls": -1}

    res = evolve(counting, TOY_SPACE, rng=12345, state_path=state, log_csv=log, **kw)   # rng comes from the state
    assert [c.token_hash for c in res.history] == [c.token_hash for c in ref.history]
    assert [c.score for c in res.history] == [c.score for c in ref.history]
    assert len(resumed_calls) == len(ref.history) - 17 and not set(resumed_calls) & set(calls)
    assert res.history[3].extra == {"calls": 4}           # cached extras survive the restart
    with open(log, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["token_hash"] for r in rows] == [c.token_hash for c in ref.history]
    assert all(float(r["score"]) == toy_score(SubnetConfig.from_dict({"blocks": json.loads(r["config"])}, TOY_SPACE))
               for r in rows)
    # a finished state resumes to the same result without evaluating anything
    again = evolve(lambda c: pytest.fail("re-evaluated"), TOY_SPACE, state_path=state, log_csv=log, **kw)
    assert [c.token_hash for c in again.top] == [c.token_hash for c in ref.top]
    with pytest.raises(ValueError):
        evolve(toy_score, TOY_SPACE, state_path=state, **dict(kw, n_childs=4))
    files = save_top_k(res, str(tmp_path / "top"), 3)
    assert [load_subnet_config(f) for f in files] == [c.config for c in res.top[:3]]
    summary = json.loads((tmp_path / "top" / "top_k.json").read_text())
    assert [e["score"] for e in summary] == sorted(c.score for c in res.history)[:3]


def test_evolution_ranks_non_finite_scores_last():
    def score(cfg):
        return math.nan if cfg.blocks[0].dense_op == "fc" else toy_score(cfg)

    r = evolve(score, TOY_SPACE, init_population=12, sample_size=6, n_childs=2, n_generations=3, rng=0,
               progress=False)
    finite = [c for c in r.history if math.isfinite(c.score)]
    assert 0 < len(finite) < len(r.history)
    assert r.best.score == min(c.score for c in finite)
    k = len(finite)
    assert all(math.isfinite(c.score) for c in sorted(r.history, key=lambda c: c.rank_key)[:k])


# ----------------------------------------------------------------------------------------------
# zero-shot proxy arithmetic
# ----------------------------------------------------------------------------------------------
def test_proxies_from_gradients_by_hand():
    theta = {"w": np.array([1.0, -1.0]), "e": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}
    g1 = {"w": (None, np.array([1.0, 2.0])), "e": (np.array([0, 0]), np.array([[1.0, 0.0], [1.0, 0.0]]))}
    g2 = {"w": (None, np.array([3.0, 2.0])), "e": (np.array([2]), np.array([[0.0, 1.0]]))}
    p = proxies_from_gradients([g1, g2], theta, [0.5, 0.7], zico_coef=1, fr_coef=1, loss_coef=2)
    # w: mean|g| = [2, 2], std = [sqrt 2, 0] -> sum = sqrt 2
    # e (rows 0 and 2 touched; row 0 gets 1+1 = 2 in batch 1): elements with std > 0:
    #   e[0,0]: g = [2, 0] mean 1 std sqrt2;  e[2,1]: g = [0, 1] mean 0.5 std sqrt(0.5)
    zico = math.log(math.sqrt(2)) + math.log(1 / math.sqrt(2) + 0.5 / math.sqrt(0.5))
    fr = (4 * 1 + 4 * -1) + (2 * 1 + 1 * 6)
    assert p["zico"] == pytest.approx(zico)
    assert p["fisher_rao"] == pytest.approx(math.log(abs(fr) + 1e-10))
    assert p["loss"] == pytest.approx(0.6)
    assert p["mean_abs_grad"] == pytest.approx((1 + 2 + 3 + 2 + 2 + 1) / (2 * 8))
    assert p["sigeo"] == pytest.approx(-zico - math.log(8) + 2 * 0.6)
    # the row-sparse form equals the dense form
    dense = [{"w": g["w"], "e": (None, _densify(g["e"], 3))} for g in (g1, g2)]
    q = proxies_from_gradients(dense, theta, [0.5, 0.7], 1, 1, 2)
    assert q == pytest.approx(p)
    with pytest.raises(ValueError):
        proxies_from_gradients([g1], theta, [0.5])
    with pytest.raises(ValueError):                       # a gradient without its weights
        proxies_from_gradients([g1, g2], {"w": theta["w"]}, [0.5, 0.7])
    # weights without gradients only count in the mean-|grad| denominator
    r = proxies_from_gradients([g1, g2], dict(theta, unused=np.ones(8)), [0.5, 0.7], 1, 1, 2)
    assert r["zico"] == p["zico"] and r["mean_abs_grad"] == pytest.approx(p["mean_abs_grad"] / 2)
    assert proxies_from_gradients([g1, g2], theta, [0.5, 0.7], 1, 1, 2, n_elements=16)["mean_abs_grad"] == \
        pytest.approx(p["mean_abs_grad"] / 2)


def _densify(rv, n):
    rows, vals = rv
    out = np.zeros((n, vals.shape[1]))
    np.add.at(out, rows, vals)
    return out


# ----------------------------------------------------------------------------------------------
# rank correlations
# ----------------------------------------------------------------------------------------------
def test_rank_correlations_by_hand():
    assert list(rankdata([3, 1, 2, 2])) == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # x = [1,2,2,3], y = [1,3,2,4]: C = 5, D = 0, one pair tied in x -> tau_b = 5 / sqrt(5 * 6)
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(5 / math.sqrt(30))
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4])
    expect = np.corrcoef(rx, ry)[0, 1]
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(expect)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def _brute_tau_b(x, y):
    c = d = tx = ty = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            c += sx * sy > 0
            d += sx * sy < 0
            tx += sx == 0
            ty += sy == 0
    n0 = len(x) * (len(x) - 1) / 2
    return (c - d) / math.sqrt((n0 - tx) * (n0 - ty))


def _reference():
    """scipy when installed, else brute-force definitions."""
    try:
        from scipy import stats
        return (lambda x, y: stats.spearmanr(x, y).correlation), (lambda x, y: stats.kendalltau(x, y).correlation)
    except ImportError:
        def rank(a):
            return np.array([np.sum(a < v) + (np.sum(a == v) + 1) / 2 for v in a])
        return (lambda x, y: np.corrcoef(rank(x), rank(y))[0, 1]), _brute_tau_b


def test_rank_correlations_match_reference():
    ref_rho, ref_tau = _reference()
    rng = np.random.default_rng(0)
    for n in (5, 37, 300):
        x = rng.integers(0, 8, n).astype(float)          # many ties
        y = x + rng.integers(0, 4, n)
        z = rng.normal(size=n)
        assert spearman(x, y) == pytest.approx(ref_rho(x, y), abs=1e-12)
        assert kendall_tau(x, y) == pytest.approx(ref_tau(x, y), abs=1e-12)
        assert kendall_tau(x, z, chunk=7) == pytest.approx(ref_tau(x, z), abs=1e-12)
        if n < 100:
            assert kendall_tau(x, y) == pytest.approx(_brute_tau_b(x, y), abs=1e-12)


def test_default_subnet_is_valid():
    c = default_subnet()
    validate(c)
    assert [b.dense_op for b in c.blocks] == ["fc", "dot", "gating"]
    assert [b.sparse_op for b in c.blocks] == ["efc", "attention", "efc"]
    assert isinstance(c.blocks[0], BlockConfig)
    assert list(itertools.chain(*[b.dense_in for b in c.blocks])) == [0, 0, 1, 1, 2]
