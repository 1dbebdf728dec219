"""Artifacts passed between stages: references, content hashes, manifests and atomic writes.

A stage never hands the next one a local path: it hands an :class:`ArtifactRef` (MLflow run id, artifact path,
sha256 of the content, stage). ``tasks/`` turns a reference back into a local directory through MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True)
class ArtifactRef:
    """Where a stage output lives: ``run_id`` + ``artifact_path`` in MLflow, with its content hash.

    ``run_id`` is None for inputs that are not MLflow artifacts (a data file, a hub model id, a scratch model spec);
    then ``artifact_path`` is that file, id or spec and ``sha256`` its content (or spec) hash.
    """

    run_id: str | None
    artifact_path: str
    sha256: str
    stage: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArtifactRef:
        return cls(**d)


@dataclass
class StageOutput:
    """What a stage function returns. Files live under the stage's ``out_dir``; ``tasks/`` logs all of it.

    ``primary`` is the artifact path (relative to ``out_dir``) that the next stage consumes, e.g. ``data`` or
    ``model``. ``metrics`` go to the stage's MLflow child run (``parent_metrics`` to the parent run).
    """

    primary: str
    metrics: dict[str, float] = field(default_factory=dict)
    parent_metrics: dict[str, float] = field(default_factory=dict)
    summary: str = ""  # markdown shown in the Prefect artifact / printed by the CLI
    outputs: dict[str, str] = field(default_factory=dict)  # further named outputs (relative paths) for later stages


def sha256_file(path: Path, h: Any | None = None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    """Content hash of a file, or of a directory (relative names + contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextmanager
def atomic_write(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write to a temporary name beside ``path`` and rename on success: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``path``, then swap it into place: never half a directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_write(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file that tunewright itself wrote (trusted). Untrusted input goes through ``pipelines.records``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, default=str)
