"""export: the run's final model as one standalone Hugging Face directory that is also an MLflow Model.

Reads: the final checkpoint (the aligned policy, else sft, else dapt) as full weights (``tasks/`` merges every
adapter on the way in), the evaluation table, and the references of every stage (``lineage``).
Writes: ``model/`` with

- ``config.json`` + ``model*.safetensors`` (every adapter merged; optionally cast to ``export.dtype``),
- the tokenizer with a chat template: the model's own, or the prompt format the run trained with written as one
  (a ``plain`` format such as the demo's ``Question: …\\nAnswer:`` becomes an equivalent Jinja template),
- ``generation_config.json``: greedy, stopping at EOS and the template's end-of-turn token, with the
  template's stop strings (``stop_strings``), the decoding evaluate scored,
- ``tunewright_export.json``: the lineage of every stage (run id, artifact path, sha256), the evaluation row of
  the exported checkpoint, the whole evaluation table, the template, library versions and file hashes,
- ``MLmodel`` (``python_function`` flavour, loader in ``code/``): ``mlflow models serve`` serves the same
  directory on ``/invocations``.

``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)`` load it with nothing else of
the run. Registration in the Model Registry and promotion happen after the stage (``pipelines/promote.py``), so a
cached export is registered once and never re-gated. Run alone on any finished run::

    python -m pipelines.export RUN_ID OUT_DIR      # a pipeline parent run, or one of its stage runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from pipelines.artifacts import ArtifactRef, StageOutput, atomic_dir, sha256_file, write_json
from pipelines.config import ExportConfig, PipelineConfig, TemplateConfig

EXPORT_MANIFEST = "tunewright_export.json"
FINAL_ORDER = ("grpo", "ppo", "dpo", "sft", "dapt")  # which checkpoint a run exports: the last one it trained
LOADER = "tunewright_pyfunc"
_LOADER_SOURCE = '''"""MLflow python_function loader of a tunewright export (the directory is a plain Hugging Face model).

Input: a DataFrame (or records) with a ``messages`` column (a list of {role, content}) or a ``prompt`` column (a
string, used as one user turn). Output: one answer per row, greedy, with the directory's generation_config.
"""

import copy
import json
from pathlib import Path


class _Model:
    def __init__(self, path):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
        self.generation = GenerationConfig.from_pretrained(path)

    def predict(self, data, params=None):
        import torch

        rows = data.to_dict("records") if hasattr(data, "to_dict") else list(data)
        out = []
        for row in rows:
            msgs = row.get("messages")
            if isinstance(msgs, str):
                msgs = json.loads(msgs)
            if msgs is None:
                msgs = [{"role": "user", "content": str(row["prompt"])}]
            ids = self.tokenizer.apply_chat_template(list(msgs), add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
            gc = copy.deepcopy(self.generation)
            if (params or {}).get("max_new_tokens"):
                gc.max_new_tokens = int(params["max_new_tokens"])
            with torch.inference_mode():
                gen = self.model.generate(**ids, generation_config=gc, tokenizer=self.tokenizer)
            text = self.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            for s in self.generation.stop_strings or []:
                text = text.split(s, 1)[0]
            out.append(text.strip())
        return out


def _load_pyfunc(path):
    return _Model(str(Path(path)))
'''


class ExportError(RuntimeError):
    """The run has nothing to export (no finished training stage); one line for the user."""


def final_checkpoint(names) -> str | None:
    """The checkpoint a run exports, from the stage names it has: the aligned policy, else sft, else dapt."""
    return next((s for s in FINAL_ORDER if s in set(names)), None)


def _generation_config(model, tokenizer, renderer, ecfg_max_new_tokens: int, stop: tuple[str, ...]):
    from transformers import GenerationConfig

    gc = GenerationConfig.from_model_config(model.config)
    eos = list(dict.fromkeys([i for i in renderer.stop_ids if i is not None]))
    gc.eos_token_id = eos[0] if len(eos) == 1 else eos
    gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    gc.do_sample = False
    gc.max_new_tokens = ecfg_max_new_tokens
    if stop:
        gc.stop_strings = list(stop)
    return gc


def _write_mlmodel(d: Path) -> None:
    """Make the Hugging Face directory an MLflow Model too: an ``MLmodel`` file and the loader under ``code/``."""
    from mlflow.models import Model
    from mlflow.pyfunc import add_to_model

    (d / "code").mkdir()
    (d / "code" / f"{LOADER}.py").write_text(_LOADER_SOURCE, encoding="utf-8")
    import torch
    import transformers

    (d / "requirements.txt").write_text(
        f"torch=={torch.__version__.split('+')[0]}\ntransformers=={transformers.__version__}\nsafetensors\n")
    m = Model()
    add_to_model(m, loader_module=LOADER, data=".", code="code", python_env=None)
    m.metadata = {"tunewright_export": EXPORT_MANIFEST}
    m.save(str(d / "MLmodel"))


def export_model(model_dir: Path, out_dir: Path, template: TemplateConfig, ecfg: ExportConfig, *,
                 checkpoint: str, lineage: dict[str, Any], evaluation: dict[str, dict[str, float]] | None,
                 max_new_tokens: int = 64, spec=None, pipeline: str = "") -> dict[str, Any]:
    """Write the standalone directory ``out_dir`` (atomically) from a full-weights ``model_dir``; its manifest."""
    from pipelines.chat import Renderer
    from pipelines.modeling import LoadSpec, check_saved, load_model, load_tokenizer, read_manifest, versions

    spec = spec or LoadSpec()
    train_manifest = read_manifest(model_dir)
    if train_manifest.get("kind") == "adapter":
        raise ExportError(f"{model_dir}: an adapter; export needs full weights (merge it onto its base first)")
    tokenizer = load_tokenizer(model_dir, spec.trust_remote_code)
    renderer = Renderer.for_model(tokenizer, template, f"checkpoint {checkpoint}")  # sets tokenizer.chat_template
    dtype = ecfg.dtype or spec.dtype
    model = load_model(model_dir, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    model.generation_config = _generation_config(model, tokenizer, renderer, max_new_tokens, renderer.stop)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=ecfg.max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        check_saved(tmp)
        if not (tmp / "generation_config.json").is_file():
            model.generation_config.save_pretrained(str(tmp))
        _write_mlmodel(tmp)
        manifest = {
            "pipeline": pipeline, "checkpoint": checkpoint, "dtype": dtype,
            "lineage": {k: _public(v) for k, v in lineage.items()},
            "evaluation": (evaluation or {}).get(checkpoint, {}), "evaluation_table": evaluation or {},
            "template": template.model_dump(mode="json"), "chat_template": renderer.template,
            "stop_token_ids": renderer.stop_ids, "trained": {k: v for k, v in train_manifest.items()
                                                             if k in ("stage", "task", "merged_from", "config")},
            "versions": versions(),
            "files": {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        write_json(tmp / EXPORT_MANIFEST, manifest)
    return manifest


def _public(ref: dict[str, Any]) -> dict[str, Any]:
    """A lineage entry safe to ship with the model: a local path (which may hold a user name) becomes its name."""
    if ref.get("run_id") is None and Path(str(ref.get("artifact_path", ""))).expanduser().exists():
        return {**ref, "artifact_path": Path(str(ref["artifact_path"])).name}
    return ref


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    """The stage: ``inputs`` are ``model`` (full weights), ``evaluation`` (evaluation.json, optional) and
    ``lineage`` (a JSON file of every stage's :class:`ArtifactRef`, written by ``tasks/``)."""
    import time

    from pipelines.modeling import load_spec

    t0 = time.time()
    lineage = json.loads(Path(inputs["lineage"]).read_text()) if "lineage" in inputs else {}
    checkpoint = final_checkpoint(lineage) or "model"
    evaluation = json.loads(Path(inputs["evaluation"]).read_text()) if "evaluation" in inputs else None
    d = out_dir / "model"
    manifest = export_model(inputs["model"], d, cfg.template, cfg.export, checkpoint=checkpoint, lineage=lineage,
                            evaluation=evaluation, max_new_tokens=cfg.evaluate.max_new_tokens,
                            spec=load_spec(cfg.model), pipeline=cfg.name)
    size = _size(d)
    weights = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    seconds = time.time() - t0
    row = manifest["evaluation"]
    summary = (f"{checkpoint} exported: {weights / 2**20:.1f} MiB of safetensors ({manifest['dtype']}), "
               f"{len(manifest['files'])} files, {seconds:.1f}s"
               + (f"; held-out exact match {row['qa_exact_match']:.3f}" if "qa_exact_match" in row else ""))
    return StageOutput(primary="model", summary=summary,
                       metrics={"export_seconds": seconds, "export_bytes": float(size), "weights_bytes": float(weights)})


# ------------------------------------------------------------------------------------------ any finished run
def _child_runs(c, parent_id: str) -> dict[str, Any]:
    from pipelines import tracking

    runs = tracking.with_retries(lambda: c.search_runs(
        [tracking.experiment_id()], f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'"),
        "search runs")
    out: dict[str, Any] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        out[r.data.tags.get(tracking.TAG_STAGE, r.info.run_name)] = r
    return out


def _ref(run) -> ArtifactRef:
    from pipelines import tracking

    t = run.data.tags
    return ArtifactRef(t.get(tracking.TAG_SOURCE, run.info.run_id), t[tracking.TAG_PRIMARY], t[tracking.TAG_SHA],
                       t[tracking.TAG_STAGE])


def export_run(run_id: str, out_dir: Path, log=print) -> Path:
    """``out_dir`` = the standalone model of a finished run: its export when it has one (downloaded and checked),
    else built here from its final checkpoint and evaluation (runs from before export existed, export disabled)."""
    from pipelines import tracking
    from pipelines.config import ExportConfig, PipelineConfig
    from pipelines.modeling import LoadSpec, load_spec, materialize

    c = tracking.client()
    try:
        run = tracking.with_retries(lambda: c.get_run(run_id), "get run")
    except Exception as e:
        raise ExportError(f"run {run_id}: not found in {tracking.tracking_uri()} ({str(e).splitlines()[0]})") from None
    stage = run.data.tags.get(tracking.TAG_STAGE)
    parent = run.data.tags.get("mlflow.parentRunId") if stage else run.info.run_id
    kids = _child_runs(c, parent) if parent else {}
    if stage and stage != "export":
        kids = {**{k: v for k, v in kids.items() if k in ("evaluate",)}, stage: run}
    if stage == "export":
        kids = {"export": run}
    if "export" in kids:
        src = tracking.fetch(_ref(kids["export"]))
        with atomic_dir(Path(out_dir)) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        log(f"export: copied the export of run {kids['export'].info.run_id[:8]} to {out_dir}")
        return Path(out_dir)
    checkpoint = final_checkpoint(kids)
    if checkpoint is None:
        raise ExportError(f"run {run_id}: no finished training stage to export ({', '.join(kids) or 'no stage runs'})")
    cfg_json = _run_config(c, parent) if parent else None
    cfg = PipelineConfig.model_validate(cfg_json) if cfg_json else None
    spec = load_spec(cfg.model) if cfg else LoadSpec()
    log(f"export: building from the {checkpoint} checkpoint of run {kids[checkpoint].info.run_id[:8]}")
    model_dir = materialize(_ref(kids[checkpoint]), spec)
    evaluation = json.loads(materialize(_ref(kids["evaluate"])).read_text()) if "evaluate" in kids else None
    lineage = {s: _ref(r).to_dict() for s, r in kids.items() if tracking.TAG_SHA in r.data.tags}
    export_model(model_dir, Path(out_dir), cfg.template if cfg else TemplateConfig(), cfg.export if cfg else ExportConfig(),
                 checkpoint=checkpoint, lineage=lineage, evaluation=evaluation,
                 max_new_tokens=cfg.evaluate.max_new_tokens if cfg else 64, spec=spec,
                 pipeline=cfg.name if cfg else "")
    return Path(out_dir)


def _run_config(c, parent_id: str) -> dict | None:
    """The validated config a pipeline run logged (``config.json`` on the parent run), with its name."""
    import tempfile

    from pipelines import tracking

    with tempfile.TemporaryDirectory() as tmp:
        try:
            p = c.download_artifacts(parent_id, "config.json", tmp)
        except Exception:
            return None
        cfg = json.loads(Path(p).read_text())
    run = c.get_run(parent_id)
    return {**cfg, "name": run.data.tags.get(tracking.TAG_PIPELINE, cfg.get("name", "pipeline"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_id", help="A pipeline parent run id, or the id of one of its stage runs")
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    try:
        export_run(args.run_id, args.out_dir)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.out_dir)
    return 0


__all__ = ["run", "export_model", "export_run", "final_checkpoint", "EXPORT_MANIFEST", "ExportError"]

if __name__ == "__main__":
    raise SystemExit(main())
