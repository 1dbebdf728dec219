"""The base model as a referenceable artifact.

A hub id or local directory is referenced as it is. A scratch model (tokenizer trained on the sanitized corpus, so
no PII enters its vocabulary, plus a small Llama) is built once per fingerprint and logged to MLflow under the
parent run's ``base_model/`` artifact, so every worker fetches the same bytes instead of rebuilding it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines import tracking
from pipelines.artifacts import ArtifactRef, read_jsonl, sha256_path
from pipelines.config import PipelineConfig
from pipelines.lease import Lease, acquire
from pipelines.modeling import base_ref, build_scratch, scratch_fingerprint

TAG_BASE_FP = "tunewright.base_fingerprint"
TAG_BASE_SHA = "tunewright.base_sha256"


def resolve_base(cfg: PipelineConfig, corpus: ArtifactRef, general: ArtifactRef | None, parent_run_id: str,
                 log=print) -> ArtifactRef:
    if cfg.model.scratch is None:
        return base_ref(cfg.model)
    fp = scratch_fingerprint(cfg.model.scratch, cfg.seed, [corpus.sha256, general.sha256 if general else ""])
    c = tracking.client()

    def built() -> ArtifactRef | None:
        found = tracking.with_retries(lambda: c.search_runs(
            [tracking.experiment_id()], filter_string=f"tags.`{TAG_BASE_FP}` = '{fp}'", max_results=1), "search runs")
        if not found:
            return None
        run = found[0]
        log(f"base: reusing scratch model {fp[:12]} from run {run.info.run_id[:8]}")
        return ArtifactRef(run.info.run_id, "base_model", run.data.tags[TAG_BASE_SHA], "base")

    # concurrent runs build it once: the others wait on the lease and reuse the builder's artifact
    got = acquire(f"base:{fp}", until=built, log=log, runs=(parent_run_id,),
                  waiting=lambda h: f"base: scratch model {fp[:12]} is being built by {h.owner} (lease until {h.until}); waiting")
    if not isinstance(got, Lease):
        return got
    with got:
        return _build_and_log(cfg, corpus, general, parent_run_id, fp, log)


def _build_and_log(cfg: PipelineConfig, corpus: ArtifactRef, general: ArtifactRef | None, parent_run_id: str,
                   fp: str, log=print) -> ArtifactRef:
    from tasks.stages import materialize

    texts = [r[cfg.data.text_field] for r in read_jsonl(materialize(corpus))]
    general_texts = [r["text"] for r in read_jsonl(materialize(general))] if general else []
    log(f"base: building scratch model {fp[:12]} ({len(texts)} corpus + {len(general_texts)} general texts)")
    c = tracking.client()
    with tempfile.TemporaryDirectory(prefix="tw-base-") as tmp:
        out = Path(tmp) / "base_model"
        build_scratch(cfg.model.scratch, texts, general_texts, cfg.seed, out)
        sha = sha256_path(out)
        tracking.with_retries(lambda: c.log_artifacts(parent_run_id, str(out), "base_model"), "log artifacts")
    tracking.log_batch(c, parent_run_id, tags={TAG_BASE_SHA: sha, TAG_BASE_FP: fp})  # one request: never one alone
    return ArtifactRef(parent_run_id, "base_model", sha, "base")


@task(name="base-model", cache_policy=NO_CACHE)
def base_model_task(cfg: PipelineConfig, corpus: ArtifactRef, general: ArtifactRef | None,
                    parent_run_id: str) -> ArtifactRef:
    return resolve_base(cfg, corpus, general, parent_run_id, log=get_run_logger().info)
