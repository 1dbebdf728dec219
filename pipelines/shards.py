"""shards: run the data stages on contiguous shards of a record file, in worker processes or on any engine.

Reads: a JSONL record file (the format data stages exchange). Writes: shard files (``split``), a merged output
(``merge``, atomic) and, for sanitize, the same ``OUTPUT.rejected.jsonl`` as the one-process run.

What is sharded, and how:
- sanitize is per record: each shard is sanitized on its own and the outputs are concatenated in shard order, so
  the merged file equals the one-process output byte for byte (rejected-record line numbers are shifted back to
  the input's, ``max_bad_fraction`` is checked once over the whole input, a fatal bad record names the input's line).
- dedup needs a global view: exact hashing and the neighbour search + verification run once over all records
  (cheap: hashes and O(n*d) vectors), the expensive part, the embeddings, runs per shard
  (:func:`sharded_embedder`, passed to ``pipelines.dedup.find_duplicates``).

Where the shards run is a ``mapper(fn, items) -> list``: :func:`process_map` (local worker processes, the default)
or anything with the same shape, e.g. a Prefect flow whose tasks run on a Dask cluster (see tests/test_scaleout.py;
``pipelines`` never imports Prefect). Functions handed to a mapper are module-level, so they pickle by reference.

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
from pipelines.config import SanitizeConfig
from pipelines.records import BadInputError, check_bad_fraction, rejected_path

Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


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
