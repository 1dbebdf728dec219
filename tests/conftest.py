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


def tiny_llama(texts: list[str], repeat: int, vocab: int = 300):
    """A 1-layer, 32-wide random-init Llama and a BPE tokenizer trained on ``texts * repeat`` (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.modeling import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(texts * repeat, vocab)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id))
    return model, tok
