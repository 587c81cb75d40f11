"""AFM attentional pooling, xDeepFM's CIN and AutoInt's self-attention against numpy versions of the
papers' equations (written with explicit loops over pairs / feature maps / heads), in both backends;
plus parameter counts and output shapes of AFM, xDeepFM, AutoInt and AutoInt+."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch

import zoo_tf
import zoo_torch
from common.schema import Schema
from zoo_tf.layers.attention import AttentionalPooling as TFPooling
from zoo_tf.layers.attention import MultiHeadSelfAttention as TFSelfAttention
from zoo_tf.layers.cin import CIN as TFCIN
from zoo_torch.layers.attention import AttentionalPooling as TorchPooling
from zoo_torch.layers.attention import MultiHeadSelfAttention as TorchSelfAttention
from zoo_torch.layers.cin import CIN as TorchCIN

TOL = 1e-5


def softmax(x, axis):
    x = x - x.max(axis, keepdims=True)
    ex = np.exp(x)
    return ex / ex.sum(axis, keepdims=True)


def random_weights(torch_layer, seed, scale=0.5):
    """Random values for every weight of a layer, by canonical name (the same names in both backends)."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, scale, v.shape).astype(np.float32) for k, v in zoo_torch.get_weights(torch_layer).items()}


def run_both(torch_layer, tf_layer, weights, x):
    """Load ``weights`` into both layers and apply them to ``x`` (eval mode)."""
    assert sorted(zoo_tf.get_weights(tf_layer)) == sorted(weights)
    zoo_torch.set_weights(torch_layer, weights)
    zoo_tf.set_weights(tf_layer, weights)
    torch_layer.eval()
    with torch.no_grad():
        yt = torch_layer(torch.from_numpy(x)).numpy()
    yf = tf_layer(tf.constant(x), training=False).numpy()
    return yt, yf


# ---------------------------------------------------------------------------------------------- AFM
def numpy_afm(e, w):
    """p^T sum_{i<j} a_ij (e_i * e_j),  a_ij = softmax over pairs of h^T ReLU(W (e_i * e_j) + b)."""
    e = e.astype(np.float64)
    W, b, h, p = (w[k].astype(np.float64) for k in ("kernel", "bias", "h", "p"))
    B, F, _ = e.shape
    out = np.zeros(B)
    for n in range(B):
        prods, scores = [], []
        for i in range(F):
            for j in range(i + 1, F):
                v = e[n, i] * e[n, j]
                prods.append(v)
                scores.append(h[:, 0] @ np.maximum(v @ W + b, 0.0))
        a = softmax(np.array(scores), 0)
        out[n] = p[:, 0] @ sum(a_k * v_k for a_k, v_k in zip(a, prods))
    return out


@pytest.mark.parametrize("F,d,A", [(5, 4, 3), (2, 6, 8), (7, 3, 1)])
def test_afm_pooling_matches_numpy(F, d, A):
    rng = np.random.default_rng(F * 100 + d)
    e = rng.normal(0, 1.0, (6, F, d)).astype(np.float32)
    lt, lf = TorchPooling(F, d, A), TFPooling(F, d, A)
    assert lt.num_pairs == lf.num_pairs == F * (F - 1) // 2
    w = random_weights(lt, seed=F)
    assert {k: v.shape for k, v in w.items()} == {"kernel": (d, A), "bias": (A,), "h": (A, 1), "p": (d, 1)}
    w["bias"] += 0.3  # keep some ReLU units active
    yt, yf = run_both(lt, lf, w, e)
    ref = numpy_afm(e, w)
    assert yt.shape == yf.shape == (6,)
    np.testing.assert_allclose(yt, ref, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(yf, ref, rtol=TOL, atol=TOL)


def test_afm_attention_weights_are_a_softmax_over_pairs():
    rng = np.random.default_rng(0)
    e = rng.normal(0, 1.0, (3, 6, 4)).astype(np.float32)
    lt, lf = TorchPooling(6, 4, 5), TFPooling(6, 4, 5)
    w = random_weights(lt, seed=1)
    zoo_torch.set_weights(lt, w)
    zoo_tf.set_weights(lf, w)
    pairs = (e[:, lf._rows.numpy()] * e[:, lf._cols.numpy()]).astype(np.float32)
    at = lt.attention(torch.from_numpy(pairs)).detach().numpy()
    af = lf.attention(tf.constant(pairs)).numpy()
    for a in (at, af):
        assert a.shape == (3, 15)
        np.testing.assert_allclose(a.sum(1), 1.0, rtol=1e-6)
        assert np.ptp(a, axis=1).min() > 1e-4             # not uniform: the weights depend on the pair
    np.testing.assert_allclose(at, af, rtol=TOL, atol=1e-7)


def test_afm_dropout_only_in_training():
    rng = np.random.default_rng(3)
    e = rng.normal(0, 1.0, (64, 5, 8)).astype(np.float32)
    lt, lf = TorchPooling(5, 8, 4, dropout=0.5), TFPooling(5, 8, 4, dropout=0.5)
    w = random_weights(lt, seed=2)
    yt, yf = run_both(lt, lf, w, e)
    np.testing.assert_allclose(yt, numpy_afm(e, w), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(yf, numpy_afm(e, w), rtol=TOL, atol=TOL)
    lt.train()
    assert not np.allclose(lt(torch.from_numpy(e)).detach().numpy(), yt)
    assert not np.allclose(lf(tf.constant(e), training=True).numpy(), yf)


# ---------------------------------------------------------------------------------------------- CIN
def numpy_cin(e, w, sizes, split_half):
    """X^k_h = sum_i sum_j W^{k,h}_{ij} (X^{k-1}_i o X^0_j) + b^{k,h}; sum-pool; split-half."""
    x0 = e.astype(np.float64)
    B, m, D = x0.shape
    x, outs = x0, []
    for k, H in enumerate(sizes):
        W = w[f"layers.{k}.kernel"].astype(np.float64)
        b = w[f"layers.{k}.bias"].astype(np.float64)
        xk = np.zeros((B, H, D))
        for h in range(H):
            for i in range(x.shape[1]):
                for j in range(m):
                    xk[:, h] += W[i * m + j, h] * x[:, i] * x0[:, j]
            xk[:, h] += b[h]
        if split_half and k < len(sizes) - 1:
            x, direct = xk[:, :H // 2], xk[:, H // 2:]
        else:
            x, direct = xk, xk
        outs.append(direct.sum(2))
    return np.concatenate(outs, 1)


@pytest.mark.parametrize("m,D,sizes,split_half", [
    (4, 3, (6, 4, 2), True),
    (3, 5, (5, 3), True),        # odd sizes: floor(H/2) maps go on, the rest is pooled
    (4, 2, (3, 2, 4), False),
    (5, 4, (2,), True),          # a single layer is never split
])
def test_cin_matches_numpy(m, D, sizes, split_half):
    rng = np.random.default_rng(m * 10 + D)
    e = rng.normal(0, 1.0, (5, m, D)).astype(np.float32)
    lt, lf = TorchCIN(m, sizes, split_half), TFCIN(m, sizes, split_half)
    w = random_weights(lt, seed=len(sizes))
    expected_out = sum((h - h // 2) if split_half and k < len(sizes) - 1 else h for k, h in enumerate(sizes))
    assert lt.out_dim == lf.out_dim == expected_out
    # kernel shapes: [H_{k-1} * m, H_k], H_0 = m, H_{k-1} halved by split_half
    prev = m
    for k, h in enumerate(sizes):
        assert w[f"layers.{k}.kernel"].shape == (prev * m, h)
        prev = h // 2 if split_half and k < len(sizes) - 1 else h
    yt, yf = run_both(lt, lf, w, e)
    ref = numpy_cin(e, w, sizes, split_half)
    assert yt.shape == yf.shape == (5, expected_out)
    np.testing.assert_allclose(yt, ref, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(yf, ref, rtol=TOL, atol=TOL)


def test_afm_needs_two_fields():
    for cls in (TorchPooling, TFPooling):
        with pytest.raises(ValueError):
            cls(1, 4, 4)


def test_cin_rejects_unsplittable_layer():
    for cls in (TorchCIN, TFCIN):
        with pytest.raises(ValueError):
            cls(4, (1, 3), True)
        with pytest.raises(ValueError):
            cls(4, (), True)


# ----------------------------------------------------------------------------------- self-attention
def numpy_self_attention(e, w, num_heads, head_dim, use_residual):
    """Per head: alpha_{m,k} = softmax_k <W_Q e_m, W_K e_k>; e~_m = [sum_k alpha W_V e_k]_heads;
    out = ReLU(e~_m + W_Res e_m)."""
    e = e.astype(np.float64)
    B, F, _ = e.shape
    out = np.zeros((B, F, num_heads * head_dim))
    for hd in range(num_heads):
        cols = slice(hd * head_dim, (hd + 1) * head_dim)
        q, k, v = (e @ w[n][:, cols].astype(np.float64) for n in ("query", "key", "value"))
        for m in range(F):
            alpha = softmax(np.einsum("bd,bkd->bk", q[:, m], k), 1)
            out[:, m, cols] = np.einsum("bk,bkd->bd", alpha, v)
    if use_residual:
        out = out + e @ w["residual"].astype(np.float64)
    return np.maximum(out, 0.0)


@pytest.mark.parametrize("F,in_dim,heads,head_dim,res", [(5, 4, 2, 3, True), (3, 6, 1, 4, False), (6, 8, 3, 2, True)])
def test_self_attention_matches_numpy(F, in_dim, heads, head_dim, res):
    rng = np.random.default_rng(F + in_dim)
    e = rng.normal(0, 1.0, (4, F, in_dim)).astype(np.float32)
    lt, lf = TorchSelfAttention(in_dim, head_dim, heads, res), TFSelfAttention(in_dim, head_dim, heads, res)
    w = random_weights(lt, seed=heads)
    assert sorted(w) == sorted(["query", "key", "value"] + (["residual"] if res else []))
    assert all(v.shape == (in_dim, heads * head_dim) for v in w.values())
    yt, yf = run_both(lt, lf, w, e)
    ref = numpy_self_attention(e, w, heads, head_dim, res)
    assert yt.shape == yf.shape == (4, F, heads * head_dim)
    assert (ref > 0).mean() > 0.2
    np.testing.assert_allclose(yt, ref, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(yf, ref, rtol=TOL, atol=TOL)


# ------------------------------------------------------------------------------------------ models
def mlp_params(in_dim, hidden, batch_norm):
    dims, n = [in_dim, *hidden], 0
    for a, b in zip(dims[:-1], dims[1:]):
        n += a * b + b + (2 * b if batch_norm else 0)
    return n + dims[-1] + 1          # output layer (bias included)


def expected_params(name, schema, cfg):
    V, n_num, F = schema.total_vocab, len(schema.numeric), schema.num_fields
    d = cfg.get("embed_size", 16)
    emb = V * d + n_num * d
    linear = V + n_num + 1
    if name == "AFM":
        A = cfg["attention_size"]
        return linear + emb + d * A + A + A + d
    if name == "xDeepFM":
        n, prev, out = linear + emb, F, 0
        for k, h in enumerate(cfg["cin_layers"]):
            n += prev * F * h + h
            split = cfg["cin_split_half"] and k < len(cfg["cin_layers"]) - 1
            prev = h // 2 if split else h
            out += h - h // 2 if split else h
        n += out                                 # cin_out, no bias
        return n + (mlp_params(F * d, cfg["mlp"], cfg.get("batch_norm", False)) if cfg["mlp"] else 0)
    if name in ("AutoInt", "AutoIntPlus"):
        hd = cfg["num_heads"] * cfg["attention_dim"]
        n, prev = emb, d
        for _ in range(cfg["attention_layers"]):
            n += (4 if cfg["use_residual"] else 3) * prev * hd
            prev = hd
        n += F * prev + 1
        return n + (mlp_params(F * d, cfg["mlp"], cfg.get("batch_norm", False)) if cfg["mlp"] else 0)
    raise AssertionError(name)


def random_batch(schema, n, seed=0):
    rng = np.random.default_rng(seed)
    b = {f.name: rng.integers(0, f.vocab_size, n).astype(np.int32) for f in schema.categorical}
    b.update({f.name: rng.normal(0, 1, n).astype(np.float32) for f in schema.numeric})
    for f in schema.sequence:
        s = rng.integers(1, f.vocab_size, (n, f.max_len)).astype(np.int32)
        s[np.arange(f.max_len)[None, :] >= rng.integers(0, f.max_len + 1, n)[:, None]] = 0
        b[f.name] = s
    return b


MODEL_CASES = [
    ("AFM", dict(embed_size=8, attention_size=4)),
    ("AFM", dict(embed_size=6, attention_size=10, attention_dropout=0.2)),
    ("xDeepFM", dict(embed_size=4, cin_layers=(6, 4, 3), cin_split_half=True, mlp=(8,), batch_norm=True)),
    ("xDeepFM", dict(embed_size=4, cin_layers=(5, 2), cin_split_half=False, mlp=())),
    ("xDeepFM", dict(embed_size=4, cin_layers=(), cin_split_half=True, mlp=(8, 4))),
    ("AutoInt", dict(embed_size=4, attention_layers=2, num_heads=2, attention_dim=3, use_residual=True, mlp=())),
    ("AutoInt", dict(embed_size=5, attention_layers=1, num_heads=1, attention_dim=4, use_residual=False, mlp=())),
    ("AutoIntPlus", dict(embed_size=4, attention_layers=3, num_heads=2, attention_dim=2, use_residual=True,
                         mlp=(16, 8), batch_norm=True)),
]


@pytest.mark.parametrize("name,cfg", MODEL_CASES)
def test_model_params_and_shapes(random_dataset, name, cfg):
    schema = Schema.load(random_dataset)
    assert schema.num_fields == 7 and schema.numeric and schema.sequence
    tm = zoo_torch.build_model(name, schema, seed=1, **cfg)
    fm = zoo_tf.build_model(name, schema, seed=1, **cfg)
    n = expected_params(name, schema, cfg)
    assert zoo_torch.count_params(tm) == n
    assert zoo_tf.count_params(fm) == n
    nb = 10
    batch = random_batch(schema, nb)
    tm.eval()
    yt = tm({k: torch.from_numpy(v) for k, v in batch.items()})
    yf = fm({k: tf.constant(v) for k, v in batch.items()}, training=False)
    assert tuple(yt.shape) == tuple(yf.shape) == (nb,)
    assert np.isfinite(yt.detach().numpy()).all() and np.isfinite(yf.numpy()).all()


def test_autoint_variants(random_dataset):
    schema = Schema.load(random_dataset)
    for zoo in (zoo_torch, zoo_tf):
        with pytest.raises(ValueError):
            zoo.build_model("AutoIntPlus", schema, mlp=())
        plain = zoo.get_weights(zoo.build_model("AutoInt", schema, embed_size=4))
        plus = zoo.get_weights(zoo.build_model("AutoIntPlus", schema, embed_size=4, mlp=(8,)))
        assert not any(k.startswith("dnn.") for k in plain)
        assert any(k.startswith("dnn.") for k in plus)
        assert not any(k.startswith("linear.") for k in plain)   # no first-order term (see models/autoint.py)
        assert set(plain) <= set(plus)
        wide = zoo.get_weights(zoo.build_model("AutoInt", schema, embed_size=4, use_wide=True))
        assert set(wide) - set(plain) == {k for k in wide if k.startswith("linear.")} != set()


# ---- zoo_torch's hand-written self-attention backward (_SelfAttention) -----------------------------
@pytest.mark.parametrize("res", [True, False])
def test_self_attention_function_gradcheck(res):
    from zoo_torch.layers.attention import _SelfAttention
    g = torch.Generator().manual_seed(1)
    heads, head_dim, in_dim = 2, 3, 5
    e = torch.randn(4, 6, in_dim, generator=g, dtype=torch.float64, requires_grad=True)
    kernels = [(0.5 * torch.randn(in_dim, heads * head_dim, generator=g, dtype=torch.float64)).requires_grad_()
               for _ in range(4 if res else 3)]
    assert torch.autograd.gradcheck(lambda e, *k: _SelfAttention.apply(e, heads, *k), [e, *kernels])


@pytest.mark.parametrize("needs", ["only_e", "only_key", "kernels_not_e", "value_and_residual"])
def test_self_attention_backward_with_some_inputs_frozen(needs):
    """Only the requested gradients are computed, and they equal those with everything trainable."""
    from zoo_torch.layers.attention import _SelfAttention
    g = torch.Generator().manual_seed(3)
    heads, head_dim, in_dim = 2, 3, 4
    e0 = torch.randn(5, 6, in_dim, generator=g, dtype=torch.float64)
    k0 = [0.5 * torch.randn(in_dim, heads * head_dim, generator=g, dtype=torch.float64) for _ in range(4)]
    w = torch.randn(5, 6, heads * head_dim, generator=g, dtype=torch.float64)

    def run(flags):
        e = e0.clone().requires_grad_(flags[0])
        ks = [k.clone().requires_grad_(f) for k, f in zip(k0, flags[1:])]
        (_SelfAttention.apply(e, heads, *ks) * w).sum().backward()
        return [x.grad for x in (e, *ks)]

    flags = {"only_e": [1, 0, 0, 0, 0], "only_key": [0, 0, 1, 0, 0], "kernels_not_e": [0, 1, 1, 1, 1],
             "value_and_residual": [0, 0, 0, 1, 1]}[needs]
    got, full = run([bool(f) for f in flags]), run([True] * 5)
    for f, a, b in zip(flags, got, full):
        if f:
            torch.testing.assert_close(a, b)
        else:
            assert a is None


@pytest.mark.parametrize("res", [True, False])
def test_self_attention_training_path_equals_plain_formula(res):
    """The layer (hand-written backward) = the plain formula under autograd, values and gradients;
    a traced export records the plain ops, not the Python function."""
    torch.manual_seed(0)
    layer = TorchSelfAttention(5, 4, 2, res).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    e = torch.randn(7, 6, 5, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())
    y = layer(e)
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                [e, *params])

    def plain(e):
        f = e.shape[1]
        q, k, v = (layer.split_heads(e @ w, f) for w in (layer.query, layer.key, layer.value))
        out = (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2).reshape(-1, f, layer.out_dim)
        return torch.relu(out + e @ layer.residual if res else out)

    ref = plain(e)
    ref_grads = torch.autograd.grad((ref * torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype).view_as(ref)).sum(),
                                    [e, *params])
    torch.testing.assert_close(y, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    traced = torch.jit.trace(layer, (e.detach(),))
    torch.testing.assert_close(traced(e.detach()), ref.detach())
    assert not any(n.kind() == "prim::PythonOp" for n in traced.graph.nodes())


# ---- zoo_tf's AutoInt runs its attention stack on slices of the batch ------------------------------
@pytest.mark.parametrize("rows", [3, 600, 1029])
def test_tf_autoint_in_slices_equals_torch_and_the_whole_batch(random_dataset, rows):
    """Sliced (eager: static batch; tf.function: dynamic batch, empty slices below 8 rows) and unsliced
    TF AutoInt give torch's logits and each other's gradients."""
    from zoo_tf.models import autoint as tf_autoint

    schema = Schema.load(random_dataset)
    cfg = dict(embed_size=4, attention_layers=2, num_heads=2, attention_dim=3, use_residual=True, mlp=())
    tm = zoo_torch.build_model("AutoInt", schema, seed=1, **cfg).eval()
    fm = zoo_tf.build_model("AutoInt", schema, seed=1, **cfg)
    weights = {k: np.random.default_rng(3).normal(0, 0.5, v.shape).astype(np.float32)
               for k, v in zoo_torch.get_weights(tm).items()}
    zoo_torch.set_weights(tm, weights)
    zoo_tf.set_weights(fm, weights)
    batch = random_batch(schema, rows, seed=4)
    with torch.no_grad():
        want = tm({k: torch.from_numpy(v) for k, v in batch.items()}).numpy()
    tb = {k: tf.constant(v) for k, v in batch.items()}
    spec = {k: tf.TensorSpec((None,) + v.shape[1:], v.dtype) for k, v in tb.items()}

    def grads(chunks, graph):
        fm.attention_chunks = chunks

        def f(b):
            with tf.GradientTape() as tape:
                y = fm(b, training=True)
                loss = tf.reduce_sum(y * tf.range(rows, dtype=tf.float32))
            return y, tape.gradient(loss, fm.trainable_variables)

        return (tf.function(f, input_signature=[spec]) if graph else f)(tb)

    whole_y, whole_g = grads(1, False)
    np.testing.assert_allclose(whole_y.numpy(), want, rtol=1e-5, atol=1e-5)
    for graph in (False, True):
        y, g = grads(tf_autoint.ATTENTION_CHUNKS, graph)
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
        for a, b in zip(g, whole_g):
            np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(),
                                       rtol=1e-4, atol=1e-5)
    # eager with a static batch: fewer slices for small batches (one below 2 x MIN_CHUNK_ROWS)
    calls = []
    fm.attention_chunks = tf_autoint.ATTENTION_CHUNKS
    real = fm.attend
    fm.attend = lambda x: calls.append(int(x.shape[0])) or real(x)
    fm(tb, training=False)
    del fm.attend
    expect = max(1, min(tf_autoint.ATTENTION_CHUNKS, rows // tf_autoint.MIN_CHUNK_ROWS))
    assert len(calls) == expect and sum(calls) == rows
