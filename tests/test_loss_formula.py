"""AutoLossGen formulas: syntax, DAGs, numpy autodiff, validity/rejection checks, CLI, backend parity."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorflow as tf  # noqa: E402  (imported up front: TF changes the recursion limit on import)
import torch  # noqa: E402

from common.errors import UserError
from common.loss_check import SignatureCache, cheap_check, validity_check
from common.loss_formula import (CLAMP_MAX, CLAMP_MIN, EPS, NAMED_FORMULAS, OPS, REFERENCE_FORMULAS, SEARCH_OPS,
                                 FormulaError, LossDAG, Node, compile_program, parse, resolve, to_string,
                                 value_and_grad)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINITE_OPS = tuple(o for o in SEARCH_OPS if o != "exp")     # exp can overflow to inf -> 0 * inf gradients


@st.composite
def dags(draw, ops=FINITE_OPS, max_nodes=10):
    n = draw(st.integers(1, max_nodes))
    nodes = []
    for k in range(n):
        nid = k + 3
        op = draw(st.sampled_from(ops))
        if OPS[op].arity == 2:
            a = draw(st.integers(0, nid - 1))
            b = draw(st.integers(0, nid - 2))
            nodes.append((op, (a, b if b < a else b + 1)))
        else:
            nodes.append((op, (draw(st.integers(0, nid - 1)),)))
    return LossDAG(tuple(nodes))


def eval_dag_raw(dag: LossDAG, p, y, eps=EPS):
    """Direct node-by-node evaluation of a DAG (no trees, no simplification) -- the reference semantics."""
    from common.loss_formula import clamp_np
    vals = [p, np.broadcast_to(y, p.shape).astype(float), np.ones_like(p)]
    for op, ins in dag.nodes:
        vals.append(clamp_np(OPS[op].fn(*(vals[i] for i in ins), eps)))
    return vals[-1]


def points(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.02, 0.98, n), (np.arange(n) % 2).astype(np.float64)


# ------------------------------------------------------------------------------- syntax
@pytest.mark.parametrize("text", [
    *NAMED_FORMULAS.values(), *REFERENCE_FORMULAS.values(),
    "p - (y - 1)", "p - y - 1", "p / (y / 2)", "-(p * y)", "-p * y", "p + -y", "-(-p)", "sinv(slog(p)) * 0.5",
    "max(min(p, y), clamp(y))", "ssqrt(abs(p - 0.25)) + relu(y) + sigmoid(tanh(p)) + exp(sign(p))", "1e-06 * p",
])
def test_parse_print_round_trip(text):
    tree = parse(text)
    printed = to_string(tree)
    assert parse(printed) == tree
    assert to_string(parse(printed)) == printed


def test_parser_precedence_and_aliases():
    assert parse("a" if False else "p + y * 2") == Node("add", (Node("p"), Node("mul", (Node("y"), Node("const", value=2.0)))))
    assert parse("p - y - 1") == parse("(p - y) - 1")
    assert parse("p - y - 1") != parse("p - (y - 1)")
    assert parse("-p * y") == Node("mul", (Node("neg", (Node("p"),)), Node("y")))
    assert parse("pred + label * eps") == parse("p + y * e")
    assert parse("p^2") == parse("sq(p)") == parse("p ** 2")
    assert parse("clamp(y)") == parse("id(y)")
    # left-associativity survives printing: clamping makes + non-associative
    t = Node("add", (Node("p"), Node("add", (Node("y"), Node("e")))))
    assert to_string(t) == "p + (y + e)" and parse(to_string(t)) == t


@pytest.mark.parametrize("bad, where", [
    ("max(p,", "end"), ("foo(p)", "unknown function"), ("p +", "end"), ("q * 2", "unknown name"),
    ("max(p)", "takes 2"), ("p $ y", "unexpected character"), ("(p", "expected ')'"), ("", "empty"),
    ("p y", "unexpected"), ("log", "needs arguments"), ("p^3", "exponent 2"),
])
def test_malformed_formulas(bad, where):
    with pytest.raises(FormulaError) as ei:
        parse(bad)
    assert where in str(ei.value)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, UserError)
    assert "\n" not in str(ei.value)


def test_named_formulas_resolve():
    for name, text in NAMED_FORMULAS.items():
        for spelled in (name, name.lower(), f"formula:{name}", f"  {name.upper()} "):
            f = resolve(spelled)
            assert f.name == name and f.expr == parse(text) and f.eps == EPS
    assert resolve("formula: p * y").expr == parse("p*y")
    assert resolve("MaxR", eps=0.1).eps == 0.1


# ------------------------------------------------------------------------------- DAGs
def test_dag_json_round_trip_and_validation():
    dag = LossDAG((("add", (0, 1)), ("sinv", (3,)), ("max", (4, 2))))
    assert LossDAG.from_json(dag.to_json()) == dag
    assert resolve(dag.to_json()).expr == dag.to_expr()
    assert str(dag) == "max(sinv(p + y), 1)"
    for nodes, msg in [((("add", (0, 3)),), "earlier nodes"), ((("foo", (0,)),), "unknown operator"),
                       ((("add", (0,)),), "takes 2"), ((("sub", (0, 1)),), "unknown operator"), ((), "at least one")]:
        with pytest.raises(FormulaError, match=msg):
            LossDAG(nodes)
    with pytest.raises(FormulaError):
        LossDAG.from_json("{not json")


def test_simplification_only_removes_exact_no_ops():
    # id over an operator output disappears; id over a leaf stays (clamp(0) = 1e-5 != 0)
    dag = LossDAG((("mul", (0, 1)), ("id", (3,)), ("id", (1,)), ("add", (4, 5))))
    assert str(dag) == "p * y + clamp(y)"
    dag2 = LossDAG((("add", (0, 1)), ("neg", (3,)), ("neg", (4,)), ("mul", (5, 2))))
    assert str(dag2) == "p + y"
    dag3 = LossDAG((("neg", (1,)), ("neg", (3,))))       # -(-y) is NOT y at y = 0 under the clamp
    assert str(dag3) == "-(-y)"
    p, y = points()
    for d in (dag, dag2, dag3):
        for yy in (y, 1 - y):
            np.testing.assert_array_equal(compile_program(d).forward(p, yy), eval_dag_raw(d, p, yy))
            np.testing.assert_array_equal(compile_program(parse(str(d))).forward(p, yy), eval_dag_raw(d, p, yy))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(dags(ops=SEARCH_OPS))
def test_dag_string_parse_same_values(dag):
    p, y = points(32)
    ref = eval_dag_raw(dag, p, y)
    tree = parse(str(dag))
    assert tree == dag.to_expr()
    got = compile_program(tree).forward(p, y)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(compile_program(dag.to_expr(simplify=False)).forward(p, y), ref)
    _, g1 = compile_program(tree).value_and_grad(p, y)
    _, g2 = compile_program(dag.to_expr(simplify=False)).value_and_grad(p, y)
    np.testing.assert_array_equal(g1, g2)


# ------------------------------------------------------------------------------- numpy autodiff
def central_diff(prog, p, y, h):
    return (prog.forward(p + h, y) - prog.forward(p - h, y)) / (2 * h)


@pytest.mark.parametrize("text", [*NAMED_FORMULAS, *REFERENCE_FORMULAS, "slog(p * y + 1) + sinv(p + y) * sq(p)",
                                  "ssqrt(p) * exp(-p) + sigmoid(p * 3) - tanh(p + y) + abs(p - 0.5)",
                                  "sqrt(p) / (1 + y) - log(1 + p)", "max(p * y, sq(p)) + min(1 - p, y)"])
def test_numpy_gradient_matches_finite_differences(text):
    prog = compile_program(text)
    for yv in (0.0, 1.0):
        p = np.linspace(0.03, 0.97, 41) + 1e-3       # avoid the kinks of max/min/abs at exact ties
        y = np.full_like(p, yv)
        _, g = prog.value_and_grad(p, y)
        fd = central_diff(prog, p, y, 1e-6)
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(dags())
def test_numpy_gradient_random_dags_vs_finite_differences(dag):
    prog = compile_program(dag)
    p, y = points(32, seed=1)
    _, g = prog.value_and_grad(p, y)
    fd1, fd2 = central_diff(prog, p, y, 1e-5), central_diff(prog, p, y, 1e-6)
    smooth = np.isfinite(fd1) & np.isclose(fd1, fd2, rtol=1e-4, atol=1e-7)   # skip points next to a kink
    np.testing.assert_allclose(g[smooth], fd2[smooth], rtol=2e-3, atol=1e-5)


def test_clamp_semantics():
    p = np.array([1e-7, 1e-3, 0.5])
    v, g = value_and_grad("-p", p, 0.0)
    np.testing.assert_allclose(v, [-CLAMP_MIN, -1e-3, -0.5])          # sign kept, magnitude >= 1e-5
    np.testing.assert_allclose(g, [0.0, -1.0, -1.0])                   # no gradient inside the clamp
    v, g = value_and_grad("clamp(y) + 0 * p", p, 0.0)                 # clamp(0) = +1e-5
    np.testing.assert_allclose(v, CLAMP_MIN + CLAMP_MIN, rtol=1e-12)   # 0*p = 0 -> +1e-5 as well
    v, g = value_and_grad("sinv(p) * sinv(p)", p, 1.0)                 # 1/p^2 > 1e5 for p = 1e-3 -> capped
    assert v[0] == CLAMP_MAX and v[1] == CLAMP_MAX and g[0] == 0 and g[1] == 0
    np.testing.assert_allclose(v[2], 1 / (0.5 + EPS) ** 2)


# ------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("name", ["MaxR", "SumR", "LogMin", "BCE", "MSE", "Focal", "p * (1 - 2 * y)"])
def test_validity_check_passes(name):
    v = validity_check(name)
    assert v.passed, v.line()
    assert v.pos_frac > 0.9 and v.neg_frac > 0.9


@pytest.mark.parametrize("text", ["sq(p)", "-y * p", "y * p", "p + y", "1 - p"])
def test_validity_check_fails(text):
    v = validity_check(text)
    assert not v.passed, v.line()


def test_validity_check_requires_the_label():
    v = validity_check("sq(p)")
    assert not v.uses_label and v.neg_frac > 0.99 and v.pos_frac == 0.0


def test_cheap_check_reasons_and_signatures():
    assert cheap_check("sq(y) + 1").reason == "no_gradient"
    assert cheap_check("max(p, 1)").reason == "zero_gradient"                     # always 1 on [0.1, 0.9]
    assert cheap_check("exp(sq(sq(sinv(p)))) * y + sq(sinv(p))").reason == "nan"   # 0 * inf in the gradient
    a, b, c = cheap_check("p * y"), cheap_check("y * p"), cheap_check("p * y * y")
    assert a.ok and b.ok and c.ok and a.key == b.key == c.key
    cache = SignatureCache()
    assert cache.lookup(a.signature) is None
    cache.add(a.signature, 0.75, "p * y")
    assert cache.lookup(c.signature) == (0.75, "p * y")
    assert cache.lookup(cheap_check("sq(p - y)").signature) is None
    cache2 = SignatureCache.from_json(cache.to_json())
    assert cache2.lookup(b.signature) == (0.75, "p * y")


# ------------------------------------------------------------------------------- CLI
def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "common.loss_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_exit_codes(tmp_path):
    r = run_cli("--formula", "MaxR", "--formula", "max((y+e)/(p+e), (p+e)/(y+e))", "--formula", "formula:BCE")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("PASS") == 3 and "y=1: 100.0%" in r.stdout
    r = run_cli("--formula", "SumR", "--formula", "sq(p)")
    assert r.returncode == 1
    assert "FAIL" in r.stdout and "sq(p)" in r.stdout
    r = run_cli("--formula", "max(p,")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --formula:") and r.stderr.count("\n") == 1
    path = tmp_path / "found.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["formula", "reward"])
        w.writerow(["LogMin", "0.8"])
        w.writerow(["(y + p + e) / (e + p * y)", "0.7"])
    r = run_cli("--csv", str(path))
    assert r.returncode == 0 and r.stdout.count("PASS") == 2
    with open(path, "a", newline="") as fh:
        csv.writer(fh).writerow(["min(p,, y)", "0.6"])
    r = run_cli("--csv", str(path))
    assert r.returncode == 2 and f"{path}:4:" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("--csv", str(path), "--column", "nope")
    assert r.returncode == 2 and "no column 'nope'" in r.stderr


# ------------------------------------------------------------------------------- backends
def backend_value_grad(formula, p, y):
    from zoo_tf.loss_formula import compile_formula as tf_compile
    from zoo_torch.loss_formula import compile_formula as torch_compile

    pt = torch.tensor(p, requires_grad=True)
    lt = torch_compile(formula)(pt, torch.tensor(y))
    gt = torch.autograd.grad(lt, pt)[0].numpy() if lt.requires_grad else np.zeros_like(p)
    pf = tf.Variable(p)
    with tf.GradientTape() as tape:
        lf = tf_compile(formula)(pf, tf.constant(y))
    gf = tape.gradient(lf, pf)
    gf = np.zeros_like(p) if gf is None else gf.numpy()
    return (float(lt), gt), (float(lf.numpy()), gf)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(dags())
def test_random_dags_agree_across_backends(dag):
    p, y = points(24, seed=2)
    v, g = compile_program(dag).value_and_grad(p, y)
    ref_v, ref_g = float(np.mean(v)), g / len(p)
    (vt, gt), (vf, gf) = backend_value_grad(dag, p, y)
    for val, grad in ((vt, gt), (vf, gf)):
        np.testing.assert_allclose(val, ref_v, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(grad, ref_g, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(gt, gf, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("text", [*NAMED_FORMULAS.values(), *REFERENCE_FORMULAS.values(),
                                  "exp(-p) * y + ssqrt(p) - sqrt(p) / (1 + y)"])
def test_hand_written_formulas_agree_across_backends(text):
    p, y = points(40, seed=3)
    v, g = compile_program(text).value_and_grad(p, y)
    (vt, gt), (vf, gf) = backend_value_grad(text, p, y)
    for val, grad in ((vt, gt), (vf, gf)):
        np.testing.assert_allclose(val, np.mean(v), rtol=1e-10)
        np.testing.assert_allclose(grad, g / len(p), rtol=1e-10, atol=1e-15)


def test_compile_loss_float32_and_sigmoid():
    from zoo_tf.loss_formula import compile_loss as tf_loss
    from zoo_torch.loss_formula import compile_loss as torch_loss

    rng = np.random.default_rng(4)
    z = rng.normal(0, 2, 256).astype(np.float32)
    y = (rng.random(256) < 0.4).astype(np.float32)
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    for name in ("MaxR", "SumR", "LogMin", "formula:sq(p - y)", "formula: -(y*log(p+e) + (1-y)*log(1-p+e))"):
        ref = float(np.mean(compile_program(name).forward(p, y.astype(np.float64))))
        zt = torch.tensor(z, requires_grad=True)
        lt = torch_loss(name)(zt, torch.tensor(y))
        lt.backward()
        zf = tf.Variable(z)
        with tf.GradientTape() as tape:
            lf = tf_loss(name)(zf, tf.constant(y))
        gf = tape.gradient(lf, zf).numpy()
        assert lt.dtype == torch.float32 and lf.dtype == tf.float32
        np.testing.assert_allclose(float(lt), ref, rtol=1e-5)
        np.testing.assert_allclose(float(lf), ref, rtol=1e-5)
        np.testing.assert_allclose(zt.grad.numpy(), gf, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError):
        torch_loss("formula:max(p,")
    with pytest.raises(ValueError):
        tf_loss("formula:max(p,")


def test_get_loss_delegates_named_formulas():
    from zoo_torch.losses import get_loss

    z, y = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([1.0, 0.0, 1.0])
    p = torch.sigmoid(z).double().numpy()
    assert float(get_loss("maxr")(z, y)) == pytest.approx(
        float(np.mean(compile_program("MaxR").forward(p, y.double().numpy()))), rel=1e-5)
