"""The ``finetune`` flow: stage order, ``--from/--only/--force``, the gates between stages, the run report.

One MLflow parent run per flow run (tag ``tunewright.pipeline=<config name>``), one child run per stage (see
``tasks/stages.py``). The flow's typed parameter is the validated :class:`PipelineConfig`;
deployments pass a config path instead (a form field in the UI).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from pipelines import tracking
from pipelines.artifacts import ArtifactRef, sha256_path
from pipelines.config import PREFERENCE_ALGORITHMS, PipelineConfig, load_config
from pipelines.chat import check_template
from pipelines.data import resolve_data
from tasks.base import base_model_task
from tasks.promote import promote_task
from tasks.stages import STAGE_TASKS, StageResult


StageName = Literal["sanitize", "dedup", "curriculum", "dapt", "sft", "reward", "dpo", "ppo", "grpo", "evaluate",
                    "export"]
# The deployment form's parameter types. `Literal[StageName, None]` (not `StageName | None`): its JSON schema is one
# enum with null in it, which the Prefect UI renders as a select of stage names; the union's `anyOf` renders as
# "str | None" tabs with a free-text field. A tuple (not `list | None`) is a plain array of that enum: a multi-select.
OptionalStage = Literal[StageName, None]
StageNames = tuple[StageName, ...]


class GateError(RuntimeError):
    """A check between stages failed (e.g. the reward model is too weak to optimise against)."""


class SelectionError(ValueError):
    """--from/--only/--force named a stage this config does not run."""


@dataclass
class RunReport:
    parent_run_id: str
    pipeline: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluation_md: str = ""
    promotion: dict[str, Any] = field(default_factory=dict)
    promotion_md: str = ""
    seconds: float = 0.0


def plan(cfg: PipelineConfig, from_stage: str | None, only: str | None, force: list[str]) -> dict[str, str]:
    """For each active stage: 'run' (cache allowed), 'force' (recompute) or 'skip' (after --only's stage)."""
    stages = cfg.active_stages()
    for name, s in [("--from", from_stage), ("--only", only)] + [("--force", f) for f in force]:
        if s is not None and s not in stages:
            raise SelectionError(f"{name} {s}: not a stage of this pipeline ({', '.join(stages)})")
    if from_stage and only:
        raise SelectionError("--from and --only cannot be combined")
    out = {}
    for i, s in enumerate(stages):
        if only:
            out[s] = "force" if s == only else ("run" if i < stages.index(only) else "skip")
        elif from_stage:
            out[s] = "force" if i >= stages.index(from_stage) else "run"
        else:
            out[s] = "force" if s in force else "run"
    return out


def input_refs(files: dict[str, Any]) -> dict[str, ArtifactRef]:
    """External input files as references (content-hashed, so an edited file invalidates its stages)."""
    return {k: ArtifactRef(None, str(p), sha256_path(p), "input") for k, p in files.items()}


def _parent_run(cfg: PipelineConfig) -> str:
    """The MLflow parent run, named after the Prefect flow run; each links to the other (tag / link artifact)."""
    c = tracking.client()
    # Same name in both UIs: the Prefect flow run's name (a timestamped one outside a flow run).
    name = flow_run.get_name() or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {tracking.TAG_PIPELINE: cfg.name, "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "prefect.flow_run_name": str(flow_run.get_name() or "")}
    ui_url = flow_run.get_flow_run_ui_url()
    if ui_url and ui_url.startswith("http"):
        tags["prefect.flow_run_url"] = ui_url
    run = tracking.with_retries(lambda: c.create_run(tracking.experiment_id(), run_name=name, tags=tags), "create run")
    rid = run.info.run_id
    tracking.log_batch(c, rid, params=tracking.flatten(cfg.model_dump(mode="json", exclude={"base_dir"})))
    c.log_text(rid, json.dumps(cfg.model_dump(mode="json", exclude={"base_dir"}), indent=2), "config.json")
    _link_flow_run(rid)
    return rid


def _link_flow_run(run_id: str) -> None:
    """Prefect side of the link: a flow-run tag ``mlflow:<run id>`` and a link artifact to the MLflow run page."""
    fid = flow_run.get_id()
    if not fid:
        return
    try:
        from prefect.artifacts import create_link_artifact
        from prefect.client.orchestration import get_client

        url = tracking.run_url(run_id)
        if url:
            create_link_artifact(link=url, link_text=f"MLflow run {run_id}", key="mlflow-run",
                                 description="The MLflow parent run of this flow run (stages are its child runs)")
        with get_client(sync_client=True) as client:
            tags = client.read_flow_run(fid).tags
            client.update_flow_run(fid, tags=sorted({*tags, f"mlflow:{run_id}"}))
    except Exception as e:  # a missing link must not fail a training run
        get_run_logger().warning("could not link flow run %s to MLflow run %s: %s", fid, run_id, e)


def artifact_key(pipeline: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes ("demo-b1.0" -> "tunewright-demo-b1-0")."""
    return "tunewright-" + (re.sub(r"[^a-z0-9]+", "-", pipeline.lower()).strip("-") or "pipeline")


def run_pipeline(cfg: PipelineConfig, from_stage: str | None = None, only: str | None = None,
                 force: list[str] | None = None) -> RunReport:
    logger = get_run_logger()
    t0 = time.time()
    todo = plan(cfg, from_stage, only, list(force or []))
    from pipelines.launch import preflight

    preflight(cfg)
    check_template(cfg)
    prepared = resolve_data(cfg)
    files = input_refs(prepared)
    c = tracking.client()
    parent = _parent_run(cfg)
    _log_split(c, parent, prepared)
    report = RunReport(parent, cfg.name)
    try:
        results: dict[str, StageResult] = {}

        def stage(name: str, inputs: dict[str, ArtifactRef]) -> ArtifactRef | None:
            if todo[name] == "skip":
                return None
            if getattr(cfg.stage_config(name), "work_pool", "local") == "gpu":
                from flows.dispatch import run_on_pool  # training on GPU workers, artifacts meet in MLflow

                res = run_on_pool("gpu", name, cfg, inputs, parent, todo[name] == "force")
            else:
                res = STAGE_TASKS[name](cfg, inputs, parent, todo[name] == "force")
            results[name] = res
            report.stages[name] = {"run_id": res.run_id, "cache": "hit" if res.cache_hit else "miss",
                                   "seconds": round(res.seconds, 1), "summary": res.summary.splitlines()[0] if res.summary else ""}
            return res.ref

        data = stage("sanitize", {"records": files["corpus"], **{r: files[r] for r in SANITIZED if r in files}})
        # every role's text is masked by sanitize; a stage after --only's is skipped and keeps the prepared file
        files = {**files, **((results["sanitize"].outputs or {}) if "sanitize" in results else {})}
        data = stage("dedup", {"records": data})
        # --only sanitize skips dedup: no corpus to build a scratch base on, and nothing after needs one
        base = base_model_task(cfg, data, files.get("general"), parent) if data else None
        data = stage("curriculum", {"records": data, "model": base})
        dapt = stage("dapt", {"records": data, "model": base,
                              **({"sft": files["sft"]} if cfg.dapt.mix_sft > 0 else {})})
        sft = stage("sft", {"sft": files["sft"], "model": dapt}) if dapt else None
        rm_base = {"sft": sft, "dapt": dapt, "model": base}[cfg.reward.base]
        rm = stage("reward", {"preference": files["preference"], "eval_preference": files["eval_preference"],
                              "model": rm_base}) if rm_base else None
        alg = cfg.preference.algorithm
        aligned = None
        if sft and todo[alg] != "skip":
            inputs = {"preference": files["preference"], "model": sft,
                      **({"records": data} if alg == "dpo" and cfg.dpo.ptx_coef > 0 else {})}
            if alg in ("ppo", "grpo"):
                _reward_gate(c, results.get("reward"), cfg.preference.min_reward_accuracy, alg)
                inputs = {"prompts": files["prompts"], "model": sft, "reward": rm,
                          **({"preference": files["preference"]} if alg == "ppo" and cfg.ppo.sft_loss_weight > 0
                             else {}),
                          **({"records": data} if alg == "ppo" and cfg.ppo.ptx_coef > 0 else {}),
                          **({"sft": files["sft"]} if alg == "ppo" and cfg.ppo.sft_mix_coef > 0 else {})}
            aligned = stage(alg, inputs)
        if todo["evaluate"] != "skip" and aligned:
            ev_inputs = {"base": base, "dapt": dapt, "sft": sft, alg: aligned, "reward": rm,
                         **{k: files[k] for k in ("eval_text", "eval_qa", "eval_prompts") if k in files}}
            ev = stage("evaluate", ev_inputs)
            from tasks.stages import materialize

            report.evaluation = json.loads(materialize(ev).read_text())
            report.evaluation_md = results["evaluate"].summary
        final = aligned or sft or dapt
        if final is not None and "export" in todo and todo["export"] != "skip":
            lineage = {f"lineage.{k}": r.ref for k, r in results.items()} | {"lineage.base": base}
            exported = stage("export", {"model": final, **({"evaluation": results["evaluate"].ref}
                                                           if "evaluate" in results else {}), **lineage})
            decision = promote_task(cfg, exported, final.stage, report.evaluation, parent)
            report.promotion, report.promotion_md = decision.to_dict(), decision.markdown()
            logger.info("promotion: %s", decision.line())
        report.seconds = time.time() - t0
        tracking.log_batch(c, parent, metrics={"pipeline_seconds": report.seconds})
        c.log_text(parent, json.dumps(report.__dict__, indent=2, default=str), "run_report.json")
        _publish(report)
        tracking.with_retries(lambda: c.set_terminated(parent, "FINISHED"), "end run")
    except BaseException as e:
        tracking.with_retries(lambda: c.set_terminated(parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"),
                              "end run")
        raise
    logger.info("pipeline %s finished in %.1fs (parent run %s)", cfg.name, report.seconds, parent)
    return report


SANITIZED = ("sft", "preference", "prompts", "eval_text", "eval_qa", "eval_preference", "eval_prompts")


def _log_split(c, parent: str, prepared: dict) -> None:
    """Where every role's records came from and what was held out (counts and record hashes): the parent run's
    ``inputs/split.json``."""
    from pipelines.data import split_report

    c.log_dict(parent, split_report(prepared), "inputs/split.json")


def _reward_gate(c, reward_result: StageResult | None, threshold: float, alg: str) -> None:
    if reward_result is None:
        raise GateError(f"{alg} needs a reward model, but the reward stage did not run")
    acc = c.get_run(reward_result.run_id).data.metrics.get("pairwise_accuracy", float("nan"))
    if not acc >= threshold:
        raise GateError(f"gate: {alg} refuses to start: the reward model's held-out pairwise accuracy is {acc:.3f}, "
                        f"below preference.min_reward_accuracy = {threshold:.3f}")


def stage_table(report: RunReport) -> str:
    lines = ["| stage | cache | seconds | result |", "|---|---|---:|---|"]
    for s, r in report.stages.items():
        lines.append(f"| {s} | {r['cache']} | {r['seconds']:.1f} | {r['summary']} |")
    return "\n".join(lines)


def _publish(report: RunReport) -> None:
    md = (f"# tunewright run `{report.pipeline}`\n\nMLflow parent run `{report.parent_run_id}`"
          f"{' ([open](' + tracking.run_url(report.parent_run_id) + '))' if tracking.run_url(report.parent_run_id) else ''}"
          f"\n\n## Stages\n\n{stage_table(report)}\n\n## Evaluation\n\n{report.evaluation_md or '(not run)'}\n"
          f"\n## Promotion\n\n{report.promotion_md or '(no export)'}\n")
    create_markdown_artifact(markdown=md, key=artifact_key(report.pipeline),
                             description="tunewright stage, evaluation and promotion tables")


@flow(name="finetune", log_prints=True)
def finetune(config: PipelineConfig | str = "pipelines/configs/demo.yaml", from_stage: OptionalStage = None,
             only: OptionalStage = None, force: StageNames = ()) -> dict[str, Any]:
    """Run the tunewright fine-tuning pipeline; stages whose fingerprint is unchanged are reused from MLflow.

    Args:
        config: A pipeline config file (path relative to the project root, e.g. pipelines/configs/demo.yaml),
            or the validated config itself.
        from_stage: Recompute this stage and every stage after it.
        only: Recompute this stage alone; upstream stages come from the cache, downstream ones are skipped.
        force: Recompute these stages (the rest may come from the cache).
    """
    cfg = load_config(config) if isinstance(config, str) else config
    report = run_pipeline(cfg, from_stage, only, force)
    return {"parent_run_id": report.parent_run_id, "stages": report.stages, "evaluation": report.evaluation,
            "promotion": report.promotion, "seconds": report.seconds}


__all__ = ["finetune", "plan", "run_pipeline", "GateError", "SelectionError",
           "PREFERENCE_ALGORITHMS"]
