"""AutoLossGen search: controller parity across backends, REINFORCE step, the backend-free search driver."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

import tensorflow as tf  # noqa: F401  (import before hypothesis/pytest-heavy tests; sets TF up once)
import torch

from common.autolossgen import (LOG_COLUMNS, ControllerConfig, NumpyAdam, SearchConfig, run_search, sample_index,
                                search_epoch)
from common.errors import StoreError
from common.loss_check import cheap_check, validity_check
from common.loss_formula import LossDAG, parse
from zoo_tf.controller import Controller as TFController
from zoo_torch.controller import Controller as TorchController


def perturbed_pair(seed=0, scale=0.5, **cfg):
    """Torch and TF controllers with the same (non-initial, peaky) weights."""
    ct, cf = TorchController(seed=seed, **cfg), TFController(seed=seed, **cfg)
    rng = np.random.default_rng(seed + 100)
    w = {k: (v + rng.normal(0, scale, v.shape)).astype(np.float32) for k, v in ct.get_weights().items()}
    ct.set_weights(w)
    cf.set_weights(w)
    return ct, cf


# ------------------------------------------------------------------------------- controller
def test_controller_weights_identical_across_backends():
    ct, cf = TorchController(seed=7), TFController(seed=7)
    wt, wf = ct.get_weights(), cf.get_weights()
    assert sorted(wt) == sorted(wf) == sorted(["lstm.w_ih", "lstm.w_hh", "lstm.bias", "g_emb", "input_emb", "op_emb",
                                               "w_soft", "w_attn1", "w_attn2", "v_attn"])
    for k in wt:
        np.testing.assert_array_equal(wt[k], wf[k])
    assert wt["lstm.w_ih"].shape == (64, 256) and wt["w_soft"].shape == (64, 9)
    assert np.abs(wt["w_attn1"]).max() <= 0.1 and not np.array_equal(wt["w_attn1"], TorchController(seed=8).get_weights()["w_attn1"])


def test_controller_log_prob_parity():
    ct, cf = perturbed_pair(seed=1)
    dags = []
    for s in range(4):
        dt, lpt, ent_t = ct.sample(np.random.default_rng(s))
        df, lpf, ent_f = cf.sample(np.random.default_rng(s))
        assert dt == df                                   # same weights + same generator -> same DAG
        np.testing.assert_allclose(lpf, lpt, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(ent_f, ent_t, rtol=1e-6, atol=1e-5)
        dags.append(dt)
    # teacher-forced log-probabilities of given sequences, including one the controller is unlikely to sample
    dags.append(LossDAG(tuple([("add", (0, 1)), ("sinv", (3,)), ("max", (4, 2))] + [("id", (k + 5,)) for k in range(7)])))
    for dag in dags:
        lt, et = ct.log_prob(dag)
        lf, ef = cf.log_prob(dag)
        np.testing.assert_allclose(float(lf), float(lt), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(float(ef), float(et), rtol=1e-6, atol=1e-5)
        assert float(lt) < 0 and float(et) > 0
    # sampled log-prob equals the teacher-forced one
    d0, lp0, _ = ct.sample(np.random.default_rng(0))
    assert float(ct.log_prob(d0)[0]) == pytest.approx(lp0, abs=1e-5)


def test_controller_samples_valid_dags_and_rejects_foreign_ones():
    ct = TorchController(seed=2, num_nodes=4, ops=("add", "mul", "neg", "sq"))
    for s in range(5):
        dag, lp, ent = ct.sample(s)
        assert len(dag.nodes) == 4 and all(op in ("add", "mul", "neg", "sq") for op, _ in dag.nodes)
        assert all(len(set(ins)) == len(ins) for _, ins in dag.nodes)
        assert math.isfinite(lp) and ent > 0
    with pytest.raises(ValueError, match="not in the controller"):
        ct.log_prob(LossDAG((("max", (0, 1)),) * 1 + (("sq", (3,)),) * 3))
    with pytest.raises(ValueError, match="operator nodes"):
        ct.log_prob(LossDAG((("sq", (0,)),)))


def test_reinforce_step_parity_and_direction():
    ct, cf = perturbed_pair(seed=3, scale=0.2)
    dags = [ct.sample(np.random.default_rng(s))[0] for s in range(3)]
    adv = [0.8, -0.5, 0.1]
    lt, gt = ct.gradients(dags, adv)
    lf, gf = cf.gradients(dags, adv)
    assert lt == pytest.approx(lf, rel=1e-5)
    assert sorted(gt) == sorted(gf)
    scale = max(float(np.abs(g).max()) for g in gt.values())
    for k in gt:
        np.testing.assert_allclose(gf[k], gt[k], atol=1e-5 * max(scale, 1.0))
    # a positive advantage makes the sequence more likely, a negative one less likely
    for ctrl in (ct, cf):
        before = float(ctrl.log_prob(dags[0])[0])
        info = ctrl.update([dags[0]], [1.0])
        assert float(ctrl.log_prob(dags[0])[0]) > before and info["grad_norm"] > 0
        before = float(ctrl.log_prob(dags[1])[0])
        ctrl.update([dags[1]], [-1.0])
        assert float(ctrl.log_prob(dags[1])[0]) < before
    wt, wf = ct.get_weights(), cf.get_weights()
    for k in wt:
        np.testing.assert_allclose(wf[k], wt[k], atol=1e-4)


def test_numpy_adam_matches_torch_adam_with_clipping():
    rng = np.random.default_rng(0)
    w0 = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in w0.items()}
    opt_t = torch.optim.Adam(params.values(), lr=1e-3, betas=(0.0, 0.999))
    opt_n = NumpyAdam(1e-3, (0.0, 0.999), 1e-8, 5.0)
    w = dict(w0)
    for step in range(6):
        grads = {k: rng.normal(0, 4.0 if step % 2 else 0.1, v.shape).astype(np.float32) for k, v in w0.items()}
        for k, p in params.items():
            p.grad = torch.tensor(grads[k])
        norm_t = float(torch.nn.utils.clip_grad_norm_(params.values(), 5.0))
        opt_t.step()
        w, norm_n = opt_n.step(w, grads)
        assert norm_n == pytest.approx(norm_t, rel=1e-5)
        for k in w:
            np.testing.assert_allclose(w[k], params[k].detach().numpy(), rtol=1e-5, atol=1e-6)
    opt2 = NumpyAdam()
    opt2.load_state_arrays(opt_n.state_arrays())
    assert opt2.t == 6 and all(np.array_equal(opt2.m[k], opt_n.m[k]) for k in opt_n.m)


def test_sample_index_inverse_cdf():
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_index([0.2, 0.0, 0.8], rng) for _ in range(2000)], minlength=3)
    assert counts[1] == 0 and 300 < counts[0] < 500


# ------------------------------------------------------------------------------- search driver
def dag(text_nodes):
    return LossDAG(tuple(text_nodes))


D_MUL = dag([("mul", (0, 1))])                                              # p * y
D_MUL_REV = dag([("mul", (1, 0))])                                          # y * p: same gradient signature
D_NO_P = dag([("sq", (1,))])                                                # no p
D_ZERO = dag([("max", (0, 2))])                                             # max(p, 1) = 1 on [0.1, 0.9]
D_NAN = dag([("sinv", (0,)), ("sq", (3,)), ("sq", (4,)), ("exp", (5,)), ("mul", (6, 1)), ("sq", (3,)),
             ("add", (7, 8))])                                              # exp overflow -> 0 * inf
D_MSE = dag([("neg", (1,)), ("add", (0, 3)), ("sq", (4,))])                 # sq(p + -y)
D_LOW = dag([("neg", (0,)), ("mul", (3, 1))])                               # -p * y


class ScriptedController:
    """Emits a fixed DAG sequence; records updates (for exact driver bookkeeping tests)."""

    def __init__(self, dags):
        self.dags, self.i, self.updates = list(dags), 0, []

    def sample(self, rng):
        rng.random()
        d = self.dags[self.i % len(self.dags)]
        self.i += 1
        return d, -1.5, 2.0

    def update(self, dags, advantages):
        self.updates.append((list(dags), list(advantages)))
        return {"grad_norm": 0.25}

    def state_arrays(self):
        return {"i": np.asarray(self.i)}

    def load_state_arrays(self, d):
        self.i = int(d["i"])


class FakeEvaluator:
    def __init__(self, table=None, default=0.6, fail_after=None):
        self.table, self.default, self.fail_after, self.calls = table or {}, default, fail_after, []

    def __call__(self, formula):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append(formula)
        parse(formula)                              # candidates arrive in the string syntax
        if formula in self.table:
            return self.table[formula]
        v = validity_check(formula)                 # deterministic: valid losses score higher
        return 0.5 + 0.3 * v.total_frac


def read_log(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cheap_rejections_of_the_fixtures():
    assert cheap_check(D_NO_P).reason == "no_gradient"
    assert cheap_check(D_ZERO).reason == "zero_gradient"
    assert cheap_check(D_NAN).reason == "nan"
    assert cheap_check(D_MUL).key == cheap_check(D_MUL_REV).key


def test_run_search_bookkeeping(tmp_path):
    seq = [D_MUL, D_NO_P, D_MUL_REV, D_ZERO, D_NAN, D_MSE, D_LOW, D_MUL]
    ctrl = ScriptedController(seq)
    ev = FakeEvaluator({"p * y": 0.7, "sq(p + -y)": 0.8, "-p * y": 0.5})
    log, ff = tmp_path / "log.csv", tmp_path / "found.csv"
    cfg = SearchConfig(num_aggregate=4)
    res = run_search(ctrl, ev, 8, baseline_auc=0.55, log_csv=str(log), formula_file=str(ff), config=cfg)
    rows = read_log(log)
    assert list(rows[0]) == LOG_COLUMNS and len(rows) == 8
    assert [r["formula"] for r in rows] == [str(d) for d in seq]
    assert [r["status"] for r in rows] == ["evaluated", "rejected", "reused", "rejected", "rejected", "evaluated",
                                           "evaluated", "reused"]
    assert [r["reason"] for r in rows] == ["", "no_gradient", "", "zero_gradient", "nan", "", "below_baseline", ""]
    assert ev.calls == ["p * y", "sq(p + -y)", "-p * y"]           # rejected and reused candidates are not trained
    assert rows[2]["reused_from"] == "p * y" and float(rows[2]["auc"]) == 0.7
    assert [float(r["reward"]) for r in rows] == [0.7, -1, 0.7, -1, -1, 0.8, -1, 0.7]
    # moving baseline: starts at the starting AUC, moves only on accepted candidates (reward + entropy bonus)
    b = 0.55
    for r in rows:
        if r["reason"] == "" and r["status"] != "rejected":
            b -= 0.01 * (b - (float(r["reward"]) + 1e-4 * 2.0))
        assert float(r["baseline"]) == pytest.approx(b, abs=1e-12)
        assert float(r["advantage"]) == pytest.approx(float(r["reward"]) + 2e-4 - b, abs=1e-12)
    # two controller updates of four candidates each; rejected ones are discouraged
    assert len(ctrl.updates) == 2 and all(len(d) == 4 for d, _ in ctrl.updates)
    assert ctrl.updates[0][0][1] == D_NO_P and ctrl.updates[0][1][1] < -1.5
    assert [r["controller_update"] for r in rows] == ["", "", "", "0.25", "", "", "", "0.25"]
    assert (res.best_formula, res.best_reward, res.best_step) == ("sq(p + -y)", 0.8, 5)
    assert (res.evaluated, res.reused, res.rejected, res.below_baseline, res.updates) == (3, 2, 3, 1, 2)
    found = read_log(ff)
    assert [f["formula"] for f in found] == ["sq(p + -y)", "p * y", "y * p"]
    assert [f["valid"] for f in found] == ["1", "0", "0"]
    assert LossDAG.from_json(found[0]["dag"]) == D_MSE


def test_run_search_resumes_exactly(tmp_path):
    cfg = SearchConfig(num_aggregate=5, seed=11)
    ctrl_cfg = dict(seed=5, num_nodes=4)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    ev_a = FakeEvaluator()
    ctrl_a = TorchController(**ctrl_cfg)
    res_a = run_search(ctrl_a, ev_a, 12, baseline_auc=0.6, log_csv=str(a_dir / "log.csv"),
                       checkpoint_path=str(a_dir / "ckpt.json"), formula_file=str(a_dir / "found.csv"), config=cfg)
    assert res_a.steps == 12 and res_a.updates == 2 and len(ev_a.calls) >= 3
    # crash in the middle of the (k+1)-th evaluation
    k = len(ev_a.calls) // 2
    ctrl_b = TorchController(**ctrl_cfg)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_search(ctrl_b, FakeEvaluator(fail_after=k), 12, baseline_auc=0.6, log_csv=str(b_dir / "log.csv"),
                   checkpoint_path=str(b_dir / "ckpt.json"), formula_file=str(b_dir / "found.csv"), config=cfg)
    state = json.loads((b_dir / "ckpt.json").read_text())
    assert 0 < state["step"] < 12
    assert len(list(b_dir.glob("ckpt.json.*.npz"))) == 1
    # resume with a FRESH controller object (different seed): weights and optimiser state come from the checkpoint
    ctrl_b2 = TorchController(seed=99, num_nodes=4)
    ev_b = FakeEvaluator()
    res_b = run_search(ctrl_b2, ev_b, 12, baseline_auc=0.6, log_csv=str(b_dir / "log.csv"),
                       checkpoint_path=str(b_dir / "ckpt.json"), formula_file=str(b_dir / "found.csv"), config=cfg)
    assert len(ev_b.calls) == len(ev_a.calls) - k                 # no evaluation is repeated or lost
    strip = lambda rows: [{c: r[c] for c in LOG_COLUMNS if c != "wall_s"} for r in rows]  # noqa: E731
    assert strip(read_log(b_dir / "log.csv")) == strip(read_log(a_dir / "log.csv"))
    assert (a_dir / "found.csv").read_text() == (b_dir / "found.csv").read_text()
    assert (res_b.best_formula, res_b.best_reward, res_b.updates) == (res_a.best_formula, res_a.best_reward, 2)
    wa, wb = ctrl_a.get_weights(), ctrl_b2.get_weights()
    assert all(np.array_equal(wa[n], wb[n]) for n in wa)
    # a finished round resumes to the same result without sampling again
    res_c = run_search(TorchController(**ctrl_cfg), FakeEvaluator(fail_after=0), 12, baseline_auc=0.6,
                       log_csv=str(b_dir / "log.csv"), checkpoint_path=str(b_dir / "ckpt.json"), config=cfg)
    assert res_c.best_formula == res_a.best_formula and len(read_log(b_dir / "log.csv")) == 12


def test_run_search_same_candidates_in_both_backends(tmp_path):
    cfg = SearchConfig(num_aggregate=3, seed=2)
    rows = {}
    for name, cls in (("torch", TorchController), ("tf", TFController)):
        run_search(cls(seed=4, num_nodes=5), FakeEvaluator(), 5, baseline_auc=0.55,
                   log_csv=str(tmp_path / f"{name}.csv"), config=cfg)
        rows[name] = read_log(tmp_path / f"{name}.csv")
    assert [r["formula"] for r in rows["torch"]] == [r["formula"] for r in rows["tf"]]
    assert [r["reward"] for r in rows["torch"]] == [r["reward"] for r in rows["tf"]]
    for a, b in zip(rows["torch"], rows["tf"]):
        assert float(a["log_prob"]) == pytest.approx(float(b["log_prob"]), abs=1e-4)


def test_corrupt_checkpoint_is_a_store_error(tmp_path):
    ck = tmp_path / "ckpt.json"
    ck.write_text(json.dumps({"version": 1, "step": 3}))
    with pytest.raises(StoreError, match="cannot resume"):
        run_search(ScriptedController([D_MUL]), FakeEvaluator(), 5, baseline_auc=0.5, checkpoint_path=str(ck))


def test_search_epoch_trains_with_the_best_candidate(tmp_path):
    class Hooks:
        def __init__(self):
            self.auc, self.trained = 0.6, []

        def validation_auc(self):
            return self.auc

        def trial_auc(self, formula):
            return {"sq(p + -y)": 0.65, "p * y": 0.55}.get(formula, 0.5)

        def train_epoch(self, formula):
            self.trained.append(formula)
            self.auc = 0.64 if formula else 0.61
            return self.auc

    h = Hooks()
    out = search_epoch(ScriptedController([D_MUL, D_MSE, D_ZERO]), h, 6, config=SearchConfig(num_aggregate=3),
                       log_csv=str(tmp_path / "e1.csv"))
    assert out["trained_with"] == "sq(p + -y)" and h.trained == ["sq(p + -y)"] and out["auc_after"] == 0.64
    out = search_epoch(ScriptedController([D_MUL, D_ZERO]), h, 4, config=SearchConfig(num_aggregate=2),
                       log_csv=str(tmp_path / "e2.csv"))
    assert out["best_formula"] is None and out["trained_with"] is None and h.trained[-1] is None
    out = search_epoch(ScriptedController([D_MSE]), h, 2, train_with_optim=False, config=SearchConfig(num_aggregate=2))
    assert out["best_formula"] == "sq(p + -y)" and out["trained_with"] is None


def test_controller_config_validation():
    with pytest.raises(ValueError, match="unknown search operator"):
        ControllerConfig(ops=("add", "sub"))
    with pytest.raises(ValueError):
        ControllerConfig(num_nodes=0)
