"""A fully cached rerun against the local store vs against the `make up` stack, side by side (issue 12, item 5).

    .venv/bin/python -m bench.stack_rerun [--config pipelines/configs/demo.yaml] [--dir /tmp/tw-stack-bench]
                                          [--reruns 3] [--old-reruns 1]

In DIR only (this checkout's ``.tunewright``/``.env`` are not touched), one after the other:

1. a stack as ``make up`` starts it (``deployments.stack.Stack``: Prefect server with basic auth, MLflow
   ``--app-name basic-auth`` server with its credential cache, on free loopback ports, random credentials), plus a
   second MLflow basic-auth server on the same store with the credential cache off (the stack before this change);
2. each target in its own process: one run that fills the cache (or, when it is filled, one untimed rerun: imports,
   the local ephemeral Prefect server), then ``--reruns`` timed fully cached reruns (``finetune(cfg)``, as
   ``bench.demo`` times them), counting the HTTP requests sent to the MLflow server;
3. "old" logging: ``tracking.log_batch`` replaced by one ``log_param``/``set_tag`` request per entry (metrics stay
   batched, as they were) and the experiment id looked up at every use: the request pattern of the code before this
   change (a cached stage logged no params then either, so this emulates its cached rerun exactly).

Prints a markdown table (target, logging, credential cache, rerun seconds, MLflow requests, ratio to local).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- one target
def _old_style() -> None:
    """The request pattern before batching: one request per param and tag, the experiment looked up every time."""
    import math

    from mlflow.entities import Metric

    from pipelines import tracking

    def log_batch(c, run_id, *, params=None, tags=None, metrics=None, step=0):
        n = 0
        for k, v in (params or {}).items():
            c.log_param(run_id, k, str(v))
            n += 1
        for k, v in (tags or {}).items():
            c.set_tag(run_id, k, str(v))
            n += 1
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()
              if isinstance(v, (int, float)) and math.isfinite(v)]
        for i in range(0, len(ms), 500):
            c.log_batch(run_id, metrics=ms[i: i + 500])
            n += 1
        return n

    lookup = tracking.experiment_id

    def experiment_id(name=tracking.EXPERIMENT):
        tracking._EXPERIMENT_IDS.clear()
        return lookup(name)

    tracking.log_batch = log_batch
    tracking.experiment_id = experiment_id
    tracking._experiment_of = lambda uri, run_id: tracking.client().get_run(run_id).info.experiment_id


class _Requests:
    """Counts HTTP requests to one server (requests' adapter: every MLflow REST call and artifact transfer)."""

    def __init__(self, prefix: str):
        import requests.adapters

        self.prefix, self.n = prefix, 0
        send = requests.adapters.HTTPAdapter.send
        counter = self

        def counting_send(adapter, request, **kw):
            if prefix and request.url.startswith(prefix):
                counter.n += 1
            return send(adapter, request, **kw)

        requests.adapters.HTTPAdapter.send = counting_send


def phase(args) -> None:
    os.environ.setdefault("TUNEWRIGHT_NO_PROGRESS", "1")
    from flows.finetune import finetune
    from pipelines.config import load_config

    cfg = load_config(args.config)
    counter = _Requests(os.environ.get("MLFLOW_TRACKING_URI", ""))
    t0 = time.perf_counter()
    first = finetune(cfg)  # fills the cache, or (filled) warms this process up
    first_s = time.perf_counter() - t0
    computed = sum(1 for s in first["stages"].values() if s["cache"] == "miss")
    if args.style == "old":
        _old_style()
    reruns = []
    for _ in range(args.reruns):
        counter.n = 0
        t0 = time.perf_counter()
        out = finetune(cfg)
        reruns.append({"seconds": time.perf_counter() - t0, "mlflow_requests": counter.n})
        misses = [s for s, r in out["stages"].items() if r["cache"] != "hit"]
        assert not misses, f"not a fully cached rerun: {misses} recomputed"
    print("RESULT " + json.dumps({"first_s": first_s, "computed": computed, "reruns": reruns}), flush=True)


# ------------------------------------------------------------------------------------------------ side by side
def _run_phase(name: str, env: dict[str, str], args, style: str, reruns: int, log_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.stack_rerun", "--phase", "--config", args.config, "--style", style,
           "--reruns", str(reruns)]
    t0 = time.time()
    with open(log_dir / f"{name}.log", "w") as log:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True, timeout=3600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed ({p.returncode}); see {log_dir / (name + '.log')}\n{p.stdout[-2000:]}")
    res = json.loads(lines[-1].removeprefix("RESULT "))
    done = ", ".join("%.2fs/%d req" % (r["seconds"], r["mlflow_requests"]) for r in res["reruns"])
    print(f"  {name}: {time.time() - t0:.0f}s ({res['computed']} stages computed first; reruns {done})", file=sys.stderr)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="pipelines/configs/demo.yaml")
    ap.add_argument("--dir", default="/tmp/tw-stack-bench")
    ap.add_argument("--reruns", type=int, default=3)
    ap.add_argument("--old-reruns", type=int, default=1)
    ap.add_argument("--phase", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--style", default="new", choices=["new", "old"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        return phase(args)

    from deployments.stack import Stack

    class NoCredentialCache(Stack):
        """A second MLflow server on the same store and auth database, with MLflow's credential cache off."""

        def pid_file(self, name: str) -> Path:
            return super().pid_file(name + "-nocache")

        def log_file(self, name: str) -> Path:
            return super().log_file(name + "-nocache")

    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    (base / "logs").mkdir(parents=True)
    stack = Stack.ephemeral(base / "stack", tunewright_home=base / "stack-home")
    plain = NoCredentialCache.ephemeral(base / "stack", tunewright_home=base / "stack-home")
    plain.mlflow_user, plain.mlflow_password, plain.mlflow_auth_cache_s = stack.mlflow_user, stack.mlflow_password, 0
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "TUNEWRIGHT_"))}
    clean.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    local_env = {**clean, "TUNEWRIGHT_HOME": str(base / "local"), "PREFECT_HOME": str(base / "local" / "prefect"),
                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}  # a busy machine starts it slowly
    stack_env = {**clean, **stack.client_env(), "PREFECT_HOME": str(base / "stack-home" / "prefect")}
    plain_env = {**stack_env, "MLFLOW_TRACKING_URI": plain.mlflow_url}
    for d in (base / "local" / "prefect", base / "stack-home" / "prefect"):
        d.mkdir(parents=True)
    t_start, load_before = time.time(), os.getloadavg()[0]
    try:
        stack.start_mlflow(wait=False)
        stack.start_prefect(wait=False)
        stack.wait_mlflow()
        stack.wait_prefect()
        plain.start_mlflow()  # after the first server has read its basic_auth.ini: this one rewrites it (cache 0)
        print(f"stack up: Prefect {stack.prefect_ui}, MLflow {stack.mlflow_url} (credential cache "
              f"{stack.mlflow_auth_cache_s}s) and {plain.mlflow_url} (no credential cache)", file=sys.stderr)
        rows = [
            ("local sqlite store", "batched", "–", _run_phase("local-new", local_env, args, "new", args.reruns, base / "logs")),
            ("stack (`make up`)", "batched", "on", _run_phase("stack-new", stack_env, args, "new", args.reruns, base / "logs")),
            ("stack, no credential cache", "batched", "off",
             _run_phase("stack-nocache-new", plain_env, args, "new", args.reruns, base / "logs")),
            ("local sqlite store", "one request per param/tag", "–",
             _run_phase("local-old", local_env, args, "old", args.reruns, base / "logs")),
            ("stack, no credential cache (before)", "one request per param/tag", "off",
             _run_phase("stack-nocache-old", plain_env, args, "old", args.old_reruns, base / "logs")),
        ]
    finally:
        plain.stop("mlflow-server")
        stack.down()
    local_s = statistics.median(r["seconds"] for r in rows[0][3]["reruns"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"1-min load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"config: {args.config}; first runs (cache fill): local {rows[0][3]['first_s']:.0f}s, stack "
          f"{rows[1][3]['first_s']:.0f}s; bench wall time {time.time() - t_start:.0f}s\n")
    print("| target | logging | credential cache | cached rerun (s), median | reruns (s) | MLflow HTTP requests "
          "per rerun | × local |\n|---|---|---|---:|---|---:|---:|")
    for target, logging_, cache, res in rows:
        secs = [r["seconds"] for r in res["reruns"]]
        reqs = sorted({r["mlflow_requests"] for r in res["reruns"]})
        med = statistics.median(secs)
        print(f"| {target} | {logging_} | {cache} | {med:.2f} | {', '.join(f'{s:.2f}' for s in secs)} | "
              f"{'–' if target.startswith('local') else '/'.join(map(str, reqs))} | {med / local_s:.1f} |")


if __name__ == "__main__":
    main()
