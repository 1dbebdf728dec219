"""sft: supervised fine-tuning on instruction pairs with TRL's SFTTrainer (LoRA by default, or full).

Reads: ``inputs["sft"]`` (JSONL with ``prompt`` and ``completion``), ``inputs["model"]`` (the dapt model directory).
Writes: ``model/`` (LoRA adapter on the dapt model, or full safetensors weights) + tokenizer + manifest.
The loss covers the completion tokens only (``completion_only_loss``). Run alone::

    python -m pipelines.sft SFT.jsonl MODEL_DIR OUT_DIR [--epochs 3] [--method lora|full]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.artifacts import StageOutput, read_jsonl
from pipelines.config import PeftConfig, PipelineConfig, SFTStageConfig
from pipelines.modeling import load_model, load_tokenizer, seed_everything
from pipelines.training import (
    check_peft_supported, last_checkpoint, log_history_metrics, lora_config, quantization_config, save_trained,
    trainer_kwargs,
)


def sft(pairs: list[dict], model_dir: Path, scfg: SFTStageConfig, seed: int, out_dir: Path,
        trust_remote_code: bool = False, work_dir: Path | None = None) -> StageOutput:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    check_peft_supported(scfg.peft, "sft")
    seed_everything(seed)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    qcfg = quantization_config(scfg.peft)
    model = load_model(model_dir, trust_remote_code=trust_remote_code,
                       **({"quantization_config": qcfg} if qcfg is not None else {}))
    train = Dataset.from_list([{"prompt": p["prompt"], "completion": p["completion"]} for p in pairs])
    work_dir = work_dir or out_dir / "checkpoints"
    args = SFTConfig(**trainer_kwargs(scfg, work_dir, seed), max_length=scfg.max_length,
                     completion_only_loss=scfg.completion_only_loss, packing=scfg.packing)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=lora_config(scfg.peft))
    trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))
    metrics = log_history_metrics(trainer)
    metrics["train_examples"] = float(len(train))
    save_trained(trainer.model, tokenizer, out_dir / "model",
                 {"stage": "sft", "task": "causal_lm", "config": scfg.model_dump(), "metrics": metrics})
    return StageOutput(primary="model", metrics=metrics,
                       summary=f"{metrics['global_step']:.0f} steps, final loss {metrics.get('train_loss', float('nan')):.3f}")


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    return sft(read_jsonl(inputs["sft"]), inputs["model"], cfg.sft, cfg.seed, out_dir, cfg.model.trust_remote_code,
               inputs.get("work_dir"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--epochs", type=float, default=SFTStageConfig().epochs)
    ap.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    args = ap.parse_args(argv)
    if not args.pairs.is_file():
        print(f"error: {args.pairs}: file not found", file=sys.stderr)
        return 2
    scfg = SFTStageConfig(epochs=args.epochs, peft=PeftConfig(method=args.method))
    print(sft(read_jsonl(args.pairs), args.model_dir, scfg, 0, args.out_dir).summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
