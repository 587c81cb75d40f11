"""AutoLossGen formulas compiled to differentiable TensorFlow functions (mirror of zoo_torch/loss_formula.py).

Semantics are defined in :mod:`common.loss_formula`.  The returned functions use
only TF ops, so they can be called inside ``tf.function``.

    fn = compile_formula("max((y+e)/(p+e), (p+e)/(y+e))")   # fn(probs, labels) -> scalar mean
    loss = compile_loss("MaxR")                              # loss(logits, labels) = fn(sigmoid(logits), labels)
"""
from __future__ import annotations

import tensorflow as tf

from common.loss_formula import CLAMP_MAX, CLAMP_MIN, FormulaError, compile_program


def _where(c, a, b):
    return tf.where(c, a, b)


def _clamp(x):
    s = tf.where(x < 0, -tf.ones_like(x), tf.ones_like(x))
    return s * tf.clip_by_value(tf.abs(x), CLAMP_MIN, CLAMP_MAX)


def _op(name, eps):
    sign, absf = tf.sign, tf.abs
    table = {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
        "max": lambda a, b: _where(a >= b, a, b),
        "min": lambda a, b: _where(a <= b, a, b),
        "neg": lambda a: -a,
        "id": lambda a: a,
        "slog": lambda a: sign(a) * tf.math.log(absf(a) + eps),
        "sq": lambda a: a * a,
        "sinv": lambda a: sign(a) / (absf(a) + eps),
        "sigmoid": tf.sigmoid,
        "tanh": tf.tanh,
        "relu": lambda a: _where(a > 0, a, tf.zeros_like(a)),
        "abs": absf,
        "ssqrt": lambda a: sign(a) * tf.sqrt(absf(a) + eps),
        "exp": tf.exp,
        "log": tf.math.log,
        "sqrt": tf.sqrt,
        "sign": sign,
    }
    if name not in table:
        raise FormulaError(f"operator {name!r} has no TensorFlow implementation")
    return table[name]


def compile_formula(formula, eps: float | None = None):
    """``fn(probs, labels) -> mean loss`` for a formula (string, name, Node, LossDAG, DAG JSON or Formula).

    Computes in the dtype of ``probs`` (float32 in training; float64 works too).
    """
    prog = compile_program(formula, eps)
    steps = [(op, args, v, _op(op, prog.eps) if op not in ("p", "y", "const") else None)
             for op, args, v in prog.instrs]

    def fn(probs, labels):
        probs = tf.convert_to_tensor(probs)
        labels = tf.cast(labels, probs.dtype)
        vals = []
        for op, args, v, f in steps:
            if op == "p":
                out = probs
            elif op == "y":
                out = labels
            elif op == "const":
                out = tf.fill(tf.shape(probs), tf.constant(v, probs.dtype))
            else:
                out = _clamp(f(*(vals[i] for i in args)))
            vals.append(out)
        return tf.reduce_mean(vals[-1])

    fn.program = prog
    return fn


def compile_loss(name: str, eps: float | None = None):
    """``loss(logits, labels)`` for ``"formula:<expr>"``, ``"MaxR"``, ``"SumR"``, ``"LogMin"`` (p = sigmoid(logits))."""
    f = compile_formula(name, eps)

    def loss(logits, labels):
        return f(tf.sigmoid(logits), labels)

    loss.program = f.program
    loss.formula_name = name
    return loss
