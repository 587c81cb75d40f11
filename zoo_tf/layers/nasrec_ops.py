"""NASRec operators with elastic widths; mirror of zoo_torch/layers/nasrec_ops.py (see there).

Every op is built either at the supernet's maximum sizes or at a standalone subnet's
exact sizes, and is called with ``rows`` (kernel rows of the active input sources,
``None`` = all) and ``width`` (active output width); slicing the shared kernels to the
active rows/columns computes exactly what masking inactive channels to zero computes.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from zoo_tf.layers.base import Dense, Module, activation

LN_EPS = 1e-5
ATTN_LN_INIT = "const:0.17"


def take_rows(kernel, rows):
    if rows is None:
        return kernel
    if len(rows) == 1:
        a, b = rows[0]
        return kernel if (a == 0 and b == kernel.shape[0]) else kernel[a:b]
    return tf.concat([kernel[a:b] for a, b in rows], 0)


class ElasticDense(Module):
    """Kernel ``[in, out]`` (+ bias) used through its active rows and first ``width`` columns."""

    def __init__(self, in_dim: int, out_dim: int, use_bias: bool = False):
        super().__init__()
        self.add_param("kernel", (in_dim, out_dim), "glorot_uniform")
        self.use_bias = use_bias
        if use_bias:
            self.add_param("bias", (out_dim,), "zeros", regularize=False)

    def weight(self, rows=None, width=None):
        k = take_rows(self.kernel, rows)
        return k if width is None or width == k.shape[1] else k[:, :width]

    def __call__(self, x, rows=None, width=None):
        y = tf.matmul(x, self.weight(rows, width))
        if self.use_bias:
            y = y + (self.bias if width is None else self.bias[:width])
        return y


class LayerNorm(Module):
    """Layer norm over ``axis`` with the first n = x.shape[axis] entries of gamma/beta."""

    def __init__(self, dim: int, gamma_init: str = "ones"):
        super().__init__()
        self.add_param("gamma", (dim,), gamma_init, regularize=False)
        self.add_param("beta", (dim,), "zeros", regularize=False)

    def __call__(self, x, axis: int = -1):
        rank = len(x.shape)
        n = x.shape[axis]
        g, b = self.gamma[:n], self.beta[:n]
        if axis not in (-1, rank - 1):
            shape = [1] * rank
            shape[axis] = n
            g, b = tf.reshape(g, shape), tf.reshape(b, shape)
        mean = tf.reduce_mean(x, axis, keepdims=True)
        xc = x - mean
        var = tf.reduce_mean(xc * xc, axis, keepdims=True)
        return xc * tf.math.rsqrt(var + LN_EPS) * g + b


def feature_project(sp, kernel):
    """[B, N, d] x [N, K] -> [B, K, d]."""
    return tf.einsum("bnd,nk->bkd", sp, kernel)


def pad_to(x, width: int):
    w = x.shape[1]
    return x if w == width else tf.pad(x, [[0, 0], [0, width - w]])


class FCOp(Module):
    def __init__(self, in_dim: int, width: int, act: str = "relu"):
        super().__init__()
        self._act = activation(act)
        self.linear = ElasticDense(in_dim, width)
        self.norm = LayerNorm(width)

    def __call__(self, x, rows, width):
        return self._act(self.norm(self.linear(x, rows, width)))


class DotOp(Module):
    def __init__(self, dense_in: int, sparse_in: int, width: int, embed_size: int, k: int):
        super().__init__()
        self.dense_proj = ElasticDense(dense_in, embed_size)
        self.dense_norm = LayerNorm(embed_size)
        self.sparse_proj = ElasticDense(sparse_in, k)
        self.sparse_norm = LayerNorm(k)
        n = k + 1
        li, lj = np.tril_indices(n, -1)
        self._flat_index = tf.constant((li * n + lj).astype(np.int64))
        self._n = n
        self.out = ElasticDense(len(li), width)
        self.norm = LayerNorm(width)

    def __call__(self, x, xrows, sp, srows, width):
        a = self.dense_norm(self.dense_proj(x, xrows))
        y = self.sparse_norm(feature_project(sp, self.sparse_proj.weight(srows)), axis=1)
        t = tf.concat([a[:, None, :], y], 1)
        z = tf.reshape(tf.matmul(t, t, transpose_b=True), [-1, self._n * self._n])
        z = tf.gather(z, self._flat_index, axis=1)
        return self.norm(self.out(z, None, width))


class GatingOp(Module):
    def __init__(self, left_dim: int, right_dim: int, width: int):
        super().__init__()
        self.gate = ElasticDense(left_dim, right_dim, use_bias=True)
        self.out = ElasticDense(right_dim, width)
        self.norm = LayerNorm(width)

    def __call__(self, left, right, width):
        ql, qr = left.shape[1], right.shape[1]
        g = tf.sigmoid(tf.matmul(left, self.gate.kernel[:ql, :qr]) + self.gate.bias[:qr])
        return self.norm(self.out(g * right, [(0, qr)], width))


class SumOp(Module):
    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.out = ElasticDense(in_dim, width)
        self.norm = LayerNorm(width)

    def __call__(self, left, right, width):
        q = max(left.shape[1], right.shape[1])
        return self.norm(self.out(pad_to(left, q) + pad_to(right, q), [(0, q)], width))


class EFCOp(Module):
    def __init__(self, in_features: int, width: int, act: str = "relu"):
        super().__init__()
        self._act = activation(act)
        self.linear = ElasticDense(in_features, width)
        self.norm = LayerNorm(width)

    def __call__(self, sp, rows, width):
        return self._act(self.norm(feature_project(sp, self.linear.weight(rows, width)), axis=1))


class AttentionOp(Module):
    def __init__(self, in_features: int, width: int, embed_size: int, heads: int, act: str = "relu"):
        super().__init__()
        self._act = activation(act)
        self._heads = heads
        self.proj = ElasticDense(in_features, width)
        self.proj_norm = LayerNorm(width)
        self.query = Dense(embed_size, embed_size)
        self.key = Dense(embed_size, embed_size, use_bias=False)   # a key bias only shifts each query's scores
        self.value = Dense(embed_size, embed_size)
        self.output = Dense(embed_size, embed_size)
        self.attn_norm = LayerNorm(embed_size, ATTN_LN_INIT)
        self.ffn1 = Dense(embed_size, embed_size)
        self.ffn2 = Dense(embed_size, embed_size)
        self.ffn_norm = LayerNorm(embed_size, ATTN_LN_INIT)

    def __call__(self, sp, rows, width):
        h = self.proj_norm(feature_project(sp, self.proj.weight(rows, width)), axis=1)   # [B, s, d]
        s, d = h.shape[1], h.shape[2]
        nh = self._heads
        dh = d // nh

        def split(t):
            return tf.transpose(tf.reshape(t, [-1, s, nh, dh]), [0, 2, 1, 3])

        q, k, v = split(self.query(h) * (1.0 / math.sqrt(dh))), split(self.key(h)), split(self.value(h))
        att = tf.nn.softmax(tf.matmul(q, k, transpose_b=True), -1)
        ctx = tf.reshape(tf.transpose(tf.matmul(att, v), [0, 2, 1, 3]), [-1, s, d])
        a = self.attn_norm(h + self.output(ctx))
        return self.ffn_norm(a + self.ffn2(self._act(self.ffn1(a))))


class ToSparse(Module):
    def __init__(self, in_dim: int, merge_features: int, embed_size: int):
        super().__init__()
        self._m, self._d = merge_features, embed_size
        self.linear = ElasticDense(in_dim, merge_features * embed_size)
        self.norm = LayerNorm(merge_features * embed_size)

    def __call__(self, x):
        y = self.norm(self.linear(x, [(0, x.shape[1])]))
        return tf.reshape(y, [-1, self._m, self._d])


class ToDense(Module):
    def __init__(self, embed_size: int, width: int):
        super().__init__()
        self.linear = ElasticDense(embed_size, width)
        self.norm = LayerNorm(width)

    def __call__(self, sp, width):
        s = tf.reduce_sum(sp, 1)
        fm = 0.5 * (s * s - tf.reduce_sum(sp * sp, 1))
        return self.norm(self.linear(fm, None, width))


class NASRecBlock(Module):
    """Mirror of zoo_torch.layers.nasrec_ops.NASRecBlock."""

    def __init__(self, dense_ops, sparse_ops, to_sparse: bool, to_dense: bool, sizes: dict, act: str = "relu"):
        super().__init__()
        z = sizes
        for op in dense_ops:
            if op == "fc":
                self.fc = FCOp(z["dense_in"], z["width"], act)
            elif op == "dot":
                self.dot = DotOp(z["dense_in"], z["sparse_in"], z["width"], z["embed"], z["k"])
            elif op == "gating":
                self.gating = GatingOp(z["left"], z["right"], z["width"])
            elif op == "sum":
                self.sum = SumOp(z["sum_in"], z["width"])
        for op in sparse_ops:
            if op == "efc":
                self.efc = EFCOp(z["sparse_in"], z["sparse_width"], act)
            elif op == "attention":
                self.attention = AttentionOp(z["sparse_in"], z["sparse_width"], z["embed"], z["heads"], act)
        if to_sparse:
            self.to_sparse = ToSparse(z["width"], z["merge"], z["embed"])
        if to_dense:
            self.to_dense = ToDense(z["embed"], z["width"])

    def __call__(self, dense_src, sparse_src, pb, drows, srows):
        w, s = pb.dense_width, pb.sparse_width
        x = tf.concat([dense_src[j] for j in pb.dense_in], 1) if len(pb.dense_in) > 1 else dense_src[pb.dense_in[0]]
        sp = tf.concat([sparse_src[j] for j in pb.sparse_in], 1) if len(pb.sparse_in) > 1 \
            else sparse_src[pb.sparse_in[0]]
        dense_out = None
        for op in pb.dense_ops:
            if op == "fc":
                y = self.fc(x, drows, w)
            elif op == "dot":
                y = self.dot(x, drows, sp, srows, w)
            else:
                left, right = _side(dense_src, pb.left), _side(dense_src, pb.right)
                y = self.gating(left, right, w) if op == "gating" else self.sum(left, right, w)
            dense_out = y if dense_out is None else dense_out + y
        sparse_out = None
        for op in pb.sparse_ops:
            y = self.efc(sp, srows, s) if op == "efc" else self.attention(sp, srows, s)
            sparse_out = y if sparse_out is None else sparse_out + y
        new_dense = dense_out + self.to_dense(sparse_out, w) if pb.sparse_to_dense else dense_out
        new_sparse = tf.concat([sparse_out, self.to_sparse(dense_out)], 1) if pb.dense_to_sparse else sparse_out
        return new_dense, new_sparse


def _side(dense_src, sources):
    if len(sources) == 1:
        return dense_src[sources[0]]
    q = max(dense_src[j].shape[1] for j in sources)
    out = None
    for j in sources:
        t = pad_to(dense_src[j], q)
        out = t if out is None else out + t
    return out


def dense_stem(index, batch):
    if index.n_num:
        return index.numeric(batch)
    ref = batch[index.cat_names[0]] if index.cat_names else batch[index.seq_names[0]]
    return tf.ones([tf.shape(ref)[0], 1])


def forward_network(model, batch, path, layout=None):
    """Mirror of zoo_torch.layers.nasrec_ops.forward_network."""
    from common.nas_space import source_widths

    dense_src = [dense_stem(model.embedding.index, batch)]
    sparse_src = [model.embedding(batch)]
    widths = source_widths(path, layout) if layout is not None else None
    for i, pb in enumerate(path):
        drows = srows = None
        if layout is not None:
            drows = layout.dense_ranges(pb.dense_in, widths[0])
            srows = layout.sparse_ranges(pb.sparse_in, widths[1], widths[2])
        d, s = model.blocks[i](dense_src, sparse_src, pb, drows, srows)
        dense_src.append(d)
        sparse_src.append(s)
    last = path[-1]
    sp = sparse_src[-1]
    feats = tf.concat([dense_src[-1], tf.reshape(sp, [-1, sp.shape[1] * sp.shape[2]])], 1)
    hrows = layout.head_ranges(last.dense_width, last.sparse_width, last.dense_to_sparse) if layout else None
    return tf.squeeze(model.head(feats, hrows), -1)
