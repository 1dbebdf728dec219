"""Streaming readers for untrusted record files, shared by the data stages (sanitize, dedup).

Reads: JSONL (``.jsonl``/``.ndjson``), a JSON array (``.json``; a ``.json`` file that is not an array is read as
JSONL), CSV (``.csv``, header row), Parquet (``.parquet``) and a directory written by ``datasets.save_to_disk``.
Writes: nothing itself; :func:`process_file` writes a stage's JSONL output and ``OUTPUT.rejected.jsonl``.

Every record must be an object whose text field is a non-empty string. A bad record is either fatal
(``bad_records="fail"``: :class:`BadInputError`, one line "<file>:<line>: <what is wrong>") or quarantined
(``"quarantine"``: ``{"line", "reason", "raw"}`` appended to ``rejected``). For Parquet and dataset
directories "line" is the 1-based row number. Memory does not grow with the file: text formats are read line by
line (JSON arrays element by element), columnar formats in Arrow batches.

Run alone to check a file::

    python -m pipelines.records INPUT [--field text] [--bad-records fail|quarantine]
"""

from __future__ import annotations

import argparse
import codecs
import csv
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pipelines.artifacts import atomic_write

BadRecords = Literal["fail", "quarantine"]
_BATCH_ROWS = 1024
_JSON_CHUNK = 1 << 16


class BadInputError(Exception):
    """Bad input, already phrased as one line for the user: ``<file>:<line>: <what is wrong>``."""

    def __init__(self, path: Path | str, what: str, line: int | None = None) -> None:
        self.path, self.line, self.what = str(path), line, what.replace("\n", " ")
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {self.what}")


def rejected_path(output: Path) -> Path:
    """Where quarantined records go: ``OUTPUT.rejected.jsonl`` beside the output."""
    return output.with_name(output.name + ".rejected.jsonl")


def _check(obj: Any, field: str) -> str | None:
    """Why ``obj`` is not a usable record (an object with a non-empty string ``field``), or None."""
    if not isinstance(obj, dict):
        return f"not a JSON object (got {_kind(obj)})"
    if field not in obj or obj[field] is None:
        return f"missing field {field!r}"
    value = obj[field]
    if not isinstance(value, str):
        return f"field {field!r} is not a string (got {_kind(value)})"
    if not value.strip():
        return f"field {field!r} is empty"
    return None


def _kind(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), type(v).__name__)


class RecordError(ValueError):
    """Raised by a ``normalize`` callable: the record is bad; ``str()`` says what is wrong."""


Normalize = Callable[[dict], dict]


class _Sink:
    """Applies the bad-record policy in one place so every format behaves the same."""

    def __init__(self, path: Path, mode: BadRecords, rejected: list | None, field: str | None,
                 normalize: Normalize | None = None) -> None:
        if mode not in ("fail", "quarantine"):
            raise ValueError(f"bad_records must be 'fail' or 'quarantine', not {mode!r}")
        self.path, self.mode, self.field, self.normalize = path, mode, field, normalize
        self.rejected = rejected if rejected is not None else []

    def accept(self, obj: Any, line: int | None, raw: str) -> dict | None:
        """The record (normalised when a ``normalize`` is set), or None after applying the policy to a bad one."""
        if self.normalize is not None:
            if not isinstance(obj, dict):
                self.bad(line, f"not a JSON object (got {_kind(obj)})", raw)
                return None
            try:
                return self.normalize(obj)
            except RecordError as e:
                self.bad(line, str(e), raw)
                return None
        why = _check(obj, self.field)
        if why:
            self.bad(line, why, raw)
            return None
        return obj

    def bad(self, line: int | None, reason: str, raw: str) -> None:
        if self.mode == "fail":
            raise BadInputError(self.path, reason, line)
        self.rejected.append({"line": line, "reason": reason, "raw": raw})


def _utf8_error(e: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1})"


# ------------------------------------------------------------------------------------------------------- formats
def _iter_jsonl(path: Path, sink: _Sink) -> Iterator[dict]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                sink.bad(n, _utf8_error(e), raw.decode("utf-8", "replace").rstrip("\r\n"))
                continue
            if not line.strip():
                continue  # blank lines (often a trailing one) are not records
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                sink.bad(n, f"invalid JSON: {e.msg} (column {e.colno})", line.rstrip("\r\n"))
                continue
            rec = sink.accept(obj, n, line.rstrip("\r\n"))
            if rec is not None:
                yield rec


_WS = re.compile(r"[ \t\r\n]*")


def _iter_json_array(path: Path, sink: _Sink) -> Iterator[dict]:
    """Decode one array element at a time from a sliding buffer (no ijson dependency, memory = a few elements)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("strict")
    st = {"buf": "", "pos": 0, "line": 1, "eof": False, "first": True}

    def more() -> bool:
        if st["eof"]:
            return False
        chunk = f.read(_JSON_CHUNK)
        if st["first"] and chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8) :]
        st["first"] = False
        try:
            text = utf8.decode(chunk, final=not chunk)
        except UnicodeDecodeError:  # an array cannot be resynchronised after a bad byte: always fatal
            raise BadInputError(path, "invalid UTF-8 in JSON array", st["line"]) from None
        # drop what is consumed so the buffer stays a few chunks long, not the whole file
        st["buf"], st["pos"] = st["buf"][st["pos"] :] + text, 0
        st["eof"] = not chunk
        return True

    def skip_ws() -> str:
        """Next non-blank character ('' at end of file), counting newlines for error messages."""
        while True:
            m = _WS.match(st["buf"], st["pos"])
            st["line"] += st["buf"].count("\n", st["pos"], m.end())
            st["pos"] = m.end()
            if st["pos"] < len(st["buf"]):
                return st["buf"][st["pos"]]
            if not more():
                return ""

    with open(path, "rb") as f:
        if skip_ws() != "[":
            raise BadInputError(path, "a .json file must hold a JSON array of objects (or one object per line)", st["line"])
        st["pos"] += 1
        expect_value, empty_ok = True, True  # ']' may close the array right after '[' or after a value
        while True:
            c = skip_ws()
            if not c:
                raise BadInputError(path, "invalid JSON: unterminated array", st["line"])
            if c == "]" and (empty_ok or not expect_value):
                return
            if not expect_value:
                if c != ",":
                    raise BadInputError(path, f"invalid JSON: expected ',' or ']' but found {c!r}", st["line"])
                st["pos"] += 1
                expect_value, empty_ok = True, False
                continue
            while True:
                try:
                    obj, end = decoder.raw_decode(st["buf"], st["pos"])
                    if end == len(st["buf"]) and not st["eof"]:
                        raise ValueError  # a number or literal may continue in the next chunk
                    break
                except (json.JSONDecodeError, ValueError) as e:
                    if not more():
                        msg = e.msg if isinstance(e, json.JSONDecodeError) else "truncated value"
                        raise BadInputError(path, f"invalid JSON: {msg}", st["line"]) from None
            raw = st["buf"][st["pos"] : end]
            start_line = st["line"]
            st["line"] += raw.count("\n")
            st["pos"], expect_value, empty_ok = end, False, False
            rec = sink.accept(obj, start_line, raw)
            if rec is not None:
                yield rec


def _iter_csv(path: Path, sink: _Sink) -> Iterator[dict]:
    counter = {"line": 0}

    def lines() -> Iterator[str]:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                counter["line"] = n
                if n == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    sink.bad(n, _utf8_error(e), raw.decode("utf-8", "replace").rstrip("\r\n"))

    reader = csv.reader(lines())
    try:
        header = next(reader)
    except StopIteration:
        return
    if sink.normalize is None and sink.field not in header:
        raise BadInputError(path, f"no column {sink.field!r} in the CSV header", 1)
    prev_end = counter["line"]
    for row in reader:
        start, prev_end = prev_end + 1, counter["line"]
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            sink.bad(start, f"row has {len(row)} cells, header has {len(header)}", ",".join(row))
            continue
        rec = sink.accept(dict(zip(header, row)), start, ",".join(row))
        if rec is not None:
            yield rec


def _iter_arrow_batches(path: Path, batches: Iterator[list[dict]], names: list[str], sink: _Sink) -> Iterator[dict]:
    if sink.normalize is None and sink.field not in names:
        raise BadInputError(path, f"no column {sink.field!r} (columns: {', '.join(names)})")
    row = 0
    for batch in batches:
        for obj in batch:
            row += 1
            rec = sink.accept(obj, row, json.dumps(obj, ensure_ascii=False, default=str))
            if rec is not None:
                yield rec


def _iter_parquet(path: Path, sink: _Sink) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise BadInputError(path, f"not a readable Parquet file ({type(e).__name__})") from None
    batches = (b.to_pylist() for b in pf.iter_batches(batch_size=_BATCH_ROWS))
    yield from _iter_arrow_batches(path, batches, pf.schema_arrow.names, sink)


def _iter_hf_dir(path: Path, sink: _Sink, split: str | None = None) -> Iterator[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow: nothing is loaded up front
    except Exception as e:
        raise BadInputError(path, f"not a dataset directory written by datasets.save_to_disk ({type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is not None:
            if split not in ds:
                raise BadInputError(path, f"no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
        elif "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise BadInputError(path, f"dataset has several splits ({', '.join(ds)}) and no 'train' split")
    names = list(ds.column_names)

    def batches() -> Iterator[list[dict]]:
        for b in ds.iter(batch_size=_BATCH_ROWS):
            keys = list(b)
            yield [dict(zip(keys, vals)) for vals in zip(*(b[k] for k in keys))]

    yield from _iter_arrow_batches(path, batches(), names, sink)


def iter_records(
    path: Path, field: str | None, bad_records: BadRecords = "fail", rejected: list | None = None,
    normalize: Normalize | None = None, split: str | None = None,
) -> Iterator[dict]:
    """Yield the valid records of ``path`` one at a time; see the module docstring for the policy.

    Without ``normalize`` a record is valid when ``field`` holds a non-empty string. With it, ``normalize(obj)``
    returns the record to yield or raises :class:`RecordError` (the conversation formats, ``pipelines.formats``).
    ``split`` picks a split of a dataset directory.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(path, "file not found")
    sink = _Sink(path, bad_records, rejected, field, normalize)
    if path.is_dir():
        yield from _iter_hf_dir(path, sink, split)
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path, sink)
    elif suffix == ".json":
        with open(path, "rb") as f:
            head = f.read(64).lstrip(codecs.BOM_UTF8).lstrip()
        reader = _iter_json_array if head.startswith(b"[") else _iter_jsonl
        yield from reader(path, sink)
    elif suffix == ".csv":
        yield from _iter_csv(path, sink)
    elif suffix in (".parquet", ".pq"):
        yield from _iter_parquet(path, sink)
    else:
        raise BadInputError(path, f"unknown format {suffix or '(no extension)'!r}; use .jsonl, .json, .csv, .parquet or a dataset directory")


# ---------------------------------------------------------------------------------------------- shared file driver
def dumps_record(obj: dict) -> str:
    """One JSONL line; ``default=str`` because Parquet/Arrow rows may hold dates or decimals."""
    return json.dumps(obj, ensure_ascii=False, default=str) + "\n"


def check_bad_fraction(path: Path, n_good: int, n_bad: int, max_bad_fraction: float, output: Path) -> None:
    total = n_good + n_bad
    if total and n_bad / total > max_bad_fraction:
        raise BadInputError(
            path,
            f"{n_bad} of {total} records rejected ({n_bad / total:.1%}), above max_bad_fraction "
            f"{max_bad_fraction:.1%}; see {rejected_path(output)}",
        )


def write_rejected(output: Path, rejected: list[dict], scrub: Callable[[str], str] | None = None) -> Path:
    """Write quarantined records; ``scrub`` lets sanitize mask PII in the raw text it keeps for the user."""
    path = rejected_path(output)
    with atomic_write(path) as f:
        for r in rejected:
            raw = scrub(r["raw"]) if scrub else r["raw"]
            f.write(json.dumps({**r, "raw": raw}, ensure_ascii=False) + "\n")
    return path


def process_file(
    input: Path,
    output: Path,
    field: str,
    bad_records: BadRecords,
    max_bad_fraction: float,
    transform: Callable[[dict], dict | None],
    scrub: Callable[[str], str] | None = None,
) -> dict:
    """Stream ``input`` through ``transform`` (None drops a record) into ``output`` JSONL, atomically.

    In quarantine mode the rejected records go to ``OUTPUT.rejected.jsonl`` (written even when the run aborts,
    so the user can see why); the output itself is only renamed into place when the whole run succeeded.
    """
    input, output = Path(input), Path(output)
    rejected: list[dict] = []
    n_in = n_out = 0
    try:
        with atomic_write(output) as f:
            for rec in iter_records(input, field, bad_records, rejected):
                n_in += 1
                new = transform(rec)
                if new is not None:
                    f.write(dumps_record(new))
                    n_out += 1
            check_bad_fraction(input, n_in, len(rejected), max_bad_fraction, output)
    finally:
        if bad_records == "quarantine":
            write_rejected(output, rejected, scrub)
    return {"records_in": n_in + len(rejected), "records_out": n_out, "rejected": len(rejected)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.records", description="Validate a record file.")
    p.add_argument("input", type=Path)
    p.add_argument("--field", default="text")
    p.add_argument("--bad-records", choices=["fail", "quarantine"], default="fail")
    a = p.parse_args(argv)
    rejected: list[dict] = []
    try:
        n = sum(1 for _ in iter_records(a.input, a.field, a.bad_records, rejected))
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.input}: {n} valid records, {len(rejected)} rejected")
    for r in rejected[:20]:
        print(f"  line {r['line']}: {r['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
