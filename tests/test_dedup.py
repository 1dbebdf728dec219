"""pipelines.dedup with the real offline MiniLM: exact and near duplicates, verification of same-template
distinct facts, keep rules, the removal report, the labelled eval set, the pipeline entry point and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import DataConfig, DedupConfig, ModelConfig, PipelineConfig
from pipelines.dedup import (
    _numbers, dedup_file, embed, exact_key, find_duplicates, lexical_pairs, normalize, run, verify_pair,
)
from pipelines.records import BadInputError

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "The Zorblat XR-200 weighs 12 kg and costs 450 dollars.",          # 0 kept
    "the zorblat xr-200 weighs 12 kg, and costs 450 dollars!",          # 1 exact (case, punctuation)
    "The Zorblat XR-200 costs 450 dollars and weighs 12 kg.",           # 2 near (paraphrase)
    "The Zorblat XR-300 weighs 12 kg and costs 450 dollars.",           # 3 distinct: model code
    "The Zorblat XR-200 weighs 14 kg and costs 450 dollars.",           # 4 distinct: number
    "Alice Chen joined Acme in 2019 as an engineer.",                   # 5 kept
    "Bob Chen joined Acme in 2019 as an engineer.",                     # 6 distinct: name opening the sentence
    "Alice Chen joined Acme in 2019 as an engineer. Click here to subscribe to our newsletter.",  # 7 near
    "Alice Chen joined Acme in",                                        # 8 near (truncation)
]


@pytest.fixture(scope="module")
def result() -> tuple[list[bool], list[dict], dict]:
    return find_duplicates(TEXTS, DedupConfig(), progress=False)


def test_normalised_exact_key() -> None:
    assert normalize("  Hello,\tWORLD!!  ｈｉ ") == "hello world hi"
    assert normalize("It was -7, not 1.5 or 1,000 (XR-200 at 12:30).") == "it was -7 not 1.5 or 1,000 xr 200 at 12:30"
    assert exact_key("Hello, world") == exact_key("hello   WORLD!")
    assert exact_key("hello world") != exact_key("hello word")


def test_verify_pair() -> None:
    assert verify_pair(TEXTS[0], TEXTS[2]) == (True, "near")
    assert verify_pair(TEXTS[0], TEXTS[3]) == (False, "numbers differ")  # XR-200 vs XR-300
    assert verify_pair("The Zorblat XR weighs 12 kg at Acme.", "At Acme, the Zorblat QV weighs 12 kg.") == (
        False, "names differ")
    assert verify_pair("Ann joined Acme in 2019 as a chemist.", "Ann joined Acme in 2019 as a pilot.") == (
        False, "words differ")
    assert verify_pair(TEXTS[0], TEXTS[4]) == (False, "numbers differ")
    assert verify_pair(TEXTS[5], TEXTS[6]) == (False, "words differ")
    assert verify_pair(TEXTS[5], TEXTS[8]) == (True, "truncation")
    assert verify_pair("On March 8 it was 7 degrees in Lisbon.", "On March 8 it was -7 degrees in Lisbon.") == (
        False, "numbers differ")
    assert verify_pair("The cat sat on the mat today.", "A feline rested upon a rug.") == (False, "low lexical overlap")
    # a substitution next to boilerplate is still a substitution; different boilerplate around one fact is not
    assert verify_pair("Posted by admin. Jamal Lindqvist joined Vandelay in 2021 as a pilot. All rights reserved.",
                       "Jamal Lindqvist joined Vandelay in 2021 as a engineer.") == (False, "words differ")
    assert verify_pair("Posted by admin. " + TEXTS[5], TEXTS[5] + " Read more...") == (True, "near")
    # containment starts at a word boundary: "Lena" is not a cut-off "Elena"
    assert verify_pair("Lena Tanaka joined Umbrella in", "Elena Tanaka joined Umbrella in 1999.") == (False, "words differ")
    assert verify_pair("Elena Tanaka joined Umbrella in", "Elena Tanaka joined Umbrella in 1999.") == (True, "truncation")
    assert verify_pair("ZorblatA88型号电池容量为45千瓦", "[Archived] ZorblatA88型号电池容量为45千瓦时，续航13小时。") == (
        True, "truncation")


def test_lexical_pairs_find_contained_copies_and_ignore_template_shingles() -> None:
    texts = [TEXTS[0], "Posted by admin. " + TEXTS[0] + " Read more...", "The Zorblat XR-200 weighs 12 kg", TEXTS[3],
             TEXTS[5], "Alice Chen joined Acme in", TEXTS[6]]
    assert lexical_pairs(texts) == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (4, 5), (4, 6), (5, 6)}
    # 40 more records of one template: their shared 3-grams ("weighs 12 kg") are no longer rare, so the XR-300
    # fact (3) stops being a candidate of the XR-200 one, while the boilerplate copy and the truncation remain
    filler = [f"The Brixon QM-{100 + i} weighs 12 kg and costs 450 dollars." for i in range(40)]
    assert lexical_pairs(texts + filler) == {(0, 1), (0, 2), (1, 2), (4, 5), (4, 6), (5, 6)}


def test_keep_first_and_report(result) -> None:
    keep, removed, stats = result
    assert keep == [True, False, False, True, True, True, True, False, False]
    assert [(r["removed_index"], r["kept_index"], r["reason"]) for r in removed] == [
        (1, 0, "exact"), (2, 0, "near"), (7, 5, "near"), (8, 5, "near")]
    assert removed[0]["similarity"] == 1.0
    assert all(0.8 <= r["similarity"] < 1.0 for r in removed[1:])
    # 11 pairs above the 0.8 cosine threshold + 1 more from the shingle index; 8 judged distinct; 1 already
    # joined through the others
    assert (stats["candidate_pairs"], stats["lexical_pairs"], stats["rejected_pairs"]) == (12, 1, 8)


def test_keep_longest() -> None:
    keep, removed, _ = find_duplicates(TEXTS, DedupConfig(keep="longest"), progress=False)
    assert keep == [False, True, False, True, True, False, True, True, False]  # 1 is longer than 0 by the comma
    assert [(r["removed_index"], r["kept_index"]) for r in removed] == [(0, 1), (2, 1), (5, 7), (8, 7)]


def test_without_verification_same_template_facts_are_lost() -> None:
    keep, _, _ = find_duplicates(TEXTS, DedupConfig(verify=False), progress=False)
    assert not keep[3] and not keep[4] and not keep[6]  # why verification exists


def test_eval_set_targets() -> None:
    recs = [json.loads(x) for x in (ROOT / "tests" / "data" / "dedup_eval.jsonl").read_text("utf-8").splitlines()]
    keep, removed, _ = find_duplicates([r["text"] for r in recs], DedupConfig(), progress=False)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(recs):
        groups.setdefault(r["group"], []).append(i)
    multi = [m for m in groups.values() if len(m) > 1]
    facts_kept = sum(any(keep[i] for i in m) for m in groups.values()) / len(groups)
    reduced = sum(sum(keep[i] for i in m) == 1 for m in multi) / len(multi)
    wrong = [r for r in removed if recs[r["removed_index"]]["group"] != recs[r["kept_index"]]["group"]]
    assert (len(recs), len(groups), len(multi)) == (600, 409, 125)
    assert facts_kept == 1.0 and wrong == []
    assert reduced == 1.0  # 122/125 without the shingle index


def test_shingle_index_recovers_copies_crowded_out_of_the_neighbours() -> None:
    """With one neighbour per record, copies crowded out by same-template facts are found through shared 3-grams."""
    recs = [json.loads(x) for x in (ROOT / "tests" / "data" / "dedup_eval.jsonl").read_text("utf-8").splitlines()]
    texts = [r["text"] for r in recs]
    cache: dict[int, object] = {}

    def embed_once(t: list[str]):
        if not cache:  # both runs embed the same exact-unique texts: once is enough
            cache[0] = embed(t, DedupConfig().embedding_model, DedupConfig().batch_size, progress=False)
        return cache[0]

    reduced = {}
    for lexical in (False, True):
        keep, removed, stats = find_duplicates(texts, DedupConfig(neighbours=1, lexical=lexical), False, embed_once)
        assert all(recs[r["removed_index"]]["group"] == recs[r["kept_index"]]["group"] for r in removed)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(recs):
            groups.setdefault(r["group"], []).append(i)
        reduced[lexical] = sum(sum(keep[i] for i in m) == 1 for m in groups.values() if len(m) > 1)
    assert reduced == {False: 115, True: 121} and stats["lexical_pairs"] == 133


def _write(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_dedup_file_and_run(tmp_path: Path) -> None:
    src = _write(tmp_path / "in.jsonl", TEXTS)
    cfg = PipelineConfig(data=DataConfig(demo=True), model=ModelConfig(name_or_path="x"))
    out = run(cfg, {"records": src}, tmp_path / "stage")
    assert out.primary == "data"
    assert out.metrics == {"records_in": 9.0, "records_out": 5.0, "rejected": 0.0, "exact_duplicates": 1.0,
                           "near_duplicates": 3.0, "candidate_pairs": 12.0, "rejected_pairs": 8.0, "rescued": 0.0}
    kept = [json.loads(x) for x in (tmp_path / "stage" / "data" / "records.jsonl").read_text().splitlines()]
    assert [k["n"] for k in kept] == [0, 3, 4, 5, 6]
    assert kept[0] == {"id": "r0", "text": TEXTS[0], "n": 0}
    report = [json.loads(x) for x in (tmp_path / "stage" / "dedup_report.jsonl").read_text().splitlines()]
    assert {k: report[0][k] for k in ("removed_id", "removed_text", "kept_id", "kept_text", "similarity", "reason")} == {
        "removed_id": "r1", "removed_text": TEXTS[1], "kept_id": "r0", "kept_text": TEXTS[0], "similarity": 1.0,
        "reason": "exact"}
    assert [r["removed_id"] for r in report] == ["r1", "r2", "r7", "r8"]


def test_exact_only_quarantine_and_atomicity(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "Hello world"}\n{"text": "hello, WORLD"}\n{"text": ""}\n{"text": "other"}\n')
    out = tmp_path / "out.jsonl"
    res = dedup_file(src, out, DedupConfig(semantic=False, bad_records="quarantine", max_bad_fraction=0.25), "text")
    assert (res["records_in"], res["records_out"], res["rejected"], res["exact_duplicates"]) == (4, 2, 1, 1)
    assert out.read_text() == '{"text": "Hello world"}\n{"text": "other"}\n'
    assert json.loads((tmp_path / "out.jsonl.rejected.jsonl").read_text()) == {
        "line": 3, "reason": "field 'text' is empty", "raw": '{"text": ""}'}
    before = out.read_bytes()
    with pytest.raises(BadInputError) as e:
        dedup_file(src, out, DedupConfig(semantic=False), "text")
    assert str(e.value) == f"{src}:3: field 'text' is empty"
    assert out.read_bytes() == before


def test_cli(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("id,text\n1,Hello world\n2,hello   world!\n3,Something else\n")
    p = subprocess.run([sys.executable, "-m", "pipelines.dedup", str(src), str(tmp_path / "o.jsonl"), "--no-semantic"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["records_out"] == 2
    assert (tmp_path / "o.jsonl.report.jsonl").read_text().count("\n") == 1
    p = subprocess.run([sys.executable, "-m", "pipelines.dedup", str(tmp_path / "missing.jsonl"), str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=ROOT)
    assert (p.returncode, p.stderr) == (2, f"error: {tmp_path / 'missing.jsonl'}: file not found\n")


def test_a_chained_cluster_never_drops_a_fact_its_keeper_lacks() -> None:
    """Pairs verify one at a time: A~B and B~C can put C in A's cluster though C states a number A does not."""
    texts = ["Drytev在Kessaro生产，而Krirkrax在Ambrevik生产。",
             "Krirkrax在Ambrevik生产。",
             "Krirkrax的价格是199美元。Krirkrax在Ambrevik生产。",
             "Krirkrax的价格是199美元。Krirkrax在Ambrevik生产。"]
    keep, removed, stats = find_duplicates(texts, DedupConfig(), progress=False)
    assert stats["rescued"] == 1  # 2 joined 0's cluster through 1 (each pair a truncation), but 0 lacks its price
    assert keep == [True, False, True, False]  # 1 is inside 0; the exact copy 3 still goes, dropped for 2
    for r in removed:  # and whatever is dropped, its numbers are stated by the record it is dropped for
        assert _numbers(texts[r["removed_index"]]) <= _numbers(texts[r["kept_index"]])
