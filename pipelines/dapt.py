"""dapt: domain-adaptive continued pretraining (causal LM) on the curriculum-ordered corpus.

Reads: ``inputs["records"]`` (curriculum output, in training order), ``inputs["model"]`` (base model directory).
With ``dapt.mix_sft`` > 0, ``inputs["sft"]`` (the sft pairs) is replayed as text, spread evenly through that order.
Writes: ``model/`` (full safetensors weights, or a LoRA adapter when ``dapt.peft.method`` is lora) + tokenizer +
manifest. Whole texts are packed in curriculum order into ``max_length`` rows, each text attending only to itself
(``modeling.pack_documents``); the trainer reads the rows sequentially, so each epoch goes easy -> hard. Run alone::

    python -m pipelines.dapt RECORDS.jsonl MODEL_DIR OUT_DIR [--epochs 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.artifacts import StageOutput, read_jsonl
from pipelines.config import DaptConfig, PipelineConfig
from pipelines.modeling import load_model, load_tokenizer, pack_documents, seed_everything
from pipelines.training import (
    check_peft_supported, last_checkpoint, quantization_config, log_history_metrics, lora_config, save_trained, sequential, trainer_kwargs,
)


def interleave(texts: list[str], extra: list[str]) -> list[str]:
    """``extra`` spread evenly through ``texts``, keeping both orders (the curriculum order survives)."""
    if not extra:
        return list(texts)
    keyed = [(i / max(len(texts), 1), 0, i) for i in range(len(texts))]
    keyed += [((j + 0.5) / len(extra), 1, j) for j in range(len(extra))]
    return [texts[i] if src == 0 else extra[i] for _, src, i in sorted(keyed)]


def replay_texts(pairs: list[dict], copies: float) -> list[str]:
    """``copies`` x the sft pairs as plain text (a fractional part takes a prefix of one more copy)."""
    whole, part = int(copies), copies - int(copies)
    texts = [p["prompt"] + p["completion"] for p in pairs]
    return texts * whole + texts[: round(part * len(texts))]


def block_dataset(tokenizer, texts: list[str], block: int):
    from datasets import Dataset

    return Dataset.from_list(pack_documents(tokenizer, texts, block))


def dapt(texts: list[str], model_dir: Path, dcfg: DaptConfig, seed: int, out_dir: Path,
         trust_remote_code: bool = False, work_dir: Path | None = None) -> StageOutput:
    from transformers import Trainer, TrainingArguments

    check_peft_supported(dcfg.peft, "dapt")
    seed_everything(seed)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    qcfg = quantization_config(dcfg.peft)
    model = load_model(model_dir, trust_remote_code=trust_remote_code,
                       **({"quantization_config": qcfg} if qcfg is not None else {}))
    peft_cfg = lora_config(dcfg.peft)
    if peft_cfg is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_cfg)
    train = block_dataset(tokenizer, texts, dcfg.max_length)
    # Packed rows rely on position_ids for the block-diagonal mask, which transformers skips when a KV cache is made.
    use_cache, model.config.use_cache = model.config.use_cache, False
    work_dir = work_dir or out_dir / "checkpoints"
    args = TrainingArguments(**trainer_kwargs(dcfg, work_dir, seed))
    trainer = sequential(Trainer)(model=model, args=args, train_dataset=train)
    trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))
    metrics = log_history_metrics(trainer)
    model.config.use_cache = use_cache
    metrics["train_blocks"] = float(len(train))
    metrics["train_tokens_per_epoch"] = float(sum(x != -100 for b in train["labels"] for x in b))  # with a loss
    save_trained(trainer.model, tokenizer, out_dir / "model",
                 {"stage": "dapt", "task": "causal_lm", "config": dcfg.model_dump(), "metrics": metrics})
    return StageOutput(primary="model", metrics=metrics,
                       summary=f"{metrics['global_step']:.0f} steps, final loss {metrics.get('train_loss', float('nan')):.3f}")


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    texts = [r[cfg.data.text_field] for r in read_jsonl(inputs["records"])]
    if cfg.dapt.mix_sft > 0:
        texts = interleave(texts, replay_texts(read_jsonl(inputs["sft"]), cfg.dapt.mix_sft))
    return dapt(texts, inputs["model"], cfg.dapt, cfg.seed, out_dir, cfg.model.trust_remote_code,
                inputs.get("work_dir"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--field", default="text")
    ap.add_argument("--epochs", type=float, default=DaptConfig().epochs)
    args = ap.parse_args(argv)
    if not args.records.is_file():
        print(f"error: {args.records}: file not found", file=sys.stderr)
        return 2
    texts = [r[args.field] for r in read_jsonl(args.records)]
    print(dapt(texts, args.model_dir, DaptConfig(epochs=args.epochs), 0, args.out_dir).summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
