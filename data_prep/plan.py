"""What to read and how to encode it: the built-in formats and the JSON column spec.

A :class:`Plan` lists the label columns and the feature fields (categorical,
numeric, sequence) by *column name*; :meth:`Plan.layout` looks at one concrete file
(delimiter, header) and resolves the names to column positions.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from common.errors import DataError
from data_prep.reader import first_line, split_line

FORMATS = ("criteo", "avazu", "csv", "libfm", "synthetic")
CRITEO_INT = [f"I{i}" for i in range(1, 14)]
CRITEO_CAT = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = ["label"] + CRITEO_INT + CRITEO_CAT
RESERVED = ("label", "prob")          # batch keys that a feature field may not be named


@dataclass
class LabelSpec:
    name: str
    column: str
    kind: str = "binary"          # binary (0/1) | threshold (x > t -> 1) | map (raw -> 0/1) | sign (libfm -1/0/1)
    threshold: float = 0.0
    mapping: dict = field(default_factory=dict)


@dataclass
class CatSpec:
    name: str
    column: str
    transform: str = ""           # "" | bucketize | hour_of_day | weekday | libfm
    min_count: int = 1
    integer: bool = False         # bucketize: values must be integers


@dataclass
class NumSpec:
    name: str
    column: str
    integer: bool = False


@dataclass
class SeqSpec:
    name: str
    column: str
    separator: str
    max_len: int
    vocab: str = ""               # categorical field whose vocabulary (and embedding table) is shared
    keep: str = "last"
    min_count: int = 1


@dataclass
class Layout:
    """How one file is written."""
    path: str
    delimiter: str
    header: bool
    names: list[str]
    quotechar: str | None = None
    encoding: str = "utf-8"

    def index(self, column: str) -> int:
        return self.names.index(column)


@dataclass
class Plan:
    format: str
    labels: list[LabelSpec]
    cats: list[CatSpec] = field(default_factory=list)
    nums: list[NumSpec] = field(default_factory=list)
    seqs: list[SeqSpec] = field(default_factory=list)
    spec: dict = field(default_factory=dict)       # the csv column spec as given
    spec_path: str = ""
    spec_text: str = ""
    encoding: str = "utf-8"

    def columns_used(self) -> list[str]:
        cols = [x.column for x in self.labels + self.cats + self.nums + self.seqs]
        return list(dict.fromkeys(cols))

    def field_names(self) -> list[str]:
        return [x.name for x in self.cats + self.nums + self.seqs]

    def settings(self) -> dict:
        return {"labels": [asdict(x) for x in self.labels], "categorical": [asdict(x) for x in self.cats],
                "numeric": [asdict(x) for x in self.nums], "sequence": [asdict(x) for x in self.seqs],
                "spec": self.spec}

    # ----- per-file layout ------------------------------------------------------------------
    def layout(self, path: str) -> Layout:
        fn = {"criteo": _criteo_layout, "avazu": _avazu_layout, "csv": _csv_layout, "libfm": _libfm_layout}
        lay = fn[self.format](self, path)
        self.check_columns(path, lay.names)
        return lay

    def check_columns(self, path: str, names: list[str]) -> None:
        have = set(names)
        for col in self.columns_used():
            if col not in have:
                if self.format == "csv" and self.spec_path:
                    raise DataError(f"column {col!r} named in the spec does not exist in {path} "
                                    f"(its columns: {', '.join(names)})", path=self.spec_path,
                                    line=spec_line(self.spec_text, col))
                raise DataError(f"column {col!r} does not exist (columns: {', '.join(names)})",
                                path=path, line=1)


def _first(path: str) -> str:
    text, _ = first_line(path)
    if text is None:
        raise DataError("empty file (no data rows)", path=path, line=1)
    return text


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ----- criteo ---------------------------------------------------------------------------------
def _criteo_layout(plan: Plan, path: str) -> Layout:
    text = _first(path)
    delim = "\t" if "\t" in text else ","
    cells = text.split(delim)
    header = not _is_number(cells[0].strip()) if cells[0].strip() else False
    if header:
        names = [c.strip() for c in cells]
        if names != CRITEO_COLUMNS:
            raise DataError(f"criteo header must be label, I1..I13, C1..C26 (got {len(names)} columns "
                            f"starting {', '.join(names[:3])})", path=path, line=1)
    return Layout(path, delim, header, list(CRITEO_COLUMNS))


def criteo_plan(numeric: str, min_count: int | None) -> Plan:
    mc = 10 if min_count is None else min_count
    nums, cats = [], []
    for c in CRITEO_INT:
        if numeric == "bucketize":
            cats.append(CatSpec(c, c, "bucketize", mc, integer=True))
        else:
            nums.append(NumSpec(c, c, integer=True))
    cats += [CatSpec(c, c, "", mc) for c in CRITEO_CAT]
    return Plan("criteo", [LabelSpec("label", "label")], cats, nums)


# ----- avazu ----------------------------------------------------------------------------------
def _avazu_layout(plan: Plan, path: str) -> Layout:
    text = _first(path)
    names = [c.strip() for c in text.split(",")]
    if "click" not in names or "hour" not in names:
        raise DataError("avazu file needs a header with 'click' and 'hour' columns", path=path, line=1)
    return Layout(path, ",", True, names)


def avazu_plan(path: str, min_count: int | None) -> Plan:
    mc = 1 if min_count is None else min_count
    names = _avazu_layout(None, path).names
    cats = []
    for c in names:
        if c in ("id", "click"):
            continue
        if c == "hour":
            cats += [CatSpec("hour_of_day", "hour", "hour_of_day", mc), CatSpec("weekday", "hour", "weekday", mc)]
        else:
            cats.append(CatSpec(c, c, "", mc))
    return Plan("avazu", [LabelSpec("click", "click")], cats)


# ----- libfm ----------------------------------------------------------------------------------
def _libfm_layout(plan: Plan, path: str) -> Layout:
    text = _first(path)
    delim = "\t" if "\t" in text and " " not in text.strip() else " "
    n = len(text.rstrip("\r").split(delim))
    want = len(plan.cats) + 1
    if n != want:
        raise DataError(f"wrong number of fields: expected {want} (label and {want - 1} idx:value items), "
                        f"found {n}", path=path, line=1)
    return Layout(path, delim, False, ["label"] + [c.column for c in plan.cats])


def libfm_plan(path: str, min_count: int | None) -> Plan:
    text = _first(path)
    delim = "\t" if "\t" in text and " " not in text.strip() else " "
    n = len(text.rstrip("\r").split(delim)) - 1
    if n < 1:
        raise DataError("a libfm line needs a label and at least one idx:value item", path=path, line=1)
    mc = 1 if min_count is None else min_count
    cats = [CatSpec(f"f{i}", f"f{i}", "libfm", mc) for i in range(1, n + 1)]
    return Plan("libfm", [LabelSpec("label", "label", "sign")], cats)


# ----- csv with a JSON spec -------------------------------------------------------------------
SPEC_KEYS = {"delimiter", "header", "columns", "quotechar", "encoding", "label", "categorical", "numeric",
             "sequence", "drop"}


def spec_line(text: str, name) -> int | None:
    """Line (1-based) of the first occurrence of ``"name"`` in the spec text."""
    needle = json.dumps(name)
    for i, ln in enumerate(text.splitlines(), 1):
        if needle in ln:
            return i
    return None


def _spec_error(plan_path, text, msg, token=None):
    line = spec_line(text, token) if token is not None else None
    return DataError(msg, path=plan_path, line=line)


def _csv_layout(plan: Plan, path: str) -> Layout:
    s = plan.spec
    delim = s.get("delimiter", ",")
    quote = s.get("quotechar", '"')
    text = _first(path)
    if s.get("header", True):
        try:
            names = [c.strip() for c in split_line(text, delim, quote)]
        except Exception as exc:  # csv.Error
            raise DataError(f"unreadable header: {exc}", path=path, line=1) from None
        if "columns" in s and s["columns"] != names:
            raise DataError(f"header ({', '.join(names)}) differs from the spec's columns", path=path, line=1)
    else:
        names = list(s["columns"])
    if len(set(names)) != len(names):
        dup = sorted({c for c in names if names.count(c) > 1})
        raise DataError(f"duplicate column names: {', '.join(dup)}", path=path, line=1)
    plan.check_columns(path, names)
    used = set(plan.columns_used())
    drop = s.get("drop", [])
    if drop != "rest":
        rest = [c for c in names if c not in used and c not in drop]
        if rest:
            raise DataError(f"column(s) {', '.join(rest)} are neither used nor dropped by the spec "
                            f"{plan.spec_path} (list them in \"drop\", or set \"drop\": \"rest\")",
                            path=path, line=1)
        for c in drop:
            if c not in names:
                raise DataError(f"column {c!r} in \"drop\" does not exist in {path} (its columns: "
                                f"{', '.join(names)})", path=plan.spec_path, line=spec_line(plan.spec_text, c))
    return Layout(path, delim, bool(s.get("header", True)), names, quote, s.get("encoding", "utf-8"))


def csv_plan(spec_path: str, numeric: str | None, min_count: int | None) -> Plan:
    try:
        with open(spec_path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise DataError("no such spec file", path=spec_path) from None
    except OSError as exc:
        raise DataError(f"cannot read spec: {exc.strerror or exc}", path=spec_path) from None
    try:
        s = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg}", path=spec_path, line=exc.lineno) from None

    def err(msg, token=None):
        return _spec_error(spec_path, text, msg, token)

    if not isinstance(s, dict):
        raise err("the spec must be a JSON object")
    for k in s:
        if k not in SPEC_KEYS:
            raise err(f"unknown spec key {k!r} (known: {', '.join(sorted(SPEC_KEYS))})", k)
    delim = s.get("delimiter", ",")
    if delim == "tab":
        delim = s["delimiter"] = "\t"
    if not isinstance(delim, str) or len(delim) != 1 or delim in "\r\n\"":
        raise err(f"delimiter must be one character, got {delim!r}", "delimiter")
    quote = s.get("quotechar", '"')
    if quote is not None and (not isinstance(quote, str) or len(quote) != 1 or quote == delim):
        raise err(f"quotechar must be one character other than the delimiter, or null (got {quote!r})",
                  "quotechar")
    if not isinstance(s.get("header", True), bool):
        raise err("header must be true or false", "header")
    if not s.get("header", True):
        cols = s.get("columns")
        if not isinstance(cols, list) or not cols or not all(isinstance(c, str) and c for c in cols):
            raise err("a spec with \"header\": false needs \"columns\": a list of column names", "header")
    if "columns" in s and (not isinstance(s["columns"], list) or
                           not all(isinstance(c, str) and c for c in s["columns"])):
        raise err("columns must be a list of names", "columns")
    enc = s.get("encoding", "utf-8")
    try:
        "x".encode(enc)
    except (LookupError, TypeError):
        raise err(f"unknown encoding {enc!r}", "encoding") from None
    default_numeric = numeric or "standardize"
    mc_default = 1 if min_count is None else min_count

    def entries(key):
        v = s.get(key, [])
        if not isinstance(v, list):
            raise err(f"{key!r} must be a list", key)
        out = []
        for e in v:
            if isinstance(e, str):
                e = {"column": e}
            if not isinstance(e, dict) or not isinstance(e.get("column"), str) or not e["column"]:
                raise err(f"each {key!r} entry must be a column name or an object with \"column\"", key)
            out.append(e)
        return out

    def check_keys(e, allowed, key):
        for k in e:
            if k not in allowed:
                raise err(f"unknown key {k!r} in a {key!r} entry (known: {', '.join(sorted(allowed))})", k)

    def int_opt(e, k, default, lo):
        v = e.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise err(f"{k!r} must be an integer >= {lo} (got {v!r})", k)
        return v

    # labels
    lab = s.get("label")
    if lab is None:
        raise err("the spec needs a \"label\" column")
    labs = lab if isinstance(lab, list) else [lab]
    labels = []
    for e in labs:
        if isinstance(e, str):
            e = {"column": e}
        if not isinstance(e, dict) or not isinstance(e.get("column"), str):
            raise err("label must be a column name or {\"column\": ..., \"threshold\"|\"map\": ...}", "label")
        check_keys(e, {"column", "name", "threshold", "map"}, "label")
        if "threshold" in e and "map" in e:
            raise err("a label takes \"threshold\" or \"map\", not both", "threshold")
        if "threshold" in e:
            t = e["threshold"]
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise err(f"threshold must be a number (got {t!r})", "threshold")
            labels.append(LabelSpec(e.get("name", e["column"]), e["column"], "threshold", float(t)))
        elif "map" in e:
            m = e["map"]
            if not isinstance(m, dict) or not m or not all(isinstance(v, (int, float)) and v in (0, 1)
                                                            for v in m.values()):
                raise err("map must be an object of raw value -> 0 or 1", "map")
            labels.append(LabelSpec(e.get("name", e["column"]), e["column"], "map",
                                    mapping={str(k): int(v) for k, v in m.items()}))
        else:
            labels.append(LabelSpec(e.get("name", e["column"]), e["column"]))

    cats = []
    for e in entries("categorical"):
        check_keys(e, {"column", "name", "min_count"}, "categorical")
        cats.append(CatSpec(e.get("name", e["column"]), e["column"], "", int_opt(e, "min_count", mc_default, 1)))
    nums = []
    for e in entries("numeric"):
        check_keys(e, {"column", "name", "transform", "min_count", "integer"}, "numeric")
        tr = e.get("transform", default_numeric)
        if tr not in ("bucketize", "standardize"):
            raise err(f"numeric transform must be bucketize or standardize (got {tr!r})", "transform")
        integer = bool(e.get("integer", False))
        if tr == "bucketize":
            cats.append(CatSpec(e.get("name", e["column"]), e["column"], "bucketize",
                                int_opt(e, "min_count", mc_default, 1), integer))
        else:
            nums.append(NumSpec(e.get("name", e["column"]), e["column"], integer))
    seqs = []
    for e in entries("sequence"):
        check_keys(e, {"column", "name", "separator", "max_len", "vocab", "keep", "min_count"}, "sequence")
        sep = e.get("separator")
        if not isinstance(sep, str) or not sep:
            raise err("a sequence needs a \"separator\" string", "sequence")
        if sep == delim:
            raise err("a sequence separator must differ from the delimiter", "separator")
        keep = e.get("keep", "last")
        if keep not in ("last", "first"):
            raise err(f"keep must be \"last\" or \"first\" (got {keep!r})", "keep")
        if "max_len" not in e:
            raise err("a sequence needs \"max_len\"", "sequence")
        seqs.append(SeqSpec(e.get("name", e["column"]), e["column"], sep, int_opt(e, "max_len", None, 1),
                            e.get("vocab", ""), keep, int_opt(e, "min_count", mc_default, 1)))
    if not cats and not nums and not seqs:
        raise err("the spec names no feature columns (categorical, numeric or sequence)")
    plan = Plan("csv", labels, cats, nums, seqs, spec=s, spec_path=spec_path, spec_text=text, encoding=enc)
    names = plan.field_names()
    for n in names:
        if n in RESERVED:
            raise err(f"a feature field may not be named {n!r} (give it another \"name\")", n)
        if names.count(n) > 1:
            raise err(f"field name {n!r} is used twice (give one another \"name\")", n)
    cat_names = {c.name: c for c in cats}
    for q in seqs:
        if q.vocab:
            owner = cat_names.get(q.vocab)
            if owner is None or owner.transform:
                raise err(f"sequence {q.name!r} shares the vocabulary of {q.vocab!r}, which is not a "
                          f"(plain) categorical field", q.vocab)
    lab_cols = {x.column for x in labels}
    for x in cats + nums + seqs:
        if x.column in lab_cols:
            raise err(f"column {x.column!r} is a label and cannot also be a feature", x.column)
    drop = s.get("drop", [])
    if drop != "rest" and (not isinstance(drop, list) or not all(isinstance(c, str) for c in drop)):
        raise err("drop must be a list of column names or \"rest\"", "drop")
    if isinstance(drop, list):
        for c in drop:
            if c in plan.columns_used():
                raise err(f"column {c!r} is both used and dropped", c)
    if not s.get("header", True):
        cols = s["columns"]
        for c in plan.columns_used() + (drop if isinstance(drop, list) else []):
            if c not in cols:
                raise err(f"column {c!r} is not in the spec's \"columns\" ({', '.join(cols)})", c)
    return plan

