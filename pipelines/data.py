"""A run's inputs: every file of every role read once, checked, normalised and split before any stage starts.

Reads: ``data.*`` of a :class:`PipelineConfig` (each role a list of datasets: path, format, split, fraction), or the
generated demo domain when ``data.demo``.
Writes: ``$TUNEWRIGHT_HOME/inputs/<key>/<role>.jsonl`` in the canonical forms of :mod:`pipelines.formats`, and
``split.json`` (per role: where its records came from, counts, the held-out records' hashes). ``<key>`` hashes the
data config, the seed and each file's path, size and modification time, so an unchanged input is prepared once.

A role without its held-out file gets a deterministic held-out split of its own data (``data.val_size``, at least
``data.val_min`` records, never more than a quarter): ``eval_text`` from the corpus, ``eval_qa`` from sft,
``eval_preference`` from preference. ``eval_prompts`` defaults to the held-out preference prompts, ``prompts`` to
the training preference prompts. Held-out records are never trained on. A bad record is one line
``FILE:LINE: what is wrong`` (:class:`~pipelines.records.BadInputError`), or is quarantined with
``data.bad_records: quarantine`` (``$TUNEWRIGHT_HOME/inputs/rejected/<key>/<role>.jsonl.rejected.jsonl``). Run alone to check a config's
inputs::

    python -m pipelines.data CONFIG.yaml
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.artifacts import atomic_dir
from pipelines.config import DatasetSpec, PipelineConfig
from pipelines.formats import normalizer, prompt_of
from pipelines.records import BadInputError, check_bad_fraction, dumps_record, iter_records, rejected_path

FILES = ("corpus", "general", "sft", "preference", "prompts", "eval_text", "eval_qa", "eval_preference", "eval_prompts")
HELDOUT_OF = {"eval_text": "corpus", "eval_qa": "sft", "eval_preference": "preference"}
SPLIT = "split.json"


class MissingInputError(FileNotFoundError):
    """A configured input file does not exist; ``str()`` is one line naming the key and the path."""


@dataclass(frozen=True)
class Dataset:
    path: Path
    spec: DatasetSpec


def _demo_files(cfg: PipelineConfig) -> dict[str, Path]:
    """Demo data is generated once per (size, seed, generator source) and reused: a changed generator writes a new
    directory instead of leaving stale files in place."""
    from pipelines import demo_data
    from pipelines.tracking import code_version, home

    out = home() / "demo-data" / f"{cfg.data.demo_size}-{cfg.seed}-{code_version('pipelines.demo_data')[:8]}"
    files = {name: out / f"{name}.jsonl" for name in FILES}
    if not all(p.is_file() for p in files.values()):
        files = {k: Path(v) for k, v in demo_data.generate(out, size=cfg.data.demo_size, seed=cfg.seed).items()}
    return {k: v for k, v in files.items() if k in FILES}


def datasets(cfg: PipelineConfig) -> dict[str, list[Dataset]]:
    """The configured datasets of every role, paths resolved against the config's directory."""
    if cfg.data.demo:
        return {k: [Dataset(p, DatasetSpec(path=str(p)))] for k, p in _demo_files(cfg).items()}
    out: dict[str, list[Dataset]] = {}
    for role in FILES:
        for spec in getattr(cfg.data, role):
            p = cfg.resolve(spec.path)
            if not p.exists():
                raise MissingInputError(f"{p}: file not found (data.{role})")
            out.setdefault(role, []).append(Dataset(p, spec))
    return out


def text_field(cfg: PipelineConfig, role: str) -> str:
    if role == "general":
        return "text"
    if role == "corpus":
        return cfg.sanitize.field or cfg.data.text_field
    return cfg.data.text_field


def _record_hash(rec: dict[str, Any], seed: int) -> str:
    return hashlib.sha256(f"{seed}\0".encode() + json.dumps(rec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _keep(h: str, fraction: float) -> bool:
    """A deterministic sample: a record is kept when its hash falls in the first ``fraction`` of the hash space."""
    return fraction >= 1.0 or int(h[:12], 16) < fraction * 16 ** 12


def heldout_count(n: int, val_size: float, val_min: int) -> int:
    want = round(val_size * n) if val_size < 1 else int(val_size)
    return min(max(want, val_min), n // 4)


def _cache_key(cfg: PipelineConfig, sets: dict[str, list[Dataset]]) -> str:
    stat = {role: [[str(d.path.resolve()), *_stat(d.path), d.spec.model_dump(mode="json")] for d in ds]
            for role, ds in sets.items()}
    blob = {"data": cfg.data.model_dump(mode="json"), "seed": cfg.seed, "files": stat,
            "fields": {r: text_field(cfg, r) for r in sets}, "code": _code()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def _stat(p: Path) -> list[int]:
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file())
        return [sum(q.stat().st_size for q in files), max((q.stat().st_mtime_ns for q in files), default=0)]
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def _code() -> str:
    from pipelines.tracking import code_version

    return code_version("pipelines.data", "pipelines.formats", "pipelines.records")


def _read_role(cfg: PipelineConfig, role: str, sets: list[Dataset], out: Path, stats: dict) -> list[tuple[str, dict]]:
    """Every record of a role, normalised and sampled, as (hash, record); bad records per the policy. Quarantined
    records go to ``out/<role>.jsonl.rejected.jsonl`` (kept when the run aborts, so the user can see why)."""
    policy = cfg.sanitize.bad_records if role == "corpus" else cfg.data.bad_records
    limit = cfg.sanitize.max_bad_fraction if role == "corpus" else cfg.data.max_bad_fraction
    field = text_field(cfg, role)
    rows: list[tuple[str, dict]] = []
    rejected: list[dict] = []
    for d in sets:
        mine: list[dict] = []
        n_before = len(rows)
        for rec in iter_records(d.path, field, policy, mine, normalizer(role, field, d.spec.format, d.spec.role_tags),
                                d.spec.split):
            h = _record_hash(rec, cfg.seed)
            if _keep(h, d.spec.fraction):
                rows.append((h, rec))
        rejected += [{**r, "file": str(d.path)} for r in mine]
        try:
            check_bad_fraction(d.path, len(rows) - n_before, len(mine), limit, out / f"{role}.jsonl")
        finally:
            _write_rejected(cfg, rejected_path(out / f"{role}.jsonl"), rejected)
    stats["rejected"] = len(rejected)
    if rejected:
        stats["rejected_file"] = str(rejected_path(out / f"{role}.jsonl"))
    if not rows:
        raise BadInputError(sets[0].path, f"no usable records for data.{role}")
    return rows


def _write_rejected(cfg: PipelineConfig, path: Path, rejected: list[dict]) -> None:
    """The raw text of a rejected record may hold PII: masked as sanitize masks it."""
    if not rejected:
        return
    from pipelines.sanitize import sanitize_text

    ents, region = frozenset(cfg.sanitize.entities), cfg.sanitize.phone_region
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, [{**r, "raw": sanitize_text(r["raw"], ents, region)[0]} for r in rejected])


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(dumps_record(r))


def prepare(cfg: PipelineConfig) -> dict[str, Path]:
    """Checked, normalised, split input files by role (cached under ``$TUNEWRIGHT_HOME/inputs``)."""
    from pipelines.tracking import home

    sets = datasets(cfg)
    key = _cache_key(cfg, sets)
    final = home() / "inputs" / key
    if (final / SPLIT).is_file():
        return {r: final / f"{r}.jsonl" for r in FILES if (final / f"{r}.jsonl").is_file()}
    with atomic_dir(final) as tmp:
        split: dict[str, dict[str, Any]] = {}
        rows: dict[str, list[tuple[str, dict]]] = {}
        for role in FILES:
            if role in sets:
                split[role] = {"source": [str(d.path) for d in sets[role]]}
                rows[role] = _read_role(cfg, role, sets[role], final.parent / "rejected" / key, split[role])
        for held, src in HELDOUT_OF.items():
            if held in rows or src not in rows:
                continue
            data = rows[src]
            n_val = heldout_count(len(data), cfg.data.val_size, cfg.data.val_min)
            if n_val < 1:
                raise BadInputError(sets[src][0].path, f"data.{src} has {len(data)} records: too few to hold any out "
                                                       f"for data.{held}; add a data.{held} file")
            cut = sorted(h for h, _ in data)[n_val - 1]
            rows[held] = [(h, r) for h, r in data if h <= cut]
            rows[src] = [(h, r) for h, r in data if h > cut]
            split[held] = {"source": f"held out from data.{src}", "heldout_sha256": sorted(h for h, _ in rows[held])}
        if "prompts" not in rows and "preference" in rows:
            rows["prompts"] = [(h, {"prompt": prompt_of(r), **_meta(r)}) for h, r in rows["preference"]]
            split["prompts"] = {"source": "prompts of the data.preference training pairs"}
        if "eval_prompts" not in rows and "eval_preference" in rows:
            rows["eval_prompts"] = [(h, {"prompt": prompt_of(r), **_meta(r)}) for h, r in rows["eval_preference"]]
            split["eval_prompts"] = {"source": "prompts of the held-out preference pairs"}
        for role in FILES:
            if role in rows:
                _write(tmp / f"{role}.jsonl", [r for _, r in rows[role]])
                split[role]["records"] = len(rows[role])
        (tmp / SPLIT).write_text(json.dumps(split, indent=2, ensure_ascii=False), encoding="utf-8")
    return {r: final / f"{r}.jsonl" for r in FILES if (final / f"{r}.jsonl").is_file()}


def _meta(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in ("messages", "prompt", "chosen", "rejected")}


def split_report(files: dict[str, Path]) -> dict[str, Any]:
    """The ``split.json`` beside prepared files: where each role came from, its counts, held-out hashes."""
    any_file = next(iter(files.values()))
    return json.loads((any_file.parent / SPLIT).read_text(encoding="utf-8"))


def resolve_data(cfg: PipelineConfig) -> dict[str, Path]:
    """Input files by role, prepared (see the module docstring)."""
    return prepare(cfg)


def read_role(path: Path, role: str, field: str = "text", fmt: str = "auto") -> list[dict[str, Any]]:
    """One file of ``role`` in canonical form (every record checked; the first bad one raises), for the
    stages' standalone command lines."""
    return list(iter_records(Path(path), field, "fail", None, normalizer(role, field, fmt)))


def main(argv: list[str] | None = None) -> int:
    from pipelines.config import ConfigError, load_config

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.data CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        files = prepare(load_config(args[0]))
    except (ConfigError, MissingInputError, BadInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for role, info in split_report(files).items():
        src = info["source"] if isinstance(info["source"], str) else ", ".join(info["source"])
        print(f"{role:16s} {info['records']:8d}  {src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

