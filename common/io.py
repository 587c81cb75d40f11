"""Atomic file and directory writes: outputs appear complete or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


def atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False):
    """Yield a temporary sibling directory; rename it to ``path`` only on success.

    On any exception the temporary directory is removed and ``path`` is untouched.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            if not overwrite:
                raise FileExistsError(path)
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def last_json_line(text: str):
    """The last line of ``text`` that starts with ``{``, parsed as JSON (``ValueError`` if it is not
    JSON), or None when there is no such line -- a child process's result line, whatever other
    lines (log messages, a library's late warnings) surround it."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip().startswith("{")]
    return json.loads(lines[-1]) if lines else None
