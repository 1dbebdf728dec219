"""One real local stack per test session for the operations tests (test_ops, test_browser, test_faults, test_security).

Started the way ``make up`` starts it (``python -m deployments.stack up``: Prefect server with basic auth, MLflow
basic-auth server, a process worker on pool ``cpu``, ``tunewright deploy``), on free loopback ports, in a temporary
directory, with planted secrets that must never show up anywhere. Stopped with ``Stack.down()`` at exit.
Runs are triggered the way the UI triggers them: ``POST /api/deployments/{id}/create_flow_run``.
"""

from __future__ import annotations

import atexit
import os
import secrets
import string
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import requests

from deployments.stack import Stack, basic_auth_header, free_port
from tests.conftest import ROOT, TINY, copy_config

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
STAGES = ["sanitize", "dedup", "curriculum", "dapt", "sft", "reward", "dpo", "evaluate", "export"]


def _token(prefix: str, n: int) -> str:
    return prefix + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(n))


# Planted secrets: a token in the worker's environment and a token-looking directory name in the config path.
PLANTED_ENV_SECRET = _token("hf_", 34)
PLANTED_PATH_TOKEN = _token("ghp_", 36)


class Ops:
    """The shared stack plus small REST helpers for both servers."""

    def __init__(self, stack: Stack, base: Path):
        self.stack, self.base = stack, base
        self.h = basic_auth_header(stack.prefect_auth)

    # --------------------------------------------------------------------------------------------- Prefect
    def get(self, path: str, **kw):
        r = requests.get(f"{self.stack.prefect_api}{path}", headers=self.h, timeout=60, **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict | None = None):
        r = requests.post(f"{self.stack.prefect_api}{path}", headers=self.h, json=body or {}, timeout=60)
        r.raise_for_status()
        return r.json() if r.content else None

    def deployment(self, name: str) -> dict:
        return self.get(f"/deployments/name/finetune/{name}")

    def trigger(self, parameters: dict, deployment: str = "adhoc") -> dict:
        """What the UI's "Run" button sends."""
        dep = self.deployment(deployment)
        return self.post(f"/deployments/{dep['id']}/create_flow_run",
                         {"parameters": parameters, "state": {"type": "SCHEDULED"}})

    def flow_run(self, fid: str) -> dict:
        return self.get(f"/flow_runs/{fid}")

    def wait(self, fid: str, timeout: float = 1500.0) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            fr = self.flow_run(fid)
            if fr["state_type"] in FINAL:
                return fr
            time.sleep(2)
        raise TimeoutError(f"flow run {fid} not finished after {timeout:.0f}s; worker log:\n{self.stack.tail('worker-cpu', 60)}")

    def logs(self, fid: str) -> list[dict]:
        return self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [fid]}}, "limit": 200})

    # ---------------------------------------------------------------------------------------------- MLflow
    def mlflow(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.stack.mlflow_url)

    def all_runs(self) -> list:
        c = self.mlflow()
        exp = c.get_experiment_by_name("tunewright")
        return [] if exp is None else c.search_runs([exp.experiment_id], max_results=5000)

    def parent_of(self, fid: str):
        runs = [r for r in self.all_runs() if r.data.tags.get("prefect.flow_run_id") == fid]
        assert len(runs) == 1, f"{len(runs)} MLflow parent runs for flow run {fid}"
        return runs[0]

    def children(self, parent_id: str) -> dict[str, object]:
        return {r.info.run_name: r for r in self.all_runs() if r.data.tags.get("mlflow.parentRunId") == parent_id}

    def config(self, name: str, edit=None, token_dir: bool = False) -> Path:
        """A copy of tests/configs/tiny.yaml (optionally edited) under the stack's directory."""
        d = self.base / "configs" / (PLANTED_PATH_TOKEN if token_dir else "plain")
        d.mkdir(parents=True, exist_ok=True)
        return copy_config(TINY, d, name, edit)


@lru_cache(maxsize=1)
def ops() -> Ops:
    """Start the shared stack (once per test process) through the same entry point as ``make up``."""
    base = Path(tempfile.mkdtemp(prefix="tw-ops-"))
    env_file, state_dir, home = base / ".env", base / "stack", base / "home"
    env_file.write_text(f"TUNEWRIGHT_PREFECT_PORT={free_port()}\nTUNEWRIGHT_MLFLOW_PORT={free_port()}\n")
    worker_env = {"HF_TOKEN": PLANTED_ENV_SECRET,  # must never be logged or tracked
                  "TRANSFORMERS_VERBOSITY": "info",  # the trainer says where it resumes from (test_faults)
                  "TUNEWRIGHT_NO_PROGRESS": "1",
                  "TUNEWRIGHT_LEASE_SECONDS": "15"}  # a killed run's stage lease frees in 15 s, not 60 (test_faults)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(TUNEWRIGHT_ENV_FILE=str(env_file), TUNEWRIGHT_STACK_DIR=str(state_dir), TUNEWRIGHT_HOME=str(home),
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5", **worker_env)
    stack = Stack.from_env_file(env_file, state_dir)  # the credentials `up` will generate are read back below
    stack.tunewright_home = home
    stack.worker_env = worker_env  # for workers the tests restart themselves

    def stop() -> None:
        Stack.from_env_file(env_file, state_dir).down()
        if os.environ.get("TUNEWRIGHT_KEEP_OPS_DIR") != "1":  # keep it to read the servers' logs after a failure
            import shutil

            shutil.rmtree(base, ignore_errors=True)

    atexit.register(stop)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "deployments.stack", "up"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"`python -m deployments.stack up` failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n"
                           + "\n".join(stack.tail(s) for s in ("mlflow-server", "prefect-server", "worker-cpu")))
    print(f"ops stack up in {time.time() - t0:.0f}s: {stack.prefect_ui} {stack.mlflow_url}", file=sys.stderr)
    # in-process MLflow clients of the tests authenticate like any client would
    os.environ["MLFLOW_TRACKING_USERNAME"] = stack.mlflow_user
    os.environ["MLFLOW_TRACKING_PASSWORD"] = stack.mlflow_password
    return Ops(stack, base)


@lru_cache(maxsize=1)
def first_run() -> dict:
    """The end-to-end run: finetune/adhoc on the tiny config (at a path with a planted token), triggered over REST.

    Shared: the browser and fault tests reuse its cached stages; the security test scans what it left behind.
    """
    o = ops()
    cfg = o.config("tiny", token_dir=True)
    fr = o.trigger({"config": str(cfg)})
    t0 = time.time()
    done = o.wait(fr["id"])
    return {"flow_run": done, "config": cfg, "seconds": time.time() - t0}
