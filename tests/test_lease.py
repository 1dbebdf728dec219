"""Leases on the MLflow side (pipelines/lease.py), for real: a sqlite MLflow store shared by real processes.

- Processes (and threads) racing for one key: exactly one holds it at any time, and every one gets it in turn.
- A holder keeps its lease past ``lease_s`` by renewing it; a SIGKILLed holder stops renewing, and the next waiter
  takes over only after the dead lease's expiry, ending the dead lease FAILED and the run it held KILLED.
- ``until`` returns what it finds instead of a lease (at once, or while waiting).
- The issue's done-when, through ``tunewright run``: three runs of one config at once compute each stage once;
  with the computing run SIGKILLed, the others finish after its lease.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, copy_config

slow = pytest.mark.slow
SETTLE, POLL = 0.5, 0.2


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store (created here, before any process races to create it) and short timings."""
    monkeypatch.setenv("TUNEWRIGHT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TUNEWRIGHT_LEASE_SETTLE_SECONDS", str(SETTLE))
    monkeypatch.setenv("TUNEWRIGHT_LEASE_POLL_SECONDS", str(POLL))
    from pipelines import lease, tracking

    tracking.experiment_id()
    tracking.experiment_id(lease.EXPERIMENT)
    return tmp_path


def lease_runs(key: str | None = None, status: str | None = None):
    from mlflow.entities import ViewType

    from pipelines import lease, tracking

    flt = " and ".join(([f"tags.`{lease.TAG_KEY}` = '{lease.key_hash(key)}'"] if key else [])
                       + ([f"attributes.status = '{status}'"] if status else []))
    return tracking.client().search_runs([tracking.experiment_id(lease.EXPERIMENT)], flt, ViewType.ACTIVE_ONLY,
                                         max_results=5000)


def assert_exclusive(events: list[tuple[float, str, str]], expected_enters: int) -> None:
    """enter/exit events sorted by time alternate enter, exit (same holder), enter, exit...: never two inside."""
    seq = sorted(e for e in events if e[1] in ("enter", "exit"))
    assert sum(1 for e in seq if e[1] == "enter") == expected_enters, seq
    inside = None
    for t, what, who in seq:
        if what == "enter":
            assert inside is None, f"{who} entered at {t:.3f} while {inside} held the lease"
            inside = who
        else:
            assert inside == who, f"{who} left at {t:.3f} but {inside} was inside"
            inside = None
    assert inside is None


# ------------------------------------------------------------------------------------------------------ races
def test_racing_processes_hold_the_lease_one_at_a_time(store, tmp_path):
    n, reps, hold = 4, 2, 0.3
    events, go = tmp_path / "events", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-m", "tests._lease_worker", "race", "race-key", str(events), str(go),
                               str(reps), str(hold)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    try:
        # every process warms up (imports, first request), then all start at the same time
        t0 = time.time()
        while (events.read_text().count(" ready ") if events.exists() else 0) < n:
            assert time.time() - t0 < 180 and all(p.poll() is None for p in procs), "a racer did not get ready"
            time.sleep(0.1)
        tmp = go.with_suffix(".tmp")
        tmp.write_text(f"{time.time() + 0.5}")
        tmp.rename(go)
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    rows = [line.split() for line in events.read_text().splitlines()]
    evs = [(float(t), what, pid) for pid, what, t in rows]
    first_tries = sorted(t for t, what, pid in evs if what == "try")[:n]
    assert first_tries[-1] - first_tries[0] < 2 * SETTLE, f"the processes did not race: first tries {first_tries}"
    assert_exclusive(evs, n * reps)
    assert not lease_runs("race-key", "RUNNING"), "a released lease is not left RUNNING"
    assert len(lease_runs("race-key", "FINISHED")) == n * reps  # losing claims were withdrawn (deleted)


def test_racing_threads_hold_the_lease_one_at_a_time(store):
    from pipelines.lease import acquire

    n, reps = 8, 2
    events: list[tuple[float, str, str]] = []
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def contender(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(reps):
                with acquire("thread-key", log=lambda m: None):
                    events.append((time.time(), "enter", f"t{i}"))
                    time.sleep(0.05)
                    events.append((time.time(), "exit", f"t{i}"))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert_exclusive(events, n * reps)


# ---------------------------------------------------------------------------------------------- renewal, expiry
def test_a_live_holder_keeps_its_lease_past_lease_seconds(store):
    from pipelines import lease

    held = lease.acquire("long-key", lease_s=1.5)
    released_at: list[float] = []

    def finish() -> None:
        time.sleep(4.0)  # well past 1.5 s: only renewal keeps the lease
        released_at.append(time.time())
        held.release()

    threading.Thread(target=finish).start()
    lines: list[str] = []
    got = lease.acquire("long-key", lease_s=1.5, log=lines.append)
    t_got = time.time()
    try:
        assert released_at and t_got >= released_at[0], "taken over while its holder was alive and renewing"
        assert not held.lost
        assert lines and "long-key is held by" in lines[0] and "waiting" in lines[0]
        assert len(lines) == 1, lines  # one line per holder, not one per poll
    finally:
        got.release()
    from pipelines import tracking

    assert tracking.client().get_run(held.run_id).info.status == "FINISHED"


def test_sigkilled_holder_is_taken_over_after_its_lease_and_ended(store):
    from pipelines import lease, tracking

    lease_s = 3.0
    p = subprocess.Popen([sys.executable, "-m", "tests._lease_worker", "hold", "dead-key", str(lease_s)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("HELD "), (line, p.stderr.read() if p.poll() is not None else "")
        _, lease_run, stage_run = line.split()
        time.sleep(lease_s)  # it renews meanwhile: the lease outlives lease_s while the holder lives
        c = tracking.client()
        assert c.get_run(lease_run).info.status == "RUNNING"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    expires = float(c.get_run(lease_run).data.tags[lease.TAG_EXPIRES])  # its last renewal: final now
    assert expires > time.time() - 0.5, "the lease was renewed up to the kill"
    lines: list[str] = []
    got = lease.acquire("dead-key", lease_s=lease_s, log=lines.append)
    t_got = time.time()
    try:
        assert t_got >= expires, f"taken over {expires - t_got:.2f}s before the dead lease expired"
        assert t_got < expires + lease_s, "taken over long after the lease expired"
        dead = c.get_run(lease_run)
        assert dead.info.status == "FAILED" and dead.data.tags[lease.TAG_STATE] == "expired"
        stage = c.get_run(stage_run)
        assert stage.info.status == "KILLED", "the dead holder's run is not left RUNNING"
        assert "stopped renewing" in stage.data.tags[lease.TAG_ENDED_BY]
        assert any("dead-key is held by" in m for m in lines), lines
        assert any("is gone" in m and stage_run[:8] in m for m in lines), lines
    finally:
        got.release()
    assert not lease_runs("dead-key", "RUNNING")


# ----------------------------------------------------------------------------------------------------- until
def test_until_returns_what_it_finds_instead_of_a_lease(store):
    from pipelines import lease

    assert lease.acquire("until-key", until=lambda: "cached") == "cached"
    assert not lease_runs("until-key"), "nothing claimed when until() answers at once"

    held = lease.acquire("until-key")
    result: list[str] = []
    threading.Timer(1.5, lambda: result.append("computed by the holder")).start()
    t0 = time.time()
    got = lease.acquire("until-key", until=lambda: result[0] if result else None, log=lambda m: None)
    try:
        assert got == "computed by the holder" and time.time() - t0 >= 1.4
        assert len(lease_runs("until-key", "RUNNING")) == 1, "the waiter claimed nothing; the holder still holds"
    finally:
        held.release()


# ------------------------------------------------------------------------------ the done-when, end to end
def _tw_env(home: Path, lease_s: float) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(TUNEWRIGHT_HOME=str(home), PREFECT_API_URL=str(PREFECT_API_URL.value()),
               TUNEWRIGHT_LEASE_SECONDS=str(lease_s), TUNEWRIGHT_LEASE_SETTLE_SECONDS="1.0",
               TUNEWRIGHT_LEASE_POLL_SECONDS="1.0")
    return env


def _start_runs(cfg: Path, env: dict[str, str], logs: Path, n: int = 3) -> list[subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(cfg)], cwd=ROOT, env=env,
                             stdout=open(logs / f"run{i}.log", "w"), stderr=subprocess.STDOUT) for i in range(n)]


def _stage_runs():
    from pipelines import tracking

    runs = tracking.client().search_runs([tracking.experiment_id()], max_results=5000)
    return [r for r in runs if "tunewright.stage" in r.data.tags], [r for r in runs if "tunewright.stage" not in r.data.tags]


STAGES = ["sanitize", "dedup", "curriculum", "dapt", "sft", "reward", "dpo", "evaluate", "export"]


@slow
def test_three_concurrent_runs_compute_each_stage_once(store, prefect_api, tmp_path):
    cfg = copy_config(TINY, tmp_path, "tiny")
    procs = _start_runs(cfg, _tw_env(tmp_path / "home", 10.0), tmp_path / "logs")
    for p in procs:
        p.wait(timeout=1200)
    out = "\n".join((tmp_path / "logs" / f"run{i}.log").read_text() for i in range(3))
    assert [p.returncode for p in procs] == [0, 0, 0], out[-6000:]
    kids, parents = _stage_runs()
    computed = {s: sum(1 for r in kids if r.info.run_name == s and r.data.tags["tunewright.cache"] == "miss")
                for s in STAGES}
    hits = {s: sum(1 for r in kids if r.info.run_name == s and r.data.tags["tunewright.cache"] == "hit")
            for s in STAGES}
    assert computed == {s: 1 for s in STAGES}, computed
    assert hits == {s: 2 for s in STAGES}, hits
    assert len(parents) == 3 and all(r.info.status == "FINISHED" for r in parents + kids)
    assert sum(1 for r in parents if "tunewright.base_fingerprint" in r.data.tags) == 1, "scratch base built once"
    assert "is being computed by run" in out and "; waiting" in out
    assert not lease_runs(status="RUNNING")
    from pipelines import tracking

    versions = tracking.client().search_model_versions("name = 'tunewright-tiny'")
    assert len(versions) == 1, "one export, registered once by three concurrent runs"


@slow
def test_computing_run_sigkilled_the_others_finish_after_its_lease(store, prefect_api, tmp_path):
    from pipelines import lease, tracking

    lease_s = 10.0
    cfg = copy_config(TINY, tmp_path, "tiny")
    procs = _start_runs(cfg, _tw_env(tmp_path / "home", lease_s), tmp_path / "logs")
    c = tracking.client()
    try:
        victim = None
        t0 = time.time()
        while victim is None and time.time() - t0 < 600:  # the run computing dedup (the longest early stage)
            assert all(p.poll() is None for p in procs), "a run ended before dedup was computed"
            for h in lease_runs(status="RUNNING"):
                runs = h.data.tags.get(lease.TAG_RUNS, "").split(",")
                if len(runs) == 2 and c.get_run(runs[1]).info.run_name == "dedup":
                    victim = h
            time.sleep(0.3)
        assert victim is not None, "no run computed dedup"
        pid = int(victim.data.tags[lease.TAG_HOLDER].rsplit(":", 1)[1])
        killed = next(p for p in procs if p.pid == pid)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        dead_parent, dead_child = victim.data.tags[lease.TAG_RUNS].split(",")
        expires = float(c.get_run(victim.info.run_id).data.tags[lease.TAG_EXPIRES])
        for p in procs:
            p.wait(timeout=1200)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = "\n".join((tmp_path / "logs" / f"run{i}.log").read_text() for i in range(3))
    assert sorted(p.returncode for p in procs) == [-signal.SIGKILL, 0, 0], out[-6000:]
    kids, parents = _stage_runs()
    dedup_computed = [r for r in kids if r.info.run_name == "dedup" and r.data.tags["tunewright.cache"] == "miss"]
    assert sorted(r.info.status for r in dedup_computed) == ["FINISHED", "KILLED"]
    retry = next(r for r in dedup_computed if r.info.status == "FINISHED")
    assert retry.info.start_time / 1000 >= expires, "dedup recomputed before the dead run's lease expired"
    assert c.get_run(dead_child).info.status == "KILLED" and c.get_run(dead_parent).info.status == "KILLED"
    assert c.get_run(victim.info.run_id).info.status == "FAILED"
    for s in STAGES:  # every stage finished computed once; the second survivor reused it
        done = [r for r in kids if r.info.run_name == s and r.info.status == "FINISHED"]
        assert sorted(r.data.tags["tunewright.cache"] for r in done) == (["hit", "miss"] if s != "sanitize" else
                                                                        ["hit", "hit", "miss"]), s
    assert not [r for r in kids + parents if r.info.status == "RUNNING"]
    assert not lease_runs(status="RUNNING")
    assert "is gone" in out
