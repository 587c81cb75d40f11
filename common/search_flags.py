"""Flags of the two search modes of the train examples (identical in both scripts).

    python train_example_pytorch.py --model BiasedMF --data D --search_loss --search_budget 200
    python train_example_tensorflow.py --search_arch --warmup_fraction 0.1 --zeroshot sigeo

``--search_loss`` runs AutoLossGen (:mod:`common.autolossgen`) for the chosen
model; ``--search_arch`` warms a NASRec supernet and runs regularized evolution
(:mod:`common.evolution`).  Without either flag the scripts train as usual.
:func:`validate_search` turns the parsed values into a :class:`SearchArgs`
(``None`` when no search was asked for); every impossible value is a
:class:`common.errors.FlagError`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from absl import flags

from common.errors import FlagError

ZEROSHOT = ("sigeo", "zico", "fr", "loss", "none")
SPACES = ("small", "full")

LOSS_SEARCH_FLAGS = ("search_loss", "search_budget", "search_epochs", "train_with_optim", "formula_path",
                     "controller_hidden", "controller_nodes", "controller_ops", "controller_lr",
                     "controller_aggregate", "controller_entropy", "controller_baseline_decay", "controller_clip")
ARCH_SEARCH_FLAGS = ("search_arch", "search_space", "n_blocks", "dense_widths", "sparse_widths", "warmup_fraction", "warmup_epochs", "n_generations",
                     "init_population", "sample_size", "n_childs", "zeroshot", "proxy_batches", "finetune_steps",
                     "top_k", "zico_coef", "fr_coef", "loss_coef")


def define_search_flags(fv: flags.FlagValues) -> None:
    d = dict(flag_values=fv)
    # ---- AutoLossGen
    flags.DEFINE_boolean("search_loss", False, "search a loss function with AutoLossGen for --model instead of "
                                               "plain training", **d)
    flags.DEFINE_integer("search_budget", 200, "candidates sampled per search round (--search_loss)", **d)
    flags.DEFINE_integer("search_epochs", 1, "outer AutoLossGen epochs: search a round, then train the model an "
                                             "epoch (--search_loss; replaces --epochs / --patience there)", **d)
    flags.DEFINE_boolean("train_with_optim", False, "after each round, train the real model an epoch with the best "
                                                    "candidate if it does not lower validation AUC", **d)
    flags.DEFINE_string("formula_path", "", "where the accepted formulas go (default "
                                            "<model_save_dir>/formulas.json; a name ending in .csv gives the CSV "
                                            "that `python -m common.loss_check --csv` reads)", **d)
    flags.DEFINE_integer("controller_hidden", 64, "LSTM size of the loss controller", **d)
    flags.DEFINE_integer("controller_nodes", 10, "operator nodes per sampled loss formula", **d)
    flags.DEFINE_string("controller_ops", "", "comma list of searchable operators (default: add,mul,max,min,neg,"
                                              "identity,log,sq,inv)", **d)
    flags.DEFINE_float("controller_lr", 1e-3, "Adam learning rate of the controller", **d)
    flags.DEFINE_integer("controller_aggregate", 10, "candidates per controller update", **d)
    flags.DEFINE_float("controller_entropy", 1e-4, "entropy bonus weight", **d)
    flags.DEFINE_float("controller_baseline_decay", 0.01, "moving-average baseline decay", **d)
    flags.DEFINE_float("controller_clip", 5.0, "gradient-norm clip of the controller", **d)
    # ---- NASRec / SiGeo
    flags.DEFINE_boolean("search_arch", False, "search a NASRec architecture (supernet warm-up + regularized "
                                               "evolution) instead of plain training", **d)
    flags.DEFINE_string("search_space", "small", f"NASRec search space: {', '.join(SPACES)}", **d)
    flags.DEFINE_integer("n_blocks", 7, "blocks of the NASRec search space", **d)
    flags.DEFINE_string("dense_widths", "", "comma list of dense widths of the search space (default NASRec's "
                                            "16,32,64,128,256,512,768,1024)", **d)
    flags.DEFINE_string("sparse_widths", "", "comma list of sparse widths (default NASRec's 16,32,48,64)", **d)
    flags.DEFINE_float("warmup_fraction", 1.0, "fraction of the training split the supernet is warmed on "
                                               "(0: no warm-up, zero-shot only)", **d)
    flags.DEFINE_integer("warmup_epochs", 1, "passes over that fraction", **d)
    flags.DEFINE_integer("n_generations", 240, "generations of regularized evolution", **d)
    flags.DEFINE_integer("init_population", 128, "initial population of regularized evolution", **d)
    flags.DEFINE_integer("sample_size", 64, "tournament sample size", **d)
    flags.DEFINE_integer("n_childs", 8, "children per generation", **d)
    flags.DEFINE_string("zeroshot", "sigeo", f"how a child is scored: {', '.join(ZEROSHOT)} (none: fine-tune the "
                                             "final layer and take validation logloss)", **d)
    flags.DEFINE_integer("proxy_batches", 4, "training batches a zero-shot proxy looks at", **d)
    flags.DEFINE_integer("finetune_steps", 200, "final-layer fine-tuning steps (--zeroshot none)", **d)
    flags.DEFINE_integer("top_k", 5, "best subnet configs written to --model_save_dir", **d)
    flags.DEFINE_float("zico_coef", 1.0, "SiGeo weight of ZiCo", **d)
    flags.DEFINE_float("fr_coef", 1.0, "SiGeo weight of the Fisher-Rao norm", **d)
    flags.DEFINE_float("loss_coef", 0.0, "SiGeo weight of the training loss", **d)


@dataclass
class SearchArgs:
    mode: str                                  # "loss" or "arch"
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _pos(fv, name, lo=1):
    if fv[name].value < lo:
        raise FlagError(name, f"must be {'a positive integer' if lo == 1 else f'>= {lo}'}, got {fv[name].value}")


def _float(fv, name, lo=None, hi=None, lo_open=False):
    v = fv[name].value
    if not math.isfinite(v):
        raise FlagError(name, f"must be a finite number, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise FlagError(name, f"must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
    if hi is not None and v > hi:
        raise FlagError(name, f"must be <= {hi:g}, got {v:g}")


def _given(fv, names) -> list[str]:
    return [n for n in names if fv[n].present and n not in ("search_loss", "search_arch")]


def _widths(name: str, text: str) -> list[int]:
    try:
        vals = sorted({int(x) for x in text.strip().strip("[]()").split(",") if x.strip()})
    except ValueError:
        raise FlagError(name, f"{text!r}: expected comma-separated integers like 16,32,64") from None
    if not vals or vals[0] <= 0:
        raise FlagError(name, f"{text!r}: widths must be positive integers")
    return vals


def validate_search(fv: flags.FlagValues, model: str) -> SearchArgs | None:
    """``SearchArgs`` for ``--search_loss`` / ``--search_arch``; None for plain training."""
    if fv.search_loss and fv.search_arch:
        raise FlagError("search_arch", "choose one of --search_loss and --search_arch")
    if fv.search_loss:
        for n in ("search_budget", "search_epochs", "controller_hidden", "controller_nodes", "controller_aggregate"):
            _pos(fv, n)
        _float(fv, "controller_lr", lo=0.0, lo_open=True)
        _float(fv, "controller_entropy", lo=0.0)
        _float(fv, "controller_baseline_decay", lo=0.0, hi=1.0)
        _float(fv, "controller_clip", lo=0.0, lo_open=True)
        ops = tuple(o.strip() for o in fv.controller_ops.split(",") if o.strip())
        if ops:
            from common.loss_formula import OPS

            bad = [o for o in ops if o not in OPS or not OPS[o].searchable]
            if bad:
                raise FlagError("controller_ops", f"unknown search operator {bad[0]!r}; available: "
                                                  f"{', '.join(o for o in OPS if OPS[o].searchable)}")
        opts = {n: fv[n].value for n in LOSS_SEARCH_FLAGS if n != "search_loss"}
        opts["controller_ops"] = list(ops)
        return SearchArgs("loss", opts)
    if fv.search_arch:
        if model != "NASRec":
            raise FlagError("search_arch", f"architecture search builds NASRec subnets; drop --model {model} "
                                           "(or give --model NASRec)")
        for n in ("n_blocks", "warmup_epochs", "n_generations", "init_population", "sample_size", "n_childs",
                  "proxy_batches", "top_k"):
            _pos(fv, n)
        _pos(fv, "finetune_steps", lo=0)
        _float(fv, "warmup_fraction", lo=0.0, hi=1.0)
        for n in ("zico_coef", "fr_coef", "loss_coef"):
            _float(fv, n)
        if fv.sample_size > fv.init_population:
            raise FlagError("sample_size", f"must be <= --init_population ({fv.init_population}), "
                                           f"got {fv.sample_size}")
        if fv.zeroshot not in ZEROSHOT:
            raise FlagError("zeroshot", f"{fv.zeroshot!r} is not a proxy; choose one of {', '.join(ZEROSHOT)}")
        if fv.search_space not in SPACES:
            raise FlagError("search_space", f"{fv.search_space!r}: choose one of {', '.join(SPACES)}")
        opts = {n: fv[n].value for n in ARCH_SEARCH_FLAGS if n not in ("search_arch", "dense_widths", "sparse_widths")}
        for n in ("dense_widths", "sparse_widths"):
            if fv[n].value.strip():
                opts[n] = _widths(n, fv[n].value)
        # explicit trainer flags win over the published warm-up setting (Adagrad 0.12, batch 512)
        opts["given"] = {n: bool(fv[n].present) for n in ("optimizer", "lr", "batch_size")}
        return SearchArgs("arch", opts)
    stray = _given(fv, LOSS_SEARCH_FLAGS + ARCH_SEARCH_FLAGS)
    if stray:
        raise FlagError(stray[0], "is a search option; add --search_loss or --search_arch")
    return None
