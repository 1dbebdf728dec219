"""A separate process that takes leases, for tests/test_lease.py (processes, not threads: the real case).

    python -m tests._lease_worker race KEY EVENTS GO_FILE REPS HOLD_S
        warm up, append "ready" to EVENTS, wait for GO_FILE (it holds the start time, epoch seconds), then acquire
        KEY REPS times, holding it HOLD_S each time; every event is one line appended to EVENTS:
        "<pid> <ready|try|enter|exit> <time.time()>"
    python -m tests._lease_worker hold KEY LEASE_S
        acquire KEY, create a RUNNING run in the tunewright experiment and attach it to the lease, print
        "HELD <lease run> <attached run>" and sleep until killed

The store is whatever TUNEWRIGHT_HOME / MLFLOW_TRACKING_URI name (the caller's).
"""

from __future__ import annotations

import os
import sys
import time


def _event(path: str, what: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {what} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


def main(argv: list[str]) -> None:
    from pipelines import lease, tracking

    mode, key = argv[0], argv[1]
    tracking.experiment_id(lease.EXPERIMENT)  # warm: imports and the first request before the start line
    if mode == "race":
        events, go, reps, hold = argv[2], argv[3], int(argv[4]), float(argv[5])
        _event(events, "ready")
        while not os.path.exists(go):
            time.sleep(0.01)
        with open(go) as f:
            start_at = float(f.read())
        time.sleep(max(0.0, start_at - time.time()))
        for _ in range(reps):
            _event(events, "try")
            with lease.acquire(key, log=lambda m: None):
                _event(events, "enter")
                time.sleep(hold)
                _event(events, "exit")
    elif mode == "hold":
        got = lease.acquire(key, lease_s=float(argv[2]))
        c = tracking.client()
        run = c.create_run(tracking.experiment_id(), run_name="held-stage")
        got.attach(run.info.run_id)
        print(f"HELD {got.run_id} {run.info.run_id}", flush=True)
        while True:
            time.sleep(60)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
