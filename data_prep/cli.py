"""Command line of ``python -m data_prep`` (see the package docstring for the full story)."""
from __future__ import annotations

import argparse
import sys

from common.errors import FlagError, cli_errors, die
from common.store import DEFAULT_CHUNK_ROWS
from data_prep.plan import FORMATS


class _Parser(argparse.ArgumentParser):
    def error(self, message):          # one line on stderr, exit 2 (no usage dump)
        die(message)


def build_parser() -> argparse.ArgumentParser:
    import data_prep

    p = _Parser(prog="python -m data_prep", description=(data_prep.__doc__ or "").split("\n\n")[0],
                epilog="Full documentation (formats, the csv column spec): see data_prep/__init__.py.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=FORMATS, help="input format")
    p.add_argument("--input", help="raw input file (plain or .gz); the train file when --valid/--test are given")
    p.add_argument("--valid", help="separate validation file (then --input is the train file)")
    p.add_argument("--test", help="separate test file (then --input is the train file)")
    p.add_argument("--output", required=True, help="dataset directory to create (atomically)")
    p.add_argument("--spec", help="JSON column spec (required for --format csv)")
    p.add_argument("--min_count", type=int, default=None,
                   help="min training count to enter a vocabulary (default 10 for criteo, 1 otherwise)")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,valid,test fractions of a single input")
    p.add_argument("--stratify", action="store_true", help="split each label class separately")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (and of synthetic data)")
    p.add_argument("--rows", type=int, default=None,
                   help="use only the first N data lines of each file (synthetic: rows to generate)")
    p.add_argument("--on_bad_line", choices=("error", "skip"), default="error",
                   help="malformed line: stop with an error (default) or skip it and record it in the schema")
    p.add_argument("--numeric", choices=("bucketize", "standardize"), default=None,
                   help="numeric columns: Criteo log^2 bucketing into a categorical field (criteo default) or "
                        "standardisation into a numeric field (csv default)")
    p.add_argument("--chunk_mb", type=float, default=4.0, help="MiB of raw text parsed per chunk")
    p.add_argument("--chunk_rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per stored LMDB chunk")
    p.add_argument("--count_mb", type=float, default=16.0,
                   help="MiB for the token counts of pass 1; past it they go to scratch files next to the output "
                        "and are merged one hash partition at a time (same result, bounded memory)")
    p.add_argument("--workers", type=int, default=2,
                   help="threads that tokenise, parse and encode chunks (the output does not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no_cache", dest="cache", action="store_false", default=None,
                   help="parse the input again in pass 2 instead of replaying pass 1's scratch file "
                        "(the default spills it next to the output when the disk has room)")
    p.add_argument("--base_ctr", type=float, default=0.25, help="synthetic: base click-through rate")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="always show progress bars (default: only on a terminal)")
    prog.add_argument("--no_progress", dest="progress", action="store_false")
    return p


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        raise FlagError("split", f"expected three fractions like 0.8,0.1,0.1, got {text!r}") from None
    if len(parts) != 3 or any(x < 0 for x in parts) or abs(sum(parts) - 1) > 1e-6 or parts[0] <= 0:
        raise FlagError("split", f"expected three non-negative fractions summing to 1 (train > 0), got {text!r}")
    return tuple(parts)


def options_from_args(a):
    from data_prep.pipeline import Options

    split = parse_split(a.split)
    if a.format != "synthetic" and not a.input:
        raise FlagError("input", f"--format {a.format} needs --input PATH")
    if a.format != "csv" and a.spec:
        raise FlagError("spec", "--spec is only used with --format csv")
    if a.format == "csv" and not a.spec:
        raise FlagError("spec", "--format csv needs --spec SPEC.json")
    if a.min_count is not None and a.min_count < 1:
        raise FlagError("min_count", f"must be >= 1, got {a.min_count}")
    if a.rows is not None and a.rows < 1:
        raise FlagError("rows", f"must be >= 1, got {a.rows}")
    if a.chunk_rows < 1:
        raise FlagError("chunk_rows", f"must be >= 1, got {a.chunk_rows}")
    if not a.chunk_mb > 0:
        raise FlagError("chunk_mb", f"must be > 0, got {a.chunk_mb}")
    if a.workers < 1:
        raise FlagError("workers", f"must be >= 1, got {a.workers}")
    if not a.count_mb > 0:
        raise FlagError("count_mb", f"must be > 0, got {a.count_mb}")
    if (a.valid or a.test) and a.split != "0.8,0.1,0.1":
        raise FlagError("split", "--split applies to a single --input; not with --valid/--test")
    if (a.valid or a.test) and a.stratify:
        raise FlagError("stratify", "--stratify applies to a single --input; not with --valid/--test")
    if a.format == "criteo" and a.numeric is None:
        a.numeric = "bucketize"
    return Options(format=a.format, input=a.input, output=a.output, valid=a.valid, test=a.test, spec=a.spec,
                   min_count=a.min_count, split=split, seed=a.seed, rows=a.rows, on_bad_line=a.on_bad_line,
                   stratify=a.stratify, numeric=a.numeric, block_mb=a.chunk_mb, chunk_rows=a.chunk_rows,
                   overwrite=a.overwrite, progress=a.progress, base_ctr=a.base_ctr, cache=a.cache,
                   count_mb=a.count_mb, workers=a.workers)


def _tune_malloc() -> None:
    """glibc only: serve allocations below 8 MiB from the heap and keep up to 16 MiB free
    at its top.  The chunk-sized numpy buffers of both passes (a few MiB each, allocated
    and freed for every block) are then reused instead of being mapped, returned and
    faulted in afresh each time (glibc's default adapts its thresholds as it goes, which
    for this pattern costs about twice the system time and lets the heap creep); bigger
    arrays (the token counts) are mapped and returned to the system when freed."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 8 << 20)         # M_MMAP_THRESHOLD
        libc.mallopt(-1, 16 << 20)        # M_TRIM_THRESHOLD
    except (OSError, AttributeError):     # not glibc
        pass


def main(argv=None) -> int:
    from data_prep.pipeline import prepare

    _tune_malloc()
    with cli_errors():
        args = build_parser().parse_args(argv)
        opts = options_from_args(args)
        try:
            schema = prepare(opts)
        except OSError as exc:           # disk full, permissions, ...: one line, not a traceback
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            die(f"{where}{exc.strerror or exc}")
        rows = ", ".join(f"{k} {v}" for k, v in schema.splits.items())
        skipped = schema.skipped_lines.get("count", 0) if schema.skipped_lines else 0
        print(f"wrote {opts.output}: {len(schema.fields)} fields, {rows}"
              + (f", {skipped} bad lines skipped" if skipped else ""))
    return 0
