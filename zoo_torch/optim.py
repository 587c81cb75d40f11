"""PyTorch implementation of the optimisers defined in common/optim.py (read the rules there).

    opt = build_optimizer(model, make_optimizer_config("LazyAdam", 1e-3))
    loss.backward(); opt.step(); opt.zero_grad()
    opt.lr = 5e-4                                  # LR decay between steps
    torch.save(opt.state_dict(), path)             # step count, lr, all slots: exact resume

Dense gradients are updated with ``torch._foreach_*`` kernels (one call per
operation for all dense parameters).  Sparse COO gradients (from
``F.embedding(sparse=True)``) are deduplicated (sort + segment sum, see
``_dedup``) and then handled by row index with ``index_select`` /
``index_copy_`` (``index_add_`` on CPU loops row by row): the lazy rules touch
only the touched rows; dense Adam / SGD-with-momentum decay the whole state
once and then fix up the touched rows, which equals the dense rule with
``g = 0`` for untouched rows without materialising a dense gradient.

The optimiser only reads ``p.grad`` of the raw model's parameters, so it works
unchanged when the model is wrapped in DistributedDataParallel / DataParallel
(pass either the wrapper or the raw model).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from common.batching import sort_runs
from common.optim import OptimizerConfig, as_config, make_optimizer_config  # noqa: F401  (re-export)
from common.optim import state_from_arrays, state_to_arrays
from zoo_torch.layers.base import full_table


# The sort of the last looked-up categorical rows, computed by the loader (common.batching.row_plan) and
# published by FeatureEmbedding; _dedup uses it when a gradient's indices are exactly those rows.
_ROW_SORT: list = [None]


def publish_row_sort(rows: torch.Tensor, plan) -> None:
    """Offer ``plan = (uniq, order, starts)`` of ``rows.reshape(-1)`` to every optimiser's dedup."""
    _ROW_SORT[0] = (rows.reshape(-1), *plan) if plan is not None else None


def sort_runs_torch(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`common.batching.sort_runs` on a device tensor: ``(uniq, order, starts)`` of 1-D ``flat``
    (stable sort).  One device-to-host sync (the number of distinct rows)."""
    srt, order = torch.sort(flat, stable=True)
    flag = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
    flag[:1] = True
    torch.ne(srt[1:], srt[:-1], out=flag[1:])
    starts = flag.nonzero().squeeze(1)
    return srt.index_select(0, starts), order, starts


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do ``a`` and ``b`` hold the same values?  The same live memory (both are kept alive by whoever
    compares them, so the memory cannot have been reused) answers without reading it -- on a GPU,
    reading would cost a device-to-host sync; otherwise compare values on the CPU only."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return a.device.type == "cpu" and torch.equal(a, b)


def unwrap(model: nn.Module) -> nn.Module:
    """The raw model under DistributedDataParallel / DataParallel wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


class Optimizer:
    """One optimiser over the named parameters of a zoo model (see common/optim.py for the rules)."""

    def __init__(self, model: nn.Module, cfg: OptimizerConfig):
        self.cfg = as_config(cfg)
        self.lr = float(self.cfg.lr)
        self.t = 0
        raw = unwrap(model)
        self.params: list[tuple[str, nn.Parameter]] = [(n, p) for n, p in raw.named_parameters() if p.requires_grad]
        self.lazy_rows = {n: self.cfg.lazy and bool(getattr(p, "zoo_sparse", False)) for n, p in self.params}
        slots = self.cfg.slot_names()
        self.state: dict[str, dict[str, torch.Tensor]] = {
            n: {s: full_table(p.shape, self.cfg.slot_init(s), like=p) for s in slots}
            for n, p in self.params}
        self._fused = self.cfg.base == "Adam" and hasattr(torch, "_fused_adam_")
        self._step_t = None            # the step count as a float32 tensor on the parameters' device
        self._dedup_cache = None
        self._dense_grad: dict[int, torch.Tensor] = {}   # dense Adam on row-sparse grads: zero buffers
        base = self.cfg.base
        self._dense_fn = {"Adam": self._adam_dense, "Adagrad": self._adagrad_dense, "SGD": self._sgd_dense}[base]
        self._sparse_fn = {"Adam": self._adam_sparse, "Adagrad": self._adagrad_sparse,
                           "SGD": self._sgd_sparse}[base]

    # ----- public API -----------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.t

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad = None if p.grad.is_sparse else p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """Apply one update from the parameters' current ``.grad`` (parameters with ``grad is None`` skip)."""
        self.t += 1
        dense_p, dense_g, dense_s = [], [], []
        for name, p in self.params:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                idx, vals = self._dedup(g)
                if idx.numel():
                    self._sparse_fn(p, self.state[name], idx, vals, self.lazy_rows[name])
            else:
                dense_p.append(p)
                dense_g.append(g)
                dense_s.append(self.state[name])
        if dense_p:
            self._dense_fn(dense_p, dense_g, dense_s)

    def state_dict(self) -> dict:
        """``{"config", "step", "lr", "state": {param name: {slot: tensor}}}`` (tensors by reference)."""
        return {"config": self.cfg.to_dict(), "step": self.t, "lr": self.lr,
                "state": {n: dict(s) for n, s in self.state.items()}}

    def state_arrays(self) -> dict:
        """Flat ``{key: ndarray}`` copy of the state (:func:`common.optim.state_to_arrays`), for checkpoints."""
        sd = self.state_dict()
        sd["state"] = {n: {s: t.detach().cpu().numpy().copy() for s, t in sl.items()} for n, sl in sd["state"].items()}
        return state_to_arrays(sd)

    def load_state_arrays(self, arrays: dict) -> None:
        """Inverse of :meth:`state_arrays` (the current config is kept)."""
        self.load_state_dict(state_from_arrays(arrays, self.state, self.cfg.to_dict()))

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        cfg = as_config(sd["config"])
        if cfg.name != self.cfg.name or cfg.slot_names() != self.cfg.slot_names():
            raise ValueError(f"optimizer state is for {cfg.name}, this optimizer is {self.cfg.name}")
        if set(sd["state"]) != set(self.state):
            missing = sorted(set(self.state) - set(sd["state"]))
            extra = sorted(set(sd["state"]) - set(self.state))
            raise ValueError(f"optimizer state does not match the model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for n, slots in self.state.items():
            for s, t in slots.items():
                src = torch.as_tensor(sd["state"][n][s])
                if tuple(src.shape) != tuple(t.shape):
                    raise ValueError(f"optimizer slot {n}/{s}: shape {tuple(src.shape)} != {tuple(t.shape)}")
                t.copy_(src)
        self.cfg = cfg
        self.t = int(sd["step"])
        self.lr = float(sd["lr"])

    # ----- row-sparse gradients -------------------------------------------------------------
    def _dedup(self, g):
        """(unique sorted row indices, summed row gradients) of a sparse COO gradient.

        Sort once, then sum each run of equal indices with ``embedding_bag``
        (a parallel segment sum; ``coalesce``/``index_add_`` loop row by row on
        CPU).  Tables looked up with the same indices in the same step (e.g. a
        model's linear and embedding tables) share the sort, and when the indices are
        the rows the loader already sorted (:func:`publish_row_sort`) there is no sort.
        """
        idx, vals = g._indices()[0], g._values()
        if g.is_coalesced() or idx.numel() == 0:
            return idx, vals
        known = next((c for c in (self._dedup_cache, _ROW_SORT[0])    # this step's earlier table, the loader's
                      if c is not None and _same_rows(c[0], idx)), None)
        if known is not None:
            _, uniq, order, starts = self._dedup_cache = known
        else:
            if idx.device.type == "cpu":         # numpy's vectorised sort is several times faster here
                uniq, order, starts = (torch.from_numpy(a) for a in sort_runs(idx.numpy()))
            else:
                uniq, order, starts = sort_runs_torch(idx)
            self._dedup_cache = (idx, uniq, order, starts)
        if vals.dim() == 1:
            vals = vals.unsqueeze(1)
        summed = torch.nn.functional.embedding_bag(order, vals, starts, mode="sum")
        return uniq, summed.view((uniq.numel(),) + tuple(g.shape[1:]))

    # ----- Adam ------------------------------------------------------------------------
    def _bias(self):
        c = self.cfg
        bc1 = 1.0 - c.beta1 ** self.t
        bc2 = 1.0 - c.beta2 ** self.t
        return self.lr / bc1, math.sqrt(bc2)

    def _fused_adam(self, ps, gs, ms, vs) -> bool:
        """torch's fused Adam kernel: exactly the common rule (lerp for m, eps after the bias-corrected
        sqrt), one pass per tensor, step t given (not incremented by the kernel).  False if unavailable."""
        if not self._fused:
            return False
        c = self.cfg
        try:
            if self._step_t is None or self._step_t.device != ps[0].device:
                self._step_t = torch.zeros((), dtype=torch.float32, device=ps[0].device)
            self._step_t.fill_(self.t)
            torch._fused_adam_(ps, gs, ms, vs, [], [self._step_t] * len(ps), lr=self.lr, beta1=c.beta1,
                               beta2=c.beta2, weight_decay=0.0, eps=c.eps, amsgrad=False, maximize=False)
            return True
        except (RuntimeError, TypeError, NotImplementedError):   # not in this build / device: foreach
            self._fused = False
            return False

    def _adam_dense(self, ps, gs, ss):
        c = self.cfg
        ms = [s["m"] for s in ss]
        vs = [s["v"] for s in ss]
        if self._fused_adam(ps, gs, ms, vs):
            return
        step_size, sqrt_bc2 = self._bias()
        torch._foreach_lerp_(ms, gs, 1.0 - c.beta1)                 # m = b1 m + (1-b1) g
        torch._foreach_mul_(vs, c.beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - c.beta2)   # v = b2 v + (1-b2) g^2
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, sqrt_bc2)
        torch._foreach_add_(denom, c.eps)                           # sqrt(v / bc2) + eps
        torch._foreach_addcdiv_(ps, ms, denom, value=-step_size)   # p -= lr/bc1 * m / denom

    def _adam_sparse(self, p, s, idx, g, lazy):
        c = self.cfg
        m, v = s["m"], s["v"]
        step_size, sqrt_bc2 = self._bias()
        if lazy:
            p_r, m_r, v_r = p.index_select(0, idx), m.index_select(0, idx), v.index_select(0, idx)
            if not self._fused_adam([p_r], [g.contiguous()], [m_r], [v_r]):
                m_r.lerp_(g, 1.0 - c.beta1)
                v_r.mul_(c.beta2).addcmul_(g, g, value=1.0 - c.beta2)
                p_r.addcdiv_(m_r, v_r.sqrt().div_(sqrt_bc2).add_(c.eps), value=-step_size)
            m.index_copy_(0, idx, m_r)
            v.index_copy_(0, idx, v_r)
            p.index_copy_(0, idx, p_r)
        else:   # dense rule with g = 0 outside the touched rows
            # a persistent all-zero gradient buffer gets the touched rows, then one fused pass
            # over the whole table, then the rows are zeroed again (no 0-fill of the table per step)
            buf = self._dense_grad.get(id(p))
            if buf is None:
                buf = self._dense_grad[id(p)] = full_table(p.shape, 0.0, like=p)
            buf.index_copy_(0, idx, g)
            if not self._fused_adam([p], [buf], [m], [v]):
                m.lerp_(buf, 1.0 - c.beta1)
                v.mul_(c.beta2).addcmul_(buf, buf, value=1.0 - c.beta2)
                p.addcdiv_(m, v.sqrt().div_(sqrt_bc2).add_(c.eps), value=-step_size)
            buf.index_fill_(0, idx, 0.0)

    # ----- Adagrad -----------------------------------------------------------------------
    def _adagrad_dense(self, ps, gs, ss):
        accs = [s["accumulator"] for s in ss]
        torch._foreach_addcmul_(accs, gs, gs)                      # a += g^2
        std = torch._foreach_sqrt(accs)
        torch._foreach_add_(std, self.cfg.eps)
        torch._foreach_addcdiv_(ps, gs, std, value=-self.lr)       # p -= lr g / (sqrt(a) + eps)

    def _adagrad_sparse(self, p, s, idx, g, lazy):
        # lazy or not: a zero gradient changes neither a nor p, so touched rows are all there is
        acc = s["accumulator"]
        a_r = acc.index_select(0, idx).addcmul_(g, g)
        acc.index_copy_(0, idx, a_r)
        p.index_copy_(0, idx, p.index_select(0, idx).addcdiv_(g, a_r.sqrt_().add_(self.cfg.eps), value=-self.lr))

    # ----- SGD ----------------------------------------------------------------------------
    def _sgd_dense(self, ps, gs, ss):
        mom = self.cfg.momentum
        if mom > 0:
            bufs = [s["momentum"] for s in ss]
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, gs)                          # b = mom b + g
            torch._foreach_add_(ps, bufs, alpha=-self.lr)
        else:
            torch._foreach_add_(ps, gs, alpha=-self.lr)

    def _sgd_sparse(self, p, s, idx, g, lazy):
        mom = self.cfg.momentum
        if mom > 0:      # dense semantics: every row's buffer decays
            buf = s["momentum"]
            buf.mul_(mom)
            buf.index_copy_(0, idx, buf.index_select(0, idx).add_(g))
            p.add_(buf, alpha=-self.lr)
        else:
            p.index_copy_(0, idx, p.index_select(0, idx).add_(g, alpha=-self.lr))


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> Optimizer:
    """The optimiser for ``model`` (raw or DDP/DataParallel-wrapped); state is created now."""
    return Optimizer(model, cfg)
