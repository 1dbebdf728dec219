"""Leases on the MLflow side: at most one holder per key, across processes and machines sharing a tracking server.

Reads: ``TUNEWRIGHT_LEASE_SECONDS`` (lease length, default 60), ``TUNEWRIGHT_LEASE_SETTLE_SECONDS`` (default 1.0),
``TUNEWRIGHT_LEASE_POLL_SECONDS`` (default 2.0), and the tracking URI of :mod:`pipelines.tracking`.
Writes: one MLflow run per claim in experiment ``tunewright-leases``.

A lease is a run of that experiment, tagged with the key, ``RUNNING`` while held, with an expiry time (tag
``tunewright.lease.expires``, epoch seconds) that a daemon thread pushes forward every ``lease_s / 3`` seconds.
Release ends the run ``FINISHED``. A holder that dies stops renewing; once its expiry has passed, the next waiter
ends the dead lease ``FAILED`` and every run it names (``tunewright.lease.runs``: the stage's child run and its
pipeline run) ``KILLED``, so nothing stays ``RUNNING``, and takes over.

MLflow has no compare-and-swap, so acquisition is a timed mutual exclusion (Fischer's, with every claimant's claim
visible): read the key's live claims; if there are none, create a claim; wait ``settle`` seconds; read again; the
smallest live claim by (start time, run id) wins, the others delete theirs and wait. Two claimants cannot both win
as long as each one's claim became visible within ``settle`` seconds of the read that found no claim: a claimant
measures that itself (read sent -> claim created, on its monotonic clock) and withdraws when it took longer, so
the guarantee does not rest on a guess about server latency. What it does rest on: every process sharing a server
uses the same ``settle`` (the env default), the server answers reads with the writes it has acknowledged (one
MLflow server, or one database), and the clocks of holders and waiters agree to well within ``2/3 lease_s``
(expiry is compared on the waiter's clock; NTP-synchronised machines are fine).

    with acquire(f"promote:{name}") as lease:      # or: got = acquire(key, until=find_result)
        ...                                        #     isinstance(got, Lease) -> compute, else use got
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from pipelines import tracking

EXPERIMENT = "tunewright-leases"
TAG_KEY = "tunewright.lease.key"  # sha256 of the key: safe inside a filter string whatever the key holds
TAG_NAME = "tunewright.lease.name"  # the key as given (readable in the UI)
TAG_EXPIRES = "tunewright.lease.expires"  # epoch seconds on the holder's clock
TAG_HOLDER = "tunewright.lease.holder"  # host:pid
TAG_RUNS = "tunewright.lease.runs"  # comma-separated MLflow runs the holder owns (ended KILLED if it dies)
TAG_STATE = "tunewright.lease.state"  # released / expired / lost
TAG_ENDED_BY = "tunewright.ended_by"
T = TypeVar("T")


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    return float(v) if v else default


def default_lease_s() -> float:
    return _env_float("TUNEWRIGHT_LEASE_SECONDS", 60.0)


def settle_s() -> float:
    return _env_float("TUNEWRIGHT_LEASE_SETTLE_SECONDS", 1.0)


def poll_s() -> float:
    return _env_float("TUNEWRIGHT_LEASE_POLL_SECONDS", 2.0)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:40]


class LeaseTimeout(TimeoutError):
    """``acquire(..., timeout_s=...)`` waited that long without getting the lease."""


@dataclass(frozen=True)
class Holder:
    """A live (or expired) claim on a key, as a waiter sees it."""

    run_id: str
    key: str
    holder: str
    expires: float
    start_time: int
    runs: tuple[str, ...]

    @property
    def until(self) -> str:
        return time.strftime("%H:%M:%S", time.localtime(self.expires))

    @property
    def owner(self) -> str:
        """What to call the holder in a message: the first run it named, else host:pid."""
        return f"run {self.runs[0][:8]}" if self.runs else self.holder

    @classmethod
    def from_run(cls, run) -> Holder:
        t = run.data.tags
        try:
            expires = float(t.get(TAG_EXPIRES, "0"))
        except ValueError:
            expires = 0.0
        return cls(run.info.run_id, t.get(TAG_NAME, ""), t.get(TAG_HOLDER, "?"), expires, run.info.start_time or 0,
                   tuple(r for r in t.get(TAG_RUNS, "").split(",") if r))


class Lease:
    """A held lease: renewed by a daemon thread until :meth:`release` (or the end of a ``with`` block)."""

    def __init__(self, run_id: str, key: str, lease_s: float, runs: Iterable[str] = (), log=print):
        self.run_id, self.key, self.lease_s, self.log = run_id, key, lease_s, log
        self.runs: list[str] = list(runs)
        self.lost = False  # set when the lease was found ended by someone else (this holder was taken for dead)
        self.released = False
        self.expires = time.time() + lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{key[:40]}", daemon=True)
        self._thread.start()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease({self.key!r}, run {self.run_id[:8]}, until {time.strftime('%H:%M:%S', time.localtime(self.expires))})"

    def attach(self, *run_ids: str) -> None:
        """Name more runs this holder owns: if it dies, the waiter that takes over ends them ``KILLED``."""
        self.runs += [r for r in run_ids if r and r not in self.runs]
        c = tracking.client()
        tracking.log_batch(c, self.run_id, tags={TAG_RUNS: ",".join(self.runs)})

    def _renew(self) -> None:
        c = tracking.client()
        interval = self.lease_s / 3
        while not self._stop.wait(interval):
            try:
                run = c.get_run(self.run_id)
                if run.info.status != "RUNNING":
                    self.lost = True
                    self.log(f"warning: lease {self.key} (run {self.run_id[:8]}) was ended by another process "
                             f"({run.data.tags.get(TAG_ENDED_BY, run.info.status)}); no longer renewing it")
                    return
                expires = time.time() + self.lease_s
                tracking.log_batch(c, self.run_id, tags={TAG_EXPIRES: f"{expires:.3f}"})
                self.expires = expires
            except Exception as e:  # a blip of the tracking server: try again at the next beat
                self.log(f"warning: could not renew lease {self.key}: {type(e).__name__}: {str(e)[:200]}")

    def release(self) -> None:
        """Stop renewing and end the lease run ``FINISHED``; idempotent. A tracking server that cannot be reached
        now is logged, not raised: the lease then simply expires ``lease_s`` after its last renewal."""
        if self.released:
            return
        self.released = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self.lost:
            return  # someone else ended it (and may hold the key now): leave their view alone
        c = tracking.client()
        try:
            tracking.log_batch(c, self.run_id, tags={TAG_STATE: "released"})
            tracking.with_retries(lambda: c.set_terminated(self.run_id, "FINISHED"), "end lease")
        except Exception as e:
            self.log(f"warning: could not release lease {self.key} ({type(e).__name__}: {str(e)[:200]}); "
                     f"it expires at {time.strftime('%H:%M:%S', time.localtime(self.expires))}")


# ------------------------------------------------------------------------------------------------------- acquire
def _claims(c, exp: str, kh: str) -> list[Holder]:
    runs = tracking.with_retries(lambda: c.search_runs(
        [exp], filter_string=f"tags.`{TAG_KEY}` = '{kh}' and attributes.status = 'RUNNING'", max_results=1000),
        "search leases")
    return sorted((Holder.from_run(r) for r in runs), key=lambda h: (h.start_time, h.run_id))


def _reap(c, dead: Holder, log) -> None:
    """End an expired lease ``FAILED`` and the runs its holder left ``RUNNING`` as ``KILLED``."""
    why = (f"lease {dead.key} expired at {dead.until}: its holder {dead.holder} stopped renewing it; "
           f"ended by {socket.gethostname()}:{os.getpid()}")
    tracking.log_batch(c, dead.run_id, tags={TAG_STATE: "expired", TAG_ENDED_BY: why})
    tracking.with_retries(lambda: c.set_terminated(dead.run_id, "FAILED"), "end lease")
    ended = []
    for rid in dead.runs:
        try:
            run = tracking.with_retries(lambda: c.get_run(rid), "get run")
        except Exception:  # deleted meanwhile: nothing to end
            continue
        if run.info.status == "RUNNING":
            tracking.log_batch(c, rid, tags={TAG_ENDED_BY: why})
            tracking.with_retries(lambda: c.set_terminated(rid, "KILLED"), "end run")
            ended.append(rid[:8])
    log(f"{dead.key}: the holder {dead.holder} is gone (lease expired at {dead.until}); "
        f"ended its lease FAILED{' and run(s) ' + ', '.join(ended) + ' KILLED' if ended else ''}")


def _live(c, exp: str, kh: str, log) -> list[Holder]:
    """The key's live claims, oldest first; expired ones are reaped on the way."""
    now = time.time()
    live = []
    for h in _claims(c, exp, kh):
        if h.expires > now:
            live.append(h)
        else:
            _reap(c, h, log)
    return live


def _claim(c, exp: str, key: str, kh: str, lease_s: float, runs: Iterable[str]) -> str:
    tags = {TAG_KEY: kh, TAG_NAME: key[:500], TAG_HOLDER: f"{socket.gethostname()}:{os.getpid()}",
            TAG_EXPIRES: f"{time.time() + lease_s:.3f}", TAG_RUNS: ",".join(runs)}
    run = tracking.with_retries(lambda: c.create_run(exp, run_name=key[:250], tags=tags), "create lease")
    return run.info.run_id


def _withdraw(c, run_id: str) -> None:
    tracking.with_retries(lambda: c.delete_run(run_id), "withdraw claim")


def acquire(key: str, *, lease_s: float | None = None, until: Callable[[], T | None] | None = None, log=print,
            runs: Iterable[str] = (), waiting: Callable[[Holder], str] | None = None,
            timeout_s: float | None = None) -> Lease | T:
    """Hold the lease on ``key``, or return what ``until()`` found while waiting for it.

    ``until`` is asked first, between polls, and once more right after winning (a holder that finished just before
    the lease became free has its result visible by then); whatever non-None it returns is returned instead of a
    lease. ``runs`` are MLflow runs the holder owns (more with :meth:`Lease.attach`). ``waiting(holder)`` words
    the one line logged per holder waited on (default: "KEY is held by run ... (lease until ...); waiting").
    """
    if until is not None and (found := until()) is not None:
        return found
    lease_s = float(lease_s or default_lease_s())
    settle = settle_s()
    poll = max(0.05, min(poll_s(), lease_s / 3))
    runs = tuple(runs)
    c = tracking.client()
    exp = tracking.experiment_id(EXPERIMENT)
    kh = key_hash(key)
    t_start = time.monotonic()
    announced: str | None = None
    first = True
    while True:
        if not first and until is not None and (found := until()) is not None:
            return found
        first = False
        if timeout_s is not None and time.monotonic() - t_start > timeout_s:
            raise LeaseTimeout(f"{key}: not acquired within {timeout_s:.0f}s")
        t_read = time.monotonic()
        live = _live(c, exp, kh, log)
        if live:
            h = live[0]
            if h.run_id != announced:
                log(waiting(h) if waiting else f"{key} is held by {h.owner} (lease until {h.until}); waiting")
                announced = h.run_id
            time.sleep(poll * random.uniform(0.8, 1.2))
            continue
        mine = _claim(c, exp, key, kh, lease_s, runs)
        if time.monotonic() - t_read >= settle:
            # our claim may have become visible too late for a claimant that read just after us: step back
            _withdraw(c, mine)
            time.sleep(random.uniform(0, settle))
            continue
        time.sleep(settle)
        live = _live(c, exp, kh, log)
        if not live or live[0].run_id != mine:
            _withdraw(c, mine)  # someone older holds or claims it: the next read waits on them
            if live:
                continue
            time.sleep(random.uniform(0, settle))
            continue
        lease = Lease(mine, key, lease_s, runs, log)
        if until is not None and (found := until()) is not None:
            lease.release()
            return found
        return lease
