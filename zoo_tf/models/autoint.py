"""AutoInt and AutoInt+ (Song et al., CIKM 2019): stacked multi-head self-attention over the fields.

    e^(0)_m   = e_m                                              field embeddings [B, F, d]
    alpha^h_{m,k} = exp(<W_Q^h e_m, W_K^h e_k>) / sum_k' exp(<W_Q^h e_m, W_K^h e_k'>)
    e~_m      = [ sum_k alpha^1_{m,k} W_V^1 e_k ; ... ; sum_k alpha^H_{m,k} W_V^H e_k ]
    e^(l)_m   = ReLU( e~_m + W_Res e^(l-1)_m )                   l = 1..``attention_layers``
    y_AutoInt = w^T [e^(L)_1; ...; e^(L)_F] + b                  (output layer over the flattened fields)
    y_AutoInt+ = y_AutoInt + MLP([e_1; ...; e_F])               (DNN over the flattened embeddings)
    y_wide    = y + w_0 + sum_i w[x_i] + sum_j w_j x_j           (``use_wide``: a first-order term)

H = ``num_heads``, d' = ``attention_dim`` per head, ``use_residual`` toggles W_Res.
No first-order (linear) term by default: the paper's output layer is the logistic regression
above, and FuxiCTR's AutoInt leaves its optional wide part off by default too.  ``use_wide=True``
adds one (FuxiCTR's switch; DeepCTR, deepctr-torch and torchfm always have it).
AutoInt builds the DNN branch only when ``mlp`` is non-empty (so AutoInt with ``mlp`` set is
AutoInt+); AutoIntPlus requires it.

Execution (not math) differs from zoo_torch: the attention stack runs on ``attention_chunks``
slices of the batch, each slice through all layers on its own.  The slices are independent, so a
``tf.function`` graph runs them side by side on the inter-op threads, and each slice's
[b, H, F, F] scores stay in cache between the softmax, its gradient and the matmuls around them
(for the whole batch they are 50 MB per layer at batch 4096, 2 heads, 39 fields).  Every sample
goes through the same ops as before, so the result is the same up to float rounding.  Measured on
the 2-core benchmark machine (three layers, batch 4096): forward + backward of the attention stack
15-20 % faster with 8 slices than with one; the whole training step +12 % with 2 heads x 8 and +21 %
with 2 x 32 (4 slices: about as fast as 8; 16: slower).  zoo_torch's hand-written backward
gains nothing from slicing (its small ops parallelise badly over the threads).
"""
import tensorflow as tf

from zoo_tf.layers.attention import MultiHeadSelfAttention
from zoo_tf.layers.base import Dense
from zoo_tf.layers.blocks import MLP
from zoo_tf.layers.embeddings import LinearPart
from zoo_tf.models.base import CTRModel


ATTENTION_CHUNKS = 8
MIN_CHUNK_ROWS = 256       # smaller batches are cut into fewer slices (one below 512 rows)


def in_slices(fn, x, n: int):
    """``fn`` applied to ``n`` consecutive slices of ``x``'s rows, concatenated (``fn`` row-wise)."""
    rows = x.shape[0]
    if rows is not None:
        n = max(1, min(n, rows // MIN_CHUNK_ROWS))
    if n <= 1:
        return fn(x)
    b = tf.shape(x)[0]
    size = (b + n - 1) // n
    sizes = tf.clip_by_value(b - tf.range(n) * size, 0, size)
    return tf.concat([fn(part) for part in tf.split(x, sizes, num=n)], 0)


class AutoInt(CTRModel):
    attention_chunks = ATTENTION_CHUNKS

    def __init__(self, schema, config):
        super().__init__(schema, config)
        c = config
        f = schema.num_fields
        dims = [c.embed_size] + [c.num_heads * c.attention_dim] * c.attention_layers
        self.embedding = self.make_embedding()
        self.attention = [MultiHeadSelfAttention(a, c.attention_dim, c.num_heads, c.use_residual)
                          for a in dims[:-1]]
        self.out = Dense(f * dims[-1], 1)
        self.dnn = MLP(f * c.embed_size, c.mlp, c.activation, c.dropout, c.batch_norm, out_dim=1) if c.mlp else None
        self.linear = LinearPart(schema) if c.use_wide else None

    def __call__(self, batch, training=False):
        e = self.embedding(batch)
        x = in_slices(self.attend, e, self.attention_chunks)
        y = tf.squeeze(self.out(tf.reshape(x, [-1, x.shape[1] * x.shape[2]])), -1)
        if self.dnn is not None:
            y = y + tf.squeeze(self.dnn(tf.reshape(e, [-1, e.shape[1] * e.shape[2]]), training=training), -1)
        if self.linear is not None:
            y = y + self.linear(batch)
        return y

    def attend(self, x):
        """[b, F, d] -> [b, F, H d']: the stacked interacting layers."""
        for layer in self.attention:
            x = layer(x)
        return x


class AutoIntPlus(AutoInt):
    """AutoInt+ = AutoInt + a DNN over the flattened embeddings, summed into the logit."""

    def __init__(self, schema, config):
        if not config.mlp:
            raise ValueError("AutoIntPlus needs a DNN: set mlp to a non-empty tuple (or use AutoInt)")
        super().__init__(schema, config)
