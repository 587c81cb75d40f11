"""Optimiser definitions shared by both backends (no torch/tensorflow here).

``zoo_torch.optim.build_optimizer`` and ``zoo_tf.optim.build_optimizer`` both
implement exactly the update rules below -- neither uses the framework's own
optimiser classes (Keras places Adam's epsilon and bias correction
differently from torch, so the two would drift apart).

Notation: ``g`` is the gradient of the step's objective (loss + penalty) for a
parameter ``p``, ``t`` the global step count (1 at the first ``step()``/``apply``),
``lr`` the current learning rate (settable between steps for LR decay).  All
state starts at zero unless stated otherwise.

Adam (``beta1``, ``beta2``, ``eps``; the torch placement of eps and bias correction)::

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g**2
    p = p - lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)

Adagrad (``initial_accumulator``, ``eps``; default eps 1e-10 as in torch)::

    a = a + g**2                                   (a starts at initial_accumulator)
    p = p - lr * g / (sqrt(a) + eps)

SGD (``momentum``; momentum 0 = plain SGD, no state)::

    b = momentum * b + g
    p = p - lr * b                                 (b = g when momentum == 0)

Dense vs lazy semantics for row-sparse (embedding) parameters
--------------------------------------------------------------
A parameter is *sparse* when the model flags it so (torch ``p.zoo_sparse``, TF
``zoo_tf.weight_meta(model)[name]["sparse"]``); its gradient arrives row-sparse
(torch sparse COO from ``F.embedding(sparse=True)``, TF ``tf.IndexedSlices``
from ``tf.gather``).  The *touched rows* of a step are the row indices present
in that sparse gradient (the rows looked up in the batch, padding included);
duplicate indices are summed first.  A dense gradient touches every row.

- ``Adam``, ``Adagrad``, ``SGD``: the rules above for every element of every
  parameter, i.e. untouched rows have ``g = 0``.  For Adam (and SGD with
  momentum) the moments of untouched rows still decay and the rows still move.
  For Adagrad and plain SGD a zero gradient changes nothing, so updating only
  the touched rows is the same computation (that is how it is implemented).
- ``LazyAdam``, ``LazyAdagrad``: for sparse parameters only the touched rows
  are updated (their moments and the rows themselves; ``g`` = the summed row
  gradient; Adam's bias correction uses the global step ``t``); untouched rows
  and their moments stay bit-identical.  Dense parameters get the dense rule.
  ``LazyAdagrad`` therefore computes the same as ``Adagrad``.

A parameter whose gradient is ``None`` (not connected to the loss) is skipped
entirely in a step: neither it nor its state changes (``t`` still counts).

L2 regularisation is not an optimiser option: it is the model's ``penalty``
term, added to the loss by the train step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

OPTIMIZERS = ("Adam", "Adagrad", "SGD", "LazyAdam", "LazyAdagrad")
LAZY = {"LazyAdam": "Adam", "LazyAdagrad": "Adagrad"}        # lazy name -> its base rule
DEFAULT_EPS = {"Adam": 1e-8, "Adagrad": 1e-10, "SGD": 0.0}


def canonical_optimizer_name(name: str) -> str:
    """``"lazyadam"`` -> ``"LazyAdam"``; ValueError listing the names for unknown ones."""
    low = {n.lower(): n for n in OPTIMIZERS}
    key = str(name).strip().lower().replace("_", "").replace("-", "")
    if key not in low:
        raise ValueError(f"unknown optimizer {name!r}; available optimizers: {', '.join(OPTIMIZERS)}")
    return low[key]


@dataclass
class OptimizerConfig:
    """One optimiser's hyper-parameters; see the module docstring for the update rules.

    ``eps=None`` means the rule's default (Adam 1e-8, Adagrad 1e-10).
    """
    name: str
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float | None = None
    initial_accumulator: float = 0.0     # Adagrad
    momentum: float = 0.0                # SGD

    def __post_init__(self):
        self.name = canonical_optimizer_name(self.name)
        self.lr = float(self.lr)
        if self.eps is None:
            self.eps = DEFAULT_EPS[self.base]
        self.eps = float(self.eps)
        if not self.lr >= 0:
            raise ValueError(f"optimizer lr must be >= 0, got {self.lr}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"Adam betas must be in [0, 1), got beta1={self.beta1}, beta2={self.beta2}")
        if self.eps < 0 or self.initial_accumulator < 0 or self.momentum < 0:
            raise ValueError("optimizer eps, initial_accumulator and momentum must be >= 0")
        if self.base == "Adagrad" and self.eps == 0 and self.initial_accumulator == 0:
            raise ValueError("Adagrad needs eps > 0 or initial_accumulator > 0 (else 0/0 at untouched rows)")

    @property
    def base(self) -> str:
        """The rule: "Adam", "Adagrad" or "SGD"."""
        return LAZY.get(self.name, self.name)

    @property
    def lazy(self) -> bool:
        return self.name in LAZY

    def slot_names(self) -> tuple[str, ...]:
        """Per-parameter state tensors (same shape as the parameter), in both backends."""
        if self.base == "Adam":
            return ("m", "v")
        if self.base == "Adagrad":
            return ("accumulator",)
        return ("momentum",) if self.momentum > 0 else ()

    def slot_init(self, slot: str) -> float:
        return float(self.initial_accumulator) if slot == "accumulator" else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_optimizer_config(name: str, lr: float, **kw) -> OptimizerConfig:
    """``make_optimizer_config("adam", 1e-3, beta2=0.99)``; unknown names/options raise ValueError."""
    known = {f.name for f in dataclasses.fields(OptimizerConfig)} - {"name", "lr"}
    bad = sorted(set(kw) - known)
    if bad:
        raise ValueError(f"unknown optimizer option(s) {', '.join(bad)}; options: {', '.join(sorted(known))}")
    return OptimizerConfig(name=name, lr=lr, **kw)


def as_config(cfg) -> OptimizerConfig:
    """Accept an OptimizerConfig, a dict (``to_dict()`` output) or a bare name with ``lr`` inside a dict."""
    if isinstance(cfg, OptimizerConfig):
        return cfg
    if isinstance(cfg, dict):
        return OptimizerConfig(**cfg)
    raise TypeError(f"expected an OptimizerConfig, got {type(cfg).__name__}")


def state_to_arrays(sd: dict) -> dict:
    """A backend optimiser's ``state_dict()`` (slots as numpy arrays) -> flat ``{key: ndarray}`` for
    checkpoints: ``__step__``, ``__lr__`` and ``<param>/<slot>``."""
    out = {"__step__": np.asarray(sd["step"], np.int64), "__lr__": np.asarray(sd["lr"], np.float64)}
    for pname, slots in sd["state"].items():
        for s, a in slots.items():
            out[f"{pname}/{s}"] = a
    return out


def state_from_arrays(arrays: dict, params, config: dict) -> dict:
    """Inverse of :func:`state_to_arrays`: a ``state_dict`` for ``load_state_dict`` (``params``: the
    optimiser's parameter names; ``config``: the config to keep)."""
    state: dict = {n: {} for n in params}
    for k, v in arrays.items():
        if not k.startswith("__"):
            pname, slot = k.rsplit("/", 1)
            state.setdefault(pname, {})[slot] = v
    return {"config": config, "step": int(arrays["__step__"]), "lr": float(arrays["__lr__"]), "state": state}
