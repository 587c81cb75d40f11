"""AutoLossGen formulas compiled to differentiable PyTorch functions.

Semantics (operators, the sign-preserving clamp after every operator, epsilon,
tie rules) are defined in :mod:`common.loss_formula`; the TensorFlow mirror is
``zoo_tf/loss_formula.py``.  Every operator is written with the same elementary
operations in both backends and in numpy, so values AND gradients agree.

    fn = compile_formula("max((y+e)/(p+e), (p+e)/(y+e))")   # fn(probs, labels) -> scalar mean
    loss = compile_loss("MaxR")                              # loss(logits, labels) = fn(sigmoid(logits), labels)
"""
from __future__ import annotations

import torch

from common.loss_formula import CLAMP_MAX, CLAMP_MIN, FormulaError, compile_program


def _where(c, a, b):
    return torch.where(c, a, b)


def _clamp(x):
    s = torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x))
    return s * torch.clamp(torch.abs(x), CLAMP_MIN, CLAMP_MAX)


def _op(name, eps):
    sign, absf = torch.sign, torch.abs
    table = {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
        "max": lambda a, b: _where(a >= b, a, b),
        "min": lambda a, b: _where(a <= b, a, b),
        "neg": lambda a: -a,
        "id": lambda a: a,
        "slog": lambda a: sign(a) * torch.log(absf(a) + eps),
        "sq": lambda a: a * a,
        "sinv": lambda a: sign(a) / (absf(a) + eps),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "relu": lambda a: _where(a > 0, a, torch.zeros_like(a)),
        "abs": absf,
        "ssqrt": lambda a: sign(a) * torch.sqrt(absf(a) + eps),
        "exp": torch.exp,
        "log": torch.log,
        "sqrt": torch.sqrt,
        "sign": sign,
    }
    if name not in table:
        raise FormulaError(f"operator {name!r} has no PyTorch implementation")
    return table[name]


def compile_formula(formula, eps: float | None = None):
    """``fn(probs, labels) -> mean loss`` for a formula (string, name, Node, LossDAG, DAG JSON or Formula).

    Computes in the dtype of ``probs`` (float32 in training; float64 works too).
    """
    prog = compile_program(formula, eps)
    steps = [(op, args, v, _op(op, prog.eps) if op not in ("p", "y", "const") else None)
             for op, args, v in prog.instrs]

    def fn(probs, labels):
        labels = labels.to(probs.dtype)
        vals = []
        for op, args, v, f in steps:
            if op == "p":
                out = probs
            elif op == "y":
                out = labels
            elif op == "const":
                out = torch.full_like(probs, v)
            else:
                out = _clamp(f(*(vals[i] for i in args)))
            vals.append(out)
        return vals[-1].mean()

    fn.program = prog
    return fn


def compile_loss(name: str, eps: float | None = None):
    """``loss(logits, labels)`` for ``"formula:<expr>"``, ``"MaxR"``, ``"SumR"``, ``"LogMin"`` (p = sigmoid(logits))."""
    f = compile_formula(name, eps)

    def loss(logits, labels):
        return f(torch.sigmoid(logits), labels)

    loss.program = f.program
    loss.formula_name = name
    return loss
