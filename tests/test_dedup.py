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
    _names, _numbers, containment_pairs, copy_kind, dedup_file, embed, exact_key, fact_pairs, find_duplicates,
    lexical_pairs, normalize, run, verify_pair,
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
    assert [r["kind"] for r in removed] == ["exact", "paraphrase", "boilerplate", "truncation"]
    assert stats["paraphrases_kept"] == 0  # paraphrases: drop (the default) keeps one record per cluster
    assert removed[0]["similarity"] == 1.0
    # (a containment pair needs no cosine bar: the containment is the evidence)
    assert all(0.3 <= r["similarity"] <= 1.0 for r in removed[1:]), [r["similarity"] for r in removed]  # model2vec: a reordering can be 1.0
    # 11 pairs above the 0.8 cosine threshold + 1 more from the shingle index; 8 judged distinct; 1 already
    # joined through the others
    # (measured with the model2vec default; MiniLM gave (12, 1, 8))
    assert (stats["candidate_pairs"], stats["lexical_pairs"], stats["rejected_pairs"]) == (12, 4, 8)


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


def test_candidate_sources_recover_copies_crowded_out_of_the_neighbours() -> None:
    """With one neighbour per record, same-template facts crowd out copies; each other candidate source (shared rare
    3-grams, the sorted-suffix containment pass, same-number blocks) recovers some on its own, all three every one,
    and none removes a record for another fact."""
    recs = [json.loads(x) for x in (ROOT / "tests" / "data" / "dedup_eval.jsonl").read_text("utf-8").splitlines()]
    texts = [r["text"] for r in recs]
    cache: dict[int, object] = {}

    def embed_once(t: list[str]):
        if not cache:  # every run embeds the same exact-unique texts: once is enough
            # MiniLM itself: the numbers below are the candidate sources', measured on one fixed backend
            cache[0] = embed(t, DedupConfig().embedding_model, DedupConfig().batch_size, progress=False, backend="torch")
        return cache[0]

    groups: dict[int, list[int]] = {}
    for i, r in enumerate(recs):
        groups.setdefault(r["group"], []).append(i)
    reduced, found = {}, {}
    for sources in [(), ("lexical",), ("containment",), ("same_numbers",), ("lexical", "containment", "same_numbers")]:
        cfg = DedupConfig(neighbours=1, **{s: s in sources for s in ("lexical", "containment", "same_numbers")})
        keep, removed, stats = find_duplicates(texts, cfg, False, embed_once)
        assert all(recs[r["removed_index"]]["group"] == recs[r["kept_index"]]["group"] for r in removed)
        assert all(any(keep[i] for i in m) for m in groups.values())
        reduced[sources] = sum(sum(keep[i] for i in m) == 1 for m in groups.values() if len(m) > 1)
        found[sources] = (stats["lexical_pairs"], stats["containment_pairs"], stats["number_pairs"])
    assert reduced == {(): 117, ("lexical",): 123, ("containment",): 123, ("same_numbers",): 122,
                       ("lexical", "containment", "same_numbers"): 125}  # of 125 groups with copies
    assert found[("lexical",)] == (133, 0, 0) and found[("containment",)] == (0, 26, 0)
    assert found[("same_numbers",)] == (0, 0, 78)


def test_containment_pairs_find_prefix_and_wrapped_copies_in_a_crowd() -> None:
    base = "On March 19 the temperature in Bergen reached 12 degrees Celsius."
    crowd = [f"On March {d} the temperature in Bergen reached {t} degrees Celsius." for d in range(1, 29)
             for t in range(-5, 30, 3)]
    texts = crowd + [base, "On March 19 the temperature in Bergen reached 12", "[Archived] " + base + " Read more...",
                     "Bergen saw 12 degrees Celsius on March 19."]
    b, cut, wrapped, para = range(len(crowd), len(texts))
    pairs = containment_pairs(texts)
    # a dozen records share the cut's first 8 words; sorting still puts it next to the two texts that contain it
    assert {pq for pq in pairs if cut in pq} == {(b, cut), (cut, wrapped)}
    assert (b, wrapped) in pairs
    assert not any(para in pq for pq in pairs)  # a rewording contains nothing: that is the number blocks' job
    assert (b, para) in fact_pairs(texts)
    # verification tells the crowd apart: the same numbers bound to other words are another fact
    assert verify_pair("On March 26 the temperature in Tallinn reached 28 degrees Celsius.",
                       "Tallinn saw 26 degrees Celsius on March 28.") == (False, "numbers differ")
    assert verify_pair(texts[para], base) == (True, "near")


def _write(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_dedup_file_and_run(tmp_path: Path) -> None:
    src = _write(tmp_path / "in.jsonl", TEXTS)
    cfg = PipelineConfig(data=DataConfig(demo=True), model=ModelConfig(name_or_path="x"))
    out = run(cfg, {"records": src}, tmp_path / "stage")
    assert out.primary == "data"
    metrics = {k: v for k, v in out.metrics.items() if k != "partitions"}  # the sharded path's own count
    assert metrics == {"records_in": 9.0, "records_out": 5.0, "rejected": 0.0, "exact_duplicates": 1.0,
                       "near_duplicates": 3.0, "boilerplate_duplicates": 1.0, "truncated_duplicates": 1.0,
                       "template_duplicates": 0.0, "paraphrases_dropped": 1.0, "paraphrases_kept": 0.0,
                       "candidate_pairs": 12.0, "rejected_pairs": 8.0, "rescued": 0.0}
    assert out.metrics.get("partitions", 1.0) == 1.0
    assert "(1 exact, 3 near duplicates removed: 1 boilerplate-wrapped, 1 truncated, 0 templated, 1 paraphrases; " \
           "0 paraphrases kept (paraphrases: drop)" in out.summary
    kept = [json.loads(x) for x in (tmp_path / "stage" / "data" / "records.jsonl").read_text().splitlines()]
    assert [k["n"] for k in kept] == [0, 3, 4, 5, 6]
    assert kept[0] == {"id": "r0", "text": TEXTS[0], "n": 0}
    report = [json.loads(x) for x in (tmp_path / "stage" / "dedup_report.jsonl").read_text().splitlines()]
    assert {k: report[0][k] for k in ("removed_id", "removed_text", "kept_id", "kept_text", "similarity", "reason")} == {
        "removed_id": "r1", "removed_text": TEXTS[1], "kept_id": "r0", "kept_text": TEXTS[0], "similarity": 1.0,
        "reason": "exact"}
    assert [r["removed_id"] for r in report] == ["r1", "r2", "r7", "r8"]
    assert [r["kind"] for r in report] == ["exact", "paraphrase", "boilerplate", "truncation"]
    # paraphrases: keep -> the reworded record 2 stays, the copies still go; the counts say so
    keep_cfg = cfg.model_copy(update={"dedup": DedupConfig(paraphrases="keep")})
    out = run(keep_cfg, {"records": src}, tmp_path / "stage-keep")
    kept = [json.loads(x)["n"] for x in (tmp_path / "stage-keep" / "data" / "records.jsonl").read_text().splitlines()]
    assert kept == [0, 2, 3, 4, 5, 6]
    assert {k: out.metrics[k] for k in ("records_out", "paraphrases_dropped", "paraphrases_kept", "near_duplicates")} == {
        "records_out": 6.0, "paraphrases_dropped": 0.0, "paraphrases_kept": 1.0, "near_duplicates": 2.0}
    assert "1 paraphrases kept (paraphrases: keep)" in out.summary


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


def test_tunewright_dedup_paraphrase_flags(tmp_path: Path) -> None:
    """`tunewright dedup --paraphrases keep` keeps the rewording and still drops the copies; a bad value is one line."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    tw = Path(sys.executable).with_name("tunewright")
    runs = {}
    for policy in ("drop", "keep"):
        p = subprocess.run([str(tw), "dedup", str(src), str(tmp_path / f"{policy}.jsonl"), "--embedding-backend",
                            "torch", "--paraphrases", policy], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[policy] = [json.loads(line)["text"] for line in (tmp_path / f"{policy}.jsonl").open()]
    assert TEXTS[2] not in runs["drop"] and TEXTS[2] in runs["keep"]
    assert set(runs["keep"]) - set(runs["drop"]) == {TEXTS[2]}  # the copies (1, 7, 8) go under both policies
    p = subprocess.run([str(tw), "dedup", str(src), str(tmp_path / "x.jsonl"), "--paraphrases", "merge"],
                       capture_output=True, text=True, cwd=ROOT)
    assert (p.returncode, p.stderr.strip()) == (2, "error: --paraphrases merge: expected drop, keep or keep_k")
    assert not (tmp_path / "x.jsonl").exists()


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


# ------------------------------------------------------------------------------------------ paraphrase policies
def test_copy_kind_tells_copies_from_rewordings() -> None:
    base = TEXTS[5]  # "Alice Chen joined Acme in 2019 as an engineer."
    assert copy_kind(TEXTS[7], base) == "boilerplate"  # + " Click here to subscribe to our newsletter."
    assert copy_kind("Posted by admin. " + base + " Read more...", base + " All rights reserved.") == "boilerplate"
    assert copy_kind("Home > Products > " + base, base) == "boilerplate"
    assert copy_kind(TEXTS[8], base) == "truncation"  # "Alice Chen joined Acme in"
    assert copy_kind(base, base + " The Acme office is in Lisbon.") == "truncation"  # cut at a sentence, rest lost
    assert copy_kind(base + " The Acme office is in Lisbon.", base) is None  # dropped for base, the office is lost
    # the same facts in other words: moved words, a reordering, another sentence shape
    assert copy_kind("In 2019, Alice Chen joined Acme as an engineer.", base) is None
    assert copy_kind(TEXTS[2], TEXTS[0]) is None  # "... costs 450 dollars and weighs 12 kg."
    assert copy_kind("The temperature in Lisbon reached 7 degrees Celsius on March 8.",
                     "On March 8 the temperature in Lisbon reached 7 degrees Celsius.") is None
    # a shared sentence continued with other content is not boilerplate (the colour would be lost)
    assert copy_kind("The Ronquarn is a camera from Veltrane Labs. The Ronquarn is painted teal.",
                     "The Ronquarn is a camera from Veltrane Labs. The Ronquarn sells for 149 dollars.") is None
    assert copy_kind("The Ronquarn sells for 149 dollars and is painted teal.", "The Ronquarn sells for 149 dollars.") is None
    # Chinese: boilerplate is set off by punctuation too; moved words are a rewording
    zh = "ZorblatA88型号电池容量为45千瓦时，续航13小时。"
    assert copy_kind("【内部】" + zh, zh + "（转自客服邮箱）") == "boilerplate"
    assert copy_kind("ZorblatA88型号电池容量为45千瓦", "[Archived] " + zh) == "truncation"
    assert copy_kind("续航13小时的ZorblatA88型号，电池容量为45千瓦时。", zh) is None


def test_latin_names_in_chinese_text_are_names() -> None:
    """Chinese has no capitalised sentence openers: a product name opening a Chinese sentence is still a name, so
    two records about different products never verify as one."""
    assert _names("Nukrath（6小时）比Fakmer（24小时）续航短。") == {"nukrath", "fakmer"}
    assert verify_pair("我很喜欢我那台Kortrer的橄榄绿外壳。", "我很喜欢我那台Thinbrak的青绿色外壳。") == (False, "names differ")


@pytest.fixture(scope="module")
def eval_set() -> tuple[list[dict], list[str], object]:
    recs = [json.loads(x) for x in (ROOT / "tests" / "data" / "dedup_eval.jsonl").read_text("utf-8").splitlines()]
    texts = [r["text"] for r in recs]
    emb = embed(texts, DedupConfig().embedding_model, DedupConfig().batch_size, progress=False)
    index = {t: i for i, t in enumerate(texts)}  # find_duplicates embeds the exact-unique texts, in input order
    return recs, texts, lambda t: emb[[index[x] for x in t]]


def _policy(eval_set, **kw) -> tuple[list[bool], list[dict], dict, dict]:
    from pipelines.dedup import kind_counts

    recs, texts, embed_fn = eval_set
    keep, removed, stats = find_duplicates(texts, DedupConfig(**kw), False, embed_fn)
    return keep, removed, stats, kind_counts(removed, stats)


def test_paraphrase_policies_on_the_labelled_set(eval_set) -> None:
    """Each kind of removal matches the generator's label; copies go under every policy; only the paraphrase
    counts move with the policy; no fact is ever lost and nothing is dropped for another fact."""
    recs = eval_set[0]
    runs = {p: _policy(eval_set, paraphrases=p) for p in ("drop", "keep")}
    runs["keep_k=2"] = _policy(eval_set, paraphrases="keep_k", paraphrase_k=2)
    copies = {"exact_duplicates": 75, "near_duplicates": None, "boilerplate_duplicates": 31,
              "truncated_duplicates": 43, "template_duplicates": 0}
    expected = {"drop": (42, 0), "keep": (0, 42), "keep_k=2": (5, 37)}  # (paraphrases dropped, kept)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(recs):
        groups.setdefault(r["group"], []).append(i)
    for name, (keep, removed, stats, counts) in runs.items():
        assert {k: counts[k] for k in copies if copies[k] is not None} == {k: v for k, v in copies.items() if v is not None}, name
        assert (counts["paraphrases_dropped"], counts["paraphrases_kept"]) == expected[name], name
        assert counts["near_duplicates"] == 31 + 43 + counts["paraphrases_dropped"]
        assert sum(keep) == 409 + counts["paraphrases_kept"] and stats["rescued"] == 0
        # every removal is labelled with the kind the generator made (a paraphrase can repeat another one exactly)
        pairs = {(recs[r["removed_index"]]["variant"], r["kind"]) for r in removed}
        assert pairs <= {("exact", "exact"), ("spacing", "exact"), ("boilerplate", "boilerplate"),
                         ("truncation", "truncation"), ("paraphrase", "paraphrase"), ("paraphrase", "exact")}, name
        assert all(any(keep[i] for i in m) for m in groups.values()), f"{name}: a fact was lost"
        assert all(recs[r["removed_index"]]["group"] == recs[r["kept_index"]]["group"] for r in removed), name
        assert all(_numbers(recs[r["removed_index"]]["text"]) <= _numbers(recs[r["kept_index"]]["text"])
                   for r in removed)
    keep_all = runs["keep"][0]
    assert not any(keep_all[i] for i, r in enumerate(recs) if r["variant"] in ("exact", "spacing", "boilerplate",
                                                                                "truncation"))
    assert sum(keep_all[i] for i, r in enumerate(recs) if r["variant"] == "paraphrase") == 42


def test_keep_k_keeps_at_most_k_per_cluster(eval_set) -> None:
    recs = eval_set[0]
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(recs):
        groups.setdefault(r["group"], []).append(i)
    most = {}
    for k in (1, 2, 3):
        keep, _, stats, counts = _policy(eval_set, paraphrases="keep_k", paraphrase_k=k)
        most[k] = max(sum(keep[i] for i in m) for m in groups.values())
        assert all(any(keep[i] for i in m) for m in groups.values())
        if k == 1:
            assert keep == _policy(eval_set)[0] and counts["paraphrases_kept"] == 0  # keep_k 1 is drop
    assert most == {1: 1, 2: 2, 3: 3}  # the labelled set has facts stated in three wordings
    assert _policy(eval_set, paraphrases="keep_k", paraphrase_k=3)[0] == _policy(eval_set, paraphrases="keep")[0]


def test_templated_spam_and_copies_go_under_every_policy() -> None:
    """Fact-free near copies (templated spam) are never a wording of their own; a reworded fact is."""
    spam = ["Limited offer: subscribe to our newsletter today and get the best deals!",
            "Subscribe to our newsletter today and get the best deals, limited offer!",
            "Get the best deals when you subscribe to our newsletter today!",  # verification: not the same text
            "Limited offer! Subscribe to our newsletter today and get the best deals.",
            "Don't miss out: subscribe to our newsletter today and get the best deals!"]
    texts = spam + [TEXTS[0], TEXTS[2], TEXTS[1]]
    out = {p: find_duplicates(texts, DedupConfig(paraphrases=p), progress=False) for p in ("drop", "keep")}
    for p, (keep, removed, _) in out.items():
        assert keep[:5] == [True, False, True, False, False], p
        assert {r["removed_index"]: r["kind"] for r in removed if r["removed_index"] < 5} == {
            1: "boilerplate", 3: "exact", 4: "template"}, p
    assert out["drop"][0][5:] == [True, False, False] and out["keep"][0][5:] == [True, True, False]


def test_paraphrase_k_config() -> None:
    from pydantic import ValidationError

    assert DedupConfig().paraphrases == "drop"  # today's behaviour unless a config chooses otherwise
    assert DedupConfig(paraphrases="keep_k", paraphrase_k=3).paraphrase_k == 3
    with pytest.raises(ValidationError, match="paraphrase_k"):
        DedupConfig(paraphrases="keep_k", paraphrase_k=0)
    with pytest.raises(ValidationError, match="'drop', 'keep' or 'keep_k'"):
        DedupConfig(paraphrases="some")
