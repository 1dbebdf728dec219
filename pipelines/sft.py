"""sft: supervised fine-tuning on instruction conversations with TRL's SFTTrainer (LoRA by default, or full).

Reads: ``inputs["sft"]`` (canonical ``{"messages": [...]}`` records, :mod:`pipelines.data`), ``inputs["model"]``
(the dapt model directory). Every conversation is encoded by the one renderer (:mod:`pipelines.chat`: the model's
chat template, or the configured one), and the loss covers the assistant turns only (``completion_only_loss``).
Writes: ``model/`` (LoRA adapter on the dapt model, or full safetensors weights) + tokenizer (with the chat
template used) + manifest, and ``examples.jsonl`` (the first rendered examples: prompt, trained text, token counts).
Run alone (any instruction format :mod:`pipelines.formats` reads)::

    python -m pipelines.sft SFT.json MODEL_DIR OUT_DIR [--epochs 3] [--method lora|full]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.artifacts import StageOutput, read_jsonl, write_jsonl
from pipelines.chat import Renderer
from pipelines.config import PeftConfig, PipelineConfig, SFTStageConfig, TemplateConfig
from pipelines.modeling import LoadSpec, load_spec, seed_everything
from pipelines.training import (
    EXAMPLES, N_EXAMPLES, last_checkpoint, load_trainable, log_history_metrics, lora_config, save_trained,
    trainer_kwargs,
)


def sft(records: list[dict], model_dir: Path, scfg: SFTStageConfig, seed: int, out_dir: Path,
        spec: LoadSpec | None = None, work_dir: Path | None = None,
        template: TemplateConfig | None = None) -> StageOutput:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    seed_everything(seed)
    tokenizer, model = load_trainable(model_dir, scfg.peft, "sft", spec)
    renderer = Renderer.for_model(tokenizer, template or TemplateConfig(), str(model_dir))
    rows = []
    for r in records:
        ids, mask = renderer.encode(r["messages"], scfg.max_length)
        rows.append({"input_ids": ids, "completion_mask": mask if scfg.completion_only_loss else [1] * len(ids)})
    write_jsonl(out_dir / EXAMPLES, [renderer.example(r["messages"], scfg.max_length) for r in records[:N_EXAMPLES]])
    train = Dataset.from_list(rows)
    work_dir = work_dir or out_dir / "checkpoints"
    args = SFTConfig(**trainer_kwargs(scfg, work_dir, seed), max_length=scfg.max_length,
                     completion_only_loss=True, packing=scfg.packing)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=lora_config(scfg.peft))
    trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))
    metrics = log_history_metrics(trainer)
    metrics["train_examples"] = float(len(train))
    metrics["trained_tokens"] = float(sum(sum(r["completion_mask"]) for r in rows))
    save_trained(trainer.model, tokenizer, out_dir / "model",
                 {"stage": "sft", "task": "causal_lm", "config": scfg.model_dump(), "metrics": metrics})
    return StageOutput(primary="model", metrics=metrics,
                       summary=f"{metrics['global_step']:.0f} steps, final loss {metrics.get('train_loss', float('nan')):.3f}")


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    return sft(read_jsonl(inputs["sft"]), inputs["model"], cfg.sft, cfg.seed, out_dir, load_spec(cfg.model),
               inputs.get("work_dir"), cfg.template)


def main(argv: list[str] | None = None) -> int:
    from pipelines.data import read_role
    from pipelines.records import BadInputError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--epochs", type=float, default=SFTStageConfig().epochs)
    ap.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    args = ap.parse_args(argv)
    try:
        records = read_role(args.pairs, "sft")
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scfg = SFTStageConfig(epochs=args.epochs, peft=PeftConfig(method=args.method))
    print(sft(records, args.model_dir, scfg, 0, args.out_dir).summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
