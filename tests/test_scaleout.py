"""Scale-out of the data stages: shards split and merge byte-exactly, sanitize on worker processes equals the
one-process run byte for byte (bad records included), and the same shards run as Prefect tasks on a real local
Dask cluster (prefect-dask ``DaskTaskRunner``, 2 worker processes): sanitize by shard, dedup with per-shard
embeddings and a global neighbour search, both equal to the one-process result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.data_stages import corpus, make_dedup_records
from pipelines.config import DedupConfig, SanitizeConfig
from pipelines.dedup import find_duplicates
from pipelines.records import BadInputError
from pipelines.sanitize import sanitize_file
from pipelines.shards import count_lines, local_mapper, merge, sanitize_sharded, sharded_embedder, split


def _records(path: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    """n JSONL records (30% with PII), with the given 1-based lines replaced by bad ones."""
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in enumerate(corpus(n, seed=3))]
    for line, raw in (bad or {}).items():
        lines[line - 1] = raw
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


def test_split_and_merge_are_exact(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "a"}\n\n{"text": "bb"}\n{"text": "ccc"}\nnot json\n{"text": "last"}')  # no final \n
    parts = split(src, 3, tmp_path / "s")
    assert [p.name for p in parts] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert [p.read_bytes() for p in parts] == [b'{"text": "a"}\n\n{"text": "bb"}\n', b'{"text": "ccc"}\nnot json\n',
                                               b'{"text": "last"}']
    assert [count_lines(p) for p in parts] == [3, 2, 1]
    assert merge(parts, tmp_path / "m.jsonl").read_bytes() == src.read_bytes()
    many = split(src, 9, tmp_path / "t")  # more shards than lines: the tail shards are empty, never missing
    assert len(many) == 9 and b"".join(p.read_bytes() for p in many) == src.read_bytes()
    assert [p.stat().st_size == 0 for p in many].count(True) == 3
    csv = tmp_path / "in.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(BadInputError) as e:
        split(csv, 2)
    assert str(e.value) == f"{csv}: sharding reads JSONL (.jsonl/.ndjson); run the stage once without shards or convert the file first"


def test_sanitize_on_worker_processes_equals_one_process(tmp_path: Path) -> None:
    src = _records(tmp_path / "in.jsonl", 400, {17: "{broken", 250: '{"text": ""}', 390: '{"id": 5}'})
    cfg = SanitizeConfig(bad_records="quarantine")
    one = sanitize_file(src, tmp_path / "one.jsonl", cfg, "text")
    many = sanitize_sharded(src, tmp_path / "many.jsonl", cfg, "text", shards=4, mapper=local_mapper(2))
    assert (tmp_path / "many.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert (tmp_path / "many.jsonl.rejected.jsonl").read_bytes() == (tmp_path / "one.jsonl.rejected.jsonl").read_bytes()
    assert [json.loads(x)["line"] for x in (tmp_path / "many.jsonl.rejected.jsonl").read_text().splitlines()] == [17, 250, 390]
    assert {k: many[k] for k in ("records_in", "records_out", "rejected", "counts")} == one
    assert (one["records_in"], one["records_out"], one["rejected"]) == (400, 397, 3)
    assert sum(one["counts"].values()) > 100
    # fail mode: the error names the input file and its own line number, as the one-process run does
    with pytest.raises(BadInputError) as e:
        sanitize_sharded(src, tmp_path / "f.jsonl", SanitizeConfig(), "text", shards=4, mapper=local_mapper(2))
    assert str(e.value) == f"{src}:17: invalid JSON: Expecting property name enclosed in double quotes (column 2)"
    assert not (tmp_path / "f.jsonl").exists()
    # the bad-record fraction is judged over the whole input, not per shard
    with pytest.raises(BadInputError, match=r"3 of 400 records rejected \(0.8%\), above max_bad_fraction 0.5%"):
        sanitize_sharded(src, tmp_path / "g.jsonl", SanitizeConfig(bad_records="quarantine", max_bad_fraction=0.005),
                         "text", shards=4, mapper=local_mapper(2))


@pytest.mark.slow  # 2 spawned workers each import torch and load MiniLM: 30-136 s on the shared 2-core box
def test_dedup_num_proc_embeds_shards_on_worker_processes() -> None:
    texts = [r["text"] for r in make_dedup_records(120, seed=5)]
    one = find_duplicates(texts, DedupConfig(), progress=False)
    two = find_duplicates(texts, DedupConfig(num_proc=2), progress=False)
    assert two[0] == one[0] and [r["kept_index"] for r in two[1]] == [r["kept_index"] for r in one[1]]
    assert sum(not k for k in one[0]) == 34


# ------------------------------------------------------------------------------------ Prefect on a Dask cluster
def _prefect_dask_flow():
    from prefect import flow, task, unmapped
    from prefect.cache_policies import NO_CACHE
    from prefect_dask import DaskTaskRunner

    @task(cache_policy=NO_CACHE)
    def run_shard(fn, item):
        return os.getpid(), fn(item)

    @flow(task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 2, "processes": True, "threads_per_worker": 1}))
    def data_stages_on_dask(src: str, out: str, texts: list[str]) -> dict:
        pids: set[int] = set()

        def mapper(fn, items):
            results = run_shard.map(unmapped(fn), items).result()
            pids.update(pid for pid, _ in results)
            return [r for _, r in results]

        san = sanitize_sharded(Path(src), Path(out), SanitizeConfig(bad_records="quarantine"), "text", shards=4,
                               mapper=mapper)
        embed_fn = sharded_embedder(DedupConfig().embedding_model, 64, shards=4, mapper=mapper)
        keep, removed, _ = find_duplicates(texts, DedupConfig(), progress=False, embed_fn=embed_fn)
        return {"sanitize": san, "keep": keep, "removed": removed, "pids": sorted(pids)}

    return data_stages_on_dask


@pytest.mark.slow  # Prefect test server + 2 Dask workers loading MiniLM: 50-140 s on the shared 2-core box
def test_prefect_flow_runs_shards_on_a_local_dask_cluster(tmp_path: Path, prefect_api) -> None:
    src = _records(tmp_path / "in.jsonl", 300, {40: "[1, 2]"})
    texts = [r["text"] for r in make_dedup_records(200, seed=6)]
    res = _prefect_dask_flow()(str(src), str(tmp_path / "dask.jsonl"), texts)
    one = sanitize_file(src, tmp_path / "one.jsonl", SanitizeConfig(bad_records="quarantine"), "text")
    assert (tmp_path / "dask.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert (tmp_path / "dask.jsonl.rejected.jsonl").read_bytes() == (tmp_path / "one.jsonl.rejected.jsonl").read_bytes()
    assert res["sanitize"]["counts"] == one["counts"] and res["sanitize"]["shards"] == 4
    keep, removed, _ = find_duplicates(texts, DedupConfig(), progress=False)
    assert res["keep"] == keep
    # similarities may differ in the last float bits (other batch composition), decisions may not
    assert [(r["removed_index"], r["kept_index"], r["reason"]) for r in res["removed"]] == [
        (r["removed_index"], r["kept_index"], r["reason"]) for r in removed]
    assert max(abs(a["similarity"] - b["similarity"]) for a, b in zip(res["removed"], removed)) <= 1e-3
    assert sum(not k for k in keep) == 63
    # the shards ran in the cluster's 2 worker processes, not in the flow's process
    assert len(res["pids"]) == 2 and os.getpid() not in res["pids"]
