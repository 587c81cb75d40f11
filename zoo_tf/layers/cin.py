"""Compressed Interaction Network (xDeepFM, Lian et al., KDD 2018).

Mirror of ``zoo_torch/layers/cin.py`` (see there for the details):

    X^k_{h,*} = sum_{i=1..H_{k-1}} sum_{j=1..m} W^{k,h}_{ij} (X^{k-1}_{i,*} o X^0_{j,*}) + b^{k,h}
    output    = [p^1; ...; p^T],  p^k_h = sum_d X^k_{h,d}     (split_half: half the maps are pooled)

W^k = ``layers.{k-1}.kernel`` [H_{k-1} m, H_k] (input channel c = i*m + j), computed channels-last
over the N = B D rows.  As in zoo_torch, ``_cin_map`` builds the outer product Z [N, H_{k-1} m]
(~1 GB at batch 4096) only chunk by chunk (a ``tf.while_loop`` over ~8 MB blocks of rows) and its
``tf.custom_gradient`` recomputes each block for dW instead of keeping Z: same speed as
TensorFlow's own gradient of the whole-Z formula, a fraction of its memory.
"""
from __future__ import annotations

import tensorflow as tf

from zoo_tf.layers.base import Dense, Module


class CIN(Module):
    """[B, m, D] field embeddings -> [B, out_dim] sum-pooled CIN feature maps."""

    def __init__(self, num_fields: int, layer_sizes=(200, 200, 200), split_half: bool = True):
        super().__init__()
        self.layer_sizes = [int(h) for h in layer_sizes]
        if not self.layer_sizes:
            raise ValueError("CIN needs at least one layer")
        self.split_half = split_half
        self.layers = []
        self.next_maps, self.pool_from, self.out_dim = [], [], 0
        prev = num_fields
        for k, h in enumerate(self.layer_sizes):
            self.layers.append(Dense(prev * num_fields, h))
            split = split_half and k < len(self.layer_sizes) - 1
            if split and h < 2:
                raise ValueError(f"CIN layer {k} has {h} feature map(s): too few to split in half")
            prev = h // 2 if split else h                            # maps [0, prev) feed layer k+1
            self.next_maps.append(prev)
            self.pool_from.append(prev if split else 0)              # maps [pool_from, h) are pooled
            self.out_dim += h - self.pool_from[-1]

    def __call__(self, e, training=False):
        d, m = e.shape[2], e.shape[1]
        x0 = tf.reshape(tf.transpose(e, [0, 2, 1]), [-1, m])          # [B D, m] rows n = (b, d)
        x, pooled = x0, []
        for k, layer in enumerate(self.layers):
            xk = _cin_map(x, x0, layer.kernel, layer.bias)           # [B D, H_k]
            h = xk.shape[1]
            pooled.append(tf.reduce_sum(tf.reshape(xk, [-1, d, h])[..., self.pool_from[k]:], 1))
            x = xk[:, :self.next_maps[k]]
        return tf.concat(pooled, -1)


CHUNK_BYTES = 8 << 20


def _chunk_rows(h: int, m: int) -> int:
    """Rows per chunk of ``_cin_map``: an outer-product block of about ``CHUNK_BYTES`` (float32)."""
    return max(1, CHUNK_BYTES // (h * m * 4))


def _rows_array(dtype, width: int):
    """A TensorArray of [rows, width] chunks (concat() of none is [0, width])."""
    return tf.TensorArray(dtype, size=0, dynamic_size=True, infer_shape=False,
                          element_shape=tf.TensorShape([None, width]))


def _cin_map(x, x0, kernel, bias):
    """One CIN layer over N rows, ``(x (x) x0) @ kernel + bias`` ([N, h], [N, m] -> [N, H_k]), in chunks
    of rows; the gradient recomputes each chunk's block of the outer product (see the module doc):
    dW = sum_chunks Z_c^T dY_c, dx_i = sum_j dZ_ij x0_j, dx0_j = sum_i dZ_ij x_i with dZ = dY W^T."""
    h, m = x.shape[1], x0.shape[1]
    step = _chunk_rows(h, m)

    def loop(n, body, state):
        k = tf.maximum((n + step - 1) // step, 1)            # >= 1 chunk: an empty batch gives [0, width]
        return tf.while_loop(lambda i, *_: i < k, body, [tf.constant(0), *state], parallel_iterations=1)

    def rows(n, i):
        return i * step, tf.minimum((i + 1) * step, n)

    @tf.custom_gradient
    def cin_map(x, x0, kernel, bias):
        n = tf.shape(x)[0]

        def forward(i, out):
            s, t = rows(n, i)
            xc, x0c = x[s:t], x0[s:t]
            z = tf.reshape(xc[:, :, None] * x0c[:, None, :], [-1, h * m])           # c = i*m + j
            return i + 1, out.write(i, tf.matmul(z, kernel) + bias)

        _, out = loop(n, forward, [_rows_array(x.dtype, kernel.shape[1])])
        y = tf.reshape(out.concat(), [-1, kernel.shape[1]])

        def grad(gy):
            def backward(i, gk, gx, gx0):
                s, t = rows(n, i)
                xc, x0c, gyc = x[s:t], x0[s:t], gy[s:t]
                z = tf.reshape(xc[:, :, None] * x0c[:, None, :], [-1, h * m])
                gz = tf.reshape(tf.matmul(gyc, kernel, transpose_b=True), [-1, h, m])
                return (i + 1, gk + tf.matmul(z, gyc, transpose_a=True),
                        gx.write(i, tf.linalg.matvec(gz, x0c)), gx0.write(i, tf.linalg.matvec(gz, xc, transpose_a=True)))

            _, gk, gx, gx0 = loop(n, backward, [tf.zeros_like(kernel), _rows_array(x.dtype, h), _rows_array(x.dtype, m)])
            return (tf.reshape(gx.concat(), [-1, h]), tf.reshape(gx0.concat(), [-1, m]), gk, tf.reduce_sum(gy, 0))

        return y, grad

    return cin_map(x, x0, kernel, bias)
