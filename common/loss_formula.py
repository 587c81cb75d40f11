"""AutoLossGen loss formulas (Li et al., SIGIR'22, arXiv 2204.13160): representation, parser, numpy autodiff.

Backend-free (numpy only).  The same formula compiles to PyTorch
(``zoo_torch.loss_formula``) and TensorFlow (``zoo_tf.loss_formula``) with
identical semantics, defined here.

Three representations
---------------------
* :class:`LossDAG` -- what the controller searches.  Nodes 0, 1, 2 are the fixed
  inputs: the prediction ``p`` (a probability), the label ``y`` and the constant
  ``1``.  Node ``k >= 3`` applies one operator of :data:`OPS` to earlier nodes;
  the loss is the batch mean of the LAST node.  JSON form (:meth:`LossDAG.to_json`)::

      {"nodes": [["add", [0, 1]], ["sinv", [3]], ...]}      # node 3, node 4, ...

* :class:`Node` -- an expression tree (what the string syntax parses to and what
  all evaluators run, after common-subexpression elimination into a :class:`Program`).
* the string syntax (:func:`parse` / :func:`to_string`), e.g.
  ``max((y+e)/(p+e), (p+e)/(y+e))``:

  ============================  ==============================================
  ``p``  (``pred``)             the predicted probability
  ``y``  (``label``)            the label
  ``e``  (``eps``)              the formula's epsilon (default :data:`EPS`)
  ``1``, ``0.5``, ``1e-3``      numeric constants
  ``a + b``, ``a - b``          exact sum / difference
  ``a * b``, ``a / b``          exact product / quotient (no epsilon added)
  ``-a``  (``neg(a)``)          negation
  ``max(a, b)``, ``min(a, b)``  ties go to the FIRST argument (also its gradient)
  ``log sqrt exp abs sq``       exact ``log(a)``, ``sqrt(a)``, ``exp(a)``, ``|a|``, ``a^2``
  ``sigmoid tanh relu sign``    as usual (``sign(0) = 0``; ``relu'(0) = 0``)
  ``slog(a)``                   protected log:  ``sign(a) * log(|a| + e)``
  ``sinv(a)``                   protected inverse:  ``sign(a) / (|a| + e)``
  ``ssqrt(a)``                  protected root:  ``sign(a) * sqrt(|a| + e)``
  ``clamp(a)`` (``id(a)``)      the identity operator (i.e. just the clamp below)
  ============================  ==============================================

  Precedence: unary minus > ``* /`` > ``+ -``; binary operators are
  left-associative, so ``a + b + c`` is ``(a + b) + c``.

Clamping (one rule for every formula, searched or hand-written)
---------------------------------------------------------------
The output of EVERY operator application (every non-leaf tree node, every DAG
node >= 3) is passed through the sign-preserving magnitude clamp

    C(x) = s(x) * min(max(|x|, 1e-5), 1e5),      s(x) = -1 if x < 0 else +1

so ``|C(x)|`` is in ``[1e-5, 1e5]``, the sign is kept, and ``C(0) = C(-0.0) = +1e-5``.
Its derivative is 1 where ``1e-5 <= |x| <= 1e5`` (boundaries included) and 0
elsewhere (also at x = 0).  Leaves (``p``, ``y``, ``e``, constants) are not
clamped.  This generalises the paper's code, which clamps every node to
``[1e-5, 1e5]`` and thereby maps every negative value to ``+1e-5`` (so ``neg``
and negative logs were dead ends there); here negative values survive.  ``C`` is
idempotent, so an identity applied to an operator's output is a no-op -- the
printer drops it (and a few other exact no-ops, see :meth:`LossDAG.to_expr`).

Epsilon
-------
:data:`EPS` = 1e-6: the ``epsilon`` of the paper's ``LossFormula`` (protected
operators), the threshold of its validity check, and the ``--smooth_coef 1e-6``
of its README's effectiveness-test command.  (The code's default
``smooth_coef`` for the hand-coded MaxR/SumR/LogMin is 0.1; pass ``eps=0.1`` to
reproduce that variant.)  The named formulas :data:`NAMED_FORMULAS` use ``e``.

Evaluation and gradient in numpy
--------------------------------
:func:`compile_program` turns a tree into a straight-line :class:`Program`
(common subexpressions shared); :meth:`Program.forward` evaluates it and
:meth:`Program.value_and_grad` runs reverse-mode autodiff over it, giving the
per-example loss ``l_i`` and ``dl_i/dp_i`` analytically (no finite differences).
Ties of ``max``/``min`` and the clamp boundaries use exactly the same rules as
the backend compilers, so all three agree.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from common.errors import UserError

EPS = 1e-6
CLAMP_MIN = 1e-5
CLAMP_MAX = 1e5
NUM_INPUTS = 3                       # DAG nodes 0, 1, 2 = p, y, 1
INPUT_NAMES = ("p", "y", "1")
DEFAULT_NUM_NODES = 10               # L operator nodes after the inputs

# The paper's losses (Table 2/3) and the usual baselines written in the formula syntax.
NAMED_FORMULAS = {
    "MaxR": "max((y + e) / (p + e), (p + e) / (y + e))",
    "SumR": "(y + p + e) / (e + p * y)",
    "LogMin": "log(1 / (min(y, p) + e) + e) * (min(y, p) + y + p)",
}
REFERENCE_FORMULAS = {
    "BCE": "-(y * log(p + e) + (1 - y) * log(1 - p + e))",
    "MSE": "sq(p - y)",
    "Focal": "-(y * sq(1 - p) * log(p + e) + (1 - y) * sq(p) * log(1 - p + e))",
}


class FormulaError(UserError, ValueError):
    """A malformed formula / DAG (one-line message; also a ValueError)."""


# --------------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------------
def _sign(a):
    return np.sign(a)


@dataclass(frozen=True)
class OpSpec:
    """One operator: numpy forward ``fn(*args, eps)`` and local partials ``grad(*args, out, eps)``."""
    name: str
    arity: int
    fn: Callable
    grad: Callable                 # -> tuple of d out / d arg_k (same shape as args)
    searchable: bool = False       # part of the controller's vocabulary
    enabled: bool = False          # in the default search space
    doc: str = ""


def _ops() -> dict[str, OpSpec]:
    one = lambda a: np.ones_like(a)  # noqa: E731
    table = [
        # searchable, in the paper's operator order; the first nine are its default space
        OpSpec("add", 2, lambda a, b, e: a + b, lambda a, b, o, e: (one(a), one(b)), True, True, "a + b"),
        OpSpec("mul", 2, lambda a, b, e: a * b, lambda a, b, o, e: (b, a), True, True, "a * b"),
        OpSpec("max", 2, lambda a, b, e: np.where(a >= b, a, b),
               lambda a, b, o, e: ((a >= b).astype(a.dtype), (~(a >= b)).astype(a.dtype)), True, True,
               "max(a, b), ties -> a"),
        OpSpec("min", 2, lambda a, b, e: np.where(a <= b, a, b),
               lambda a, b, o, e: ((a <= b).astype(a.dtype), (~(a <= b)).astype(a.dtype)), True, True,
               "min(a, b), ties -> a"),
        OpSpec("neg", 1, lambda a, e: -a, lambda a, o, e: (-one(a),), True, True, "-a"),
        OpSpec("id", 1, lambda a, e: a, lambda a, o, e: (one(a),), True, True, "a (clamped)"),
        OpSpec("slog", 1, lambda a, e: _sign(a) * np.log(np.abs(a) + e),
               lambda a, o, e: (_sign(a) * _sign(a) / (np.abs(a) + e),), True, True, "sign(a) log(|a| + eps)"),
        OpSpec("sq", 1, lambda a, e: a * a, lambda a, o, e: (2 * a,), True, True, "a^2"),
        OpSpec("sinv", 1, lambda a, e: _sign(a) / (np.abs(a) + e),
               lambda a, o, e: (-(_sign(a) * _sign(a)) / ((np.abs(a) + e) * (np.abs(a) + e)),), True, True,
               "sign(a) / (|a| + eps)"),
        OpSpec("sigmoid", 1, lambda a, e: 1 / (1 + np.exp(-a)), lambda a, o, e: (o * (1 - o),), True, False,
               "1 / (1 + exp(-a))"),
        OpSpec("tanh", 1, lambda a, e: np.tanh(a), lambda a, o, e: (1 - o * o,), True, False, "tanh(a)"),
        OpSpec("relu", 1, lambda a, e: np.where(a > 0, a, np.zeros_like(a)), lambda a, o, e: ((a > 0).astype(a.dtype),),
               True, False, "max(a, 0)"),
        OpSpec("abs", 1, lambda a, e: np.abs(a), lambda a, o, e: (_sign(a),), True, False, "|a|"),
        OpSpec("ssqrt", 1, lambda a, e: _sign(a) * np.sqrt(np.abs(a) + e),
               lambda a, o, e: (_sign(a) * _sign(a) / (2 * np.sqrt(np.abs(a) + e)),), True, False,
               "sign(a) sqrt(|a| + eps)"),
        OpSpec("exp", 1, lambda a, e: np.exp(a), lambda a, o, e: (np.exp(a),), True, False, "exp(a)"),
        # string-syntax only (never sampled)
        OpSpec("sub", 2, lambda a, b, e: a - b, lambda a, b, o, e: (one(a), -one(b)), doc="a - b"),
        OpSpec("div", 2, lambda a, b, e: a / b, lambda a, b, o, e: (1 / b, -a / (b * b)), doc="a / b"),
        OpSpec("log", 1, lambda a, e: np.log(a), lambda a, o, e: (1 / a,), doc="log(a)"),
        OpSpec("sqrt", 1, lambda a, e: np.sqrt(a), lambda a, o, e: (0.5 / np.sqrt(a),), doc="sqrt(a)"),
        OpSpec("sign", 1, lambda a, e: _sign(a), lambda a, o, e: (0 * a,), doc="sign(a)"),
    ]
    return {s.name: s for s in table}


OPS: dict[str, OpSpec] = _ops()
SEARCH_OPS: tuple[str, ...] = tuple(n for n, s in OPS.items() if s.searchable)
DEFAULT_SEARCH_OPS: tuple[str, ...] = tuple(n for n, s in OPS.items() if s.enabled)
LEAVES = ("p", "y", "e", "const")

# string-syntax function names -> op
FUNCTIONS = {
    "max": "max", "min": "min", "neg": "neg", "id": "id", "clamp": "id", "slog": "slog", "sq": "sq",
    "sinv": "sinv", "sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "abs": "abs", "ssqrt": "ssqrt",
    "exp": "exp", "log": "log", "sqrt": "sqrt", "sign": "sign",
}
VARIABLES = {"p": "p", "pred": "p", "y": "y", "label": "y", "e": "e", "eps": "e"}
_PRINT_NAME = {"id": "clamp"}


def clamp_np(x):
    """The node clamp C(x) (see module docstring)."""
    s = np.where(x < 0, -1.0, 1.0).astype(x.dtype)
    return s * np.clip(np.abs(x), CLAMP_MIN, CLAMP_MAX)


def clamp_grad_np(x):
    a = np.abs(x)
    return ((a >= CLAMP_MIN) & (a <= CLAMP_MAX)).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Expression trees
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """Expression-tree node: a leaf (``p``, ``y``, ``e``, ``const`` with ``value``) or an operator of OPS."""
    op: str
    args: tuple = ()
    value: float | None = None

    @property
    def is_leaf(self) -> bool:
        return self.op in LEAVES

    def __str__(self) -> str:
        return to_string(self)

    def walk(self):
        yield self
        for a in self.args:
            yield from a.walk()

    def uses(self, leaf: str) -> bool:
        return any(n.op == leaf for n in self.walk())

    def size(self) -> int:
        return sum(1 for _ in self.walk())


P, Y, E, ONE = Node("p"), Node("y"), Node("e"), Node("const", value=1.0)


def const(v: float) -> Node:
    return Node("const", value=float(v))


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------
_INFIX = {"add": ("+", 1), "sub": ("-", 1), "mul": ("*", 2), "div": ("/", 2)}


def _num(v: float) -> str:
    if math.isfinite(v) and float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _fmt(n: Node) -> tuple[str, int]:
    """(text, precedence): 1 = sum, 2 = product, 3 = unary minus, 4 = atom / call."""
    if n.op == "p" or n.op == "y" or n.op == "e":
        return n.op, 4
    if n.op == "const":
        s = _num(n.value)
        return (s, 4) if n.value >= 0 else (f"({s})", 4)
    if n.op in _INFIX:
        sym, prec = _INFIX[n.op]
        (ls, lp), (rs, rp) = _fmt(n.args[0]), _fmt(n.args[1])
        if lp < prec:
            ls = f"({ls})"
        if rp <= prec:                    # left-associative: a + (b + c) keeps its parentheses
            rs = f"({rs})"
        return f"{ls} {sym} {rs}", prec
    if n.op == "neg":
        s, pr = _fmt(n.args[0])
        return (f"-{s}" if pr == 4 else f"-({s})"), 3
    name = _PRINT_NAME.get(n.op, n.op)
    return f"{name}({', '.join(_fmt(a)[0] for a in n.args)})", 4


def to_string(n: Node) -> str:
    """The formula in the string syntax; ``parse(to_string(t)) == t`` for every tree ``t``."""
    return _fmt(n)[0]


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<id>[A-Za-z_][A-Za-z_0-9]*)"
                    r"|(?P<op>\*\*|[-+*/(),^]))")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks: list[tuple[str, str, int]] = []
        pos = 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                self.fail(f"unexpected character {text[pos]!r}", pos)
            kind = m.lastgroup
            self.toks.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()
        self.i = 0

    def fail(self, msg: str, pos: int | None = None):
        if pos is None:
            pos = self.toks[self.i][2] if self.i < len(self.toks) else len(self.text)
        raise FormulaError(f"formula {self.text!r}: {msg} at column {pos + 1}")

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None, len(self.text))

    def take(self, value: str | None = None):
        tok = self.peek()
        if value is not None and tok[1] != value:
            self.fail(f"expected {value!r}" + (f", found {tok[1]!r}" if tok[1] is not None else ", found the end"))
        self.i += 1
        return tok

    def parse(self) -> Node:
        if not self.toks:
            self.fail("empty formula", 0)
        n = self.expr()
        if self.i < len(self.toks):
            self.fail(f"unexpected {self.peek()[1]!r}")
        return n

    def expr(self) -> Node:
        n = self.term()
        while self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            n = Node("add" if op == "+" else "sub", (n, self.term()))
        return n

    def term(self) -> Node:
        n = self.unary()
        while self.peek()[1] in ("*", "/"):
            op = self.take()[1]
            n = Node("mul" if op == "*" else "div", (n, self.unary()))
        return n

    def unary(self) -> Node:
        if self.peek()[1] == "-":
            self.take()
            return Node("neg", (self.unary(),))
        if self.peek()[1] == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self) -> Node:
        n = self.primary()
        if self.peek()[1] in ("^", "**"):           # only x^2 (= sq) is supported
            tok = self.take()
            nt = self.peek()
            if nt[0] != "num" or float(nt[1]) != 2.0:
                self.fail("only the exponent 2 is supported (x^2 = sq(x))", tok[2])
            self.take()
            n = Node("sq", (n,))
        return n

    def primary(self) -> Node:
        kind, val, pos = self.peek()
        if kind is None:
            self.fail("unexpected end of formula")
        if kind == "num":
            self.take()
            return const(float(val))
        if val == "(":
            self.take()
            n = self.expr()
            self.take(")")
            return n
        if kind == "id":
            self.take()
            low = val.lower()
            if self.peek()[1] == "(":
                if low not in FUNCTIONS:
                    self.fail(f"unknown function {val!r} (known: {', '.join(sorted(FUNCTIONS))})", pos)
                op = FUNCTIONS[low]
                self.take("(")
                args = [self.expr()]
                while self.peek()[1] == ",":
                    self.take()
                    args.append(self.expr())
                self.take(")")
                if len(args) != OPS[op].arity:
                    self.fail(f"{val}() takes {OPS[op].arity} argument(s), got {len(args)}", pos)
                return Node(op, tuple(args))
            if low in VARIABLES:
                return Node(VARIABLES[low])
            if low in FUNCTIONS:
                self.fail(f"function {val!r} needs arguments in parentheses", pos)
            self.fail(f"unknown name {val!r} (variables: p, y, e)", pos)
        self.fail(f"unexpected {val!r}", pos)


def parse(text: str) -> Node:
    """Parse the string syntax into an expression tree (raises :class:`FormulaError`)."""
    if not isinstance(text, str):
        raise FormulaError(f"formula must be a string, got {type(text).__name__}")
    return _Parser(text).parse()


# --------------------------------------------------------------------------------------------
# DAGs (the searched representation)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossDAG:
    """Operator nodes ``3, 4, ...`` as ``(op, inputs)``; inputs index earlier nodes (0 = p, 1 = y, 2 = 1)."""
    nodes: tuple

    def __post_init__(self):
        norm = []
        for k, item in enumerate(self.nodes):
            try:
                op, ins = item
                ins = tuple(int(i) for i in ins)
            except (TypeError, ValueError):
                raise FormulaError(f"DAG node {k + NUM_INPUTS}: expected [op, [inputs]], got {item!r}") from None
            nid = k + NUM_INPUTS
            if op not in OPS or not OPS[op].searchable:
                raise FormulaError(f"DAG node {nid}: unknown operator {op!r} (known: {', '.join(SEARCH_OPS)})")
            if len(ins) != OPS[op].arity:
                raise FormulaError(f"DAG node {nid}: {op} takes {OPS[op].arity} input(s), got {len(ins)}")
            if any(not 0 <= i < nid for i in ins):
                raise FormulaError(f"DAG node {nid}: inputs {list(ins)} must be earlier nodes 0..{nid - 1}")
            norm.append((op, ins))
        if not norm:
            raise FormulaError("a loss DAG needs at least one operator node")
        object.__setattr__(self, "nodes", tuple(norm))

    def to_json(self) -> str:
        return json.dumps({"nodes": [[op, list(ins)] for op, ins in self.nodes]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, s) -> "LossDAG":
        try:
            d = json.loads(s) if isinstance(s, str) else s
            return cls(tuple((op, tuple(ins)) for op, ins in d["nodes"]))
        except FormulaError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise FormulaError(f"malformed loss DAG JSON: {exc}") from None

    def to_expr(self, simplify: bool = True) -> Node:
        """Expression tree of the last node (one tree node per DAG node reached).

        With ``simplify`` only exact no-ops are removed (values and gradients are
        unchanged, including the clamp): ``id(x)``, ``x * 1``, ``1 * x``, ``max(x, x)``,
        ``min(x, x)`` and ``-(-x)`` become ``x`` when ``x`` is an operator output
        (already clamped, |x| in [1e-5, 1e5]).  ``id`` of a leaf stays (printed ``clamp(.)``).
        """
        exprs: list[Node] = [P, Y, ONE]
        for op, ins in self.nodes:
            args = tuple(exprs[i] for i in ins)
            exprs.append(_simplify(op, args) if simplify else Node(op, args))
        return exprs[-1]

    def __str__(self) -> str:
        return to_string(self.to_expr())


def _simplify(op: str, args: tuple) -> Node:
    a = args[0]
    if op == "id" and not a.is_leaf:
        return a
    if op == "neg" and a.op == "neg" and not a.args[0].is_leaf:
        return a.args[0]
    if op == "mul":
        b = args[1]
        if b == ONE and not a.is_leaf:
            return a
        if a == ONE and not b.is_leaf:
            return b
    if op in ("max", "min") and args[0] == args[1] and not a.is_leaf:
        return a
    return Node(op, args)


# --------------------------------------------------------------------------------------------
# Formula = tree + epsilon (+ name); resolution of user text
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Formula:
    expr: Node
    eps: float = EPS
    name: str = ""

    @property
    def text(self) -> str:
        return to_string(self.expr)

    def __str__(self) -> str:
        return self.name or self.text


def _named_lookup(text: str):
    low = text.strip().lower()
    for table in (NAMED_FORMULAS, REFERENCE_FORMULAS):
        for k, v in table.items():
            if k.lower() == low:
                return k, v
    return None


def resolve(obj, eps: float | None = None) -> Formula:
    """A :class:`Formula` from a name (``MaxR`` ...), ``formula:<expr>``, an expression string,
    a :class:`Node`, a :class:`LossDAG`, DAG JSON (``{"nodes": ...}``) or a Formula."""
    if isinstance(obj, Formula):
        return obj if eps is None else Formula(obj.expr, float(eps), obj.name)
    e = EPS if eps is None else float(eps)
    if isinstance(obj, Node):
        return Formula(obj, e)
    if isinstance(obj, LossDAG):
        return Formula(obj.to_expr(), e)
    if isinstance(obj, dict):
        return Formula(LossDAG.from_json(obj).to_expr(), e)
    if not isinstance(obj, str):
        raise FormulaError(f"cannot make a loss formula from {type(obj).__name__}")
    text = obj.strip()
    if text.lower().startswith("formula:"):
        text = text[len("formula:"):].strip()
    named = _named_lookup(text)
    if named is not None:
        return Formula(parse(named[1]), e, named[0])
    if text.startswith("{"):
        return Formula(LossDAG.from_json(text).to_expr(), e)
    return Formula(parse(text), e)


# --------------------------------------------------------------------------------------------
# Straight-line programs, numpy evaluation and reverse-mode autodiff
# --------------------------------------------------------------------------------------------
@dataclass
class Program:
    """Instructions ``(op, arg indices, value)`` in evaluation order; the last one is the root.

    Leaves: ``("p",)``, ``("y",)``, ``("const", (), v)`` (``e`` becomes ``const eps``).
    """
    instrs: list = field(default_factory=list)
    eps: float = EPS

    @property
    def uses_p(self) -> bool:
        return any(op == "p" for op, _, _ in self.instrs)

    @property
    def uses_y(self) -> bool:
        return any(op == "y" for op, _, _ in self.instrs)

    def forward(self, p, y, with_raw: bool = False):
        p = np.asarray(p, dtype=np.float64) if not isinstance(p, np.ndarray) else p
        y = np.broadcast_to(np.asarray(y, dtype=p.dtype), p.shape)
        vals, raws = [], []
        with np.errstate(all="ignore"):
            for op, args, v in self.instrs:
                if op == "p":
                    out = raw = p
                elif op == "y":
                    out = raw = y
                elif op == "const":
                    out = raw = np.full(p.shape, v, dtype=p.dtype)
                else:
                    raw = np.asarray(OPS[op].fn(*(vals[i] for i in args), self.eps), dtype=p.dtype)
                    out = clamp_np(raw)
                vals.append(out)
                raws.append(raw)
        return (vals, raws) if with_raw else vals[-1]

    def value_and_grad(self, p, y):
        """Per-example loss ``l_i`` and its derivative ``dl_i / dp_i`` (reverse mode)."""
        p = np.asarray(p, dtype=np.float64) if not isinstance(p, np.ndarray) else p
        vals, raws = self.forward(p, y, with_raw=True)
        grads = [None] * len(vals)
        grads[-1] = np.ones_like(p)
        dp = np.zeros_like(p)
        with np.errstate(all="ignore"):
            for k in range(len(self.instrs) - 1, -1, -1):
                g = grads[k]
                if g is None:
                    continue
                op, args, _ = self.instrs[k]
                if op == "p":
                    dp = dp + g
                    continue
                if op in LEAVES:
                    continue
                graw = np.where(clamp_grad_np(raws[k]) > 0, g, np.zeros_like(g))
                partials = OPS[op].grad(*(vals[i] for i in args), raws[k], self.eps)
                for i, d in zip(args, partials):
                    c = graw * d
                    grads[i] = c if grads[i] is None else grads[i] + c
        return vals[-1], dp


def compile_program(formula, eps: float | None = None) -> Program:
    """Straight-line program of a formula (anything :func:`resolve` accepts), subexpressions shared."""
    f = resolve(formula, eps)
    prog = Program(eps=f.eps)
    index: dict[Node, int] = {}

    def emit(n: Node) -> int:
        if n in index:
            return index[n]
        if n.op == "e":
            key = ("const", (), f.eps)
        elif n.op == "const":
            key = ("const", (), float(n.value))
        elif n.op in ("p", "y"):
            key = (n.op, (), None)
        else:
            if n.op not in OPS:
                raise FormulaError(f"unknown operator {n.op!r}")
            key = (n.op, tuple(emit(a) for a in n.args), None)
        try:
            i = prog.instrs.index(key)
        except ValueError:
            prog.instrs.append(key)
            i = len(prog.instrs) - 1
        index[n] = i
        return i

    root = emit(f.expr)
    if root != len(prog.instrs) - 1:          # root is a leaf that was emitted earlier: repeat it last
        prog.instrs.append(prog.instrs[root])
    return prog


def evaluate(formula, p, y, eps: float | None = None) -> float:
    """Batch-mean loss in numpy (float64)."""
    return float(np.mean(compile_program(formula, eps).forward(np.asarray(p, np.float64), y)))


def value_and_grad(formula, p, y, eps: float | None = None):
    """(per-example losses, d l_i / d p_i) in numpy float64."""
    return compile_program(formula, eps).value_and_grad(np.asarray(p, np.float64), y)


# --------------------------------------------------------------------------------------------
# Random DAGs (tests, cold starts)
# --------------------------------------------------------------------------------------------
def random_dag(rng: np.random.Generator, num_nodes: int = DEFAULT_NUM_NODES,
               ops: Iterable[str] = DEFAULT_SEARCH_OPS) -> LossDAG:
    """A uniformly random DAG over ``ops`` (binary operators take two DIFFERENT earlier nodes)."""
    ops = tuple(ops)
    nodes = []
    for k in range(num_nodes):
        nid = k + NUM_INPUTS
        op = ops[int(rng.integers(len(ops)))]
        if OPS[op].arity == 2:
            a, b = rng.choice(nid, size=2, replace=False)
            ins = (int(a), int(b))
        else:
            ins = (int(rng.integers(nid)),)
        nodes.append((op, ins))
    return LossDAG(tuple(nodes))
