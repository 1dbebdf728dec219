"""Shared fixtures: a temporary MLflow store and Prefect home per test session, offline hub access."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "configs" / "tiny.yaml"

# Nothing in the tests may reach a model hub: everything is built from scratch or shipped by a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TUNEWRIGHT_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def tw_home(tmp_path_factory) -> Path:
    """TUNEWRIGHT_HOME + a sqlite MLflow store in a temporary directory, for the whole session."""
    home = tmp_path_factory.mktemp("tunewright")
    os.environ["TUNEWRIGHT_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return home


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real, temporary Prefect API (Prefect's own test harness: a local server on a temporary database)."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def copy_config(src: Path, dst_dir: Path, name: str | None = None, edit=None) -> Path:
    """Copy a config (optionally editing its YAML dict) into dst_dir; the stem is the pipeline name."""
    import yaml

    data = yaml.safe_load(src.read_text())
    if edit is not None:
        edit(data)
    dst = dst_dir / f"{name or src.stem}.yaml"
    dst.write_text(yaml.safe_dump(data, sort_keys=False))
    return dst
