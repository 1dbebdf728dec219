"""shards: run the data stages on contiguous shards of a record file, in worker processes or on any engine.

Reads: a JSONL record file (the format data stages exchange). Writes: shard files (``split``), a merged output
(``merge``, atomic) and, for sanitize, the same ``OUTPUT.rejected.jsonl`` as the one-process run.

What is sharded, and how:
- sanitize is per record: each shard is sanitized on its own and the outputs are concatenated in shard order, so
  the merged file equals the one-process output byte for byte (rejected-record line numbers are shifted back to
  the input's, ``max_bad_fraction`` is checked once over the whole input, a fatal bad record names the input's line).
- dedup (:func:`dedup_sharded`) runs its passes as shard tasks and embedding-space partition tasks: exact keys per
  shard, merged in the driver (16 bytes per record); embeddings per shard; k-means on a sample (one partition per
  ``dedup.partition_size`` distinct records, SemDeDup-style); search, shingle candidates and verification within each
  partition; the kept records written per shard. Memory per task is bounded by the shard and partition sizes, not
  by the corpus; up to ``partition_size`` distinct records it is exactly the one-process algorithm.

Where the shards run is a ``mapper(fn, items) -> list``: :func:`process_map` (local worker processes),
``pipelines.executor.open_mapper`` (this process, or a Dask cluster: the config's ``executor`` block, the CLI's
``--executor dask``), or anything with the same shape. ``pipelines`` never imports Prefect. Functions handed to a
mapper are module-level, so they pickle by reference.

Run alone (sanitize on worker processes)::

    python -m pipelines.shards sanitize INPUT OUTPUT [--num-proc 2] [--shards N] [--field text]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.artifacts import atomic_write
from pipelines.config import DedupConfig, ExecutorConfig, SanitizeConfig
from pipelines.executor import Mapper, in_process, open_mapper, worker_threads
from pipelines.records import BadInputError, check_bad_fraction, rejected_path



# ------------------------------------------------------------------------------------------------ split / merge
def split(path: Path, n: int, out_dir: Path | None = None) -> list[Path]:
    """Cut a JSONL file into ``n`` contiguous line ranges of about equal bytes (lines are copied untouched).

    Returns exactly ``n`` paths (trailing ones may be empty) so that shard i always means the same line range.
    Blank and malformed lines are copied too: each shard's stage applies the bad-record policy itself.
    """
    path = Path(path)
    if n < 1:
        raise ValueError(f"number of shards must be >= 1, not {n}")
    if not path.is_file():
        raise BadInputError(path, "file not found")
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise BadInputError(path, "sharding reads JSONL (.jsonl/.ndjson); run the stage once without shards or "
                                  "convert the file first")
    out_dir = Path(out_dir) if out_dir else path.with_name(f".{path.name}.shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size
    paths = [out_dir / f"part-{k:05d}.jsonl" for k in range(n)]
    with open(path, "rb") as src:
        line = src.readline()
        for k, p in enumerate(paths):
            limit = size * (k + 1) // n  # cut at the first line end past k+1 n-ths of the bytes
            with open(p, "wb") as f:
                while line and (k == n - 1 or src.tell() - len(line) < limit):
                    f.write(line)
                    line = src.readline()
    return paths


def merge(paths: Sequence[Path], out: Path) -> Path:
    """Concatenate ``paths`` in order into ``out``, atomically (readers never see a half-written file)."""
    with atomic_write(Path(out), "wb") as f:
        for p in paths:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
    return Path(out)


def count_lines(path: Path) -> int:
    """Physical lines, as ``pipelines.records`` numbers them (a last line without newline counts too)."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


# ------------------------------------------------------------------------------------------------------ mappers
def process_map(fn: Callable[[Any], Any], items: Sequence[Any], num_proc: int = 2) -> list[Any]:
    """``[fn(x) for x in items]`` on ``num_proc`` worker processes, results in input order.

    ``spawn``: a forked child of a process that already ran torch can deadlock in OpenMP.
    """
    if num_proc <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(min(num_proc, len(items)), mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(fn, items))


def local_mapper(num_proc: int) -> Mapper:
    return lambda fn, items: process_map(fn, items, num_proc)


# ----------------------------------------------------------------------------------------------------- sanitize
def sanitize_shard(job: tuple[str, str, dict, str]) -> dict:
    """Sanitize one shard. Bad input comes back as a value (exceptions with extra fields do not pickle well)."""
    from pipelines.sanitize import sanitize_file

    shard, out, cfg, field = job
    try:
        # the bad-record fraction is a property of the whole input: checked once, after the merge
        rep = sanitize_file(Path(shard), Path(out), SanitizeConfig(**{**cfg, "max_bad_fraction": 1.0}), field)
    except BadInputError as e:
        return {"error": e.what, "line": e.line}
    return rep


def sanitize_sharded(input: Path, output: Path, cfg: SanitizeConfig, field: str, shards: int = 2,
                     mapper: Mapper | None = None, work_dir: Path | None = None) -> dict:
    """Sanitize ``input`` shard by shard on ``mapper`` (default: ``shards`` local processes); same files and
    report as ``pipelines.sanitize.sanitize_file``."""
    from pipelines.sanitize import check_ner

    check_ner(cfg)
    input, output = Path(input), Path(output)
    mapper = mapper or local_mapper(shards)
    with tempfile.TemporaryDirectory(dir=work_dir or output.parent, prefix=".sanitize-shards-") as tmp:
        parts = split(input, shards, Path(tmp) / "in")
        outs = [Path(tmp) / f"out-{k:05d}.jsonl" for k in range(len(parts))]
        reps = mapper(sanitize_shard, [(str(p), str(o), cfg.model_dump(), field) for p, o in zip(parts, outs)])
        offsets = np.cumsum([0] + [count_lines(p) for p in parts[:-1]]).tolist()
        rejected: list[dict] = []
        for k, (rep, off) in enumerate(zip(reps, offsets)):
            if "error" in rep:
                if rep["line"] is None:  # a whole-file problem (e.g. file not found) is the input's problem
                    raise BadInputError(input, rep["error"])
                raise BadInputError(input, rep["error"], rep["line"] + off)
            if cfg.bad_records == "quarantine":
                for line in rejected_path(outs[k]).read_text("utf-8").splitlines():
                    r = json.loads(line)
                    rejected.append({**r, "line": r["line"] + off})
        n_in = sum(r["records_in"] for r in reps)
        try:
            check_bad_fraction(input, n_in - len(rejected), len(rejected), cfg.max_bad_fraction, output)
            merge(outs, output)
        finally:
            if cfg.bad_records == "quarantine":  # written even when the run aborts, like the one-process run
                with atomic_write(rejected_path(output)) as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected)
    counts = dict.fromkeys(cfg.entities, 0)
    for rep in reps:
        for t, c in rep["counts"].items():
            counts[t] += c
    return {"records_in": n_in, "records_out": sum(r["records_out"] for r in reps), "rejected": len(rejected),
            "counts": counts, "shards": len(parts)}


# -------------------------------------------------------------------------------------------------------- dedup
def embed_shard(job: tuple[list[str], str, int]) -> np.ndarray:
    """Embeddings of one shard of texts (the model is loaded once per worker process and cached there)."""
    from pipelines.dedup import embed

    texts, model_name, batch_size = job
    return embed(texts, model_name, batch_size, progress=False)


def sharded_embedder(model_name: str, batch_size: int, shards: int, mapper: Mapper | None = None
                     ) -> Callable[[list[str]], np.ndarray]:
    """An ``embed_fn`` for ``pipelines.dedup.find_duplicates``: contiguous slices of the texts embedded on
    ``mapper`` (default: ``shards`` local processes), stacked back in order. The neighbour search stays global."""
    mapper = mapper or local_mapper(shards)

    def embed_fn(texts: list[str]) -> np.ndarray:
        bounds = np.linspace(0, len(texts), shards + 1).astype(int)
        jobs = [(texts[a:b], model_name, batch_size) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return np.concatenate(mapper(embed_shard, jobs), axis=0)

    return embed_fn


# ------------------------------------------------------------------------------------- dedup, partitioned
# Five passes, each a list of independent tasks on the mapper; the driver holds O(n) small arrays (a 16-byte key,
# a partition id and a keep flag per record), never texts, embeddings or candidate pairs:
#   1. keys (per shard): exact-hash every valid record; bad records are judged here, before any embedding;
#   2. embed (per shard): embeddings of the shard's exact representatives -> one .npy per shard;
#   3. the driver: k-means on a sample of the embeddings (one partition per ``partition_size`` representatives),
#      every representative to its nearest centroid; an exact copy follows its representative;
#   4. bucket (per shard): each record's text (and its representative's embedding row) to its partition's files;
#   5. partition (per partition): ``pipelines.dedup.find_duplicates`` on the partition alone -> removals, report;
#   6. write (per shard): the kept records, merged in shard order. The report is merged by removed index.
# The partitions depend on the data and the dedup config only (never on the executor or the number of workers),
# so every executor gives the same output; with one partition it is the one-process algorithm.
def _read_shard(shard: str, field: str, bad_records: str, rejected: list | None = None) -> list[dict]:
    from pipelines.records import iter_records

    return list(iter_records(Path(shard), field, bad_records, rejected if rejected is not None else []))


def _keys_task(job: tuple[str, str, str]) -> dict:
    from pipelines.dedup import exact_key

    shard, field, bad_records = job
    rejected: list[dict] = []
    try:
        recs = _read_shard(shard, field, bad_records, rejected)
    except BadInputError as e:
        return {"error": e.what, "line": e.line}
    return {"keys": b"".join(exact_key(r[field]) for r in recs), "n": len(recs), "rejected": rejected,
            "lines": count_lines(Path(shard))}


def _embed_task(job: tuple[str, str, str, np.ndarray, str, dict, int, int, str | None]) -> float:
    """Embeddings of the shard's representatives (``out``) and, with ``shingles_out``, their hashed word 3-grams
    as (hash, global index) arrays for the corpus-wide shingle candidates (:func:`lexical_components`)."""
    import time

    from pipelines.dedup import embed, number_key, shingles

    shard, field, bad_records, local_reps, out, cfg, threads, start, shingles_out = job
    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    recs = _read_shard(shard, field, bad_records)
    texts = [recs[j][field] for j in local_reps]
    d = DedupConfig(**cfg)
    emb = embed(texts, d.embedding_model, d.batch_size, False, d.embedding_backend) if texts else np.zeros((0, 0), np.float32)
    np.save(out, np.ascontiguousarray(emb, dtype=np.float32))
    if shingles_out:
        hs = [np.fromiter(shingles(t), dtype=np.uint64) for t in texts]
        np.savez(shingles_out, h=np.concatenate(hs) if hs else np.zeros(0, np.uint64),
                 i=np.repeat(start + np.asarray(local_reps, dtype=np.int64), [len(h) for h in hs]),
                 k=np.array([number_key(t) for t in texts], dtype=np.uint64),
                 ki=start + np.asarray(local_reps, dtype=np.int64))
    return time.perf_counter() - t0


def _block_pairs(keys: np.ndarray, recs: np.ndarray, max_size: int) -> np.ndarray:
    """Consecutive-member pairs of each block of equal keys of 2..``max_size`` records (a chain: enough to join
    them in one component)."""
    if not len(keys):
        return np.zeros((0, 2), np.int64)
    order = np.lexsort((recs, keys))
    k, r = keys[order], recs[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    sizes = np.diff(np.r_[starts, len(k)])
    ok = np.repeat(sizes <= max_size, sizes)[1:] & (k[1:] == k[:-1])
    return np.stack([r[:-1][ok], r[1:][ok]], axis=1)


def _shingle_bucket_task(job: tuple[list[str], int, int, int]) -> dict:
    """One hash range of the corpus' shingles: pairs of records sharing rare shingles (held by at most ``max_df``
    records) with their shared count, and each record's count of rare shingles in this range."""
    files, b, buckets, max_df, same_numbers = job
    hs, rec, ks, krec = [], [], [], []
    for f in files:
        z = np.load(f)
        sel = z["h"] % np.uint64(buckets) == b
        hs.append(z["h"][sel])
        rec.append(z["i"][sel])
        if same_numbers:
            sel = (z["k"] != 0) & (z["k"] % np.uint64(buckets) == b)
            ks.append(z["k"][sel])
            krec.append(z["ki"][sel])
    facts = _block_pairs(np.concatenate(ks), np.concatenate(krec), max_df) if same_numbers else np.zeros((0, 2), np.int64)
    h, r = np.concatenate(hs), np.concatenate(rec)
    order = np.argsort(h, kind="stable")
    h, r = h[order], r[order]
    if not len(h):
        return {"pairs": np.zeros((0, 2), np.int64), "shared": np.zeros(0, np.int64),
                "rare_rec": np.zeros(0, np.int64), "rare_n": np.zeros(0, np.int64), "facts": facts}
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    sizes = np.diff(np.r_[starts, len(h)])
    rare = np.repeat(sizes <= max_df, sizes)
    rare_rec, rare_n = np.unique(r[rare], return_counts=True)
    a_list, b_list = [], []
    for size in range(2, max_df + 1):
        st = starts[sizes == size]
        if not len(st):
            continue
        members = np.sort(r[st[:, None] + np.arange(size)], axis=1)
        ia, ib = np.triu_indices(size, 1)
        a_list.append(members[:, ia].ravel())
        b_list.append(members[:, ib].ravel())
    if not a_list:
        return {"pairs": np.zeros((0, 2), np.int64), "shared": np.zeros(0, np.int64), "rare_rec": rare_rec,
                "rare_n": rare_n, "facts": facts}
    pairs, shared = np.unique(np.stack([np.concatenate(a_list), np.concatenate(b_list)], axis=1), axis=0,
                              return_counts=True)
    return {"pairs": pairs, "shared": shared, "rare_rec": rare_rec, "rare_n": rare_n, "facts": facts}


def lexical_components(mapper: Mapper, files: Sequence[Path], n: int, buckets: int, max_df: int = 32,
                       containment: float = 0.5, same_numbers: bool = False) -> np.ndarray:
    """Connected components (a label per record) of the corpus-wide shingle candidates of
    ``pipelines.dedup.lexical_pairs``, computed by hash range on the mapper.

    k-means puts a boilerplate-wrapped or truncated copy in another cell than its original when the wrapper moves its
    embedding; these pairs share rare shingles whatever the embedding does, so their records are kept together.
    With ``same_numbers``, records stating exactly the same set of numbers (blocks of at most ``max_df``: the
    candidates of ``pipelines.dedup.fact_pairs``) are joined too: a paraphrase may share no rare shingle."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    res = mapper(_shingle_bucket_task, [([str(f) for f in files], b, buckets, max_df, same_numbers)
                                        for b in range(buckets)])
    n_rare = np.zeros(n, dtype=np.int64)
    for r in res:
        np.add.at(n_rare, r["rare_rec"], r["rare_n"])
    pairs = np.concatenate([r["pairs"] for r in res])
    shared = np.concatenate([r["shared"] for r in res])
    if len(pairs):  # a pair's shared count is summed over the hash ranges
        pairs, inv = np.unique(pairs, axis=0, return_inverse=True)
        shared = np.bincount(inv.ravel(), weights=shared).astype(np.int64)
        ok = shared >= np.ceil(containment * np.minimum(n_rare[pairs[:, 0]], n_rare[pairs[:, 1]]))
        pairs = pairs[ok]
    pairs = np.concatenate([pairs.reshape(-1, 2)] + [r["facts"] for r in res])
    g = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)[1]


def _bucket_task(job: tuple[str, str, str, int, np.ndarray, np.ndarray, str | None, str, int]) -> None:
    """Write shard ``k``'s records to ``work/p<P>/s<k>.jsonl`` (+ ``.npy``: its representatives' embeddings)."""
    shard, field, bad_records, start, parts, is_rep, emb_path, work, k = job
    recs = _read_shard(shard, field, bad_records)
    emb = np.load(emb_path, mmap_mode="r") if emb_path else None
    row_of = np.cumsum(is_rep) - 1  # representative j of this shard is row j of its embedding file
    for p in np.unique(parts):
        idx = np.flatnonzero(parts == p)
        d = Path(work) / f"p{int(p):05d}"
        d.mkdir(exist_ok=True)
        with open(d / f"s{k:05d}.jsonl", "w", encoding="utf-8") as f:
            for j in idx:
                f.write(json.dumps([start + int(j), recs[j].get("id"), recs[j][field]], ensure_ascii=False,
                                   default=str) + "\n")
        if emb is not None:
            np.save(d / f"s{k:05d}.npy", np.ascontiguousarray(emb[row_of[idx[is_rep[idx]]]]))


def _partition_task(job: tuple[str, dict, str]) -> dict:
    """Dedup one partition on its own; its report lines go to ``report`` (ascending removed index)."""
    from pipelines.dedup import find_duplicates, kind_counts

    pdir, cfg, report = job
    gidx: list[int] = []
    ids: list[Any] = []
    texts: list[str] = []
    for f in sorted(Path(pdir).glob("s*.jsonl")):  # shard order = input order
        for line in f.read_text("utf-8").splitlines():
            i, rid, t = json.loads(line)
            gidx.append(i)
            ids.append(rid)
            texts.append(t)
    npys = sorted(Path(pdir).glob("s*.npy"))
    mats = [m for m in (np.load(f) for f in npys) if len(m)]
    emb = np.concatenate(mats) if mats else None

    def embed_fn(rep_texts: list[str]) -> np.ndarray:
        assert emb is not None and len(emb) == len(rep_texts), "partition embeddings do not match its records"
        return emb

    keep, removed, stats = find_duplicates(texts, DedupConfig(**cfg), progress=False, embed_fn=embed_fn)
    with open(report, "w", encoding="utf-8") as f:
        for r in removed:
            m, k = r["removed_index"], r["kept_index"]
            f.write(json.dumps({"removed_id": ids[m], "removed_text": texts[m], "kept_id": ids[k], "kept_text": texts[k],
                                **r, "removed_index": gidx[m], "kept_index": gidx[k]},
                               ensure_ascii=False, default=str) + "\n")
    reasons = [r["reason"] for r in removed]
    return {"removed": np.array([gidx[r["removed_index"]] for r in removed], dtype=np.int64), "n": len(texts),
            "exact": reasons.count("exact"), "near": reasons.count("near"),
            "counts": kind_counts(removed, stats),  # per kind of removal + paraphrases kept (dedup.kind_counts)
            "stats": {k: v for k, v in stats.items() if k != "embed_s"}}


def _write_task(job: tuple[str, str, str, np.ndarray, str]) -> int:
    from pipelines.records import dumps_record

    shard, field, bad_records, keep, out = job
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for rec, k in zip(_read_shard(shard, field, bad_records), keep):
            if k:
                f.write(dumps_record(rec))
                n += 1
    return n


def partition_reps(emb_files: Sequence[Path], parts: int, seed: int = 0, chunk: int = 65_536,
                   max_size: int | None = None) -> np.ndarray:
    """Partition id of every representative: spherical k-means (faiss) on a sample of at most 256 vectors per
    partition, then each vector's nearest centroid, read chunk by chunk from the memory-mapped shard files.

    k-means cells are uneven; a cell above ``max_size`` is split again by its own k-means (a few rounds at most),
    so the largest partition, which sets a worker's memory, stays near the target."""
    import faiss

    mats = [np.load(f, mmap_mode="r") for f in emb_files]
    sizes = np.array([len(m) for m in mats])
    offs = np.r_[0, np.cumsum(sizes)[:-1]]
    n = int(sizes.sum())
    d = next(m.shape[1] for m in mats if len(m))

    def rows(idx: np.ndarray) -> np.ndarray:
        which = np.searchsorted(np.cumsum(sizes), idx, side="right")
        return np.stack([mats[w][i - offs[w]] for w, i in zip(which, idx)]).astype(np.float32)

    def kmeans(members: np.ndarray | None, k: int, rnd: int):
        pool = n if members is None else len(members)
        pick = np.sort(np.random.default_rng(seed + rnd).choice(pool, size=min(pool, k * 256), replace=False))
        km = faiss.Kmeans(d, k, niter=25, seed=seed + 1 + rnd, spherical=True, max_points_per_centroid=256,
                          verbose=False)
        km.train(rows(pick if members is None else members[pick]))
        return km.index

    def assign(index, members: np.ndarray | None) -> np.ndarray:
        out = np.empty(n if members is None else len(members), dtype=np.int32)
        if members is None:
            for m, off in zip(mats, offs):
                for s in range(0, len(m), chunk):
                    _, lab = index.search(np.ascontiguousarray(m[s : s + chunk], dtype=np.float32), 1)
                    out[off + s : off + s + len(lab)] = lab[:, 0]
        else:
            for s in range(0, len(members), chunk):
                _, lab = index.search(rows(members[s : s + chunk]), 1)
                out[s : s + len(lab)] = lab[:, 0]
        return out

    labels = assign(kmeans(None, parts, 0), None)
    for rnd in range(1, 4):
        counts = np.bincount(labels)
        big = np.flatnonzero(counts > (max_size or n))
        if not len(big):
            break
        for p in big:
            members = np.flatnonzero(labels == p)
            k = -(-len(members) // (max_size or n)) + 1
            sub = assign(kmeans(members, k, rnd * 1000 + int(p)), members)
            nxt = labels.max() + 1
            labels[members] = np.where(sub == 0, p, nxt + sub - 1)
    return labels


def dedup_sharded(input: Path, output: Path, cfg: DedupConfig, field: str, report: Path | None = None,
                  mapper: Mapper | None = None, shards: int = 1, work_dir: Path | None = None,
                  threads: int = 0) -> dict:
    """``pipelines.dedup.dedup_file`` by shards and embedding-space partitions on ``mapper`` (default: this
    process). Same files and report; memory per task bounded by the shard and partition sizes."""
    import heapq
    import resource
    import time

    from pipelines.dedup import KIND_COUNTS, report_path
    from pipelines.records import write_rejected

    input, output = Path(input), Path(output)
    report = Path(report) if report else report_path(output)
    mapper = mapper or (lambda fn, items: [fn(x) for x in items])
    times: dict[str, float] = {}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_dir or output.parent, prefix=".dedup-shards-") as tmp:
        work = Path(tmp)
        parts_in = split(input, shards, work / "in")
        base = (field, cfg.bad_records)
        keys = mapper(_keys_task, [(str(p), *base) for p in parts_in])
        offsets = np.cumsum([0] + [k.get("lines", 0) for k in keys[:-1]]).tolist()
        rejected: list[dict] = []
        try:
            for k, off in zip(keys, offsets):
                if "error" in k:
                    raise BadInputError(input, k["error"], None if k["line"] is None else k["line"] + off)
                rejected.extend({**r, "line": r["line"] + off} for r in k["rejected"])
            n = sum(k["n"] for k in keys)
            check_bad_fraction(input, n, len(rejected), cfg.max_bad_fraction, output)
        finally:
            if cfg.bad_records == "quarantine":
                write_rejected(output, rejected)
        counts = [k["n"] for k in keys]
        starts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
        allkeys = np.frombuffer(b"".join(k["keys"] for k in keys), dtype="V16")
        _, first, inverse = np.unique(allkeys, return_index=True, return_inverse=True)
        rep_of = first[inverse.ravel()]
        is_rep = rep_of == np.arange(n)
        n_reps = int(is_rep.sum())
        n_parts = max(1, -(-n_reps // cfg.partition_size))
        times["keys_s"] = time.perf_counter() - t
        emb_files: list[Path] = []
        if cfg.semantic and n_reps > 1:
            t = time.perf_counter()
            emb_files = [work / f"emb-{k:05d}.npy" for k in range(len(parts_in))]
            steer = cfg.lexical and cfg.steer and n_parts > 1
            sh_files = [work / f"shingles-{k:05d}.npz" for k in range(len(parts_in))]
            jobs = [(str(p), *base, np.flatnonzero(is_rep[s : s + c]), str(e), cfg.model_dump(), threads, int(s),
                     str(sf) if steer else None)
                    for p, s, c, e, sf in zip(parts_in, starts, counts, emb_files, sh_files)]
            mapper(_embed_task, jobs)
            times["embed_s"] = time.perf_counter() - t
        t = time.perf_counter()
        rep_pos = np.cumsum(is_rep) - 1
        if n_parts == 1:
            part_of = np.zeros(n, dtype=np.int32)
        elif emb_files:
            part_rep = partition_reps(emb_files, n_parts, max_size=cfg.partition_size * 3 // 2)
            if cfg.lexical and cfg.steer:
                # records joined by shared rare shingles go to the partition of the component's first record
                comp = lexical_components(mapper, sh_files, n, max(len(parts_in), n_parts),
                                          same_numbers=cfg.same_numbers)
                # (a component larger than a tenth of a partition is a chain through template text: left alone)
                c = comp[np.flatnonzero(is_rep)]
                order = np.lexsort((np.arange(len(c)), c))
                heads = np.r_[True, c[order][1:] != c[order][:-1]]
                head_of = order[np.maximum.accumulate(np.where(heads, np.arange(len(order)), 0))]
                small = np.bincount(c)[c[order]] <= max(2, cfg.partition_size // 10)
                part_rep[order[small]] = part_rep[head_of[small]]
            part_of = part_rep[rep_pos[rep_of]]
        else:  # exact-only: partition by hash, copies always land together
            part_of = (np.frombuffer(allkeys.tobytes(), dtype="<u4")[::4] % n_parts).astype(np.int32)[rep_of]
        psize = np.bincount(part_of, minlength=n_parts)
        mapper(_bucket_task, [(str(p), *base, int(s), part_of[s : s + c], is_rep[s : s + c],
                               str(emb_files[k]) if emb_files else None, str(work), k)
                              for k, (p, s, c) in enumerate(zip(parts_in, starts, counts))])
        times["partition_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pdirs = sorted(work.glob("p*"))
        reports = [work / f"report-{d.name}.jsonl" for d in pdirs]
        dcfg = {**cfg.model_dump(), "num_proc": 1}
        res = mapper(_partition_task, [(str(d), dcfg, str(r)) for d, r in zip(pdirs, reports)])
        times["dedup_s"] = time.perf_counter() - t
        t = time.perf_counter()
        keep = np.ones(n, dtype=bool)
        for r in res:
            keep[r["removed"]] = False
        outs = [work / f"out-{k:05d}.jsonl" for k in range(len(parts_in))]
        kept = mapper(_write_task, [(str(p), *base, keep[s : s + c], str(o))
                                    for p, s, c, o in zip(parts_in, starts, counts, outs)])
        merge(outs, output)
        with atomic_write(report) as f:
            files = [open(r, encoding="utf-8") for r in reports]
            try:
                for line in heapq.merge(*files, key=lambda x: json.loads(x)["removed_index"]):
                    f.write(line)
            finally:
                for fh in files:
                    fh.close()
        times["write_s"] = time.perf_counter() - t
    stats = {k: sum(r["stats"][k] for r in res) for k in ("candidate_pairs", "rejected_pairs", "rescued", "search_s",
                                                          "verify_s")}
    return {"records_in": n + len(rejected), "records_out": int(sum(kept)), "rejected": len(rejected),
            # exact_duplicates, near_duplicates and each kind's count (pipelines.dedup.kind_counts), summed
            **{k: sum(r["counts"][k] for r in res) for k in KIND_COUNTS},
            **{k: int(v) for k, v in stats.items() if not k.endswith("_s")},
            "embed_s": round(times.get("embed_s", 0.0), 3), "search_s": round(stats["search_s"], 3),
            "verify_s": round(stats["verify_s"], 3), "shards": len(parts_in), "partitions": len(pdirs),
            "largest_partition": int(psize.max()) if n else 0,
            "peak_rss_mib": {"driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                             "tasks": {str(k): round(v, 1) for k, v in getattr(mapper, "peaks", {}).items()}},
            "seconds": {k: round(v, 3) for k, v in times.items()}, "report": str(report)}


# ------------------------------------------------------------------------------------------- stage entry points
def n_shards(input: Path, executor: ExecutorConfig) -> int:
    """Shards of ``executor.shard_mb`` each, and at least one per worker of a Dask cluster."""
    size = Path(input).stat().st_size if Path(input).is_file() else 0
    n = max(1, -(-size // (executor.shard_mb << 20)))
    return max(n, executor.workers) if executor.kind == "dask" else n


def _sharded(input: Path) -> bool:
    return Path(input).suffix.lower() in (".jsonl", ".ndjson")


def sanitize_records(input: Path, output: Path, cfg: SanitizeConfig, field: str,
                     executor: ExecutorConfig | None = None) -> dict:
    """The sanitize stage's file work on the configured executor (``num_proc`` local processes when local)."""
    from pipelines.sanitize import sanitize_file

    executor = executor or ExecutorConfig()
    if executor.kind != "local":
        with open_mapper(executor, "sanitize") as mapper:
            return sanitize_sharded(input, output, cfg, field, n_shards(input, executor), mapper,
                                    Path(executor.work_dir) if executor.work_dir else None)
    if cfg.num_proc > 1 and _sharded(input):
        return sanitize_sharded(input, output, cfg, field, shards=cfg.num_proc)
    return sanitize_file(input, output, cfg, field)


def dedup_records(input: Path, output: Path, cfg: DedupConfig, field: str, report: Path | None = None,
                  executor: ExecutorConfig | None = None, progress: bool = True) -> dict:
    """The dedup stage's file work: JSONL by shards and partitions on the configured executor (``num_proc``
    local processes when local); other formats in one process (``pipelines.dedup.dedup_file``)."""
    from pipelines.dedup import dedup_file

    executor = executor or ExecutorConfig()
    if executor.kind == "local" and not _sharded(input):
        return dedup_file(input, output, cfg, field, report, progress)
    work = Path(executor.work_dir) if executor.work_dir else None
    if executor.kind == "local":
        mapper = local_mapper(cfg.num_proc) if cfg.num_proc > 1 else in_process("dedup")
        return dedup_sharded(input, output, cfg, field, report, mapper, max(n_shards(input, executor), cfg.num_proc),
                             work)
    with open_mapper(executor, "dedup") as mapper:
        return dedup_sharded(input, output, cfg, field, report, mapper, n_shards(input, executor), work,
                             worker_threads(executor))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.shards", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["sanitize"])
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--field", default="text")
    p.add_argument("--num-proc", type=int, default=2, help="worker processes")
    p.add_argument("--shards", type=int, default=None, help="number of shards (default: --num-proc)")
    p.add_argument("--bad-records", choices=["fail", "quarantine"], default="fail")
    a = p.parse_args(argv)
    try:
        rep = sanitize_sharded(a.input, a.output, SanitizeConfig(bad_records=a.bad_records), a.field,
                               a.shards or a.num_proc, local_mapper(a.num_proc))
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
