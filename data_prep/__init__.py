"""Raw click logs -> fitted encoders -> a dataset directory (schema.json, store/, vocab/).

Usage::

    python -m data_prep --format {criteo,avazu,csv,libfm,synthetic} --input PATH
        [--valid PATH --test PATH] --output DIR [--spec SPEC.json] [--min_count N]
        [--split 0.8,0.1,0.1] [--stratify] [--seed S] [--rows N] [--on_bad_line error|skip]
        [--numeric bucketize|standardize] [--chunk_mb MB] [--chunk_rows N] [--overwrite]
        [--no_cache] [--count_mb MB] [--workers N] [--progress | --no_progress]
        [--base_ctr P (synthetic)]

Input files are plain text or gzip (recognised by content, any name).  One ``--input``
is split into train/valid/test by ``--split`` and ``--seed`` (see data_prep/split.py:
the split of a row is a pure function of the seed and its row number, exact
proportions in every block of ``B`` rows; ``--stratify`` does this per label class);
with ``--valid`` and/or ``--test`` the files are the splits.  ``--rows N`` reads only
the first N data lines of each file.

Encoders are fitted on the TRAIN rows only (common/encoders.py): categorical
vocabularies keep tokens seen at least ``--min_count`` times (default 10 for criteo,
1 otherwise) ordered by descending count then token; index 0 = missing/padding,
1 = out-of-vocabulary, 2.. = the vocabulary.  They are saved as JSON in
``<output>/vocab/`` and ``common.encoders.Decoder`` turns stored rows back into
tokens.  Reading is streamed in chunks of ``--chunk_mb`` MiB and vectorised with
numpy (no Python work per row for plain categorical and numeric columns: a field
becomes a uint64 key of its bytes, see data_prep/reader.py, looked up in numpy hash
tables, see data_prep/columns.py), in two passes (1: count on train rows, 2: encode
and write).  Pass 1 spills its parsed chunks of the input to a scratch file in the
temporary output directory (about the size of the raw text) and pass 2 replays it
instead of parsing the text again; ``--no_cache`` (or too little free disk) re-reads
the text instead, with the same result.

Memory does not grow with the file: nothing is kept per row, and the token counts of
pass 1 (whose number grows with the file: most hashed Criteo tokens are rare) are
held in at most ``--count_mb`` MiB (default 16); beyond that they go to scratch
files partitioned by a hash of the token and are merged one partition at a time when
fitting, so that memory is bounded by that budget plus the fitted vocabularies.  The
result is exactly that of counting in memory.

``--workers`` threads (default 2) tokenise blocks, look up known values and count the
tokens of each block; the file-order bookkeeping (line numbers, bad lines, new
values, the split) stays in one thread, and pass 2 encodes blocks in the worker
threads while that thread writes the store (numpy releases the GIL).  The output does
not depend on the number of threads or on ``--chunk_mb``.  The output directory is
written under a temporary name and renamed at the end: it appears complete or not at
all.

Formats
-------
``criteo``  label, I1..I13 (integers, may be empty, ``260.0`` is accepted), C1..C26
            (hashed strings, may be empty).  Tab-separated without a header (the
            original release) or comma-separated with the header ``label,I1,..,C26``
            (the DeepCTR sample), detected from the first line.  ``--numeric
            bucketize`` (default) turns I1..I13 into categorical fields of Criteo
            log^2 buckets (``x > 2 -> "b<floor(ln(x)^2)>"``, else ``str(x)``; missing ->
            index 0); ``standardize`` makes them numeric fields ``(x - mean) / std``
            (train statistics, missing -> 0).
``avazu``   comma-separated with a header; label ``click``; ``id`` is dropped; ``hour``
            (``YYMMDDHH``) becomes the fields ``hour_of_day`` (0..23) and ``weekday``
            (0 = Monday); every other column is categorical.
``libfm``   ``label idx:val idx:val ...`` lines (space or tab separated; Frappe /
            MovieLens-tag style) with the same number of items on every line.  Item
            position ``i`` becomes the categorical field ``f<i>`` whose token is the
            feature index ``idx`` (each position of these files is one original field);
            values must be 1 (binary libFM).  Labels -1/0 -> 0, 1 -> 1.
``csv``     any delimited file described by ``--spec SPEC.json`` (below).
``synthetic``  data with a known click model, from ``common.synthetic.write_synthetic``
            (``--rows``, ``--seed``, ``--split``, ``--base_ctr``); no ``--input``.

The csv column spec
-------------------
A JSON object::

    {
      "delimiter": "\\t",           one character (or "tab"); default ","
      "header": true,              first line names the columns (default true)
      "columns": ["user", ...],    the column names when "header" is false (checked
                                   against the header when it is true)
      "quotechar": "\\"",           quoting inside one line; null = no quoting
      "encoding": "utf-8",         e.g. "latin-1"
      "label": "clk",              a 0/1 column, or {"column": "rating", "threshold": 3}
                                   (value > 3 -> 1, else 0), or {"column": "y",
                                   "map": {"yes": 1, "no": 0}}; optional "name"; a list
                                   of these gives several labels (the first is "label"
                                   in batches)
      "categorical": ["userid", {"column": "brand", "name": "brand", "min_count": 2}],
      "numeric": ["price", {"column": "age", "transform": "bucketize"|"standardize",
                            "integer": false, "min_count": 1}],
                                   transform default: --numeric, else "standardize"
      "sequence": [{"column": "click_sequence", "separator": "^", "max_len": 20,
                    "vocab": "adgroup_id", "keep": "last", "min_count": 1}],
                                   items of a list column; the LAST max_len items are
                                   kept (the most recent ones, lists being written
                                   oldest first; "keep": "first" keeps the first ones),
                                   stored left-aligned and 0-padded at the end.  With
                                   "vocab" the sequence shares that categorical field's
                                   vocabulary and embedding table (embedding_group);
                                   the shared vocabulary is fitted on the counts of
                                   both columns (of the kept sequence items).
      "drop": ["time_stamp"]       columns not used; every column of the file must be
                                   used or dropped ("drop": "rest" drops all others)
    }

Examples (the shared sample data): MovieLens ``u.data``::

    {"delimiter": "\\t", "header": false, "columns": ["user", "item", "rating", "timestamp"],
     "label": {"column": "rating", "threshold": 3}, "categorical": ["user", "item"],
     "drop": ["timestamp"]}

the ml100k01-1-5 split (``--input train.csv --valid validation.csv --test test.csv``)::

    {"delimiter": "\\t", "label": "label", "categorical": ["uid", "iid"]}

Taobao (FuxiCTR tiny sample)::

    {"label": "clk", "categorical": ["userid", "adgroup_id", "pid", "cate_id", ...],
     "numeric": ["price"], "sequence": [{"column": "click_sequence", "separator": "^",
     "max_len": 10, "vocab": "adgroup_id"}], "drop": ["time_stamp"]}

Bad input
---------
Every problem ends the program with status 2 and one line on stderr,
``error: <file>:<line>: <what is wrong>`` (line numbers are 1-based physical lines,
the header counts), and leaves no output directory: a wrong number of fields, a
non-numeric value in a numeric column, a label that is not 0/1, an empty file, a
truncated gzip file, a missing file, a spec naming a column that does not exist.
With ``--on_bad_line skip`` malformed lines are left out instead and recorded in
``schema.skipped_lines`` (``count``, the ``first`` line numbers, ``details`` and
``per_file``).  Blank lines are ignored.
"""
__all__ = ["prepare", "Options", "main"]


def __getattr__(name):
    if name in ("prepare", "Options"):
        from data_prep import pipeline

        return getattr(pipeline, name)
    if name == "main":
        from data_prep.cli import main

        return main
    raise AttributeError(name)
