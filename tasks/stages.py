"""One thin Prefect task per stage: fingerprint, cache look-up, the MLflow child run, artifact handoff.

A stage task takes the validated config and the :class:`ArtifactRef` of each input, and returns the
:class:`ArtifactRef` of its primary output. The ML work itself is ``pipelines.<stage>.run``; this module only
moves artifacts between MLflow and local directories and records what happened.
"""

from __future__ import annotations

import importlib
import json
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines import tracking
from pipelines.artifacts import ArtifactRef, sha256_path
from pipelines.config import PipelineConfig
from pipelines.lease import Lease, acquire
from pipelines.modeling import MANIFEST, materialize, read_manifest

# Modules every stage's code version includes: a change there invalidates all stages.
SHARED_CODE = ("pipelines.artifacts", "pipelines.modeling", "pipelines.training", "pipelines.chat")
TAG_PARENT_METRICS = "tunewright.parent_metrics"
TAG_SUMMARY = "tunewright.summary"
TAG_OUTPUTS = "tunewright.outputs"


@dataclass(frozen=True)
class StageResult:
    ref: ArtifactRef
    run_id: str
    cache_hit: bool
    summary: str
    seconds: float
    outputs: dict[str, ArtifactRef] | None = None  # further named outputs (sanitize: every role's masked file)


RENDERING_STAGES = ("dapt", "sft", "reward", "dpo", "ppo", "grpo", "evaluate", "export")
# Inputs named lineage.<stage> are references only: the stage gets them as one JSON file (``lineage``), unfetched.
LINEAGE = "lineage."


def stage_fingerprint_config(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The part of the config a stage's result depends on (its own block plus the globals it reads)."""
    # what gates and names a registry version is not part of the exported artifact
    block = cfg.stage_config(stage).model_dump(
        mode="json", exclude={"promote", "registered_model"} if stage == "export" else None)
    out: dict[str, Any] = {stage: block, "seed": cfg.seed,
                           "model_loading": {k: v for k, v in cfg.model.model_dump(mode="json").items()
                                             if k in ("trust_remote_code", "dtype", "revision")}}
    if stage in ("sanitize", "dedup", "curriculum", "dapt", "evaluate"):
        out["text_field"] = cfg.data.text_field
    if stage in RENDERING_STAGES:
        out["template"] = cfg.template.model_dump(mode="json")
    if stage == "export":
        out["max_new_tokens"] = cfg.evaluate.max_new_tokens  # the generation config's default length
    if stage in ("ppo", "grpo"):
        out["preference"] = cfg.preference.model_dump(mode="json")
    if stage == "dapt":  # dapt reads the ranked corpus through the curriculum's schedule
        out["curriculum"] = cfg.curriculum.model_dump(mode="json", include=set(cfg.curriculum.PACING))
    return out


def _finish(client, run_id: str, status: str) -> None:
    tracking.with_retries(lambda: client.set_terminated(run_id, status), "end run")


def execute_stage(stage: str, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], parent_run_id: str,
                  force: bool = False, log=print) -> StageResult:
    """Run (or reuse) one stage as a child run of ``parent_run_id``; return its output reference."""
    import time

    t0 = time.time()
    c = tracking.client()
    exp = tracking.experiment_id()
    fcfg = stage_fingerprint_config(cfg, stage)
    launched = getattr(cfg.stage_config(stage), "launcher", "inprocess") != "inprocess"
    code = tracking.code_version(f"pipelines.{stage}", *SHARED_CODE, *(("pipelines.launch",) if launched else ()))
    fp = tracking.fingerprint(stage, fcfg, inputs, code)
    tags = {"mlflow.parentRunId": parent_run_id, tracking.TAG_STAGE: stage, tracking.TAG_FINGERPRINT: fp,
            tracking.TAG_PIPELINE: cfg.name}
    # One computation per fingerprint across concurrent runs: wait for whoever holds its lease and reuse their
    # run, or hold the lease while computing (a forced stage waits too, then recomputes).
    got = acquire(f"stage:{fp}", until=None if force else (lambda: tracking.find_cached(fp)), log=log,
                  runs=(parent_run_id,), waiting=lambda h: f"{stage}: fingerprint {fp[:12]} is being computed by "
                  f"{h.owner} (lease until {h.until}); waiting")
    lease, hit = (got, None) if isinstance(got, Lease) else (None, got)
    if hit is not None:
        child = tracking.with_retries(lambda: c.create_run(exp, run_name=stage, tags={
            **tags, tracking.TAG_CACHE: "hit", tracking.TAG_SOURCE: hit.info.run_id,
            tracking.TAG_SHA: hit.data.tags[tracking.TAG_SHA], tracking.TAG_PRIMARY: hit.data.tags[tracking.TAG_PRIMARY]}),
            "create run")
        rid = child.info.run_id
        tracking.log_batch(c, rid, metrics=hit.data.metrics)
        tracking.log_batch(c, parent_run_id, metrics=json.loads(hit.data.tags.get(TAG_PARENT_METRICS, "{}")))
        _finish(c, rid, "FINISHED")
        ref = ArtifactRef(hit.info.run_id, hit.data.tags[tracking.TAG_PRIMARY], hit.data.tags[tracking.TAG_SHA], stage)
        outputs = {k: ArtifactRef(hit.info.run_id, path, sha, stage)
                   for k, (path, sha) in json.loads(hit.data.tags.get(TAG_OUTPUTS, "{}")).items()}
        log(f"{stage}: cache hit (run {hit.info.run_id[:8]}, fingerprint {fp[:12]})")
        return StageResult(ref, rid, True, hit.data.tags.get(TAG_SUMMARY, ""), time.time() - t0, outputs)

    # run id or content hash only: a local path could carry a user name or a token
    input_tags = {f"tunewright.input.{k}": f"{ref.stage}:{ref.run_id or 'file'}:{ref.sha256[:12]}"
                  for k, ref in inputs.items()}
    try:
        child = tracking.with_retries(lambda: c.create_run(exp, run_name=stage, tags={
            **tags, tracking.TAG_CACHE: "miss", **input_tags}), "create run")
    except BaseException:
        lease.release()
        raise
    rid = child.info.run_id
    restore = _end_run_on_sigterm(c, rid)
    try:
        lease.attach(rid)  # if this process dies, the run that takes over ends this child run KILLED
        tracking.log_batch(c, rid, params=tracking.flatten(fcfg))
        log(f"{stage}: computing (fingerprint {fp[:12]}, child run {rid[:8]})")
        from pipelines.modeling import load_spec

        spec = load_spec(cfg.model)
        local = {k: materialize(ref, spec) for k, ref in inputs.items() if not k.startswith(LINEAGE)}
        local["work_dir"] = tracking.home() / "work" / stage / fp
        lineage = {k.removeprefix(LINEAGE): ref.to_dict() for k, ref in inputs.items() if k.startswith(LINEAGE)}
        if lineage:
            from pipelines.artifacts import write_json

            write_json(local["work_dir"] / "lineage.json", lineage)
            local["lineage"] = local["work_dir"] / "lineage.json"
        module = importlib.import_module(f"pipelines.{stage}")
        with tempfile.TemporaryDirectory(prefix=f"tw-{stage}-") as tmp:
            out_dir = Path(tmp)
            if getattr(cfg.stage_config(stage), "launcher", "inprocess") != "inprocess":
                from pipelines.launch import launch_stage  # accelerate / deepspeed subprocess (ZeRO-3 on GPUs)

                out = launch_stage(stage, cfg, local, out_dir, run_id=rid, log=log)
            else:
                out = module.run(cfg, local, out_dir)
            model_dir = out_dir / out.primary
            if model_dir.is_dir() and (model_dir / MANIFEST).is_file():
                _record_lineage(model_dir, inputs)
            sha = sha256_path(out_dir / out.primary)
            extra = {k: (path, sha256_path(out_dir / path)) for k, path in out.outputs.items()}
            tracking.log_batch(c, parent_run_id, metrics=out.parent_metrics)
            tracking.with_retries(lambda: c.log_artifacts(rid, str(out_dir)), "log artifacts")
        # metrics and the cache tags in one request, before FINISHED makes the run findable by find_cached
        tracking.log_batch(c, rid, metrics=out.metrics, tags={
            tracking.TAG_SHA: sha, tracking.TAG_PRIMARY: out.primary, TAG_PARENT_METRICS: json.dumps(out.parent_metrics),
            TAG_SUMMARY: out.summary[:4000], TAG_OUTPUTS: json.dumps(extra)})
        _finish(c, rid, "FINISHED")
        shutil.rmtree(local["work_dir"], ignore_errors=True)  # checkpoints only matter until the stage finishes
    except BaseException as e:
        _finish(c, rid, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        restore()
        lease.release()  # after FINISHED (or FAILED/KILLED): a waiter then finds the run, or computes it itself
    log(f"{stage}: done in {time.time() - t0:.1f}s: {out.summary.splitlines()[0] if out.summary else ''}")
    return StageResult(ArtifactRef(rid, out.primary, sha, stage), rid, False, out.summary, time.time() - t0,
                       {k: ArtifactRef(rid, path, s, stage) for k, (path, s) in extra.items()})


def _record_lineage(model_dir: Path, inputs: dict[str, ArtifactRef]) -> None:
    """Write the input references into the manifest: an adapter names the exact model it sits on."""
    from pipelines.artifacts import write_json

    m = read_manifest(model_dir)
    m["inputs"] = {k: v.to_dict() for k, v in inputs.items()}
    if m.get("kind") == "adapter":
        m["base"] = inputs[m.get("base_input", "model")].to_dict()
    write_json(model_dir / MANIFEST, m)


def _end_run_on_sigterm(c, run_id: str):
    """SIGTERM (a worker being stopped) ends the child run as KILLED instead of leaving it RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        _finish(c, run_id, "KILLED")
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _make_task(stage: str):
    @task(name=stage, cache_policy=NO_CACHE, retries=0, log_prints=False)
    def stage_task(cfg: PipelineConfig, inputs: dict[str, ArtifactRef], parent_run_id: str,
                   force: bool = False) -> StageResult:
        logger = get_run_logger()
        return execute_stage(stage, cfg, inputs, parent_run_id, force, log=logger.info)

    return stage_task


STAGE_TASKS = {s: _make_task(s) for s in ("sanitize", "dedup", "curriculum", "dapt", "sft", "reward", "dpo", "ppo",
                                          "grpo", "evaluate", "export")}
