"""Where a run's input files come from: the generated demo domain or the paths in the config.

Reads: ``data.*`` of a :class:`PipelineConfig`.
Writes: the demo data set (deterministic) under ``$TUNEWRIGHT_HOME/demo-data/<size>-<seed>-<generator hash>/`` when ``data.demo``.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.config import PipelineConfig

FILES = ("corpus", "general", "sft", "preference", "prompts", "eval_text", "eval_qa", "eval_preference", "eval_prompts")


class MissingInputError(FileNotFoundError):
    """A configured input file does not exist; ``str()`` is one line naming the key and the path."""


def resolve_data(cfg: PipelineConfig) -> dict[str, Path]:
    """Input files by name. Demo data is generated once per (size, seed, generator source) and reused: a changed
    generator writes a new directory instead of leaving stale files in place."""
    if cfg.data.demo:
        from pipelines import demo_data
        from pipelines.tracking import code_version, home

        out = home() / "demo-data" / f"{cfg.data.demo_size}-{cfg.seed}-{code_version('pipelines.demo_data')[:8]}"
        files = {name: out / f"{name}.jsonl" for name in FILES}
        if not all(p.is_file() for p in files.values()):
            files = {k: Path(v) for k, v in demo_data.generate(out, size=cfg.data.demo_size, seed=cfg.seed).items()}
        return {k: v for k, v in files.items() if k in FILES}
    files: dict[str, Path] = {}
    for name in FILES:
        p = cfg.resolve(getattr(cfg.data, name))
        if p is None:
            continue
        if not p.exists():
            raise MissingInputError(f"{p}: file not found (data.{name})")
        files[name] = p
    return files
