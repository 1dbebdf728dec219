"""The ``tunewright`` command line (typer). Every command honours MLFLOW_TRACKING_URI and PREFECT_API_URL.

    tunewright run CONFIG [--from STAGE] [--only STAGE] [--force STAGE]...
    tunewright run CONFIG ... [--executor local|dask] [--workers N] [--scheduler ADDRESS]
    tunewright sanitize INPUT OUTPUT [--field text] [--bad-records fail|quarantine] [--max-bad-fraction F]
                        [--executor local|dask] [--workers N] [--scheduler ADDRESS]
    tunewright dedup INPUT OUTPUT (the same options as sanitize)
    tunewright compare RUN_ID RUN_ID...
    tunewright export RUN_ID OUT_DIR
    tunewright promote VERSION [--model NAME] [--alias champion]
    tunewright deploy
    tunewright stages
    tunewright serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key-env VAR] [--served-model-name NAME]

Bad input (config, missing file, bad record) is reported as one line and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tunewright: a scheduled, cached, tracked pipeline that turns a general LLM into a domain expert.")

STAGE_HELP = {
    "sanitize": "replace PII with typed placeholders ([EMAIL], [CN_ID]...), per-type counts",
    "dedup": "drop exact and verified near-duplicates (MiniLM embeddings + FAISS), report every removal",
    "curriculum": "order records easy -> hard by perplexity under the base model",
    "dapt": "continued pretraining on the ordered domain corpus",
    "sft": "supervised fine-tuning on instruction pairs (LoRA / QLoRA / full)",
    "reward": "reward model (sequence classifier) on preference pairs",
    "dpo": "direct preference optimisation against the SFT reference",
    "ppo": "PPO against the reward model, KL-penalised to SFT",
    "grpo": "GRPO with the reward model as reward function",
    "evaluate": "perplexity, QA exact match / ROUGE-L, reward win rate and KL for every checkpoint",
    "export": "the final model as one standalone HF directory + MLflow Model; registry version, promotion gate",
}


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _load(config: Path):
    from pipelines.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as e:
        fail(str(e))


def _check_inputs(cfg) -> None:
    """Read and check every input file of every role, and the chat template, before any stage starts."""
    from pipelines.chat import TemplateError, check_template
    from pipelines.data import MissingInputError, resolve_data
    from pipelines.records import BadInputError

    try:
        resolve_data(cfg)
        check_template(cfg)
    except (MissingInputError, BadInputError, TemplateError) as e:
        fail(str(e))


Executor = Annotated[Optional[str], typer.Option("--executor", help="local (this process) | dask")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Processes of a local Dask cluster (default 2).")]
Scheduler = Annotated[Optional[str], typer.Option("--scheduler", help="Address of an existing Dask scheduler.")]


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline config YAML, e.g. pipelines/configs/demo.yaml")],
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Recompute this stage and all after it.")] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Recompute this stage alone (upstream from cache).")] = None,
    force: Annotated[Optional[list[str]], typer.Option("--force", help="Recompute this stage (repeatable).")] = None,
    executor: Executor = None,
    workers: Workers = None,
    scheduler: Scheduler = None,
) -> None:
    """Run the pipeline; cached stages are reused. Ends with the evaluation table."""
    from flows.finetune import GateError, SelectionError, finetune, plan

    cfg = _load(config)
    if executor or workers or scheduler:  # the data stages' engine; results (and so the cache) do not depend on it
        if executor not in (None, "local", "dask"):
            fail(f"--executor {executor}: expected local or dask")
        from pipelines.executor import executor_config

        cfg = cfg.model_copy(update={"executor": executor_config(executor, workers, scheduler, cfg.executor)})
    try:
        plan(cfg, from_stage, only, list(force or []))
    except SelectionError as e:
        fail(str(e))
    _check_inputs(cfg)
    from pipelines.launch import preflight
    from pipelines.training import QLoRAUnavailableError

    try:
        preflight(cfg)  # machine checks (QLoRA needs CUDA) before any stage runs
    except QLoRAUnavailableError as e:
        fail(str(e))
    try:
        out = finetune(cfg, from_stage, only, list(force or []))
    except GateError as e:
        fail(str(e), 1)
    _print_report(out)


def _print_report(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"stages (parent run {out['parent_run_id']})")
    for col in ("stage", "cache", "seconds", "result"):
        t.add_column(col, justify="right" if col == "seconds" else "left")
    for s, r in out["stages"].items():
        t.add_row(s, r["cache"], f"{r['seconds']:.1f}", r["summary"])
    console.print(t)
    if out["evaluation"]:
        from pipelines.evaluate import METRICS

        cols = [m for m in METRICS if any(m in row for row in out["evaluation"].values())]
        e = Table(title="evaluation (held-out)")
        e.add_column("checkpoint")
        for m in cols:
            e.add_column(m, justify="right")
        for name, row in out["evaluation"].items():
            e.add_row(name, *[f"{row[m]:.3f}" if m in row else "–" for m in cols])
        console.print(e)
    if out.get("promotion"):
        p = out["promotion"]
        console.print(f"promotion: {p['name']} version {p['version']}: {p['decision']} — {p['reason']}")
    console.print(f"total {out['seconds']:.1f}s")


def _records_command(kind: str, input: Path, output: Path, field: str, bad_records: str,
                     max_bad_fraction: float | None, executor: str | None, workers: int | None,
                     scheduler: str | None, dedup_opts: dict | None = None) -> None:
    import json

    from pipelines.config import DedupConfig, SanitizeConfig
    from pipelines.executor import executor_config
    from pipelines.records import BadInputError
    from pipelines.shards import dedup_records, sanitize_records

    if bad_records not in ("fail", "quarantine"):
        fail(f"--bad-records {bad_records}: expected fail or quarantine")
    if executor not in (None, "local", "dask"):
        fail(f"--executor {executor}: expected local or dask")
    if max_bad_fraction is not None and not 0.0 <= max_bad_fraction <= 1.0:
        fail(f"--max-bad-fraction {max_bad_fraction}: expected a fraction between 0 and 1")
    if workers is not None and workers < 1:
        fail(f"--workers {workers}: expected at least 1")
    opts = {"bad_records": bad_records, **({"max_bad_fraction": max_bad_fraction} if max_bad_fraction is not None else {})}
    ex = executor_config(executor, workers, scheduler)
    try:
        if kind == "sanitize":
            report = sanitize_records(input, output, SanitizeConfig(**opts), field, ex)
        else:
            report = dedup_records(input, output, DedupConfig(**opts, **(dedup_opts or {})), field, executor=ex)
    except BadInputError as e:
        fail(str(e))
    typer.echo(json.dumps(report, ensure_ascii=False, default=str))


BadRecords = Annotated[str, typer.Option("--bad-records", help="fail | quarantine (to OUTPUT.rejected.jsonl)")]
MaxBad = Annotated[Optional[float], typer.Option(
    "--max-bad-fraction", help="With quarantine: abort above this fraction of bad records (default 0.05).")]


@app.command()
def sanitize(input: Path, output: Path, field: str = "text", bad_records: BadRecords = "fail",
             max_bad_fraction: MaxBad = None, executor: Executor = None, workers: Workers = None,
             scheduler: Scheduler = None) -> None:
    """Replace PII in INPUT's text field; write OUTPUT (JSONL, every other field kept)."""
    _records_command("sanitize", input, output, field, bad_records, max_bad_fraction, executor, workers, scheduler)


@app.command()
def dedup(input: Path, output: Path, field: str = "text", bad_records: BadRecords = "fail",
          max_bad_fraction: MaxBad = None, executor: Executor = None, workers: Workers = None,
          scheduler: Scheduler = None,
          embedding_backend: Annotated[Optional[str], typer.Option(
              "--embedding-backend", help="model2vec (default) | torch | onnx-int8")] = None,
          paraphrases: Annotated[Optional[str], typer.Option(
              "--paraphrases", help="drop (default) | keep | keep_k: records restating the same facts in other "
              "words (copies, boilerplate and truncations always go)")] = None,
          paraphrase_k: Annotated[Optional[int], typer.Option(
              "--paraphrase-k", help="With keep_k: wordings kept per fact cluster (default 2)")] = None) -> None:
    """Drop exact and near-duplicate records of INPUT; write OUTPUT (JSONL) and a report beside it."""
    if embedding_backend not in (None, "torch", "onnx-int8", "model2vec"):
        fail(f"--embedding-backend {embedding_backend}: expected torch, onnx-int8 or model2vec")
    if paraphrases not in (None, "drop", "keep", "keep_k"):
        fail(f"--paraphrases {paraphrases}: expected drop, keep or keep_k")
    if paraphrase_k is not None and paraphrase_k < 1:
        fail(f"--paraphrase-k {paraphrase_k}: expected at least 1")
    opts = {"embedding_backend": embedding_backend, "paraphrases": paraphrases, "paraphrase_k": paraphrase_k}
    _records_command("dedup", input, output, field, bad_records, max_bad_fraction, executor, workers, scheduler,
                     {k: v for k, v in opts.items() if v is not None})


@app.command()
def compare(run_ids: Annotated[list[str], typer.Argument(help="Two or more MLflow parent run ids")]) -> None:
    """Config differences and metric deltas of pipeline runs, side by side (deltas against the first)."""
    from rich.console import Console
    from rich.table import Table

    from pipelines import tracking

    if len(run_ids) < 2:
        fail("compare needs at least two run ids")
    c = tracking.client()
    runs = []
    for rid in run_ids:
        try:
            runs.append(c.get_run(rid))
        except Exception:
            fail(f"run {rid}: not found in {tracking.tracking_uri()}")
    console = Console()
    keys = sorted(set().union(*(r.data.params for r in runs)))
    diff = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    t = Table(title="config differences")
    t.add_column("key")
    for r in runs:
        t.add_column(r.info.run_name or r.info.run_id[:8])
    for k in diff:
        t.add_row(k, *[str(r.data.params.get(k, "–")) for r in runs])
    console.print(t if diff else "config: identical")
    mkeys = sorted(set().union(*(r.data.metrics for r in runs)))
    m = Table(title="metrics (delta vs first)")
    m.add_column("metric")
    for i, r in enumerate(runs):
        m.add_column(r.info.run_name or r.info.run_id[:8], justify="right")
    for k in mkeys:
        base = runs[0].data.metrics.get(k)
        cells = []
        for i, r in enumerate(runs):
            v = r.data.metrics.get(k)
            if v is None:
                cells.append("–")
            elif i == 0 or base is None:
                cells.append(f"{v:.4g}")
            else:
                cells.append(f"{v:.4g} ({v - base:+.4g})")
        m.add_row(k, *cells)
    console.print(m)


@app.command()
def deploy() -> None:
    """Create the work pools cpu and gpu (type process; existing pools are left as they are), then register the
    deployments in deployments/prefect.yaml (finetune/nightly, finetune/adhoc, run-stage/gpu) with PREFECT_API_URL."""
    from flows.deploy import DeployError, ensure_work_pools, register

    try:
        typer.echo(ensure_work_pools().line())
        registered = register()
    except DeployError as e:
        fail(str(e))
    typer.echo("deployments: " + ", ".join(registered))
    typer.echo("start a worker: prefect worker start --pool cpu   (training stages sent to gpu: --pool gpu)")


@app.command()
def export(run_id: Annotated[str, typer.Argument(help="A pipeline parent run id, or one of its stage runs")],
           out_dir: Annotated[Path, typer.Argument(help="Where the standalone model directory goes")]) -> None:
    """The run's final model as one standalone Hugging Face directory (every adapter merged, chat template,
    generation config, lineage manifest): its export, or one built now from its last trained checkpoint."""
    from pipelines.export import ExportError, export_run

    try:
        export_run(run_id, out_dir, log=lambda m: typer.echo(m, err=True))
    except ExportError as e:
        fail(str(e))
    typer.echo(str(out_dir))


def _version(spec: str, model: str | None) -> tuple[str, str]:
    """VERSION as ``models:/NAME/N``, ``NAME/N`` or ``N`` (with --model, or the only tunewright-* model)."""
    from pipelines import tracking

    spec = spec.removeprefix("models:/")
    if "/" in spec:
        name, _, version = spec.rpartition("/")
        return name, version
    if model:
        return model, spec
    names = sorted(m.name for m in tracking.client().search_registered_models() if m.name.startswith("tunewright-"))
    if len(names) != 1:
        fail(f"VERSION {spec}: name the model (--model NAME or NAME/{spec}); registered: {', '.join(names) or 'none'}")
    return names[0], spec


@app.command()
def promote(version: Annotated[str, typer.Argument(help="N, NAME/N or models:/NAME/N")],
            model: Annotated[Optional[str], typer.Option("--model", help="Registered model name")] = None,
            alias: Annotated[str, typer.Option("--alias")] = "champion") -> None:
    """Move the alias (champion) to a version by hand, past the gate; recorded on the version as manual."""
    from pipelines.promote import PromotionError, promote_version

    name, v = _version(version, model)
    try:
        d = promote_version(name, v, alias)
    except PromotionError as e:
        fail(str(e))
    typer.echo(d.line())


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="A model directory, models:/NAME@ALIAS, models:/NAME/VERSION or a run id")],
    host: Annotated[str, typer.Option(help="Listen address; beyond loopback needs an API key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port")] = 8000,
    api_key_env: Annotated[Optional[str], typer.Option(
        "--api-key-env", metavar="VAR", help="Environment variable holding the API key (default: "
                                             "TUNEWRIGHT_SERVE_API_KEY when set); clients send Bearer <key>")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(
        help="The model's name in the API (default: registered model name, or directory name)")] = None,
    device: Annotated[str, typer.Option(help="Device map for loading: auto, cpu, cuda:0...")] = "auto",
) -> None:
    """An OpenAI-compatible chat endpoint (/v1/chat/completions, /v1/models) for a model (transformers serve)."""
    from pipelines.serve import ServeError, api_key_from_env
    from pipelines.serve import serve as serve_model

    try:
        serve_model(model, host, port, api_key_from_env(api_key_env), served_model_name=served_model_name,
                    device=device, log=lambda m: typer.echo(m, err=True))
    except ServeError as e:
        fail(str(e))


@app.command()
def stages() -> None:
    """List the pipeline stages in order."""
    for s, h in STAGE_HELP.items():
        typer.echo(f"{s:<11} {h}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry errors
    app()


if __name__ == "__main__":
    main()
