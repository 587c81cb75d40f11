"""AutoLossGen controller: a one-layer LSTM that samples loss DAGs, trained with REINFORCE (PyTorch).

Architecture, decoding order and canonical weight names: :class:`common.autolossgen.ControllerConfig`
(mirror: ``zoo_tf/controller.py``).  LSTM cell (gate order i, f, g, o)::

    [i, f, g, o] = x W_ih + h W_hh + b
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h' = sigmoid(o) * tanh(c')

Sampling draws from the controller's probabilities with a numpy generator
(:func:`common.autolossgen.sample_index`), so for the same weights and generator
state both backends sample the same DAG.  The REINFORCE step computes the
gradient of ``-(1/n) sum_i a_i log pi(dag_i)`` here and applies
:class:`common.autolossgen.NumpyAdam` (betas (0, 0.999), clip-norm 5).
"""
from __future__ import annotations

import numpy as np
import torch

from common.autolossgen import MASK_VALUE, ControllerConfig, NumpyAdam, sample_index
from common.loss_formula import NUM_INPUTS, OPS, LossDAG
from zoo_torch import get_weights, init_weights, set_weights
from zoo_torch.layers.base import Module


class LSTMCell(Module):
    def __init__(self, in_dim: int, hidden: int, init: str):
        super().__init__()
        self.add_param("w_ih", (in_dim, 4 * hidden), init)
        self.add_param("w_hh", (hidden, 4 * hidden), init)
        self.add_param("bias", (4 * hidden,), "zeros", regularize=False)

    def forward(self, x, h, c):
        z = x @ self.w_ih + h @ self.w_hh + self.bias
        i, f, g, o = torch.chunk(z, 4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class Controller(Module):
    def __init__(self, config: ControllerConfig | None = None, **overrides):
        super().__init__()
        cfg = config or ControllerConfig(**overrides)
        self.config = cfg
        H, n_ops, init = cfg.lstm_size, len(cfg.ops), f"uniform:{cfg.init_range}"
        self.lstm = LSTMCell(H, H, init)
        self.add_param("g_emb", (1, H), init)
        self.add_param("input_emb", (NUM_INPUTS, H), init)
        self.add_param("op_emb", (n_ops, H), init)
        self.add_param("w_soft", (H, n_ops), init)
        self.add_param("w_attn1", (H, H), init)
        self.add_param("w_attn2", (H, H), init)
        self.add_param("v_attn", (H, 1), init)
        init_weights(self, cfg.seed)
        self.optimizer = NumpyAdam(cfg.lr, cfg.betas, cfg.adam_eps, cfg.clip_norm)

    # ---------------------------------------------------------------- decoding
    def _choose(self, logits, forced, rng):
        logp = torch.log_softmax(logits, dim=-1)
        probs = torch.exp(logp)
        ent = -(probs * logp).sum()
        idx = int(forced) if forced is not None else sample_index(probs.detach().cpu().numpy(), rng)
        return idx, logp[0, idx], ent

    def _run(self, dag: LossDAG | None = None, rng: np.random.Generator | None = None):
        cfg = self.config
        H, tc = cfg.lstm_size, cfg.tanh_constant
        ops = list(cfg.ops)
        if dag is not None:
            if len(dag.nodes) != cfg.num_nodes:
                raise ValueError(f"DAG has {len(dag.nodes)} operator nodes, the controller {cfg.num_nodes}")
            missing = [op for op, _ in dag.nodes if op not in ops]
            if missing:
                raise ValueError(f"operator(s) {missing} are not in the controller's search space {ops}")
        h = torch.zeros(1, H)
        c = torch.zeros(1, H)
        anchors, anchors_w1 = [], []
        for k in range(NUM_INPUTS):
            h, c = self.lstm(self.input_emb[k:k + 1], h, c)
            anchors.append(h)
            anchors_w1.append(h @ self.w_attn1)
        x = self.g_emb
        log_prob, entropy = torch.zeros(()), torch.zeros(())
        nodes = []
        for j in range(cfg.num_nodes):
            nid = NUM_INPUTS + j
            h, c = self.lstm(x, h, c)
            logits = tc * torch.tanh(h @ self.w_soft)
            forced_op = ops.index(dag.nodes[j][0]) if dag is not None else None
            op_i, lp, ent = self._choose(logits, forced_op, rng)
            log_prob, entropy = log_prob + lp, entropy + ent
            op = ops[op_i]
            h, c = self.lstm(self.op_emb[op_i:op_i + 1], h, c)
            query = torch.tanh(torch.cat(anchors_w1, 0) + h @ self.w_attn2) @ self.v_attn    # [nid, 1]
            att = tc * torch.tanh(query.reshape(1, nid))
            chosen = []
            for slot in range(OPS[op].arity):
                masked = att
                if chosen:
                    mask = torch.zeros(1, nid)
                    mask[0, chosen] = MASK_VALUE
                    masked = att + mask
                forced = dag.nodes[j][1][slot] if dag is not None else None
                if forced is not None and forced in chosen:
                    raise ValueError(f"DAG node {nid}: a binary operator needs two different inputs")
                idx, lp, ent = self._choose(masked, forced, rng)
                log_prob, entropy = log_prob + lp, entropy + ent
                chosen.append(idx)
            nodes.append((op, tuple(chosen)))
            x = torch.stack([anchors[i] for i in chosen], 0).mean(0)
            anchors.append(h)
            anchors_w1.append(h @ self.w_attn1)
        return LossDAG(tuple(nodes)), log_prob, entropy

    def sample(self, rng: np.random.Generator | int | None = None):
        """(LossDAG, log_prob, entropy) of a fresh sample; ``rng``: numpy Generator or seed."""
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        with torch.no_grad():
            dag, lp, ent = self._run(rng=rng)
        return dag, float(lp), float(ent)

    def log_prob(self, dag: LossDAG):
        """Differentiable (log pi(dag), entropy of the decisions along dag) as scalar tensors."""
        _, lp, ent = self._run(dag=dag)
        return lp, ent

    # ---------------------------------------------------------------- REINFORCE
    def gradients(self, dags, advantages):
        """(loss, {name: grad}) of ``-(1/n) sum_i a_i log pi(dag_i)``."""
        params = dict(self.named_parameters())
        loss = torch.zeros(())
        for dag, a in zip(dags, advantages):
            lp, _ = self.log_prob(dag)
            loss = loss - float(a) * lp
        loss = loss / max(len(dags), 1)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        return float(loss.detach()), {k: (g.detach().cpu().numpy() if g is not None else np.zeros(tuple(p.shape), np.float32))
                             for (k, p), g in zip(params.items(), grads)}

    def update(self, dags, advantages) -> dict:
        loss, grads = self.gradients(dags, advantages)
        new, norm = self.optimizer.step(get_weights(self), grads)
        set_weights(self, new)
        return {"loss": loss, "grad_norm": norm}

    # ---------------------------------------------------------------- checkpoints
    def get_weights(self) -> dict:
        return get_weights(self)

    def set_weights(self, weights: dict) -> None:
        set_weights(self, weights)

    def state_arrays(self) -> dict:
        d = {f"w/{k}": v for k, v in get_weights(self).items()}
        d.update(self.optimizer.state_arrays())
        return d

    def load_state_arrays(self, d: dict) -> None:
        set_weights(self, {k[2:]: v for k, v in d.items() if k.startswith("w/")})
        self.optimizer.load_state_arrays(d)
