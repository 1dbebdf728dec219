"""Dispatch one stage to a Prefect work pool (``gpu``): the ``run-stage`` flow and the caller that waits for it.

``finetune`` calls :func:`run_on_pool` for a stage whose config says ``work_pool: gpu``. It runs the deployment
``run-stage/<pool>`` (a worker on that pool picks it up), waits, and rebuilds the :class:`StageResult` from
MLflow: the artifacts meet there, as :class:`ArtifactRef`\\ s only. Input files that exist only on this machine
(a data file, a local base model directory) are first logged to the parent run under ``inputs/<sha256>/`` and
passed by reference; hub ids pass as they are. Register the deployment (see ``docker/README.md``)::

    prefect deploy --prefect-file deployments/prefect.yaml --name run-stage/gpu
    prefect worker start --pool gpu          # on each GPU machine, from a checkout (or the docker/ GPU image)
"""

# No ``from __future__ import annotations``: Prefect builds the flow's parameter model from real annotations when
# a worker loads this file by path, and a string "PipelineConfig" would not resolve there.
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from pipelines import tracking
from pipelines.artifacts import ArtifactRef, sha256_path
from pipelines.config import PipelineConfig
from tasks.stages import STAGE_TASKS, StageResult

TAG_FLOW_RUN = "tunewright.dispatch.flow_run_id"
TAG_RESULT = "tunewright.dispatch.result"


def result_to_dict(res: StageResult) -> dict[str, Any]:
    return {"ref": res.ref.to_dict(), "run_id": res.run_id, "cache_hit": res.cache_hit, "summary": res.summary,
            "seconds": res.seconds}


def result_from_dict(d: dict[str, Any]) -> StageResult:
    return StageResult(ArtifactRef.from_dict(d["ref"]), d["run_id"], d["cache_hit"], d["summary"], d["seconds"])


@flow(name="run-stage", log_prints=True)
def run_stage(stage: str, config: PipelineConfig, inputs: dict[str, dict[str, Any]], parent_run_id: str,
              force: bool = False) -> dict[str, Any]:
    """Run one tunewright stage (a child run of ``parent_run_id``) on this worker; return its StageResult as a dict.

    Args:
        stage: The stage name (dapt, sft, reward, dpo...).
        config: The validated pipeline config.
        inputs: The stage's inputs as ArtifactRef dicts (run_id, artifact_path, sha256, stage).
        parent_run_id: The MLflow parent run of the pipeline run.
        force: Recompute even if a finished run with the same fingerprint exists.
    """
    if stage not in STAGE_TASKS:
        raise ValueError(f"{stage}: not a stage ({', '.join(STAGE_TASKS)})")
    refs = {k: ArtifactRef.from_dict(v) for k, v in inputs.items()}
    res = STAGE_TASKS[stage](config, refs, parent_run_id, force)  # the task calls tasks.stages.execute_stage
    out = result_to_dict(res)
    # The caller finds its result in MLflow by this flow run's id: no Prefect result storage has to be shared.
    c = tracking.client()
    tracking.log_batch(c, res.run_id, tags={TAG_FLOW_RUN: str(flow_run.get_id()), TAG_RESULT: json.dumps(out)})
    get_run_logger().info("%s: %s (MLflow run %s)", stage, res.summary.splitlines()[0] if res.summary else "done",
                          res.run_id)
    return out


def shareable(ref: ArtifactRef, parent_run_id: str) -> ArtifactRef:
    """A reference another machine can fetch: a local file or directory is logged to the parent run first."""
    if ref.run_id is not None:
        return ref
    p = Path(ref.artifact_path)
    if not p.exists():
        return ref  # a hub id (or a path every worker has): passed as it is
    if sha256_path(p) != ref.sha256:
        raise RuntimeError(f"{p} changed since the pipeline hashed it ({ref.stage} input)")
    where = f"inputs/{ref.sha256[:16]}"
    c = tracking.client()
    if p.is_dir():
        tracking.with_retries(lambda: c.log_artifacts(parent_run_id, str(p), f"{where}/{p.name}"), "log artifacts")
    else:
        tracking.with_retries(lambda: c.log_artifact(parent_run_id, str(p), where), "log artifact")
    return ArtifactRef(parent_run_id, f"{where}/{p.name}", ref.sha256, ref.stage)


def _logger():
    try:
        return get_run_logger()
    except Exception:  # called outside a flow run
        import logging

        return logging.getLogger("tunewright.dispatch")


def run_on_pool(pool: str, stage: str, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], parent_run_id: str,
                force: bool = False) -> StageResult:
    """Run ``stage`` on a worker of ``pool`` (deployment ``run-stage/<pool>``), wait, and return its result."""
    from prefect.deployments import run_deployment

    log = _logger()
    refs = {k: shareable(ref, parent_run_id).to_dict() for k, ref in inputs.items()}
    log.info("%s: dispatching to work pool %r (deployment run-stage/%s)", stage, pool, pool)
    fr = run_deployment(
        name=f"run-stage/{pool}", timeout=None, tags=["tunewright", stage],
        parameters={"stage": stage, "config": cfg.model_dump(mode="json"), "inputs": refs,
                    "parent_run_id": parent_run_id, "force": force},
    )
    if fr.state is None or not fr.state.is_completed():
        state = fr.state.name if fr.state else "unknown"
        message = (fr.state.message or "").strip() if fr.state else ""
        raise RuntimeError(f"{stage}: flow run {fr.name} on work pool {pool!r} ended {state}: {message}")
    c = tracking.client()
    runs = tracking.with_retries(lambda: c.search_runs(
        [tracking.experiment_id()],
        filter_string=f"tags.`{TAG_FLOW_RUN}` = '{fr.id}' and tags.`{tracking.TAG_STAGE}` = '{stage}'",
        max_results=1), "search runs")
    if not runs or TAG_RESULT not in runs[0].data.tags:
        raise RuntimeError(f"{stage}: flow run {fr.name} completed but left no result in MLflow "
                           f"({tracking.tracking_uri()}): do the worker and this flow share MLFLOW_TRACKING_URI?")
    return result_from_dict(json.loads(runs[0].data.tags[TAG_RESULT]))
