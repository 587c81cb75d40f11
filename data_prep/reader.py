"""Streaming reader for delimited text (plain or gzip) -> chunks of byte offsets.

A chunk is a block of whole lines (``block_bytes`` at a time) turned into a matrix of
field terminator offsets with numpy, so no Python object is made per row or per
field.  A field's value is read as a little-endian ``uint64`` *key* of its first 8
bytes (zero padded; unambiguous for text without NUL bytes): hashing, counting and
vocabulary lookup then run on integers.  Values longer than 8 bytes are decoded to
``str`` one by one (see :meth:`Chunk.strings`).

Line numbers are 1-based physical lines of the (decompressed) file, the header
counts.  Blank lines are ignored (as pandas does).  A line with the wrong number of
fields raises :class:`DataError` naming the file and line, or with
``on_bad_line="skip"`` is recorded in a :class:`SkipLog` and left out.

Quoted fields (``quotechar``; only for the ``csv`` format) are supported inside one
line: a block that contains the quote character is re-parsed with the ``csv``
module and rewritten with an unambiguous separator before the numpy path.

Blocks are read in order by one thread and tokenised by a small thread pool; line
numbers, the ``--rows`` limit and bad lines are then handled in file order, so the
result does not depend on the threads.
"""
from __future__ import annotations

import csv
import os
import zlib

import numpy as np

from common.errors import DataError

NL = 10
CR = 13
PAD = b"\0" * 8
CANON_SEP = "\x1f"          # separator of re-written (quoted) blocks
MASK = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [(1 << 64) - 1], dtype=np.uint64)
MASK1 = np.concatenate([[np.uint64(0)], MASK])      # indexed by length + 1


class SkipLog:
    """Lines left out with ``--on_bad_line skip``: count, first few, per file."""

    def __init__(self, keep: int = 10):
        self.keep = keep
        self.count = 0
        self.first: list[tuple[str, int, str]] = []
        self.per_file: dict[str, int] = {}
        self.enabled = True

    def add(self, path: str, line: int, reason: str) -> None:
        if not self.enabled:
            return
        self.count += 1
        self.per_file[path] = self.per_file.get(path, 0) + 1
        if len(self.first) < self.keep:
            self.first.append((path, int(line), reason))

    def to_dict(self) -> dict:
        return {"count": self.count, "first": [ln for _, ln, _ in self.first],
                "details": [f"{p}:{ln}: {r}" for p, ln, r in self.first], "per_file": dict(self.per_file)}


class GzipStream:
    """Decompress a gzip file (several members allowed) with ``zlib``.

    Unlike ``gzip.GzipFile`` it hands out everything decompressed before a truncation
    and raises ``EOFError`` only on the read after that, so the lines before the
    break are processed and the error names the first incomplete line."""

    def __init__(self, raw):
        self.raw = raw
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._buf = bytearray()
        self._done = False
        self._err: Exception | None = None

    def _fill(self, n: int) -> None:
        while len(self._buf) < n and not self._done:
            comp = self.raw.read(1 << 18)
            if not comp:
                self._done = True
                if not self._d.eof:
                    self._err = EOFError("truncated gzip file")
                break
            try:
                out = self._d.decompress(comp)
                while self._d.eof and self._d.unused_data:      # next gzip member
                    more = self._d.unused_data
                    self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    out += self._d.decompress(more)
            except zlib.error as exc:
                self._done = True
                self._err = OSError(f"corrupt gzip data ({exc})")
                break
            self._buf += out

    def read(self, n: int = -1) -> bytes:
        self._fill(n if n >= 0 else 1 << 62)
        if not self._buf and self._err is not None:
            err, self._err = self._err, None
            raise err
        k = len(self._buf) if n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:k])
        del self._buf[:k]
        return out

    def readline(self) -> bytes:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                out = bytes(self._buf[:i + 1])
                del self._buf[:i + 1]
                return out
            if self._done:
                return self.read()
            self._fill(len(self._buf) + (1 << 16))

    def close(self) -> None:
        self.raw.close()


def open_binary(path: str):
    """(readable binary stream, underlying raw file): gzip detected by its magic bytes."""
    if not os.path.exists(path):
        raise DataError("no such file", path=path)
    if os.path.isdir(path):
        raise DataError("is a directory, expected a data file", path=path)
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot open: {exc.strerror or exc}", path=path) from None
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        return GzipStream(raw), raw
    return raw, raw


def _gzip_error(path: str, line: int, exc: Exception) -> DataError:
    if isinstance(exc, EOFError):
        msg = "truncated gzip file: the compressed stream ends inside this line"
    else:
        msg = f"corrupt gzip file: {exc}"
    return DataError(msg, path=path, line=line)


class ReadError:
    """Yielded by :func:`iter_blocks` in place of the block that could not be read."""

    def __init__(self, exc: Exception, partial_lines: int):
        self.exc = exc
        self.partial_lines = partial_lines      # complete lines read after the last block


def iter_blocks(path: str, block_bytes: int, progress=None):
    """Yield blocks of whole lines, each ending in ``\\n`` (a UTF-8 BOM is dropped).

    A broken gzip stream ends the iteration with a :class:`ReadError` item, so the
    consumer can name the line where the data breaks off once it has counted the
    lines of the blocks before it."""
    f, raw = open_binary(path)
    rest, at, start = b"", 0, True
    try:
        while True:
            try:
                data = f.read(block_bytes)
            except (EOFError, OSError, zlib.error) as exc:
                yield ReadError(exc, rest.count(b"\n"))
                return
            if progress is not None:
                now = raw.tell()
                progress.update(now - at)
                at = now
            if not data:
                break
            if rest:
                data = rest + data
            if start:
                start = False
                if data.startswith(b"\xef\xbb\xbf"):
                    data = data[3:]
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            block, rest = (data, b"") if cut == len(data) else (data[:cut], data[cut:])
            yield block
        if rest:
            yield rest + b"\n"
    finally:
        f.close()
        if raw is not f:
            raw.close()


def first_line(path: str) -> tuple[str | None, bytes]:
    """The first line of a file as raw bytes (without the newline), or None when the file is empty."""
    f, raw = open_binary(path)
    try:
        try:
            ln = f.readline()
        except (EOFError, OSError, zlib.error) as exc:
            raise _gzip_error(path, 1, exc) from None
    finally:
        f.close()
        if raw is not f:
            raw.close()
    if ln.startswith(b"\xef\xbb\xbf"):
        ln = ln[3:]
    if not ln:
        return None, b""
    return ln.rstrip(b"\r\n").decode("utf-8", "surrogateescape"), ln.rstrip(b"\r\n")


def split_line(text: str, delimiter: str, quotechar: str | None) -> list[str]:
    if quotechar and quotechar in text:
        return next(csv.reader([text], delimiter=delimiter, quotechar=quotechar, strict=True))
    return text.split(delimiter)


class Chunk:
    """Rows of one block: per row its physical line number and, per needed column, the
    uint64 key of the field (``keyarr [columns, rows]``); offsets and lengths of a column
    are computed only when its strings are asked for."""

    def __init__(self, path: str, block: bytes, cols: dict, keys: np.ndarray, colmax: np.ndarray,
                 ends: np.ndarray, line_start: np.ndarray, lines: np.ndarray, encoding: str):
        self.path = path
        self.block = block
        self.cols = cols                  # column index in the file -> row of keyarr
        self.keyarr = keys                # [c, n] uint64 key of the first 8 bytes (0 = empty)
        self.colmax = colmax              # [K] longest field per column (bytes)
        self.ends = ends                  # [n, K] field end offsets (CR excluded)
        self.line_start = line_start      # [n]
        self.lines = lines                # [n] 1-based physical line numbers
        self.encoding = encoding
        self._spans: dict[int, tuple] = {}

    @classmethod
    def build(cls, path, block, buf, t, ls, lines, cols, encoding):
        """From the terminator matrix ``t [n, K]`` (C-contiguous) and line starts ``ls [n]``."""
        n, K = t.shape
        ends = t.reshape(-1)
        # d = field length + 1 (distance from the previous terminator); the first field of a row
        # starts at its line start instead
        d = np.empty_like(ends)
        np.subtract(ends[1:], ends[:-1], out=d[1:])
        d[::K] = ends[::K] - ls + 1
        D2 = d.reshape(n, K)
        last = t[:, K - 1]
        cr = (buf[np.maximum(last - 1, 0)] == CR) & (D2[:, K - 1] > 1)
        if cr.any():                      # CRLF line ends: the \r is not part of the last field
            t = t.copy()
            t[:, K - 1] -= cr
            D2[:, K - 1] -= cr
        # key = the 8 bytes after the previous terminator, masked to the field's length
        keys = np.empty(len(ends), dtype=np.uint64)
        if len(ends):
            u64p = np.ndarray((len(buf) - 8,), dtype="<u8", buffer=buf, offset=1, strides=(1,))
            keys[1:] = u64p[ends[:-1]]
            u64 = np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))
            keys[::K] = u64[ls]
            keys &= np.take(MASK1, d, mode="clip")
        colmax = D2.max(axis=0) - 1 if n else np.zeros(K, np.int64)
        k2 = keys.reshape(n, K)
        need = sorted(cols, key=cols.get)
        kT = np.ascontiguousarray(k2.T) if need == list(range(K)) else np.ascontiguousarray(k2.T[need])
        return cls(path, block, cols, kT, colmax, t, ls, lines, encoding)

    @property
    def n(self) -> int:
        return len(self.lines)

    def take(self, rows: np.ndarray) -> "Chunk":
        return Chunk(self.path, self.block, self.cols, self.keyarr[:, rows], self.colmax, self.ends[rows],
                     self.line_start[rows], self.lines[rows], self.encoding)

    def keys(self, j: int) -> np.ndarray:
        """uint64 key of the first 8 bytes of column ``j`` (0 = empty field)."""
        return self.keyarr[self.cols[j]]

    def span(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        sp = self._spans.get(j)
        if sp is None:
            start = self.line_start if j == 0 else self.ends[:, j - 1] + 1
            sp = self._spans[j] = (start, self.ends[:, j] - start)
        return sp

    def long_rows(self, j: int) -> np.ndarray | None:
        """Rows whose field ``j`` is longer than 8 bytes (their key is only a prefix), or None."""
        if self.colmax[j] <= 8:
            return None
        rows = np.flatnonzero(self.span(j)[1] > 8)
        return rows if len(rows) else None

    def strings(self, j: int, rows=None) -> list[str]:
        start, length = self.span(j)
        if rows is None:
            rows = range(len(start))
        b, enc = self.block, self.encoding
        s, ln = start.tolist(), length.tolist()
        return [b[s[i]:s[i] + ln[i]].decode(enc, "surrogateescape") for i in rows]


def key_strings(keys: np.ndarray, encoding: str) -> list[str]:
    """uint64 keys -> the strings they pack."""
    raw = np.ascontiguousarray(keys, dtype="<u8").view("S8").tolist()
    return [b.decode(encoding, "surrogateescape") for b in raw]


def string_keys(tokens: list[str], encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens -> (uint64 keys, short mask): only tokens of at most 8 bytes have a key."""
    enc = [t.encode(encoding, "surrogateescape") for t in tokens]
    short = np.array([0 < len(e) <= 8 for e in enc], dtype=bool)
    arr = np.array([e if 0 < len(e) <= 8 else b"" for e in enc], dtype="S8")
    keys = arr.view("<u8").copy() if len(enc) else np.zeros(0, dtype="<u8")
    return keys, short


class TextTable:
    """A delimited text file with ``ncols`` fields per line, read chunk by chunk."""

    def __init__(self, path: str, delimiter: str, ncols: int, header: bool = False, quotechar: str | None = None,
                 encoding: str = "utf-8", block_bytes: int = 16 << 20, max_rows: int | None = None,
                 on_bad_line: str = "error", skiplog: SkipLog | None = None, columns=None):
        if len(delimiter.encode(encoding)) != 1:
            raise DataError(f"delimiter {delimiter!r} must be a single byte", path=path)
        self.path, self.delimiter, self.ncols, self.header = path, delimiter, int(ncols), header
        self.quotechar, self.encoding, self.block_bytes = quotechar, encoding, int(block_bytes)
        self.max_rows, self.on_bad_line = max_rows, on_bad_line
        self.skiplog = skiplog if skiplog is not None else SkipLog()
        self.sep = delimiter.encode(encoding)[0]
        self.quote = quotechar.encode(encoding) if quotechar else None
        need = sorted(set(range(self.ncols) if columns is None else columns))
        self.cols = {j: r for r, j in enumerate(need)}

    def _blocks(self, progress):
        """Blocks in file order, the header line removed (see :func:`iter_blocks`)."""
        first = True
        for block in iter_blocks(self.path, self.block_bytes, progress):
            if first and self.header and not isinstance(block, ReadError):
                block = block[block.find(b"\n") + 1:]
                if not block:
                    continue
            first = False
            yield block

    def _requote(self, block: bytes, first: int, bad: list) -> bytes:
        """Re-parse a block with quoted fields; bad lines become blank lines (and go to ``bad``)."""
        text = block.decode(self.encoding, "surrogateescape")
        out = []
        lines = text.split("\n")[:-1]
        for i, ln in enumerate(lines):
            ln = ln[:-1] if ln.endswith("\r") else ln
            if not ln.strip():
                out.append("")
                continue
            try:
                fields = split_line(ln, self.delimiter, self.quotechar)
            except csv.Error as exc:
                bad.append((first + i, f"malformed quoted field ({exc})"))
                out.append("")
                continue
            if len(fields) != self.ncols:
                bad.append((first + i, f"wrong number of fields: expected {self.ncols}, found {len(fields)}"))
                out.append("")
                continue
            out.append(CANON_SEP.join(fields))
        return ("\n".join(out) + "\n").encode(self.encoding, "surrogateescape")

    def _tokenize(self, block: bytes):
        """One block -> (Chunk of its good rows or None, lines in the block, non-blank line
        indices, [(line index, reason)]); line indices are 0-based within the block."""
        K = self.ncols
        first = 0
        bad: list = []
        sep = self.sep
        if self.quote is not None and self.quote in block:
            block = self._requote(block, first, bad)
            sep = ord(CANON_SEP)
        buf = np.frombuffer(block + PAD, dtype=np.uint8)
        body = buf[:len(block)]
        if sep == 9:   # tab: one comparison finds both tab and newline
            term = np.flatnonzero(body <= 10)
            tb = body[term]
            if len(term) and tb.min() < 9:
                term = term[tb >= 9]
                tb = body[term]
        else:
            term = np.flatnonzero((body == sep) | (body == NL))
            tb = body[term]
        isnl = tb == NL
        nlines = int(np.count_nonzero(isnl))
        good_fast = len(term) == nlines * K and not bad
        if good_fast:
            t = term.reshape(nlines, K)
            good_fast = bool(isnl[K - 1::K].all())
        if good_fast:
            lines = np.arange(first, first + nlines, dtype=np.int64)
            ls = np.empty(nlines, dtype=np.int64)
            ls[0] = 0
            ls[1:] = t[:-1, -1] + 1
            nonblank = lines
        else:
            t, ls, lines, nonblank = self._slow(body, term, isnl, first, bad)
        bad.sort()
        chunk = Chunk.build(self.path, block, buf, t, ls, lines, self.cols, self.encoding) if len(lines) else None
        return chunk, nlines, nonblank, bad

    def _slow(self, buf, term, isnl, first, bad):
        """Per-line field counts: collect bad lines, skip blank ones, keep the rest."""
        K = self.ncols
        ends = np.flatnonzero(isnl)
        nf = np.diff(ends, prepend=-1)
        nlpos = term[ends]
        lstart = np.empty_like(nlpos)
        if len(nlpos):
            lstart[0] = 0
            lstart[1:] = nlpos[:-1] + 1
        width = nlpos - lstart
        blank = (nf == 1) & ((width == 0) | ((width == 1) & (buf[np.maximum(nlpos - 1, 0)] == CR)))
        sel = np.flatnonzero(~blank)
        for i in sel[nf[sel] != K].tolist():
            bad.append((first + i, f"wrong number of fields: expected {K}, found {int(nf[i])}"))
        good = sel[nf[sel] == K]
        begin = ends[good] - K + 1
        t = term[begin[:, None] + np.arange(K)] if len(good) else np.zeros((0, K), dtype=np.int64)
        nonblank = np.array(sorted(set((first + sel).tolist()) | {ln for ln, _ in bad}), dtype=np.int64)
        return t, lstart[good], (first + good).astype(np.int64), nonblank

    def chunks(self, progress=None, workers: int = 2):
        """Yield :class:`Chunk` objects of well-formed rows, in file order.

        Blocks are tokenised by ``workers`` threads (numpy releases the GIL); bad lines
        are reported in file order: the first one raises :class:`DataError`, or with
        ``on_bad_line="skip"`` each is recorded in the skip log."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        left = self.max_rows
        line = 2 if self.header else 1          # physical line number of the next block's first line
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="data_prep-tok") as ex:
            pending: deque = deque()
            blocks = self._blocks(progress)
            try:
                while True:
                    while len(pending) < max(1, workers) + 1:
                        item = next(blocks, None)
                        if item is None:
                            break
                        pending.append(item if isinstance(item, ReadError) else ex.submit(self._tokenize, item))
                    if not pending:
                        return
                    item = pending.popleft()
                    if isinstance(item, ReadError):
                        raise _gzip_error(self.path, line + item.partial_lines, item.exc)
                    chunk, nlines, nonblank, bad = item.result()
                    base, line = line, line + nlines
                    nonblank = nonblank + base
                    bad = [(ln + base, reason) for ln, reason in bad]
                    if chunk is not None:
                        chunk.lines += base
                    stop = False
                    if left is not None and len(nonblank) >= left:
                        cut = int(nonblank[left - 1])
                        bad = [b for b in bad if b[0] <= cut]
                        if chunk is not None:
                            keep = int(np.searchsorted(chunk.lines, cut, side="right"))
                            chunk = chunk.take(np.arange(keep)) if keep < chunk.n else chunk
                            chunk = chunk if chunk.n else None
                        stop = True
                    elif left is not None:
                        left -= len(nonblank)
                    for ln, reason in bad:
                        if self.on_bad_line == "error":
                            raise DataError(reason, path=self.path, line=int(ln))
                        self.skiplog.add(self.path, int(ln), reason)
                    if chunk is not None:
                        yield chunk
                    if stop:
                        return
            finally:
                for f in pending:
                    if not isinstance(f, ReadError):
                        f.cancel()
                blocks.close()


def prefetch(gen, depth: int = 2):
    """Run a generator in a background thread, ``depth`` items ahead (numpy parsing
    releases the GIL, so reading/tokenising overlaps the consumer's work).
    Exceptions are re-raised in the consumer; closing the consumer stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in gen:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            put((None, exc))
        finally:
            gen.close()

    th = threading.Thread(target=work, name="data_prep-reader", daemon=True)
    th.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        th.join()
