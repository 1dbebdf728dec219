"""``tunewright deploy``: the work pools the deployments name, then the deployments of ``deployments/prefect.yaml``.

Against any Prefect server (``PREFECT_API_URL``, with ``PREFECT_API_AUTH_STRING`` for a self-hosted server with basic
auth or ``PREFECT_API_KEY`` for Prefect Cloud; unset: Prefect's local ephemeral API):

1. every work pool a deployment names (``cpu``, ``gpu``) is created as a ``process`` pool with Prefect's default
   process job template, through the Prefect client; a pool that exists is left exactly as it is;
2. the deployments are registered by ``prefect deploy --all`` (the reader of ``prefect.yaml``) and read back.

A server that refuses (no or wrong credentials, no permission, not reachable) is one line that says how to fix it:
:class:`DeployError`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
POOL_TYPE = "process"


class DeployError(RuntimeError):
    """The Prefect server refused or could not be reached; the message says how to fix it (one line)."""


@dataclass
class PoolReport:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)

    def line(self) -> str:
        parts = []
        if self.created:
            parts.append(f"created {', '.join(self.created)} (type {POOL_TYPE})")
        if self.existing:
            parts.append(f"{', '.join(self.existing)} already exist{'s' if len(self.existing) == 1 else ''} "
                         "(left as they are)")
        return "work pools: " + "; ".join(parts)


def spec(prefect_file: Path = PREFECT_FILE) -> list[dict]:
    """The deployments of ``prefect_file`` (YAML anchors resolved)."""
    import yaml

    return list(yaml.safe_load(prefect_file.read_text()).get("deployments") or [])


def required_pools(prefect_file: Path = PREFECT_FILE) -> list[str]:
    """The work pools the deployments name, in order of first use."""
    pools: list[str] = []
    for d in spec(prefect_file):
        name = (d.get("work_pool") or {}).get("name")
        if name and name not in pools:
            pools.append(name)
    return pools


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "Prefect's local ephemeral API"


def explain(e: BaseException, action: str) -> DeployError:
    """One line for a refused or failed request: what happened and how to fix it. Never echoes a credential."""
    import httpx

    url = _api_url()
    if isinstance(e, httpx.HTTPStatusError):
        code = e.response.status_code
        if code == 401:
            from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

            sent = ("it rejects the user:password in PREFECT_API_AUTH_STRING" if PREFECT_API_AUTH_STRING.value() else
                    "it rejects PREFECT_API_KEY" if PREFECT_API_KEY.value() else "no credentials were sent")
            return DeployError(
                f"the Prefect server at {url} refused to {action} (HTTP 401: {sent}): set "
                "PREFECT_API_AUTH_STRING=user:password to the server's PREFECT_SERVER_API_AUTH_STRING (`make up` "
                "writes it to .env; `eval \"$(python -m deployments.stack env)\"`), or PREFECT_API_KEY for Prefect Cloud")
        if code == 403:
            return DeployError(
                f"the Prefect server at {url} does not allow these credentials to {action} (HTTP 403): use an API "
                f"key or account that may manage work pools and deployments, or ask an admin to create the "
                f"{POOL_TYPE} pools `prefect work-pool create cpu --type {POOL_TYPE}` (and gpu)")
        return DeployError(f"the Prefect server at {url} refused to {action} (HTTP {code}): "
                           f"{e.response.text[:200].strip()}")
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, OSError)):
        return DeployError(f"cannot reach the Prefect API at {url} to {action} ({type(e).__name__}): start a server "
                           "(`make up` or `prefect server start`) or set PREFECT_API_URL to a running one")
    return DeployError(f"could not {action} on the Prefect server at {url}: {type(e).__name__}: {e}")


def ensure_work_pools(pools: list[str] | None = None, description: str = "tunewright {pool} workers") -> PoolReport:
    """Create the missing pools (type process, Prefect's default process job template); leave existing ones as
    they are. Two deploys at once are fine: a pool created meanwhile counts as existing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    report = PoolReport()
    action = "read work pools"
    try:
        with get_client(sync_client=True) as client:
            for pool in pools if pools is not None else required_pools():
                action = f"read work pool {pool!r}"
                try:
                    client.read_work_pool(pool)
                    report.existing.append(pool)
                    continue
                except ObjectNotFound:
                    pass
                action = f"create work pool {pool!r}"
                try:
                    client.create_work_pool(WorkPoolCreate(
                        name=pool, type=POOL_TYPE, description=description.format(pool=pool),
                        base_job_template=ProcessWorker.get_default_base_job_template()))
                    report.created.append(pool)
                except ObjectAlreadyExists:
                    report.existing.append(pool)
    except DeployError:
        raise
    except Exception as e:
        raise explain(e, action) from None
    return report


def register(prefect_file: Path = PREFECT_FILE) -> list[str]:
    """``prefect deploy --all`` for ``prefect_file``, then the deployments read back: ``flow/name (pool)`` each."""
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    env = {**os.environ, "PREFECT_CLI_COLORS": "false", "PREFECT_CLI_WRAP_LINES": "false"}
    r = subprocess.run(cmd, cwd=prefect_file.parent.parent, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        out = [line.strip() for line in (r.stdout + "\n" + r.stderr).splitlines() if line.strip()]
        # Prefect's own last words (a traceback's last line is the exception, its message the cause)
        raise DeployError(f"`prefect deploy` failed against {_api_url()} (exit {r.returncode}): "
                          f"{out[-1][:300] if out else 'no output'}")
    return read_back(prefect_file)


def read_back(prefect_file: Path = PREFECT_FILE) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, DeploymentFilterTags

    names = [d["name"] for d in spec(prefect_file)]
    try:
        with get_client(sync_client=True) as client:
            found = client.read_deployments(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=names), tags=DeploymentFilterTags(all_=["tunewright"])))
            flows = {f: client.read_flow(f).name for f in {d.flow_id for d in found}}
    except Exception as e:
        raise explain(e, "read the deployments back") from None
    out = sorted(f"{flows[d.flow_id]}/{d.name} ({d.work_pool_name})" for d in found)
    missing = set(names) - {d.name for d in found}
    if missing:
        raise DeployError(f"`prefect deploy` ran, but {', '.join(sorted(missing))} is not registered on {_api_url()}")
    return out
