"""MLflow as the artifact bus: tracking URI, parent/child runs, fingerprints, cache look-up, artifact fetch.

Reads: ``MLFLOW_TRACKING_URI`` (else ``sqlite:///.tunewright/mlflow.db`` with artifacts in
``.tunewright/artifacts``) and ``TUNEWRIGHT_HOME`` (else ``.tunewright``).
Writes: MLflow runs, tags, metrics and artifacts; a local content-addressed cache of fetched artifacts.

Everything goes through an explicit :class:`mlflow.tracking.MlflowClient` (no fluent "active run" state), so
stages running in worker threads or processes cannot log into each other's runs.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from pipelines.artifacts import ArtifactRef, sha256_path

EXPERIMENT = "tunewright"
TAG_PIPELINE = "tunewright.pipeline"
TAG_STAGE = "tunewright.stage"
TAG_FINGERPRINT = "tunewright.fingerprint"
TAG_CACHE = "tunewright.cache"
TAG_SOURCE = "tunewright.source_run_id"
TAG_SHA = "tunewright.output_sha256"
TAG_PRIMARY = "tunewright.primary"
T = TypeVar("T")


def home() -> Path:
    return Path(os.environ.get("TUNEWRIGHT_HOME", ".tunewright")).resolve()


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home() / 'mlflow.db'}"


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.5) -> T:
    """Retry a call to the tracking server on connection trouble, with exponential backoff.

    Only transport errors are retried; an MLflow validation error (bad parameter, missing run) is raised at once.
    """
    import requests
    from mlflow.exceptions import MlflowException

    for i in range(attempts):
        try:
            return fn()
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError) as e:
            err: Exception = e
        except MlflowException as e:
            code = getattr(e, "error_code", "")
            if code not in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR") and "Max retries exceeded" not in str(e):
                raise
            err = e
        if i == attempts - 1:
            raise err
        time.sleep(base_delay * 2**i)
    raise AssertionError("unreachable")


_EXPERIMENT_IDS: dict[tuple[str, str], str] = {}


def experiment_id(name: str = EXPERIMENT) -> str:
    """The id of experiment ``name`` (created if missing), looked up once per process and tracking URI."""
    key = (tracking_uri(), name)
    if key in _EXPERIMENT_IDS:
        return _EXPERIMENT_IDS[key]
    c = client()
    exp = with_retries(lambda: c.get_experiment_by_name(name), "get experiment")
    if exp is not None:
        _EXPERIMENT_IDS[key] = exp.experiment_id
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (home() / "artifacts").as_uri()
    try:
        eid = with_retries(lambda: c.create_experiment(name, artifact_location=location), "create experiment")
    except Exception:  # created concurrently by another process: read it back
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        eid = exp.experiment_id
    _EXPERIMENT_IDS[key] = eid
    return eid


# ------------------------------------------------------------------------------------------------ batch logging
def _batch_limits() -> tuple[int, int, int]:
    """MLflow's per-request limits (``mlflow.utils.validation``): params and tags each, metrics, all entities."""
    try:
        from mlflow.utils import validation as v

        return v.MAX_PARAMS_TAGS_PER_BATCH, v.MAX_METRICS_PER_BATCH, v.MAX_ENTITIES_PER_BATCH
    except (ImportError, AttributeError):  # the documented REST limits
        return 100, 1000, 1000


def log_batch(c, run_id: str, *, params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
              metrics: dict[str, Any] | None = None, step: int = 0) -> int:
    """Log params, tags and metrics on one run in as few requests as MLflow allows; return the request count.

    One ``log_batch`` request carries at most 100 params, 100 tags and 1000 metrics, 1000 entities in all (the
    limits of the installed MLflow, ``mlflow.utils.validation``). Each request is retried on its own
    (:func:`with_retries`): re-logging a param with the same value and re-setting a tag are no-ops. Params and tags
    are logged as strings; metrics that are not finite numbers are skipped (one ``inf`` would fail the request).
    """
    import math

    from mlflow.entities import Metric, Param, RunTag

    per_kind, max_metrics, max_entities = _batch_limits()
    now = int(time.time() * 1000)
    ps = [Param(k, str(v)) for k, v in (params or {}).items()]
    ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()
          if isinstance(v, (int, float)) and math.isfinite(v)]
    sent = 0
    while ps or ts or ms:
        p, ps = ps[:per_kind], ps[per_kind:]
        t, ts = ts[:per_kind], ts[per_kind:]
        n = min(max_metrics, max_entities - len(p) - len(t))
        m, ms = ms[:n], ms[n:]
        with_retries(lambda: c.log_batch(run_id, metrics=m, params=p, tags=t), "log batch")
        sent += 1
    return sent


# -------------------------------------------------------------------------------------------------- fingerprints
@lru_cache(maxsize=None)
def code_version(*modules: str) -> str:
    """Hash of the source of the modules a stage runs (its own module and the shared ones it uses)."""
    import importlib

    h = hashlib.sha256()
    for name in sorted(modules):
        mod = importlib.import_module(name)
        h.update(name.encode() + b"\0" + inspect.getsource(mod).encode())
    return h.hexdigest()[:16]


def fingerprint(stage: str, stage_config: dict[str, Any], inputs: dict[str, ArtifactRef], code: str) -> str:
    from pipelines.artifacts import sha256_json

    return sha256_json(
        {"stage": stage, "config": stage_config, "inputs": {k: v.sha256 for k, v in sorted(inputs.items())}, "code": code}
    )[:32]


def find_cached(fp: str):
    """The newest finished, computed (not itself a cache hit) child run with this fingerprint, or None."""
    c = client()
    runs = with_retries(
        lambda: c.search_runs(
            [experiment_id()],
            filter_string=f"tags.`{TAG_FINGERPRINT}` = '{fp}' and tags.`{TAG_CACHE}` = 'miss' "
            "and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        ),
        "search runs",
    )
    return runs[0] if runs else None


# ---------------------------------------------------------------------------------------------- fetch artifacts
def fetch(ref: ArtifactRef) -> Path:
    """A local copy of an artifact, from the content-addressed cache or downloaded from MLflow (and verified)."""
    if ref.run_id is None:
        return Path(ref.artifact_path)
    dest = home() / "cache" / "artifacts" / ref.sha256
    target = dest / Path(ref.artifact_path).name
    if target.exists():
        return target
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ref.sha256[:12]}.", dir=dest.parent))
    try:
        import mlflow

        local = with_retries(
            lambda: mlflow.artifacts.download_artifacts(
                run_id=ref.run_id, artifact_path=ref.artifact_path, dst_path=str(tmp), tracking_uri=tracking_uri()
            ),
            "download artifacts",
        )
        got = sha256_path(Path(local))
        if got != ref.sha256:
            raise RuntimeError(
                f"artifact {ref.artifact_path} of run {ref.run_id} has sha256 {got[:12]}, expected {ref.sha256[:12]}"
            )
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def run_url(run_id: str) -> str | None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith("http"):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{_experiment_of(uri, run_id)}/runs/{run_id}"


@lru_cache(maxsize=1024)
def _experiment_of(uri: str, run_id: str) -> str:
    """A run's experiment id (it never changes): one request per run, not one per link."""
    return with_retries(lambda: client().get_run(run_id), "get run").info.experiment_id
