"""The data stages on an executor: `tunewright sanitize|dedup --executor dask --workers 2` and a pipeline config's
`executor` block run the shard work on a real local Dask cluster (2 worker processes) and write byte for byte what
the in-process run writes; partitioned semantic dedup (k-means partitions, search and verification within each)
keeps the labelled set's quality bars and does not depend on how many processes run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.data_stages import DEDUP_EVAL, corpus, dedup_scores, make_dedup_records
from pipelines.config import DedupConfig, ExecutorConfig
from pipelines.dedup import dedup_file
from pipelines.records import BadInputError
from pipelines.shards import dedup_records, dedup_sharded, local_mapper
from tests.conftest import TINY, copy_config

TW = Path(sys.executable).with_name("tunewright")


def _jsonl(path: Path, texts: list[str], bad: dict[int, str] | None = None) -> Path:
    lines = [json.dumps({"id": f"r{i}", "text": t}, ensure_ascii=False) for i, t in enumerate(texts)]
    for line, raw in (bad or {}).items():
        lines[line - 1] = raw
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


def _cli(*args: str | Path) -> dict:
    p = subprocess.run([str(TW), *map(str, args)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "TUNEWRIGHT_NO_PROGRESS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _decisions(report: Path) -> list[tuple]:
    return [(r["removed_index"], r["kept_index"], r["reason"]) for r in map(json.loads, report.read_text().splitlines())]


@pytest.mark.slow  # two local Dask clusters of 2 spawned workers (torch + MiniLM each): 1-3 min on 2 cores
def test_cli_dask_equals_in_process(tmp_path: Path) -> None:
    # PII-bearing records with paraphrased, truncated and exact copies among them, and three bad lines
    texts = corpus(200, seed=4) + [r["text"] for r in make_dedup_records(300, seed=8)]
    src = _jsonl(tmp_path / "in.jsonl", texts, {7: "{broken", 260: '{"text": ""}', 480: "[1]"})
    common = ("--bad-records", "quarantine", "--max-bad-fraction", "0.01")
    one = _cli("sanitize", src, tmp_path / "san-local.jsonl", *common, "--executor", "local")
    many = _cli("sanitize", src, tmp_path / "san-dask.jsonl", *common, "--executor", "dask", "--workers", "2")
    assert (tmp_path / "san-dask.jsonl").read_bytes() == (tmp_path / "san-local.jsonl").read_bytes()
    assert (tmp_path / "san-dask.jsonl.rejected.jsonl").read_bytes() == \
        (tmp_path / "san-local.jsonl.rejected.jsonl").read_bytes()
    assert many["shards"] == 2 and {k: many[k] for k in one} == one
    assert (one["rejected"], sum(one["counts"].values()) > 40) == (3, True)

    san = tmp_path / "san-local.jsonl"
    d1 = _cli("dedup", san, tmp_path / "dd-local.jsonl", "--executor", "local")
    d2 = _cli("dedup", san, tmp_path / "dd-dask.jsonl", "--executor", "dask", "--workers", "2")
    assert (tmp_path / "dd-dask.jsonl").read_bytes() == (tmp_path / "dd-local.jsonl").read_bytes()
    assert _decisions(tmp_path / "dd-dask.jsonl.report.jsonl") == _decisions(tmp_path / "dd-local.jsonl.report.jsonl")
    assert (d1["shards"], d2["shards"]) == (1, 2)
    assert d1["records_out"] == d2["records_out"] < d1["records_in"] - 60
    # and both equal the one-process algorithm (pipelines.dedup.dedup_file)
    dedup_file(san, tmp_path / "dd-file.jsonl", DedupConfig(), "text", progress=False)
    assert (tmp_path / "dd-file.jsonl").read_bytes() == (tmp_path / "dd-local.jsonl").read_bytes()


@pytest.mark.slow  # the Prefect flow's data stages on a local Dask cluster, then in-process: 1-3 min
def test_pipeline_config_executor_block(tw_home, prefect_api, tmp_path: Path) -> None:
    from flows.finetune import finetune
    from pipelines import tracking
    from pipelines.config import load_config

    def files(out: dict, stage: str) -> dict[str, bytes]:
        rid = out["stages"][stage]["run_id"]
        d = Path(tracking.client().download_artifacts(rid, "", str(tmp_path / f"{stage}-{rid}")))
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*.jsonl"))}

    # a seed of their own: the session's store is shared, and the same sanitize/dedup fingerprints as tests/test_flow.py's
    # tiny run would turn that run's first stages into cache hits
    dask = load_config(copy_config(TINY, tmp_path, "execdask", lambda d: d.update(
        executor={"kind": "dask", "workers": 2}, seed=13)))
    assert dask.executor.kind == "dask"
    a = finetune(dask, only="sanitize")
    b = finetune(dask, only="dedup")
    local = load_config(copy_config(TINY, tmp_path, "execlocal", lambda d: d.update(seed=13)))
    c = finetune(local, only="sanitize")
    d = finetune(local, only="dedup")
    assert [x["stages"]["sanitize"]["cache"] for x in (a, b, c, d)] == ["miss", "hit", "miss", "hit"]
    assert files(a, "sanitize") == files(c, "sanitize")
    dask_files, local_files = files(b, "dedup"), files(d, "dedup")
    assert dask_files["data/records.jsonl"] == local_files["data/records.jsonl"]
    assert set(dask_files) == set(local_files) and len(dask_files["data/records.jsonl"]) > 1000


@pytest.mark.parametrize("steer", [False, True])
def test_partitions_keep_quality_and_do_not_depend_on_workers(tmp_path: Path, steer: bool) -> None:
    recs = [json.loads(x) for x in DEDUP_EVAL.read_text().splitlines()]
    cfg = DedupConfig(partition_size=150, steer=steer)  # 4 k-means partitions of the labelled set
    one = dedup_sharded(DEDUP_EVAL, tmp_path / "a.jsonl", cfg, "text", shards=1)
    two = dedup_sharded(DEDUP_EVAL, tmp_path / "b.jsonl", cfg, "text", shards=3, mapper=local_mapper(2))
    assert one["partitions"] == two["partitions"] == 4 and one["largest_partition"] < 300
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert _decisions(tmp_path / "a.jsonl.report.jsonl") == _decisions(tmp_path / "b.jsonl.report.jsonl")
    kept = {json.loads(x)["id"] for x in (tmp_path / "a.jsonl").read_text().splitlines()}
    twin = {}
    for r in map(json.loads, (tmp_path / "a.jsonl.report.jsonl").read_text().splitlines()):
        twin[r["removed_index"]] = r["kept_index"]
    s = dedup_scores(recs, [r["id"] in kept for r in recs], twin)
    assert s["facts_kept"] >= 0.998 and s["groups_reduced_to_one"] >= 0.95, s


def test_sharded_dedup_reports_bad_records_like_one_process(tmp_path: Path) -> None:
    texts = [r["text"] for r in make_dedup_records(60, seed=2)]
    src = _jsonl(tmp_path / "in.jsonl", texts, {5: "{nope", 41: '{"id": 1}'})
    with pytest.raises(BadInputError) as one:
        dedup_file(src, tmp_path / "o.jsonl", DedupConfig(semantic=False), "text", progress=False)
    with pytest.raises(BadInputError) as many:
        dedup_sharded(src, tmp_path / "m.jsonl", DedupConfig(semantic=False), "text", shards=4)
    assert str(many.value) == str(one.value) and one.value.line == 5
    q = DedupConfig(semantic=False, bad_records="quarantine")
    dedup_file(src, tmp_path / "o.jsonl", q, "text", progress=False)
    dedup_sharded(src, tmp_path / "m.jsonl", q, "text", shards=4)
    for suffix in ("", ".rejected.jsonl", ".report.jsonl"):
        assert (tmp_path / f"m.jsonl{suffix}").read_bytes() == (tmp_path / f"o.jsonl{suffix}").read_bytes()
    assert [json.loads(x)["line"] for x in (tmp_path / "m.jsonl.rejected.jsonl").read_text().splitlines()] == [5, 41]
    # the fraction is judged over the whole input, before anything is embedded or written
    with pytest.raises(BadInputError, match=r"2 of 60 records rejected \(3.3%\), above max_bad_fraction 1.0%"):
        dedup_sharded(src, tmp_path / "f.jsonl", DedupConfig(bad_records="quarantine", max_bad_fraction=0.01),
                      "text", shards=4)
    assert not (tmp_path / "f.jsonl").exists()


def test_exact_only_partitions_by_hash(tmp_path: Path) -> None:
    texts = [f"Record number {i % 70} of the catalogue." for i in range(300)]
    src = _jsonl(tmp_path / "in.jsonl", texts)
    res = dedup_sharded(src, tmp_path / "p.jsonl", DedupConfig(semantic=False, partition_size=20), "text", shards=3)
    dedup_file(src, tmp_path / "o.jsonl", DedupConfig(semantic=False), "text", progress=False)
    assert res["partitions"] == 4 and res["exact_duplicates"] == 230
    assert (tmp_path / "p.jsonl").read_bytes() == (tmp_path / "o.jsonl").read_bytes()
    assert sorted(_decisions(tmp_path / "p.jsonl.report.jsonl")) == _decisions(tmp_path / "o.jsonl.report.jsonl")


def test_unreachable_scheduler_is_one_line(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "in.jsonl", ["one record", "another record"])
    p = subprocess.run([str(TW), "dedup", str(src), str(tmp_path / "o.jsonl"), "--scheduler", "tcp://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: tcp://127.0.0.1:9: cannot reach the Dask scheduler")
    p = subprocess.run([str(TW), "sanitize", str(src), str(tmp_path / "o.jsonl"), "--executor", "ray"],
                       capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stderr.strip()) == (2, "error: --executor ray: expected local or dask")


def test_executor_is_not_part_of_the_fingerprint() -> None:
    from pipelines.config import load_config
    from tasks.stages import stage_fingerprint_config

    a = load_config(TINY)
    b = load_config(TINY, {"executor": {"kind": "dask", "workers": 4, "scheduler": "tcp://10.0.0.5:8786"}})
    assert b.executor == ExecutorConfig(kind="dask", workers=4, scheduler="tcp://10.0.0.5:8786")
    for stage in ("sanitize", "dedup"):
        assert stage_fingerprint_config(a, stage) == stage_fingerprint_config(b, stage)


def test_partition_reps_splits_an_oversized_cell(tmp_path: Path) -> None:
    import numpy as np

    from pipelines.shards import partition_reps

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 32))
    # one dense blob of 3000 vectors and a small one: plain k-means with 2 cells leaves a 3000-vector partition
    x = np.concatenate([c + 0.05 * rng.normal(size=(m, 32)) for c, m in zip(centres, (3000, 600))])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)[rng.permutation(3600)]
    files = []
    for k, part in enumerate(np.array_split(x, 3)):
        np.save(tmp_path / f"e{k}.npy", part)
        files.append(tmp_path / f"e{k}.npy")
    plain = np.bincount(partition_reps(files, 2))
    split = partition_reps(files, 2, max_size=1200)
    assert plain.max() >= 2900
    assert np.bincount(split).max() <= 1200 and len(np.unique(split)) >= 4
    assert (partition_reps(files, 2, max_size=1200) == split).all()  # deterministic


def test_partition_steering_joins_records_stating_the_same_numbers(tmp_path: Path) -> None:
    """A paraphrase shares no rare shingle with its original, so only its numbers can keep the two in one
    partition; a record stating other numbers stays apart."""
    import numpy as np

    from pipelines.dedup import number_key, shingles
    from pipelines.shards import lexical_components

    texts = ["The Harlow bridge opened in 1932 and cost 4200 pounds to build.",
             "Costing 4200 pounds, Harlow's crossing first carried traffic in 1932.",
             "Marsh Lane's tower, finished during 1950, needed 9100 shillings."]
    hs = [np.fromiter(shingles(t), dtype=np.uint64) for t in texts]
    np.savez(tmp_path / "s.npz", h=np.concatenate(hs), i=np.repeat(np.arange(3), [len(h) for h in hs]),
             k=np.array([number_key(t) for t in texts], dtype=np.uint64), ki=np.arange(3))
    mapper = lambda fn, items: [fn(x) for x in items]  # noqa: E731 (the engine is beside the point here)
    off = lexical_components(mapper, [tmp_path / "s.npz"], 3, 2)
    on = lexical_components(mapper, [tmp_path / "s.npz"], 3, 2, same_numbers=True)
    assert len(set(off)) == 3
    assert on[0] == on[1] != on[2]
