"""The loss table shared by both backends (definitions only; no torch/tensorflow here).

Every loss takes the model's logits ``z`` and labels ``y`` in {0, 1} and is the
MEAN over the batch.  ``p = sigmoid(z)``; ``softplus(x) = log(1 + e^x)``.

    BCE    mean( softplus(z) - y * z )                      (= -[y log p + (1-y) log(1-p)])
    MSE    mean( (p - y)^2 )
    Hinge  mean( max(0, 1 - s * z) ),  s = 2y - 1
    Focal  mean( -[ y (1-p)^g log p + (1-y) p^g log(1-p) ] ),  g = FOCAL_GAMMA = 2, no alpha;
           computed from z as  y e^{-g softplus(z)} softplus(-z) + (1-y) e^{-g softplus(-z)} softplus(z)
           (log p = -softplus(-z), log(1-p) = -softplus(z)), finite for any z.

Names are case-insensitive; aliases: logloss / log_loss / binary_crossentropy /
cross_entropy -> BCE, squared_error -> MSE.

AutoLossGen formulas are not implemented here: a name ``"formula:<expr>"`` and
the named formulas in :data:`NAMED_FORMULAS` are compiled by
``zoo_<backend>.loss_formula.compile_loss(name)`` (``get_loss`` delegates).
"""
from __future__ import annotations

LOSSES = {
    "BCE": "mean(softplus(z) - y*z)",
    "MSE": "mean((sigmoid(z) - y)^2)",
    "Hinge": "mean(max(0, 1 - (2y-1)*z))",
    "Focal": "mean(-[y(1-p)^2 log p + (1-y) p^2 log(1-p)]), p = sigmoid(z)",
}
ALIASES = {
    "logloss": "BCE", "log_loss": "BCE", "binary_crossentropy": "BCE", "cross_entropy": "BCE",
    "squared_error": "MSE", "focal_loss": "Focal", "hinge_loss": "Hinge",
}
FOCAL_GAMMA = 2.0
FORMULA_PREFIX = "formula:"
NAMED_FORMULAS = ("MaxR", "SumR", "LogMin")


def is_formula_loss(name: str) -> bool:
    """True for names handled by the AutoLossGen formula compiler (``formula:...``, MaxR, SumR, LogMin)."""
    s = str(name).strip()
    return s.lower().startswith(FORMULA_PREFIX) or s.lower() in {n.lower() for n in NAMED_FORMULAS}


def canonical_loss_name(name: str) -> str:
    """``"bce"`` -> ``"BCE"``, ``"maxr"`` -> ``"MaxR"``, ``"formula:<expr>"`` kept (prefix lower-cased).

    Raises ValueError listing the available names for an unknown one.
    """
    s = str(name).strip()
    low = s.lower()
    if low.startswith(FORMULA_PREFIX):
        expr = s[len(FORMULA_PREFIX):].strip()
        if not expr:
            raise ValueError("empty loss formula: use 'formula:<expression>'")
        return FORMULA_PREFIX + expr
    table = {n.lower(): n for n in (*LOSSES, *NAMED_FORMULAS)}
    table.update({a.lower(): c for a, c in ALIASES.items()})
    if low in table:
        return table[low]
    raise ValueError(f"unknown loss {name!r}; available losses: {', '.join((*LOSSES, *NAMED_FORMULAS))} "
                     f"or '{FORMULA_PREFIX}<expression>'")
