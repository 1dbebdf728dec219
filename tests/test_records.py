"""pipelines.records: every input format, every bad-record kind, quarantine and atomic output (real files)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.records import BadInputError, iter_records, process_file, rejected_path

ROWS = [{"id": 1, "text": "alpha"}, {"id": 2, "text": "beta"}, {"id": 3, "text": "gamma"}]


def _texts(path: Path, **kw) -> list[str]:
    return [r["text"] for r in iter_records(path, "text", **kw)]


def test_jsonl_bom_and_empty_lines(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"id": 1, "text": "alpha"}\n\n   \n{"id": 2, "text": "beta"}\n\n')
    assert list(iter_records(p, "text")) == [{"id": 1, "text": "alpha"}, {"id": 2, "text": "beta"}]


def test_json_array(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text("\ufeff[\n" + ",\n".join(json.dumps(r) for r in ROWS) + "\n]\n", encoding="utf-8")
    assert list(iter_records(p, "text")) == ROWS
    (tmp_path / "e.json").write_text("[ ]", encoding="utf-8")
    assert list(iter_records(tmp_path / "e.json", "text")) == []


def test_json_array_larger_than_read_chunk(tmp_path: Path) -> None:
    rows = [{"id": i, "text": f"record {i} " + "x" * 300} for i in range(2000)]  # ~0.7 MB, many 64 KiB chunks
    p = tmp_path / "big.json"
    p.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    assert [r["id"] for r in iter_records(p, "text")] == list(range(2000))


def test_csv(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text('id,text\n1,alpha\n2,"two\nlines"\n\n3,gamma\n', encoding="utf-8")
    assert list(iter_records(p, "text")) == [{"id": "1", "text": "alpha"}, {"id": "2", "text": "two\nlines"},
                                             {"id": "3", "text": "gamma"}]


def test_csv_without_the_column(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("id,body\n1,alpha\n", encoding="utf-8")
    with pytest.raises(BadInputError) as e:
        list(iter_records(p, "text"))
    assert str(e.value) == f"{p}:1: no column 'text' in the CSV header"


def test_parquet(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p, row_group_size=2)
    assert list(iter_records(p, "text")) == ROWS


def test_hf_dataset_dir(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(d))
    assert list(iter_records(d, "text")) == ROWS
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(dd))
    assert _texts(dd) == ["alpha", "beta"]


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(BadInputError) as e:
        list(iter_records(tmp_path / "nope.jsonl", "text"))
    assert str(e.value) == f"{tmp_path / 'nope.jsonl'}: file not found"
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(BadInputError, match=r"unknown format '\.txt'"):
        list(iter_records(tmp_path / "a.txt", "text"))


BAD = [  # (line content, one-line reason)
    (b"{not json", "invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    (b"[1, 2]", "not a JSON object (got array)"),
    (b'{"id": 9}', "missing field 'text'"),
    (b'{"text": ""}', "field 'text' is empty"),
    (b'{"text": "   "}', "field 'text' is empty"),
    (b'{"text": 42}', "field 'text' is not a string (got int)"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8 (byte 0xe9 at byte 14)"),
]


@pytest.mark.parametrize("line,reason", BAD, ids=[r for _, r in BAD])
def test_fail_mode_one_line_message(tmp_path: Path, line: bytes, reason: str) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"text": "ok"}\n\n' + line + b"\n")
    with pytest.raises(BadInputError) as e:
        list(iter_records(p, "text"))
    assert str(e.value) == f"{p}:3: {reason}"
    assert "\n" not in str(e.value)


def test_quarantine_collects_every_kind(tmp_path: Path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"\n".join([b'{"text": "ok"}', *(line for line, _ in BAD)]) + b"\n")
    rejected: list[dict] = []
    assert _texts(p, bad_records="quarantine", rejected=rejected) == ["ok"]
    assert [(r["line"], r["reason"]) for r in rejected] == [(i + 2, reason) for i, (_, reason) in enumerate(BAD)]
    assert rejected[0]["raw"] == "{not json"
    assert rejected[-1]["raw"] == '{"text": "caf\ufffd"}'


def test_bad_rows_in_columnar_and_array_formats(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": None}, {"text": ""}]), tmp_path / "a.parquet")
    rej: list[dict] = []
    assert _texts(tmp_path / "a.parquet", bad_records="quarantine", rejected=rej) == ["a"]
    assert [(r["line"], r["reason"]) for r in rej] == [(2, "missing field 'text'"), (3, "field 'text' is empty")]
    (tmp_path / "a.json").write_text('[{"text": "a"},\n 7,\n {"x": 1}]', encoding="utf-8")
    with pytest.raises(BadInputError) as e:
        list(iter_records(tmp_path / "a.json", "text"))
    assert str(e.value) == f"{tmp_path / 'a.json'}:2: not a JSON object (got int)"
    (tmp_path / "b.json").write_text('[{"text": "a"},\n {"text": ', encoding="utf-8")
    with pytest.raises(BadInputError) as e:
        list(iter_records(tmp_path / "b.json", "text", bad_records="quarantine", rejected=[]))
    assert str(e.value) == f"{tmp_path / 'b.json'}:2: invalid JSON: Expecting value"


def _upper(rec: dict) -> dict:
    return {**rec, "text": rec["text"].upper()}


def test_process_file_quarantine_and_abort(tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(19)) + "{oops\n")
    rep = process_file(src, out, "text", "quarantine", 0.05, _upper)
    assert rep == {"records_in": 20, "records_out": 19, "rejected": 1}
    assert json.loads(out.read_text().splitlines()[3]) == {"id": 3, "text": "T3"}
    assert [json.loads(x) for x in rejected_path(out).read_text().splitlines()] == [
        {"line": 20, "reason": "invalid JSON: Expecting property name enclosed in double quotes (column 2)",
         "raw": "{oops"}]
    # above max_bad_fraction: abort, the previous output stays as it was, the rejected file explains why
    before = out.read_bytes()
    with pytest.raises(BadInputError) as e:
        process_file(src, out, "text", "quarantine", 0.04, _upper)
    assert str(e.value) == (f"{src}: 1 of 20 records rejected (5.0%), above max_bad_fraction 4.0%; "
                            f"see {rejected_path(out)}")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "out.jsonl.rejected.jsonl"]


def test_process_file_failure_leaves_no_partial_output(tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(1000)) + '{"text": 1}\n')
    with pytest.raises(BadInputError, match=r"in\.jsonl:1001: field 'text' is not a string \(got int\)$"):
        process_file(src, out, "text", "fail", 0.0, _upper)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
