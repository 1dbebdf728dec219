"""The promotion step after ``export``: register the export as a Model Registry version and run the gate.

Not a cached stage: a cached export is the same MLflow run, so its version is found, not registered again, and
the decision made when it was first registered stands (``pipelines/promote.py``).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines.artifacts import ArtifactRef
from pipelines.config import PipelineConfig
from pipelines.promote import Decision, promote_export


def promote(cfg: PipelineConfig, exported: ArtifactRef, checkpoint: str, evaluation: dict[str, dict[str, float]],
            parent_run_id: str, log=print) -> Decision:
    return promote_export(cfg.registered_model(), exported.run_id, evaluation.get(checkpoint, {}),
                          evaluation.get("sft"), cfg.export.promote, checkpoint=checkpoint,
                          pipeline_run_id=parent_run_id, log=log)


@task(name="promote", cache_policy=NO_CACHE, retries=0)
def promote_task(cfg: PipelineConfig, exported: ArtifactRef, checkpoint: str,
                 evaluation: dict[str, dict[str, float]], parent_run_id: str) -> Decision:
    return promote(cfg, exported, checkpoint, evaluation, parent_run_id, log=get_run_logger().info)
