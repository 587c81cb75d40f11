"""Cross networks (DCN, DCN-V2), field-aware embeddings (FFM) and the FFM / DCN / DCNv2 models.

Every layer is checked in both backends against a plain numpy transcription of its paper's
equation (column vectors, per-sample, per-expert loops: deliberately not the vectorised
formulas of the implementation); the models are checked for structure (weight names,
shapes, parameter counts) and their logits against a numpy forward pass.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch

import zoo_tf
import zoo_torch
from common.schema import Field, Schema
from zoo_tf.layers import cross as tf_cross
from zoo_tf.layers import field_aware as tf_fa
from zoo_torch.layers import cross as pt_cross
from zoo_torch.layers import field_aware as pt_fa

B = 7


def small_schema(seq=True, n_num=2):
    fields = [Field("a", "categorical", vocab_size=6), Field("b", "categorical", vocab_size=4),
              Field("c", "categorical", vocab_size=5)]
    fields += [Field(f"n{i}", "numeric") for i in range(n_num)]
    if seq:
        fields.append(Field("hist", "sequence", vocab_size=6, embedding_group="a", max_len=4))
    return Schema(fields=fields, name="small")


def random_batch(schema, rng, b=B):
    out = {}
    for f in schema.categorical:
        out[f.name] = rng.integers(0, f.vocab_size, b).astype(np.int32)
    for f in schema.numeric:
        out[f.name] = rng.normal(0, 1, b).astype(np.float32)
    for f in schema.sequence:
        s = np.zeros((b, f.max_len), np.int32)
        for r in range(b):                       # row 0 stays empty: the mask must give a zero vector
            n = int(rng.integers(1, f.max_len + 1)) if r else 0
            s[r, :n] = rng.integers(1, f.vocab_size, n)
        out[f.name] = s
    out["label"] = rng.integers(0, 2, b).astype(np.float32)
    return out


def to_torch(batch):
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def to_tf(batch):
    return {k: tf.constant(v) for k, v in batch.items()}


def random_weights(names_shapes, rng, scale=0.3):
    return {k: rng.normal(0, scale, s).astype(np.float32) for k, s in names_shapes.items()}


def shapes(weights):
    return {k: tuple(v.shape) for k, v in weights.items()}


def set_both(pt_module, tf_module, rng, scale=0.3, extra=None):
    """Random weights, set in both backends; returns them (moving variances kept positive)."""
    names = shapes(zoo_torch.get_weights(pt_module))
    assert names == shapes(zoo_tf.get_weights(tf_module))
    w = random_weights(names, rng, scale)
    for k in w:
        if k.endswith("moving_var"):
            w[k] = np.abs(w[k]) + 0.5
    w.update(extra or {})
    zoo_torch.set_weights(pt_module, w)
    zoo_tf.set_weights(tf_module, w)
    return w


# ----------------------------------------------------------------------------- numpy references
def np_cross_v1(x0, layers):
    """DCN eq. (3): x_{l+1} = x_0 x_l^T w_l + b_l + x_l, with the D x D outer product formed."""
    out = []
    for b in range(len(x0)):
        c0 = x0[b][:, None].astype(np.float64)
        x = c0
        for w, bias in layers:                   # w [D, 1], bias [D]
            x = (c0 @ x.T) @ w + bias[:, None] + x
        out.append(x[:, 0])
    return np.array(out)


def np_cross_v2(x0, layers):
    """DCN-V2 eq. (1)/(3): x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l, W_l given as a D x D matrix."""
    out = []
    for b in range(len(x0)):
        c0 = x0[b][:, None].astype(np.float64)
        x = c0
        for W, bias in layers:
            x = c0 * (W @ x + bias[:, None]) + x
        out.append(x[:, 0])
    return np.array(out)


def np_cross_mix(x0, layers):
    """DCN-V2 eq. (4): x_{l+1} = sum_i G_i(x_l) x_0 ⊙ (U_i tanh(C_i tanh(V_i^T x_l)) + b_l) + x_l,
    G = softmax over experts of g_i^T x_l.  ``layers``: lists of per-expert (V_i, C_i, U_i, g_i), b."""
    out = []
    for b in range(len(x0)):
        c0 = x0[b][:, None].astype(np.float64)
        x = c0
        for experts, bias in layers:
            logits = np.array([(g.T @ x).item() for _, _, _, g in experts])
            gates = np.exp(logits - logits.max())
            gates /= gates.sum()
            mix = 0.0
            for gate, (V, C, U, _) in zip(gates, experts):
                e = c0 * (U @ np.tanh(C @ np.tanh(V.T @ x)) + bias[:, None])
                mix = mix + gate * e
            x = mix + x
        out.append(x[:, 0])
    return np.array(out)


def np_field_aware(schema, batch, table, numeric, dim, targets=None):
    """[B, F, T, d]: v_{i,f} for every field i (categorical, numeric, sequence) and target field f
    (T = F field-aware targets; T = 1 gives a plain embedding)."""
    offs = schema.group_offsets()
    F = schema.num_fields
    T = F if targets is None else targets
    n = len(batch["label"])
    v = np.zeros((n, F, T, dim))
    i = 0
    for f in schema.categorical:
        for b in range(n):
            v[b, i] = table[offs[f.embedding_group] + batch[f.name][b]].reshape(T, dim)
        i += 1
    for k, f in enumerate(schema.numeric):
        for b in range(n):
            v[b, i] = batch[f.name][b] * numeric[k].reshape(T, dim)
        i += 1
    for f in schema.sequence:
        for b in range(n):
            ids = [t for t in batch[f.name][b] if t != 0]
            if ids:
                v[b, i] = np.mean([table[offs[f.embedding_group] + t] for t in ids], 0).reshape(T, dim)
        i += 1
    return v


def np_ffm_pairs(v):
    F = v.shape[1]
    return np.array([sum(float(v[b, i, j] @ v[b, j, i]) for i in range(F) for j in range(i + 1, F))
                     for b in range(len(v))])


def np_linear(schema, batch, w):
    """w_0 + sum_i w[x_i] + sum_j w_j x_j (+ masked mean over sequence ids)."""
    v = np_field_aware(schema, batch, w["linear.emb.weight"], w.get("linear.emb.numeric"), 1, targets=1)
    return v.sum((1, 2, 3)) + w["linear.bias"][0]


def np_embed(schema, batch, w, name="embedding"):
    """[B, F*d]: the flattened FeatureEmbedding output x_0 = [e_1; ...; e_F]."""
    table = w[f"{name}.weight"]
    v = np_field_aware(schema, batch, table, w.get(f"{name}.numeric"), table.shape[1], targets=1)
    return v.reshape(len(v), -1)


def np_mlp(x, w, prefix, n_layers, batch_norm=False, eps=1e-5):
    for i in range(n_layers):
        x = x @ w[f"{prefix}.layers.{i}.kernel"] + w[f"{prefix}.layers.{i}.bias"]
        if batch_norm:
            n = f"{prefix}.norms.{i}"
            x = (x - w[f"{n}.moving_mean"]) / np.sqrt(w[f"{n}.moving_var"] + eps) * w[f"{n}.gamma"] + w[f"{n}.beta"]
        x = np.maximum(x, 0)
    return x


# ----------------------------------------------------------------------------- layer checks
def run_cross(pt_layer, tf_layer, x0):
    pt_layer.eval()
    a = pt_layer(torch.from_numpy(x0)).detach().numpy()
    b = tf_layer(tf.constant(x0), training=False).numpy()
    return a, b


@pytest.mark.parametrize("num_layers", [1, 3])
def test_cross_net_v1_matches_paper(num_layers):
    rng = np.random.default_rng(num_layers)
    D = 6
    pt, tfm = pt_cross.CrossNet(D, num_layers), tf_cross.CrossNet(D, num_layers)
    w = set_both(pt, tfm, rng)
    assert shapes(w) == {**{f"layers.{l}.kernel": (D, 1) for l in range(num_layers)},
                         **{f"layers.{l}.bias": (D,) for l in range(num_layers)}}
    x0 = rng.normal(0, 1, (B, D)).astype(np.float32)
    ref = np_cross_v1(x0, [(w[f"layers.{l}.kernel"], w[f"layers.{l}.bias"]) for l in range(num_layers)])
    a, b = run_cross(pt, tfm, x0)
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("low_rank", [0, 2])
def test_cross_net_v2_matches_paper(low_rank):
    rng = np.random.default_rng(10 + low_rank)
    D, L = 5, 3
    pt, tfm = pt_cross.CrossNetV2(D, L, low_rank), tf_cross.CrossNetV2(D, L, low_rank)
    w = set_both(pt, tfm, rng)
    layers = []
    for l in range(L):
        if low_rank:
            assert w[f"layers.{l}.V"].shape == (D, low_rank) and w[f"layers.{l}.U"].shape == (low_rank, D)
            V, U = w[f"layers.{l}.V"], w[f"layers.{l}.U"].T            # paper: W = U V^T, U, V in R^{D x r}
            W = U @ V.T
            assert np.linalg.matrix_rank(W) <= low_rank
        else:
            W = w[f"layers.{l}.kernel"].T                               # stored [in, out]
        layers.append((W, w[f"layers.{l}.bias"]))
    x0 = rng.normal(0, 1, (B, D)).astype(np.float32)
    ref = np_cross_v2(x0, layers)
    a, b = run_cross(pt, tfm, x0)
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_experts", [1, 3])
def test_cross_net_mix_matches_paper(num_experts):
    rng = np.random.default_rng(20 + num_experts)
    D, L, r = 6, 2, 3
    pt, tfm = pt_cross.CrossNetMix(D, L, r, num_experts), tf_cross.CrossNetMix(D, L, r, num_experts)
    w = set_both(pt, tfm, rng, scale=0.5)
    K = num_experts
    assert shapes(w)["layers.1.V"] == (D, K, r) and shapes(w)["layers.1.C"] == (K, r, r)
    assert shapes(w)["layers.1.U"] == (K, r, D) and shapes(w)["layers.1.gate"] == (D, K)
    layers = []
    for l in range(L):
        p = f"layers.{l}."
        experts = [(w[p + "V"][:, i, :], w[p + "C"][i].T, w[p + "U"][i].T, w[p + "gate"][:, i:i + 1])
                   for i in range(K)]
        layers.append((experts, w[p + "bias"]))
    x0 = rng.normal(0, 1, (B, D)).astype(np.float32)
    ref = np_cross_mix(x0, layers)
    a, b = run_cross(pt, tfm, x0)
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, ref, rtol=1e-5, atol=1e-5)


def test_cross_layers_are_not_identity():
    """Guards the references above against vacuous agreement: with weights set, outputs move."""
    rng = np.random.default_rng(0)
    x0 = rng.normal(0, 1, (B, 4)).astype(np.float32)
    for pt, tfm in [(pt_cross.CrossNet(4, 2), tf_cross.CrossNet(4, 2)),
                    (pt_cross.CrossNetV2(4, 2), tf_cross.CrossNetV2(4, 2)),
                    (pt_cross.CrossNetMix(4, 2, 2, 2), tf_cross.CrossNetMix(4, 2, 2, 2))]:
        set_both(pt, tfm, rng)
        a, b = run_cross(pt, tfm, x0)
        assert np.abs(a - x0).max() > 0.05 and np.abs(b - x0).max() > 0.05


def test_field_aware_embedding_and_interaction_match_paper():
    schema = small_schema()
    F, d = schema.num_fields, 3
    rng = np.random.default_rng(4)
    pt, tfm = pt_fa.FieldAwareEmbedding(schema, d), tf_fa.FieldAwareEmbedding(schema, d)
    w = set_both(pt, tfm, rng)
    # one offset table over the groups a (shared with hist), b, c; numeric fields have their own rows
    assert shapes(w) == {"weight": (6 + 4 + 5, F * d), "numeric": (2, F * d)}
    batch = random_batch(schema, rng)
    ref = np_field_aware(schema, batch, w["weight"], w["numeric"], d)
    va = pt(to_torch(batch))
    vb = tfm(to_tf(batch))
    assert tuple(va.shape) == tuple(vb.shape) == (B, F, F, d)
    np.testing.assert_allclose(va.detach().numpy(), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vb.numpy(), ref, rtol=1e-6, atol=1e-6)
    assert np.all(ref[0, F - 1] == 0)            # empty sequence -> zero vectors

    pairs = np_ffm_pairs(ref)
    np.testing.assert_allclose(pt_fa.FFMInteraction(F)(va).detach().numpy(), pairs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tf_fa.FFMInteraction(F)(vb).numpy(), pairs, rtol=1e-5, atol=1e-6)
    # field-aware, not plain FM: using v_{i,f_j} vs v_{j,f_i} differs from <v_{i,f_i}, v_{j,f_j}>
    fm_like = np.array([sum(float(ref[b, i, i] @ ref[b, j, j]) for i in range(F) for j in range(i + 1, F))
                        for b in range(B)])
    assert np.abs(fm_like - pairs).max() > 1e-3


def test_field_aware_embedding_gradients_are_row_sparse():
    schema = small_schema()
    rng = np.random.default_rng(5)
    pt, tfm = pt_fa.FieldAwareEmbedding(schema, 2), tf_fa.FieldAwareEmbedding(schema, 2)
    set_both(pt, tfm, rng)
    batch = random_batch(schema, rng, b=3)
    pt_fa.FFMInteraction(schema.num_fields)(pt(to_torch(batch))).sum().backward()
    assert pt.weight.grad.is_sparse
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(tf_fa.FFMInteraction(schema.num_fields)(tfm(to_tf(batch))))
    g = tape.gradient(y, tfm.weight)
    assert isinstance(g, tf.IndexedSlices)
    touched = set(np.nonzero(np.abs(pt.weight.grad.to_dense().numpy()).sum(1))[0])
    assert touched and touched <= set(g.indices.numpy().tolist())
    np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(), pt.weight.grad.to_dense().numpy(),
                               rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- models
def build_both(name, schema, **cfg):
    pt = zoo_torch.build_model(name, schema, seed=3, **cfg)
    tfm = zoo_tf.build_model(name, schema, seed=3, **cfg)
    pt.eval()
    return pt, tfm


def logits_both(pt, tfm, batch):
    return pt(to_torch(batch)).detach().numpy(), tfm(to_tf(batch), training=False).numpy()


def emb_params(schema, d):
    return (schema.total_vocab + len(schema.numeric)) * d


def mlp_params(dims, batch_norm=False):
    """Trainable parameters of an MLP (batch norm: gamma and beta; moving stats are not parameters)."""
    n = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    return n + (2 * sum(dims[1:]) if batch_norm else 0)


def test_ffm_model_matches_paper():
    schema = small_schema()
    F, d = schema.num_fields, 3
    pt, tfm = build_both("FFM", schema, embed_size=d)
    rng = np.random.default_rng(6)
    w = set_both(pt, tfm, rng)
    assert shapes(w)["embedding.weight"] == (schema.total_vocab, F * d)
    expected = (schema.total_vocab + len(schema.numeric) + 1) + emb_params(schema, F * d)
    assert zoo_torch.count_params(pt) == zoo_tf.count_params(tfm) == expected
    batch = random_batch(schema, rng)
    v = np_field_aware(schema, batch, w["embedding.weight"], w["embedding.numeric"], d)
    ref = np_linear(schema, batch, w) + np_ffm_pairs(v)
    a, b = logits_both(pt, tfm, batch)
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mlp", [(8, 4), ()])
def test_dcn_model_structure_and_forward(mlp):
    schema = small_schema()
    d, L = 2, 2
    D = schema.num_fields * d
    pt, tfm = build_both("DCN", schema, embed_size=d, cross_layers=L, mlp=mlp)
    w0 = zoo_torch.get_weights(pt)
    deep = mlp[-1] if mlp else 0
    assert shapes(w0)["output.kernel"] == (D + deep, 1)
    expected = emb_params(schema, d) + L * 2 * D + (mlp_params((D, *mlp)) if mlp else 0) + D + deep + 1
    assert zoo_torch.count_params(pt) == zoo_tf.count_params(tfm) == expected
    rng = np.random.default_rng(7)
    w = set_both(pt, tfm, rng)
    batch = random_batch(schema, rng)
    x0 = np_embed(schema, batch, w)
    xc = np_cross_v1(x0, [(w[f"cross.layers.{l}.kernel"], w[f"cross.layers.{l}.bias"]) for l in range(L)])
    h = np.concatenate([xc, np_mlp(x0, w, "dnn", len(mlp))], 1) if mlp else xc
    ref = (h @ w["output.kernel"] + w["output.bias"])[:, 0]
    a, b = logits_both(pt, tfm, batch)
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, ref, rtol=1e-4, atol=1e-5)


DCNV2_CASES = [
    dict(structure="parallel", low_rank=0, num_experts=1, mlp=(8,)),
    dict(structure="stacked", low_rank=0, num_experts=1, mlp=(8, 4), batch_norm=True),
    dict(structure="parallel", low_rank=3, num_experts=1, mlp=(6,)),
    dict(structure="stacked", low_rank=3, num_experts=4, mlp=(6,)),
    dict(structure="parallel", low_rank=2, num_experts=2, mlp=()),
]


def dcnv2_cross_params(D, L, r, K):
    if not r:
        return L * (D * D + D)
    if K == 1:
        return L * (2 * D * r + D)
    return L * (D * K * r + K * r * r + K * r * D + D * K + D)


@pytest.mark.parametrize("case", DCNV2_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dcnv2_model_structure_and_forward(case):
    schema = small_schema()
    d, L = 2, 2
    D = schema.num_fields * d
    r, K, mlp, bn = case["low_rank"], case["num_experts"], case["mlp"], case.get("batch_norm", False)
    pt, tfm = build_both("DCNv2", schema, embed_size=d, cross_layers=L, **case)
    names = shapes(zoo_torch.get_weights(pt))
    assert names == shapes(zoo_tf.get_weights(tfm))
    if K > 1:
        assert names["cross.layers.0.V"] == (D, K, r) and names["cross.layers.0.gate"] == (D, K)
    elif r:
        assert names["cross.layers.0.V"] == (D, r) and "cross.layers.0.kernel" not in names
    else:
        assert names["cross.layers.0.kernel"] == (D, D)
    stacked = case["structure"] == "stacked" and mlp
    out_in = mlp[-1] if stacked else D + (mlp[-1] if mlp else 0)
    assert names["output.kernel"] == (out_in, 1)
    mlp_n = mlp_params((D, *mlp), bn) if mlp else 0
    expected = emb_params(schema, d) + dcnv2_cross_params(D, L, r, K) + mlp_n + out_in + 1
    assert zoo_torch.count_params(pt) == zoo_tf.count_params(tfm) == expected

    rng = np.random.default_rng(8)
    w = set_both(pt, tfm, rng)
    batch = random_batch(schema, rng)
    x0 = np_embed(schema, batch, w)
    if K > 1:
        layers = [([(w[f"cross.layers.{l}.V"][:, i], w[f"cross.layers.{l}.C"][i].T, w[f"cross.layers.{l}.U"][i].T,
                     w[f"cross.layers.{l}.gate"][:, i:i + 1]) for i in range(K)], w[f"cross.layers.{l}.bias"])
                  for l in range(L)]
        xc = np_cross_mix(x0, layers)
    else:
        Ws = [w[f"cross.layers.{l}.U"].T @ w[f"cross.layers.{l}.V"].T if r else w[f"cross.layers.{l}.kernel"].T
              for l in range(L)]
        xc = np_cross_v2(x0, [(W, w[f"cross.layers.{l}.bias"]) for l, W in enumerate(Ws)])
    if stacked:
        h = np_mlp(xc, w, "dnn", len(mlp), bn)
    else:
        h = np.concatenate([xc, np_mlp(x0, w, "dnn", len(mlp), bn)], 1) if mlp else xc
    ref = (h @ w["output.kernel"] + w["output.bias"])[:, 0]
    a, b = logits_both(pt, tfm, batch)
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [dict(structure="serial"), dict(num_experts=2, low_rank=0),
                                 dict(num_experts=0, low_rank=2), dict(low_rank=-1)])
def test_dcnv2_rejects_bad_config(bad):
    schema = small_schema()
    with pytest.raises(ValueError):
        zoo_torch.build_model("DCNv2", schema, **bad)
    with pytest.raises(ValueError):
        zoo_tf.build_model("DCNv2", schema, **bad)


@pytest.fixture(scope="module")
def real_batch(random_dataset):
    """One batch of the real store (4 categorical, 2 numeric, 1 sequence field), as numpy; the store
    is released right away so other modules can open the same dataset."""
    from common.batching import iter_numpy_batches

    it = iter_numpy_batches(random_dataset, "train", 32, shuffle=False)
    batch = next(it)
    it.close()
    return Schema.load(random_dataset), batch


@pytest.mark.parametrize("name", ["FFM", "DCN", "DCNv2"])
def test_models_train_on_real_batches(name, real_batch):
    """Logits [B], finite, and a loss gradient reaching the embedding table row-sparse in both backends."""
    schema, batch = real_batch
    assert len(schema.numeric) == 2 and len(schema.sequence) == 1
    cfg = dict(mlp=(16,), low_rank=4, num_experts=2) if name == "DCNv2" else dict(mlp=(16,)) if name == "DCN" else {}
    pt = zoo_torch.build_model(name, schema, seed=1, embedding_init_std=0.05, **cfg)
    tfm = zoo_tf.build_model(name, schema, seed=1, embedding_init_std=0.05, **cfg)
    tb, fb = to_torch(batch), to_tf(batch)
    y = pt(tb)
    assert tuple(y.shape) == (32,) and torch.isfinite(y).all()
    torch.nn.functional.binary_cross_entropy_with_logits(y, tb["label"]).backward()
    gt = pt.embedding.weight.grad
    assert gt.is_sparse and gt.to_dense().abs().sum() > 0
    with tf.GradientTape() as tape:
        z = tfm(fb, training=True)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(fb["label"], z))
    g = tape.gradient(loss, tfm.embedding.weight)
    assert tuple(z.shape) == (32,) and isinstance(g, tf.IndexedSlices)
