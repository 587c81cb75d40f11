"""TensorFlow implementation of the optimisers defined in common/optim.py (read the rules there).

    opt = build_optimizer(model, make_optimizer_config("LazyAdam", 1e-3))   # inside strategy.scope() if any
    opt.apply({name: grad})          # grad: Tensor, tf.IndexedSlices or None; fine inside tf.function
    opt.set_lr(5e-4)                 # opt.lr is a tf.Variable
    opt.variables()                  # [iterations, lr, *slots] for checkpoints (or opt.trackable)

No Keras optimiser is used (Keras places Adam's eps/bias correction differently
from the torch rule that both backends follow).  Dense updates use TF's fused
training kernels with arguments chosen so they compute the common rule exactly:
``ResourceApplyAdam`` is called with ``lr' = lr*sqrt(1-b2^t)/(1-b1^t)``,
``beta_powers = 0`` and ``eps' = eps*sqrt(1-b2^t)``, which is algebraically
``p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)``; ``ResourceApplyAdagradV2``
and ``ResourceApplyMomentum`` are the Adagrad / SGD rules as they stand.

``tf.IndexedSlices`` gradients (from ``tf.gather`` on an embedding table) are
first deduplicated (``tf.unique`` + ``tf.math.unsorted_segment_sum``).  Lazy
rules then gather the touched rows of the moments, update them, and scatter
moments and rows back; dense Adam / SGD-with-momentum densify the gradient
(``g = 0`` on untouched rows); Adagrad and plain SGD update the touched rows
(identical to the dense rule, see common/optim.py).

All state variables are created in ``build_optimizer`` (so a trainer can build
the optimiser inside ``strategy.scope()``), and every update goes through the
variables' resource handles, which in a MirroredStrategy replica context are
the replica's own copies (all replicas apply the same all-reduced gradients).
"""
from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf

from common.optim import OptimizerConfig, as_config, make_optimizer_config  # noqa: F401  (re-export)
from common.optim import state_from_arrays, state_to_arrays
from zoo_tf import trainable_named, weight_meta

_RAW = tf.raw_ops


def _h(v):
    return v.handle


def _gather(v, idx):
    return _RAW.ResourceGather(resource=_h(v), indices=idx, dtype=v.dtype)


def _scatter_sub_unique(v, idx, upd):
    """``v[idx] -= upd`` for UNIQUE ``idx``: gather + ScatterUpdate (ResourceScatterSub is ~5x slower on CPU)."""
    _RAW.ResourceScatterUpdate(resource=_h(v), indices=idx, updates=_gather(v, idx) - upd)


# graph id -> (graph, {rows tensor ref: (uniq, order, seg)}), for the functions being traced
_ROW_PLANS: "collections.OrderedDict" = collections.OrderedDict()


def register_row_plan(rows, uniq, order, seg) -> None:
    """Record, in the function being traced, that ``rows`` [B, C] has the sort ``(uniq, order, seg)``
    (``zoo_tf.data.PLAN_KEYS``): a gather gradient whose indices are ``rows`` is then summed per row
    with it instead of ``tf.unique``.  Outside a ``tf.function`` (eager) there is nothing to record."""
    if tf.executing_eagerly() or not hasattr(rows, "graph"):
        return
    key = id(rows.graph)
    entry = _ROW_PLANS.pop(key, None)
    if entry is None or entry[0] is not rows.graph:
        entry = (rows.graph, {})
    _ROW_PLANS[key] = entry                    # most recent last; only the last few graphs are kept
    while len(_ROW_PLANS) > 16:
        _ROW_PLANS.popitem(last=False)
    entry[1][rows.ref()] = (uniq, order, seg)


def _registered_plan(indices):
    """The registered plan of the forward rows behind a gather gradient's ``indices`` (their reshape), or None."""
    if tf.executing_eagerly() or not hasattr(indices, "op"):
        return None
    entry = _ROW_PLANS.get(id(indices.graph))
    if entry is None or entry[0] is not indices.graph:
        return None
    plans = entry[1]
    op = indices.op
    src = op.inputs[0] if op.type == "Reshape" else indices
    return plans.get(src.ref())


def _dedup(g: tf.IndexedSlices):
    """(unique row indices, summed row gradients) of an IndexedSlices gradient.

    With the loader's plan for these indices (:func:`register_row_plan`) the duplicates are summed
    in sorted order (gather + ``segment_sum``, as zoo_torch's ``embedding_bag``); otherwise
    ``tf.unique`` + ``unsorted_segment_sum``.
    """
    plan = _registered_plan(g.indices)
    if plan is not None:
        uniq, order, seg = plan
        return uniq, tf.math.segment_sum(tf.gather(g.values, order), seg)
    idx, pos = tf.unique(g.indices)
    vals = tf.math.unsorted_segment_sum(g.values, pos, tf.shape(idx)[0])
    return idx, vals


class _State(tf.Module):
    """Checkpointable container of the optimiser's variables (``tf.train.Checkpoint(optimizer=opt.trackable)``)."""

    def __init__(self, iterations, lr, slots):
        super().__init__(name="zoo_optimizer")
        self.iterations = iterations
        self.lr = lr
        self.slots = slots


class Optimizer:
    """One optimiser over ``zoo_tf.trainable_named(model)`` (see common/optim.py for the rules)."""

    def __init__(self, model, cfg: OptimizerConfig):
        self.cfg = c = as_config(cfg)
        named = trainable_named(model)
        meta = weight_meta(model)
        self.names = list(named)
        self._vars = named
        self._lazy_rows = {n: c.lazy and bool(meta[n]["sparse"]) for n in self.names}
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
        self.lr = tf.Variable(c.lr, dtype=tf.float32, trainable=False, name="learning_rate")
        self.slots: dict[str, dict[str, tf.Variable]] = {}
        flat = []
        for n in self.names:
            v = named[n]
            self.slots[n] = {}
            for s in c.slot_names():
                sv = tf.Variable(tf.fill(v.shape, tf.constant(c.slot_init(s), v.dtype)), trainable=False,
                                 name=f"{n.replace('.', '_')}_{s}")
                self.slots[n][s] = sv
                flat.append(sv)
        self.trackable = _State(self.iterations, self.lr, flat)
        self._flat_slots = flat

    # ----- public API -----------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        self.lr.assign(float(lr))

    @property
    def num_steps(self) -> int:
        return int(self.iterations.numpy())

    def variables(self) -> list:
        """``[iterations, lr, *slots]`` (slots in parameter order, then slot order)."""
        return [self.iterations, self.lr, *self._flat_slots]

    def state_dict(self) -> dict:
        """Same layout as zoo_torch's: ``{"config", "step", "lr", "state": {name: {slot: ndarray}}}``."""
        return {"config": self.cfg.to_dict(), "step": int(self.iterations.numpy()), "lr": float(self.lr.numpy()),
                "state": {n: {s: v.numpy().copy() for s, v in sl.items()} for n, sl in self.slots.items()}}

    def state_arrays(self) -> dict:
        """Flat ``{key: ndarray}`` copy of the state (:func:`common.optim.state_to_arrays`), for checkpoints."""
        return state_to_arrays(self.state_dict())

    def load_state_arrays(self, arrays: dict) -> None:
        """Inverse of :meth:`state_arrays` (the current config is kept)."""
        self.load_state_dict(state_from_arrays(arrays, self.slots, self.cfg.to_dict()))

    def load_state_dict(self, sd: dict) -> None:
        cfg = as_config(sd["config"])
        if cfg.name != self.cfg.name or cfg.slot_names() != self.cfg.slot_names():
            raise ValueError(f"optimizer state is for {cfg.name}, this optimizer is {self.cfg.name}")
        if set(sd["state"]) != set(self.slots):
            missing = sorted(set(self.slots) - set(sd["state"]))
            extra = sorted(set(sd["state"]) - set(self.slots))
            raise ValueError(f"optimizer state does not match the model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for n, sl in self.slots.items():
            for s, v in sl.items():
                a = np.asarray(sd["state"][n][s], dtype=np.float32)
                if tuple(a.shape) != tuple(v.shape):
                    raise ValueError(f"optimizer slot {n}/{s}: shape {a.shape} != {tuple(v.shape)}")
                v.assign(a)
        self.cfg = cfg
        self.iterations.assign(int(sd["step"]))
        self.lr.assign(float(sd["lr"]))

    def apply(self, grads: dict) -> None:
        """One update; ``grads`` maps parameter names to Tensor / IndexedSlices / None (skipped)."""
        c = self.cfg
        _RAW.AssignAddVariableOp(resource=_h(self.iterations), value=tf.constant(1, tf.int64))
        t = tf.cast(_RAW.ReadVariableOp(resource=_h(self.iterations), dtype=tf.int64), tf.float64)
        lr64 = tf.cast(_RAW.ReadVariableOp(resource=_h(self.lr), dtype=tf.float32), tf.float64)
        f32 = lambda x: tf.cast(x, tf.float32)  # noqa: E731
        ctx = {"lr": f32(lr64)}
        if c.base == "Adam":
            bc1 = 1.0 - tf.pow(tf.constant(c.beta1, tf.float64), t)
            sqrt_bc2 = tf.sqrt(1.0 - tf.pow(tf.constant(c.beta2, tf.float64), t))
            ctx.update(step_size=f32(lr64 / bc1), sqrt_bc2=f32(sqrt_bc2),
                       alpha=f32(lr64 * sqrt_bc2 / bc1), eps_t=f32(c.eps * sqrt_bc2))
        for n in self.names:
            g = grads.get(n)
            if g is None:
                continue
            v = self._vars[n]
            if isinstance(g, tf.IndexedSlices):
                if self._lazy_rows[n] or c.base == "Adagrad" or (c.base == "SGD" and c.momentum == 0):
                    idx, vals = _dedup(g)
                    self._rows(v, self.slots[n], idx, vals, ctx)
                    continue
                g = tf.math.unsorted_segment_sum(g.values, g.indices, v.shape[0])
            self._dense(v, self.slots[n], tf.convert_to_tensor(g), ctx)

    # ----- rules -------------------------------------------------------------------------
    def _dense(self, v, sl, g, ctx):
        c = self.cfg
        if c.base == "Adam":
            _RAW.ResourceApplyAdam(var=_h(v), m=_h(sl["m"]), v=_h(sl["v"]), beta1_power=tf.constant(0.0),
                                   beta2_power=tf.constant(0.0), lr=ctx["alpha"], beta1=tf.constant(c.beta1),
                                   beta2=tf.constant(c.beta2), epsilon=ctx["eps_t"], grad=g)
        elif c.base == "Adagrad":
            _RAW.ResourceApplyAdagradV2(var=_h(v), accum=_h(sl["accumulator"]), lr=ctx["lr"],
                                        epsilon=tf.constant(c.eps), grad=g)
        elif c.momentum > 0:
            _RAW.ResourceApplyMomentum(var=_h(v), accum=_h(sl["momentum"]), lr=ctx["lr"], grad=g,
                                       momentum=tf.constant(c.momentum))
        else:
            _RAW.ResourceApplyGradientDescent(var=_h(v), alpha=ctx["lr"], delta=g)

    def _rows(self, v, sl, idx, g, ctx):
        """Update only rows ``idx`` (unique) with their summed gradients ``g``."""
        c = self.cfg
        if c.base == "Adam":
            m_r = _gather(sl["m"], idx) * c.beta1 + g * (1.0 - c.beta1)
            v_r = _gather(sl["v"], idx) * c.beta2 + g * g * (1.0 - c.beta2)
            _RAW.ResourceScatterUpdate(resource=_h(sl["m"]), indices=idx, updates=m_r)
            _RAW.ResourceScatterUpdate(resource=_h(sl["v"]), indices=idx, updates=v_r)
            upd = ctx["step_size"] * (m_r / (tf.sqrt(v_r) / ctx["sqrt_bc2"] + c.eps))
            _scatter_sub_unique(v, idx, upd)
        elif c.base == "Adagrad":
            _RAW.ResourceSparseApplyAdagradV2(var=_h(v), accum=_h(sl["accumulator"]), lr=ctx["lr"],
                                              epsilon=tf.constant(c.eps), grad=g, indices=idx)
        else:   # plain SGD (momentum densifies before getting here)
            _scatter_sub_unique(v, idx, ctx["lr"] * g)


def build_optimizer(model, cfg: OptimizerConfig) -> Optimizer:
    """The optimiser for ``model``; all slot variables are created here."""
    return Optimizer(model, cfg)
