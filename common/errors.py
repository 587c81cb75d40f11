"""User-facing errors and the one-line CLI error convention.

Every command-line entry point of the project reports bad input as ONE line on
stderr, ``error: <file>:<line>: <what is wrong>`` (or ``error: --flag: ...``),
and exits with status 2 -- never with a traceback.
"""
from __future__ import annotations

import contextlib
import sys


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit status 2."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.message = message
        self.path = path
        self.line = line
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:{self.line}: " if self.line is not None else f"{self.path}: "
        return f"{where}{self.message}"


class DataError(UserError):
    """Malformed input data (raw files, column specs)."""


class StoreError(UserError):
    """A dataset directory / LMDB store that is missing, corrupt or foreign."""


class FlagError(UserError):
    """An impossible command-line flag value."""

    def __init__(self, flag: str, message: str):
        super().__init__(message, path=f"--{flag.lstrip('-')}")


def die(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def cli_errors():
    """Turn UserError (and friends) into the one-line ``error: ...`` + exit 2 convention."""
    try:
        yield
    except UserError as exc:
        die(exc.format())
    except KeyboardInterrupt:
        die("interrupted", 130)
