"""executor: where the data stages run their shard work — in this process or on a Dask cluster.

Reads: an ``ExecutorConfig`` (the config's ``executor`` block or the CLI's ``--executor/--workers/--scheduler``).
Writes: nothing; :func:`open_mapper` yields a ``mapper(fn, items) -> list`` (results in input order), the only thing
the stages see (``pipelines.shards``), so another engine (Ray: ``ray.remote(fn)`` + ``ray.get``) is one more branch
here and no stage changes.

- ``local``: the items run one after another in this process (the stages' own ``num_proc`` pools still apply).
- ``dask``: ``distributed.Client`` on a ``LocalCluster`` of ``workers`` processes (``threads_per_worker`` threads,
  spawned, no dashboard), or on the scheduler at ``scheduler``. Tasks are submitted with ``pure=False`` and gathered
  in input order; each finished task is a progress step on stderr. Functions are module-level, so they pickle by
  reference: a remote cluster's workers need this package installed and the work directory on shared storage.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from pipelines.config import ExecutorConfig
from pipelines.records import BadInputError

Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


def _progress(total: int, desc: str) -> tqdm:
    quiet = bool(os.environ.get("TUNEWRIGHT_NO_PROGRESS")) or total <= 1
    return tqdm(total=total, desc=desc, unit="task", file=sys.stderr, disable=quiet)


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", "tasks").strip("_").removesuffix("_task")


def measured(job: tuple[Callable[[Any], Any], Any]) -> tuple[Any, int, float]:
    """``fn(item)`` plus the pid and peak RSS (MiB) of the process that ran it: memory per worker, measured."""
    import resource

    fn, item = job
    out = fn(item)
    return out, os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_process(desc: str = "tasks") -> Mapper:
    peaks: dict[int, float] = {}

    def mapper(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        out = []
        with _progress(len(items), f"{desc}: {_name(fn)}") as bar:
            for x in items:
                r, pid, peak = measured((fn, x))
                peaks[pid] = max(peaks.get(pid, 0.0), peak)
                out.append(r)
                bar.update()
        return out

    mapper.peaks = peaks  # type: ignore[attr-defined]
    return mapper


def describe(cfg: ExecutorConfig) -> str:
    if cfg.kind == "local":
        return "local (this process)"
    return f"dask scheduler {cfg.scheduler}" if cfg.scheduler else f"dask local cluster, {cfg.workers} workers"


@contextmanager
def open_mapper(cfg: ExecutorConfig, desc: str = "tasks") -> Iterator[Mapper]:
    """A mapper on the configured engine; a Dask cluster it started is closed on exit."""
    if cfg.kind == "local":
        yield in_process(desc)
        return
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if cfg.scheduler:
        try:
            client = Client(cfg.scheduler, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise BadInputError(cfg.scheduler, f"cannot reach the Dask scheduler: {e}") from None
    else:
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=cfg.threads_per_worker, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)

    peaks: dict[int, float] = {}

    def mapper(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        t0 = time.perf_counter()
        futures = client.map(measured, [(fn, x) for x in items], pure=False)
        with _progress(len(futures), f"{desc}: {_name(fn)}") as bar:
            for _ in as_completed(futures):
                bar.update()
        if not bar.disable:
            print(f"{desc}: {_name(fn)}: {len(items)} tasks on {describe(cfg)} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        out = []
        for r, pid, peak in client.gather(futures):
            peaks[pid] = max(peaks.get(pid, 0.0), peak)
            out.append(r)
        return out

    mapper.peaks = peaks  # type: ignore[attr-defined]
    try:
        yield mapper
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def worker_threads(cfg: ExecutorConfig) -> int:
    """torch threads a task may use: a local cluster shares this machine's cores among its workers."""
    if cfg.kind == "local":
        return 0  # leave torch's default
    if cfg.scheduler:
        return cfg.threads_per_worker
    return max(1, min(cfg.threads_per_worker, (os.cpu_count() or 1) // cfg.workers) or 1)


def add_executor_args(p: Any) -> None:
    """``--executor/--workers/--scheduler`` on an argparse parser (the stages' own ``python -m`` entry points)."""
    d = ExecutorConfig()
    p.add_argument("--executor", choices=["local", "dask"], default=d.kind, help="where the shard work runs")
    p.add_argument("--workers", type=int, default=d.workers, help="processes of a local Dask cluster")
    p.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (implies dask)")


def executor_from_args(a: Any) -> ExecutorConfig:
    return executor_config(a.executor, a.workers, a.scheduler)


def executor_config(kind: str | None, workers: int | None, scheduler: str | None,
                    base: ExecutorConfig | None = None) -> ExecutorConfig:
    """``base`` with the command line's choices applied; a scheduler address means Dask."""
    upd: dict[str, Any] = {}
    if kind:
        upd["kind"] = kind
    if workers:
        upd["workers"] = workers
    if scheduler:
        upd.update(kind="dask", scheduler=scheduler)
    return ExecutorConfig(**{**(base or ExecutorConfig()).model_dump(), **upd})
