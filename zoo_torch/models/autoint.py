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
"""
from torch import nn

from zoo_torch.layers.attention import MultiHeadSelfAttention
from zoo_torch.layers.base import Dense
from zoo_torch.layers.blocks import MLP
from zoo_torch.layers.embeddings import LinearPart
from zoo_torch.models.base import CTRModel


class AutoInt(CTRModel):
    def __init__(self, schema, config):
        super().__init__(schema, config)
        c = config
        f = schema.num_fields
        dims = [c.embed_size] + [c.num_heads * c.attention_dim] * c.attention_layers
        self.embedding = self.make_embedding()
        self.attention = nn.ModuleList(MultiHeadSelfAttention(a, c.attention_dim, c.num_heads, c.use_residual)
                                       for a in dims[:-1])
        self.out = Dense(f * dims[-1], 1)
        self.dnn = MLP(f * c.embed_size, c.mlp, c.activation, c.dropout, c.batch_norm, out_dim=1) if c.mlp else None
        self.linear = LinearPart(schema) if c.use_wide else None

    def forward(self, batch):
        e = self.embedding(batch)
        x = e
        for layer in self.attention:
            x = layer(x)
        y = self.out(x.flatten(1)).squeeze(-1)
        if self.dnn is not None:
            y = y + self.dnn(e.flatten(1)).squeeze(-1)
        if self.linear is not None:
            y = y + self.linear(batch)
        return y


class AutoIntPlus(AutoInt):
    """AutoInt+ = AutoInt + a DNN over the flattened embeddings, summed into the logit."""

    def __init__(self, schema, config):
        if not config.mlp:
            raise ValueError("AutoIntPlus needs a DNN: set mlp to a non-empty tuple (or use AutoInt)")
        super().__init__(schema, config)
