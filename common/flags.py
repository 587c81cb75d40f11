"""The command-line flags of ``train_example_pytorch.py`` and ``train_example_tensorflow.py`` (identical).

    fv = flags.FlagValues(); define_flags(fv)
    args = parse_args(argv, fv)          # -> common.train_utils.TrainArgs, or FlagError

Every bad value is a :class:`common.errors.FlagError` (``error: --flag: ...``,
exit status 2 through :func:`common.errors.cli_errors`), raised before anything
is written.  Checks that need the framework (do the GPUs in ``--gpu_ids``
exist?) are done by the trainers with :func:`check_gpu_ids`.

Model-specific flags are generated from the config dataclasses in
``common/configs.py`` (every field of every registered model's config, e.g.
``--mlp 400,400,400``, ``--cross_layers 3``, ``--dropout 0.2``,
``--batch_norm``); they default to "the model's own default", and giving one
that the chosen model does not have is an error.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
import typing

from absl import flags

from common.configs import MODELS, make_config, model_entry
from common.errors import FlagError, StoreError
from common.losses import canonical_loss_name, is_formula_loss
from common.optim import OPTIMIZERS, canonical_optimizer_name
from common.search_flags import ARCH_SEARCH_FLAGS, LOSS_SEARCH_FLAGS, define_search_flags, validate_search
from common.train_utils import TrainArgs, default_save_dir

# model config fields that are trainer flags with another meaning / handled explicitly
_COMMON_MODEL_FIELDS = ("embed_size", "l2", "l2_embedding", "seed")
EXPORT_FORMATS = ("torchscript", "onnx", "saved_model")
TRAINER_FLAGS = ("model", "data", "epochs", "batch_size", "optimizer", "loss", "lr", "embed_size", "l2", "l2_embedding",
                 "gpu_ids", "model_save_dir", "seed", "patience", "eval_every", "checkpoint_every", "cpu_replicas",
                 "max_steps", "lr_decay_factor", "lr_decay_patience", "min_lr", "keep_checkpoints",
                 "eval_batch_size", "resume", "progress", "export", "threads", "compile")


def define_flags(fv: flags.FlagValues | None = None) -> flags.FlagValues:
    """Define all flags on ``fv`` (a fresh ``FlagValues`` by default) and return it."""
    fv = fv if fv is not None else flags.FlagValues()
    d = dict(flag_values=fv)
    flags.DEFINE_string("model", "DeepFM", f"model to train: {', '.join(MODELS)}", **d)
    flags.DEFINE_string("data", "", "dataset directory from `python -m data_prep` "
                                    "(empty: the embedded synthetic dataset, generated once into the cache)", **d)
    flags.DEFINE_integer("epochs", 10, "maximum number of passes over the training split", **d)
    flags.DEFINE_integer("batch_size", 4096, "GLOBAL batch size (split over all GPUs / processes / replicas)", **d)
    flags.DEFINE_string("optimizer", "Adam", f"optimiser: {', '.join(OPTIMIZERS)}", **d)
    flags.DEFINE_string("loss", "BCE", "loss: BCE, MSE, Hinge, Focal, MaxR, SumR, LogMin or 'formula:<expression>'",
                        **d)
    flags.DEFINE_float("lr", 1e-3, "initial learning rate", **d)
    flags.DEFINE_integer("embed_size", None, "embedding size (default: the model's)", **d)
    flags.DEFINE_float("l2", None, "L2 weight on dense kernels (default: the model's)", **d)
    flags.DEFINE_float("l2_embedding", None, "L2 weight on the embedding rows of each batch (default: the model's)",
                       **d)
    flags.DEFINE_string("gpu_ids", "", "comma-separated GPU ids, e.g. '0,1,2,3' (empty: CPU)", **d)
    flags.DEFINE_string("model_save_dir", "", "where checkpoints, best weights, metrics.json and TensorBoard logs "
                                              "go (default ./checkpoints/<model>/<backend>/)", **d)
    flags.DEFINE_integer("seed", 0, "seed of initialisation, data order and dropout", **d)
    flags.DEFINE_integer("patience", 2, "stop after this many evaluations without a better validation AUC "
                                        "(0: never stop early)", **d)
    flags.DEFINE_integer("eval_every", 0, "evaluate on the validation split every N steps (0: once per epoch)", **d)
    flags.DEFINE_integer("checkpoint_every", 500, "write a resume checkpoint every N steps (and at every epoch "
                                                  "end; 0: only at epoch ends)", **d)
    flags.DEFINE_integer("cpu_replicas", 0, "TensorFlow without GPUs: MirroredStrategy over N logical CPU devices "
                                            "(0 or 1: none)", **d)
    flags.DEFINE_integer("max_steps", 0, "stop after this many optimisation steps in total (0: no limit)", **d)
    flags.DEFINE_float("lr_decay_factor", 0.5, "multiply the learning rate by this on a validation plateau "
                                               "(1: no decay)", **d)
    flags.DEFINE_integer("lr_decay_patience", 1, "evaluations without improvement before the lr decays", **d)
    flags.DEFINE_float("min_lr", 1e-6, "lower bound of the decayed learning rate", **d)
    flags.DEFINE_integer("keep_checkpoints", 2, "how many resume checkpoints to keep", **d)
    flags.DEFINE_integer("eval_batch_size", 0, "batch size of evaluation (0: --batch_size)", **d)
    flags.DEFINE_boolean("resume", True, "resume from the newest checkpoint in --model_save_dir if it is of the "
                                         "same run (--noresume: start over)", **d)
    flags.DEFINE_boolean("progress", True, "show tqdm progress bars on stderr", **d)
    flags.DEFINE_string("export", "", f"export the best model at the end: comma list of {', '.join(EXPORT_FORMATS)} "
                                      "(torchscript/onnx: PyTorch, saved_model: TensorFlow)", **d)
    flags.DEFINE_integer("threads", 0, "intra-op CPU threads (0: the framework's default)", **d)
    flags.DEFINE_boolean("compile", False, "PyTorch on the CPU: train under torch.compile -- Inductor fuses the "
                         "element-wise work around the GEMMs (DeepFM about 5 percent faster); the first step compiles for "
                         "10-30 s; needs a C++ compiler, else training stays eager", **d)
    define_search_flags(fv)
    for name, (kind, helptext) in model_flag_specs().items():
        if name in TRAINER_FLAGS or name in fv:
            continue
        if kind == "bool":
            flags.DEFINE_boolean(name, None, helptext, **d)
        elif kind == "int":
            flags.DEFINE_integer(name, None, helptext, **d)
        elif kind == "float":
            flags.DEFINE_float(name, None, helptext, **d)
        else:   # "str" and "ints" (comma list)
            flags.DEFINE_string(name, None, helptext, **d)
    return fv


def _kind(tp) -> str:
    if tp is bool:
        return "bool"
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    if typing.get_origin(tp) is tuple:
        return "ints" if all(a in (int, Ellipsis) for a in typing.get_args(tp)) else "str"
    return "str"


def model_flag_specs() -> dict[str, tuple[str, str]]:
    """``{field: (kind, help)}`` for every model-config field over all registered models."""
    out: dict[str, tuple[str, str]] = {}
    users: dict[str, list[str]] = {}
    for name, entry in MODELS.items():
        hints = typing.get_type_hints(entry.config)
        for f in dataclasses.fields(entry.config):
            if f.name in _COMMON_MODEL_FIELDS:
                continue
            users.setdefault(f.name, []).append(name)
            if f.name not in out:
                out[f.name] = (_kind(hints.get(f.name, str)), "")
    for k, (kind, _) in out.items():
        fmt = " (comma-separated integers, e.g. 400,400,400)" if kind == "ints" else ""
        out[k] = (kind, f"model option{fmt}; models: {', '.join(users[k])} (default: the model's)")
    return out


# ----------------------------------------------------------------------------------------------
_ABSL_VALUE = re.compile(r"flag --([\w.-]+)=(.*?): (.*)$", re.S)


def parse_flags(argv: list[str], fv: flags.FlagValues) -> None:
    """absl parsing with every problem turned into a one-line FlagError."""
    try:
        rest = fv(list(argv), known_only=False)
    except flags.UnrecognizedFlagError as exc:
        name = getattr(exc, "flagname", "") or str(exc)
        suggestion = ""
        m = re.search(r"Did you mean: (.*)\?", str(exc))
        if m:
            suggestion = f" (did you mean --{m.group(1).split(',')[0].strip()}?)"
        raise FlagError(name, f"unknown flag{suggestion}") from None
    except flags.IllegalFlagValueError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid value"
        m = _ABSL_VALUE.match(msg)
        if m:
            name, value, why = m.groups()
            raise FlagError(name, f"invalid value {value!r}: {why}") from None
        raise FlagError("flags", msg) from None
    except flags.Error as exc:
        msg = " ".join(str(exc).split())
        m = re.search(r"--?([\w.-]+)", msg)
        raise FlagError(m.group(1) if m else "flags", msg) from None
    if len(rest) > 1:
        raise FlagError(rest[1] if rest[1].startswith("-") else "flags",
                        f"unexpected argument {rest[1]!r} (flags are --name value or --name=value)")


def parse_gpu_ids(text: str) -> list[int]:
    """``'1, 2, 3, 4'`` -> ``[1, 2, 3, 4]``; empty -> ``[]`` (CPU)."""
    text = (text or "").strip().strip("[]()")
    if not text:
        return []
    out = []
    for part in text.split(","):
        p = part.strip()
        if not p:
            continue
        if not re.fullmatch(r"\d+", p):
            raise FlagError("gpu_ids", f"{text!r}: expected comma-separated GPU numbers like '0,1,2,3'")
        out.append(int(p))
    if len(set(out)) != len(out):
        raise FlagError("gpu_ids", f"{text!r}: a GPU is listed twice")
    return out


def check_gpu_ids(gpu_ids: list[int], available: int) -> None:
    """FlagError when a listed GPU does not exist (``available`` = number of visible GPUs)."""
    missing = [g for g in gpu_ids if g >= available]
    if missing:
        have = "no GPU" if available == 0 else f"{available} GPU(s): ids 0..{available - 1}"
        raise FlagError("gpu_ids", f"GPU {missing[0]} does not exist (this machine has {have}; "
                                   f"leave --gpu_ids empty to train on the CPU)")


def _parse_ints(name: str, text: str) -> tuple[int, ...]:
    t = text.strip().strip("[]()")
    if not t:
        return ()
    try:
        vals = tuple(int(x) for x in t.split(",") if x.strip())
    except ValueError:
        raise FlagError(name, f"{text!r}: expected comma-separated integers like 400,400,400") from None
    if any(v <= 0 for v in vals):
        raise FlagError(name, f"{text!r}: sizes must be positive")
    return vals


def _finite(name, v, lo=None, lo_open=False, hi=None, hi_open=False):
    if v is None:
        return
    if not math.isfinite(v):
        raise FlagError(name, f"must be a finite number, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise FlagError(name, f"must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise FlagError(name, f"must be {'<' if hi_open else '<='} {hi:g}, got {v:g}")


def _int_at_least(name, v, lo):
    if v is not None and v < lo:
        raise FlagError(name, f"must be {'a positive integer' if lo == 1 else f'>= {lo}'}, got {v}")


def validate(fv: flags.FlagValues, backend: str, check_data: bool = True) -> TrainArgs:
    """Turn parsed flags into :class:`TrainArgs`; FlagError for any impossible value.

    ``--data`` empty means the default synthetic dataset (generated into the cache on first use).
    """
    if fv.search_arch and not fv["model"].present:
        fv.model = "NASRec"                       # --search_arch searches NASRec subnets
    try:
        entry = model_entry(fv.model)
    except ValueError as exc:
        raise FlagError("model", str(exc)) from None
    _int_at_least("epochs", fv.epochs, 1)
    _int_at_least("batch_size", fv.batch_size, 1)
    _finite("lr", fv.lr, lo=0.0, lo_open=True)
    _int_at_least("embed_size", fv.embed_size, 1)
    _finite("l2", fv.l2, lo=0.0)
    _finite("l2_embedding", fv.l2_embedding, lo=0.0)
    _int_at_least("patience", fv.patience, 0)
    _int_at_least("eval_every", fv.eval_every, 0)
    _int_at_least("checkpoint_every", fv.checkpoint_every, 0)
    _int_at_least("cpu_replicas", fv.cpu_replicas, 0)
    _int_at_least("max_steps", fv.max_steps, 0)
    _finite("lr_decay_factor", fv.lr_decay_factor, lo=0.0, lo_open=True, hi=1.0)
    _int_at_least("lr_decay_patience", fv.lr_decay_patience, 0)
    _finite("min_lr", fv.min_lr, lo=0.0)
    _int_at_least("keep_checkpoints", fv.keep_checkpoints, 1)
    _int_at_least("eval_batch_size", fv.eval_batch_size, 0)
    _int_at_least("threads", fv.threads, 0)
    if fv.seed < 0:
        raise FlagError("seed", f"must be >= 0, got {fv.seed}")
    try:
        optimizer = canonical_optimizer_name(fv.optimizer)
    except ValueError as exc:
        raise FlagError("optimizer", str(exc)) from None
    try:
        loss = canonical_loss_name(fv.loss)
        if is_formula_loss(loss):
            from common.loss_formula import resolve

            resolve(loss)            # a malformed formula fails here, before anything starts
    except ValueError as exc:
        raise FlagError("loss", str(exc).splitlines()[0] if str(exc) else "invalid loss") from None
    gpu_ids = parse_gpu_ids(fv.gpu_ids)
    if fv.cpu_replicas > 1 and gpu_ids:
        raise FlagError("cpu_replicas", "logical CPU replicas are for machines without GPUs; "
                                        "leave --gpu_ids empty or --cpu_replicas 0")
    if fv.cpu_replicas > 1 and backend != "tensorflow":
        raise FlagError("cpu_replicas", "only the TensorFlow trainer has logical CPU replicas "
                                        "(PyTorch: launch several processes with torchrun)")
    if fv.compile and backend != "pytorch":
        raise FlagError("compile", "only the PyTorch trainer compiles (TensorFlow already runs each step as "
                                   "one tf.function graph)")
    if fv.compile and gpu_ids:
        raise FlagError("compile", "torch.compile training is verified on the CPU only; leave --gpu_ids empty")
    exports = [x.strip().lower() for x in (fv.export or "").split(",") if x.strip()]
    allowed = ("torchscript", "onnx") if backend == "pytorch" else ("saved_model",)
    for x in exports:
        if x not in allowed:
            raise FlagError("export", f"{x!r} is not an export format of the {backend} trainer "
                                      f"(available: {', '.join(allowed)})")
    if "onnx" in exports and importlib.util.find_spec("onnx") is None:
        raise FlagError("export", "onnx export needs the optional `onnx` package (pip install onnx)")

    # model config: common fields + generated model flags the user actually gave
    known = {f.name for f in dataclasses.fields(entry.config)}
    overrides: dict = {"seed": int(fv.seed)}
    for k in ("embed_size", "l2", "l2_embedding"):
        if fv[k].value is not None:
            overrides[k] = fv[k].value
    for name, (kind, _) in model_flag_specs().items():
        if name in TRAINER_FLAGS or name not in fv or fv[name].value is None:
            continue
        if name not in known:
            raise FlagError(name, f"model {entry.name} has no option {name} "
                                  f"(its options: {', '.join(sorted(known - set(_COMMON_MODEL_FIELDS)))})")
        v = fv[name].value
        if kind == "ints":
            v = _parse_ints(name, v)
        elif kind == "float":
            _finite(name, v)
            if "dropout" in name:
                _finite(name, v, lo=0.0, hi=1.0, hi_open=True)
        elif kind == "int" and v < 0:
            raise FlagError(name, f"must be >= 0, got {v}")
        overrides[name] = v
    try:
        make_config(entry.name, **overrides)
    except (TypeError, ValueError) as exc:
        raise FlagError("model", f"bad options for {entry.name}: {exc}") from None

    search = validate_search(fv, entry.name)
    if fv.compile and search is not None:
        raise FlagError("compile", "not with --search_loss / --search_arch (the searches train eagerly)")
    data = fv.data
    if data:
        data = os.path.abspath(os.path.expanduser(data))
        if check_data:
            check_dataset(data)
    save_dir = fv.model_save_dir or default_save_dir(entry.name, backend)
    args = TrainArgs(model=entry.name, data=data, model_config=overrides, epochs=fv.epochs,
                     batch_size=fv.batch_size, optimizer=optimizer, loss=loss, lr=float(fv.lr), gpu_ids=gpu_ids,
                     model_save_dir=os.path.abspath(os.path.expanduser(save_dir)), seed=int(fv.seed),
                     patience=fv.patience, eval_every=fv.eval_every, checkpoint_every=fv.checkpoint_every,
                     cpu_replicas=fv.cpu_replicas, max_steps=fv.max_steps, lr_decay_factor=float(fv.lr_decay_factor),
                     lr_decay_patience=fv.lr_decay_patience, min_lr=float(fv.min_lr),
                     keep_checkpoints=fv.keep_checkpoints, eval_batch_size=fv.eval_batch_size,
                     resume=bool(fv.resume), progress=bool(fv.progress), export=exports, threads=fv.threads,
                     compile=bool(fv.compile),
                     search=search.to_dict() if search is not None else None)
    from common.train_utils import check_save_dir

    check_save_dir(args.model_save_dir)
    return args


def check_dataset(path: str) -> None:
    """FlagError (--data) unless ``path`` is a readable dataset directory with train/valid/test rows."""
    from common.batching import open_dataset

    try:
        schema, store = open_dataset(path)
    except StoreError as exc:
        raise FlagError("data", exc.format()) from None
    empty = [s for s in ("train", "valid", "test") if store.rows(s) <= 0]
    if empty:
        raise FlagError("data", f"{path}: the {', '.join(empty)} split(s) have no rows")


def resolve_data(args: TrainArgs) -> TrainArgs:
    """Fill in the default synthetic dataset when ``--data`` was not given."""
    if not args.data:
        from common.synthetic import default_dataset

        args.data = default_dataset(progress=args.progress)
    return args


def parse_args(argv: list[str], backend: str, fv: flags.FlagValues | None = None) -> TrainArgs:
    """Define (if needed), parse and validate; ``--help`` prints the flags and exits 0."""
    fv = fv if fv is not None else define_flags()
    if any(a in ("-h", "--help", "-help", "--helpfull", "--helpshort") for a in argv[1:]):
        print(f"usage: {os.path.basename(argv[0])} [--flag value ...]\n", file=sys.stdout)
        print(fv.get_help(), file=sys.stdout)
        sys.exit(0)
    parse_flags(argv, fv)
    return validate(fv, backend)
