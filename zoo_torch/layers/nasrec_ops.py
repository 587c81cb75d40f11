"""NASRec operators with elastic widths (see common/nas_space.py for the equations).

Every op is built either at the supernet's maximum sizes or at a standalone subnet's
exact sizes, and is called with ``rows`` (the kernel rows of the active input sources,
``None`` = all rows) and ``width`` (the active output width).  Elastic width = the first
``width`` channels: the op slices its shared kernels to the active rows/columns, which
computes exactly what masking the inactive channels to zero computes.

Canonical names (identical in zoo_tf/layers/nasrec_ops.py):
``fc.{linear.kernel, norm.gamma, norm.beta}``, ``dot.{dense_proj, dense_norm, sparse_proj,
sparse_norm, out, norm}``, ``gating.{gate, out, norm}``, ``sum.{out, norm}``,
``efc.{linear, norm}``, ``attention.{proj, proj_norm, query, key, value, output, attn_norm,
ffn1, ffn2, ffn_norm}``, ``to_sparse.{linear, norm}``, ``to_dense.{linear, norm}``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from zoo_torch.layers.base import ConstIndex, Dense, Module, activation

LN_EPS = 1e-5
ATTN_LN_INIT = "const:0.17"     # NASRec's attention layer-norm scale


def take_rows(kernel, rows):
    """Rows of ``kernel`` given as a list of (start, stop) ranges (None = all)."""
    if rows is None:
        return kernel
    if len(rows) == 1:
        a, b = rows[0]
        return kernel if (a == 0 and b == kernel.shape[0]) else kernel[a:b]
    return torch.cat([kernel[a:b] for a, b in rows], 0)


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

    def forward(self, x, rows=None, width=None):
        y = x @ self.weight(rows, width)
        if self.use_bias:
            y = y + (self.bias if width is None else self.bias[:width])
        return y


class LayerNorm(Module):
    """Layer norm over ``axis`` using the first n = x.shape[axis] entries of gamma/beta
    (= layer norm over the active channels of an elastic op)."""

    def __init__(self, dim: int, gamma_init: str = "ones"):
        super().__init__()
        self.add_param("gamma", (dim,), gamma_init, regularize=False)
        self.add_param("beta", (dim,), "zeros", regularize=False)

    def forward(self, x, axis: int = -1):
        n = x.shape[axis]
        g, b = self.gamma[:n], self.beta[:n]
        if axis not in (-1, x.dim() - 1):
            shape = [1] * x.dim()
            shape[axis] = n
            g, b = g.reshape(shape), b.reshape(shape)
        mean = x.mean(axis, keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(axis, keepdim=True)
        return xc * torch.rsqrt(var + LN_EPS) * g + b


def feature_project(sp, kernel):
    """[B, N, d] x [N, K] -> [B, K, d] (a linear map across the feature axis)."""
    return torch.einsum("bnd,nk->bkd", sp, kernel)


def pad_to(x, width: int):
    return x if x.shape[1] == width else F.pad(x, (0, width - x.shape[1]))


class FCOp(Module):
    """act(LN(x W)), act = relu (NASRecConfig.activation)."""

    def __init__(self, in_dim: int, width: int, act: str = "relu"):
        super().__init__()
        self._act = activation(act)
        self.linear = ElasticDense(in_dim, width)
        self.norm = LayerNorm(width)

    def forward(self, x, rows, width):
        return self._act(self.norm(self.linear(x, rows, width)))


class DotOp(Module):
    """LN(tril(T T^T) P), T = [LN(x W_d); LN_k(feature-projection of S to k features)]."""

    def __init__(self, dense_in: int, sparse_in: int, width: int, embed_size: int, k: int):
        super().__init__()
        self.dense_proj = ElasticDense(dense_in, embed_size)
        self.dense_norm = LayerNorm(embed_size)
        self.sparse_proj = ElasticDense(sparse_in, k)
        self.sparse_norm = LayerNorm(k)
        n = k + 1
        li, lj = np.tril_indices(n, -1)
        self.flat_index = ConstIndex(li * n + lj)
        self.out = ElasticDense(len(li), width)
        self.norm = LayerNorm(width)

    def forward(self, x, xrows, sp, srows, width):
        a = self.dense_norm(self.dense_proj(x, xrows))                          # [B, d]
        y = self.sparse_norm(feature_project(sp, self.sparse_proj.weight(srows)), axis=1)   # [B, k, d]
        t = torch.cat([a.unsqueeze(1), y], 1)                                   # [B, k+1, d]
        z = (t @ t.transpose(1, 2)).flatten(1)[:, self.flat_index.on(t.device)]              # strict lower triangle
        return self.norm(self.out(z, None, width))


class GatingOp(Module):
    """LN((sigmoid(l G + b) * r) W)."""

    def __init__(self, left_dim: int, right_dim: int, width: int):
        super().__init__()
        self.gate = ElasticDense(left_dim, right_dim, use_bias=True)
        self.out = ElasticDense(right_dim, width)
        self.norm = LayerNorm(width)

    def forward(self, left, right, width):
        ql, qr = left.shape[1], right.shape[1]
        g = torch.sigmoid(left @ self.gate.kernel[:ql, :qr] + self.gate.bias[:qr])
        return self.norm(self.out(g * right, [(0, qr)], width))


class SumOp(Module):
    """LN((l + r) W), l and r zero-padded to one width."""

    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.out = ElasticDense(in_dim, width)
        self.norm = LayerNorm(width)

    def forward(self, left, right, width):
        q = max(left.shape[1], right.shape[1])
        return self.norm(self.out(pad_to(left, q) + pad_to(right, q), [(0, q)], width))


class EFCOp(Module):
    """act(LN_feature(S^T W))^T: [B, N, d] -> [B, width, d]."""

    def __init__(self, in_features: int, width: int, act: str = "relu"):
        super().__init__()
        self._act = activation(act)
        self.linear = ElasticDense(in_features, width)
        self.norm = LayerNorm(width)

    def forward(self, sp, rows, width):
        return self._act(self.norm(feature_project(sp, self.linear.weight(rows, width)), axis=1))


class AttentionOp(Module):
    """h = LN_feature(feature-projection of S to ``width`` features); a = LN(h + MHA(h));
    out = LN(a + W2 act(W1 a)); the key projection has no bias (it would only shift each query's scores)."""

    def __init__(self, in_features: int, width: int, embed_size: int, heads: int, act: str = "relu"):
        super().__init__()
        self._act = activation(act)
        self.heads = heads
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

    def forward(self, sp, rows, width):
        h = self.proj_norm(feature_project(sp, self.proj.weight(rows, width)), axis=1)   # [B, s, d]
        b, s, d = h.shape
        nh, dh = self.heads, d // self.heads

        def split(t):
            return t.reshape(b, s, nh, dh).transpose(1, 2)                   # [B, H, s, dh]

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        # softmax(q k^T / sqrt(dh)) v, fused kernel
        ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        a = self.attn_norm(h + self.output(ctx))
        return self.ffn_norm(a + self.ffn2(self._act(self.ffn1(a))))


class ToSparse(Module):
    """Dense -> sparse merge: LN(x W) reshaped to [B, m, d]."""

    def __init__(self, in_dim: int, merge_features: int, embed_size: int):
        super().__init__()
        self.m, self.d = merge_features, embed_size
        self.linear = ElasticDense(in_dim, merge_features * embed_size)
        self.norm = LayerNorm(merge_features * embed_size)

    def forward(self, x):
        y = self.norm(self.linear(x, [(0, x.shape[1])]))
        return y.reshape(-1, self.m, self.d)


class ToDense(Module):
    """Sparse -> dense merge: LN(FM(S) W), FM(S) = 1/2((sum_f e_f)^2 - sum_f e_f^2)."""

    def __init__(self, embed_size: int, width: int):
        super().__init__()
        self.linear = ElasticDense(embed_size, width)
        self.norm = LayerNorm(width)

    def forward(self, sp, width):
        s = sp.sum(1)
        fm = 0.5 * (s * s - (sp * sp).sum(1))
        return self.norm(self.linear(fm, None, width))


class NASRecBlock(Module):
    """One choice block holding the ops in ``dense_ops`` / ``sparse_ops`` (all of them in the
    supernet, the chosen ones in a standalone subnet).  ``sizes``: dense_in, sparse_in,
    left, right, sum_in, width, sparse_width, embed, k, heads, merge."""

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

    def forward(self, dense_src, sparse_src, pb, drows, srows):
        w, s = pb.dense_width, pb.sparse_width
        x = torch.cat([dense_src[j] for j in pb.dense_in], 1) if len(pb.dense_in) > 1 else dense_src[pb.dense_in[0]]
        sp = torch.cat([sparse_src[j] for j in pb.sparse_in], 1) if len(pb.sparse_in) > 1 \
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
        new_sparse = torch.cat([sparse_out, self.to_sparse(dense_out)], 1) if pb.dense_to_sparse else sparse_out
        return new_dense, new_sparse


def _side(dense_src, sources):
    """One binary-op input: the chosen source (several are zero-padded and summed)."""
    if len(sources) == 1:
        return dense_src[sources[0]]
    q = max(dense_src[j].shape[1] for j in sources)
    out = None
    for j in sources:
        t = pad_to(dense_src[j], q)
        out = t if out is None else out + t
    return out


def dense_stem(index, batch, dtype=torch.float32):
    """The dense input: numeric features [B, n_num], or a constant 1 [B, 1] without numerics."""
    if index.n_num:
        return index.numeric(batch).to(dtype)
    ref = batch[index.cat_names[0]] if index.cat_names else batch[index.seq_names[0]]
    return torch.ones(ref.shape[0], 1, dtype=dtype, device=ref.device)


def forward_network(model, batch, path, layout=None):
    """Embedding stem -> blocks -> head logit [B].  ``layout`` (a SupernetLayout) turns each
    op's kernel rows into the active sources' rows of the shared supernet kernels; ``None``
    for a standalone network, whose kernels hold exactly its inputs."""
    from common.nas_space import source_widths

    dense_src = [dense_stem(model.embedding.index, batch, model.embedding.weight.dtype)]
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
    feats = torch.cat([dense_src[-1], sparse_src[-1].flatten(1)], 1)
    hrows = layout.head_ranges(last.dense_width, last.sparse_width, last.dense_to_sparse) if layout else None
    return model.head(feats, hrows).squeeze(-1)
