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
    """Yield blocks of whole lines, each ending in ``\\n`` (a UTF-8 BOM is dropped), as
    ``bytearray`` objects (a plain file is read straight into them: no other copy).

    A broken gzip stream ends the iteration with a :class:`ReadError` item, so the
    consumer can name the line where the data breaks off once it has counted the
    lines of the blocks before it."""
    f, raw = open_binary(path)
    rest, at, start = b"", 0, True
    direct = f is raw
    try:
        while True:
            try:
                if direct:
                    data = bytearray(len(rest) + block_bytes)
                    data[:len(rest)] = rest
                    got = f.readinto(memoryview(data)[len(rest):])
                    if got < block_bytes:
                        del data[len(rest) + got:]
                    fresh = got
                else:
                    chunk = f.read(block_bytes)
                    data = bytearray(rest + chunk) if chunk else bytearray(rest)
                    fresh = len(chunk)
            except (EOFError, OSError, zlib.error) as exc:
                yield ReadError(exc, rest.count(b"\n"))
                return
            if progress is not None:
                now = raw.tell()
                progress.update(now - at)
                at = now
            if not fresh:
                break
            if start:
                start = False
                if data.startswith(b"\xef\xbb\xbf"):
                    del data[:3]
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = bytes(data)
                continue
            rest = bytes(data[cut:])
            if cut < len(data):
                del data[cut:]
            yield data
        if rest:
            yield bytearray(rest + b"\n")
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


def _words(buf: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The little-endian uint64 of the 8 bytes at each offset; past the end of ``buf``
    the bytes read as zero."""
    L = len(buf)
    hi = L - 8
    if hi >= 0 and (not len(starts) or int(starts.max()) <= hi):
        return np.ndarray((hi + 1,), dtype="<u8", buffer=buf, strides=(1,))[starts]
    tail = np.zeros(L + 8, np.uint8)             # rare: a short block, or short fields at its very end
    tail[:L] = buf
    return np.ndarray((L + 1,), dtype="<u8", buffer=tail, strides=(1,))[starts]


def _load_keys(buf: np.ndarray, ends: np.ndarray, keys: np.ndarray, ls, K: int) -> None:
    """``keys[i]`` = the 8 bytes after terminator ``ends[i - 1]`` (the first field of a row:
    after its line start ``ls``; ``ls=None``: each row starts right after the previous
    one); bytes past the block read as zero.  No copy of the block is made: only the few
    fields that start in its last 8 bytes are read separately."""
    L = len(buf)
    if L >= 9:
        u64p = np.ndarray((L - 8,), dtype="<u8", buffer=buf, offset=1, strides=(1,))   # u64p[e] = after e
        j = int(np.searchsorted(ends[:-1], L - 9, side="right"))     # ends[:j] <= L - 9: fully inside
        keys[1:j + 1] = u64p[ends[:j]]
    else:
        j = 0
    if j + 1 < len(ends):
        keys[j + 1:] = _words(buf, ends[j:-1] + 1)
    if ls is None:
        keys[0] = _words(buf, np.zeros(1, np.int64))[0]
    else:
        keys[::K] = _words(buf, ls)


class Chunk:
    """Rows of one block: per row its physical line number and, per needed column, the
    uint64 key of the field (``keyarr [columns, rows]``).  Where some field is longer
    than 8 bytes (its key is only a prefix) or strings are wanted (``string_cols``), the
    block and the field end offsets are kept too, to cut out the strings of a column."""

    def __init__(self, path: str, block: bytes | None, cols: dict, keys: np.ndarray, colmax: np.ndarray | None,
                 ends: np.ndarray | None, line_start: np.ndarray | None, lines: np.ndarray, encoding: str):
        self.path = path
        self.block = block
        self.cols = cols                  # column index in the file -> row of keyarr
        self.keyarr = keys                # [c, n] uint64 key of the first 8 bytes (0 = empty)
        self.colmax = colmax              # [K] longest field per column (bytes); None: all <= 8
        self.ends = ends                  # [n, K] field end offsets (CR excluded), or None
        self.line_start = line_start      # [n], or None
        self.lines = lines                # [n] 1-based physical line numbers
        self.encoding = encoding
        self._spans: dict[int, tuple] = {}

    @classmethod
    def build(cls, path, block, buf, t, ls, lines, cols, encoding, contiguous=False, string_cols=()):
        """From the terminator matrix ``t [n, K]`` (C-contiguous) and line starts ``ls [n]``;
        ``contiguous``: the rows are all the lines of the block (each line starts right
        after the previous line's newline), which saves a few passes."""
        n, K = t.shape
        ends = t.reshape(-1)
        # prev = offset of the terminator before each field (the first field of a row: its line start - 1)
        # d = field length + 1
        d = np.empty_like(ends)
        if len(ends):
            np.subtract(ends[1:], ends[:-1], out=d[1:])
            if contiguous:
                d[0] = ends[0] + 1
            else:
                d[::K] = ends[::K] - ls + 1
        if n and b"\r" in block:
            last = t[:, K - 1]
            cr = (buf[np.maximum(last - 1, 0)] == CR) & (d[K - 1::K] > 1)
            if cr.any():                  # CRLF line ends: the \r is not part of the last field
                t = t.copy()
                t[:, K - 1] -= cr
                d[K - 1::K] -= cr
        # key = the 8 bytes after the previous terminator, masked to the field's length
        keys = np.empty(len(ends), dtype=np.uint64)
        if len(ends):
            _load_keys(buf, ends, keys, None if contiguous else ls, K)
            keys &= np.take(MASK1, d, mode="clip")
        k2 = keys.reshape(n, K)
        need = sorted(cols, key=cols.get)
        kT = np.ascontiguousarray(k2.T) if need == list(range(K)) else np.ascontiguousarray(k2.T[need])
        colmax = None
        if n and (string_cols or int(d.max()) > 9):         # some field is longer than 8 bytes
            colmax = d.reshape(n, K).max(axis=0) - 1
            return cls(path, block, cols, kT, colmax, t, ls, lines, encoding)
        return cls(path, None, cols, kT, colmax, None, None, lines, encoding)

    @property
    def n(self) -> int:
        return len(self.lines)

    def take(self, rows: np.ndarray) -> "Chunk":
        if self.ends is None:
            return Chunk(self.path, None, self.cols, self.keyarr[:, rows], None, None, None, self.lines[rows],
                         self.encoding)
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
        if self.colmax is None or self.colmax[j] <= 8:
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
                 on_bad_line: str = "error", skiplog: SkipLog | None = None, columns=None, string_cols=()):
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
        self.string_cols = tuple(string_cols)      # columns whose strings are read (sequences)

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
        buf = body = np.frombuffer(block, dtype=np.uint8)
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
        chunk = Chunk.build(self.path, block, buf, t, ls, lines, self.cols, self.encoding, contiguous=good_fast,
                            string_cols=self.string_cols) if len(lines) else None
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

    def _task(self, block: bytes, lines_before: int, post):
        out = self._tokenize(block)
        chunk = out[0]
        return out + ((post(chunk, lines_before, out[1]) if post is not None and chunk is not None else None),)

    def chunks(self, progress=None, workers: int = 2, post=None):
        """Yield :class:`Chunk` objects of well-formed rows, in file order.

        Blocks are tokenised by ``workers`` threads (numpy releases the GIL); bad lines
        are reported in file order: the first one raises :class:`DataError`, or with
        ``on_bad_line="skip"`` each is recorded in the skip log.

        ``post(chunk, lines_before, lines)``, when given, runs in the worker thread right
        after a block is tokenised (``lines_before``: lines in the blocks before it,
        ``lines``: in it) and ``(chunk, post's result)`` pairs are yielded instead.  It
        sees the chunk before line numbers are made absolute and before the ``max_rows``
        cut (which makes a new Chunk object), and must not change shared state."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        left = self.max_rows
        line = 2 if self.header else 1          # physical line number of the next block's first line
        submitted = 0                           # lines in the blocks submitted so far
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="data_prep-tok") as ex:
            pending: deque = deque()
            blocks = self._blocks(progress)
            try:
                while True:
                    while len(pending) < max(1, workers) + 1:
                        item = next(blocks, None)
                        if item is None:
                            break
                        if isinstance(item, ReadError):
                            pending.append(item)
                            continue
                        pending.append(ex.submit(self._task, item, submitted, post))
                        submitted += item.count(b"\n")
                    if not pending:
                        return
                    item = pending.popleft()
                    if isinstance(item, ReadError):
                        raise _gzip_error(self.path, line + item.partial_lines, item.exc)
                    chunk, nlines, nonblank, bad, extra = item.result()
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
                        yield chunk if post is None else (chunk, extra)
                    if stop:
                        return
            finally:
                for f in pending:
                    if not isinstance(f, ReadError):
                        f.cancel()
                blocks.close()


def ordered_map(executor, fn, items, window: int):
    """``fn(item)`` for each item, run by ``executor`` at most ``window`` ahead; results in order."""
    from collections import deque

    pending: deque = deque()
    it = iter(items)
    end = object()
    try:
        while True:
            while len(pending) < window:
                x = next(it, end)
                if x is end:
                    break
                pending.append(executor.submit(fn, x))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        close = getattr(it, "close", None)
        if close is not None:
            close()
