"""Base models, loading and saving: the one place that touches ``from_pretrained``/``save_pretrained``.

Reads: a hub id or local model directory (``model.name_or_path``), or builds ``model.scratch``: a BPE tokenizer
trained on the run's texts and a small Llama, briefly pretrained on generic text so that "base" is a general
language model that has never seen the domain.
Writes: Hugging Face model directories (safetensors only) with a ``tunewright_manifest.json`` beside the weights
(stage, kind = full | adapter, task, base reference, config, metrics, library versions).

Run alone to build the scratch base of a config::

    python -m pipelines.modeling pipelines/configs/demo.yaml OUT_DIR
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pipelines.artifacts import ArtifactRef, atomic_dir, sha256_json, sha256_path, write_json
from pipelines.config import ModelConfig, ScratchModelConfig

MANIFEST = "tunewright_manifest.json"
Task = Literal["causal_lm", "reward"]
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def torch_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


# ------------------------------------------------------------------------------------------------ scratch model
CJK_RUN = r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]+"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on ``texts`` (so Chinese and English both tokenise without unknowns)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Han/kana/full-width runs are split from Latin first: byte-level BPE alone treats "Glunav的价格是" as one word
    # and learns it as one token, so a name inside Chinese text never shares a token with the name elsewhere.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK_RUN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def scratch_fingerprint(scfg: ScratchModelConfig, seed: int, text_shas: Sequence[str]) -> str:
    from pipelines.tracking import code_version

    return sha256_json({"scratch": scfg.model_dump(), "seed": seed, "texts": list(text_shas),
                        "code": code_version("pipelines.modeling")})[:32]


def build_scratch(scfg: ScratchModelConfig, tokenizer_texts: list[str], general_texts: list[str], seed: int,
                  out_dir: Path) -> None:
    """Tokenizer + random Llama + ``general_pretrain_steps`` of causal LM on generic text; saved to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything(seed)
    tokenizer = train_tokenizer(tokenizer_texts + general_texts, scfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=scfg.hidden_size, intermediate_size=scfg.intermediate_size,
        num_hidden_layers=scfg.num_layers, num_attention_heads=scfg.num_heads, num_key_value_heads=scfg.num_heads,
        max_position_embeddings=scfg.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if scfg.general_pretrain_steps and general_texts:
        _pretrain(model, tokenizer, general_texts, scfg.general_pretrain_steps, seed)
    save_model(model, tokenizer, out_dir, {"stage": "base", "kind": "full", "task": "causal_lm",
                                            "scratch": scfg.model_dump(), "seed": seed})


def pack_blocks(tokenizer, texts: Iterable[str], block: int) -> list[list[int]]:
    """Concatenate texts (EOS between them, order kept) and cut into blocks of ``block`` tokens."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return [ids[i: i + block] for i in range(0, len(ids) - block // 4, block)]


def pack_documents(tokenizer, texts: Iterable[str], block: int) -> list[dict[str, list[int]]]:
    """Whole documents packed in order into rows of exactly ``block`` tokens, each document on its own.

    Each row carries ``position_ids`` that restart at 0 for every document: transformers then masks attention to
    the block diagonal (SDPA and flash attention, no attention mask), so a document never sees the one before it.
    ``labels`` are -100 on each document's first token (nothing before it predicts it) and on padding. A
    document longer than ``block`` is cut into ``block``-sized pieces, each its own document; a document is never
    split across rows otherwise. Without this, plain concatenation cuts the same stream into the same blocks every
    epoch, and a small model memorises each block from the documents before it instead of learning each fact
    from its own sentence (held-out QA stayed at the majority-answer baseline that way).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[dict[str, list[int]]] = []
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}

    def flush() -> None:
        n = block - len(row["input_ids"])
        if n < block:
            row["input_ids"] += [pad] * n
            row["labels"] += [-100] * n
            row["position_ids"] += list(range(n))
            rows.append({k: list(v) for k, v in row.items()})
            for v in row.values():
                v.clear()

    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for piece in (ids[i: i + block] for i in range(0, len(ids), block)):
            if len(row["input_ids"]) + len(piece) > block:
                flush()
            row["input_ids"] += piece
            row["labels"] += [-100] + piece[1:]
            row["position_ids"] += list(range(len(piece)))
    flush()
    return rows


def _pretrain(model, tokenizer, texts: list[str], steps: int, seed: int, block: int = 128, batch: int = 16) -> None:
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    blocks = [b for b in pack_blocks(tokenizer, texts, block) if len(b) == block]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in tqdm(range(steps), desc="base: general pretraining", file=sys.stderr, mininterval=5):
        x = torch.tensor(rng.sample(blocks, min(batch, len(blocks))))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


# -------------------------------------------------------------------------------------------------- base models
def base_ref(mcfg: ModelConfig, scratch_dir: Path | None = None, scratch_fp: str | None = None) -> ArtifactRef:
    """A reference for the configured base model (a hub id, a local directory, or a built scratch model)."""
    if mcfg.scratch is not None:
        assert scratch_dir is not None and scratch_fp is not None
        return ArtifactRef(None, str(scratch_dir), scratch_fp, "base")
    p = Path(mcfg.name_or_path).expanduser()
    if p.is_dir():
        return ArtifactRef(None, str(p.resolve()), sha256_path(p), "base")
    return ArtifactRef(None, mcfg.name_or_path, sha256_json([mcfg.name_or_path, mcfg.revision]), "base")


@dataclass(frozen=True)
class LoadSpec:
    """How every stage loads a model: one description from ``model.*``, used for every load of the run.

    ``revision`` pins the configured hub model (``base``) only; the run's own checkpoints are local directories.
    """

    trust_remote_code: bool = False
    dtype: str = "float32"
    device: str = "auto"
    base: str | None = None
    revision: str | None = None

    def kwargs(self, path: str | Path) -> dict[str, Any]:
        """Keyword arguments for :func:`load_model` / :func:`load_tokenizer` of ``path``."""
        kw: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision and self.base is not None and str(path) == self.base:
            kw["revision"] = self.revision
        return kw

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def load_spec(mcfg: ModelConfig) -> LoadSpec:
    return LoadSpec(mcfg.trust_remote_code, mcfg.dtype, mcfg.device, mcfg.name_or_path, mcfg.revision)


def _load_kwargs(trust_remote_code: bool, revision: str | None = None) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kw["revision"] = revision
    return kw


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), **_load_kwargs(trust_remote_code, revision))
    if tok.pad_token is None:  # decoder-only checkpoints often ship without one
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, task: Task = "causal_lm", trust_remote_code: bool = False, dtype: str = "float32",
               revision: str | None = None, **kwargs: Any):
    """Load full weights from safetensors only (``use_safetensors=True`` refuses pickled ``.bin`` weights)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    extra = {"num_labels": 1} if task == "reward" else {}
    model = cls.from_pretrained(str(path), use_safetensors=True, dtype=torch_dtype(dtype),
                                **_load_kwargs(trust_remote_code, revision), **extra, **kwargs)
    if task == "reward" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def read_manifest(model_dir: Path) -> dict[str, Any]:
    p = Path(model_dir) / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else {"kind": "full", "task": "causal_lm"}


_WALL_CLOCK = ("_runtime", "_per_second", "_seconds")


def reproducible(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` without the wall-clock numbers (``train_runtime``, ``*_per_second``, ``*_seconds``).

    The manifest is part of the stage's output and so of its content hash: a recompute that yields the same
    weights must yield the same hash, or every later stage's cache misses. Timings stay in MLflow's metrics.
    """
    return {k: v for k, v in metrics.items() if not k.endswith(_WALL_CLOCK)}


def save_model(model, tokenizer, out_dir: Path, manifest: dict[str, Any],
               transform: Callable[[Path], None] | None = None) -> None:
    """Save weights (safetensors), tokenizer and manifest into ``out_dir`` atomically (temp dir, then rename);
    ``transform`` edits the saved weights in the temp dir first (e.g. :func:`pipelines.training.scale_update`)."""
    if isinstance(manifest.get("metrics"), dict):
        manifest = {**manifest, "metrics": reproducible(manifest["metrics"])}
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if transform is not None:
            transform(tmp)
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / MANIFEST, {**manifest, "versions": versions()})
        check_saved(tmp)


def require_score_head(model_dir: Path) -> None:
    """A saved reward model must carry its score head (a classifier saved without it scores at random)."""
    from safetensors import safe_open

    keys: set[str] = set()
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    if not any("score" in k for k in keys):
        raise RuntimeError(f"{model_dir}: the saved reward model has no score head")


def check_saved(model_dir: Path) -> None:
    """Fail loudly on the classic broken saves: no weights, pickled weights, empty tensors (ZeRO-3 adapters)."""
    from safetensors import safe_open

    files = list(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"{model_dir}: no safetensors weights were written")
    if list(Path(model_dir).glob("*.bin")):
        raise RuntimeError(f"{model_dir}: pickled .bin weights written; only safetensors are allowed")
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if st.get_slice(k).get_shape() and 0 in st.get_slice(k).get_shape():
                    raise RuntimeError(f"{f.name}: tensor {k} is empty (a ZeRO-3 save without gathering?)")


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, spec: LoadSpec | None = None) -> None:
    """Base + PEFT adapter -> one full model directory (what the next stage loads)."""
    from peft import PeftModel

    spec = spec or LoadSpec()
    manifest = read_manifest(adapter_dir)
    task: Task = manifest.get("task", "causal_lm")
    base = load_model(base_dir, task=task, dtype=spec.dtype, **spec.kwargs(base_dir))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tokenizer = load_tokenizer(adapter_dir, spec.trust_remote_code)
    save_model(merged, tokenizer, out_dir, {**manifest, "kind": "full", "merged_from": manifest.get("stage")})


def materialize(ref: ArtifactRef, spec: LoadSpec | None = None) -> Path:
    """A local path for a stage input: a data file, or a full-weights model directory (adapters merged onto their
    base, recursively, once per content hash under ``$TUNEWRIGHT_HOME/cache/merged/``)."""
    from pipelines import tracking

    path = tracking.fetch(ref)
    if path.is_dir() and (path / "records.jsonl").is_file():
        return path / "records.jsonl"
    if path.is_dir() and (path / MANIFEST).is_file() and read_manifest(path).get("kind") == "adapter":
        merged = tracking.home() / "cache" / "merged" / ref.sha256
        if not merged.exists():
            base = ArtifactRef.from_dict(read_manifest(path)["base"])
            merge_adapter(materialize(base, spec), path, merged, spec)
        return merged
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    from pipelines.config import ConfigError, load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.model.scratch is None:
        print("error: this config uses model.name_or_path; nothing to build", file=sys.stderr)
        return 2
    from pipelines.data import resolve_data

    files = resolve_data(cfg)
    from pipelines.artifacts import read_jsonl

    texts = [r[cfg.data.text_field] for r in read_jsonl(files["corpus"])]
    general = [r["text"] for r in read_jsonl(files["general"])] if "general" in files else []
    build_scratch(cfg.model.scratch, texts, general, cfg.seed, args.out_dir)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
