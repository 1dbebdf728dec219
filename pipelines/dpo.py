"""dpo: direct preference optimisation with TRL's DPOTrainer; the reference is the SFT model.

Reads: ``inputs["preference"]`` (JSONL ``prompt``/``chosen``/``rejected``), ``inputs["model"]`` (the SFT model,
merged to full weights). With LoRA (default) the reference is the same network with the adapter disabled, so no
second copy of the model is held. ``dpo.loss_type`` selects TRL's variants (sigmoid = DPO, ipo, robust, hinge...).
Writes: ``model/`` (LoRA adapter on the SFT model, or full weights) + tokenizer + manifest. Run alone::

    python -m pipelines.dpo PAIRS.jsonl MODEL_DIR OUT_DIR [--loss-type sigmoid]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.artifacts import StageOutput, read_jsonl
from pipelines.config import DPOStageConfig, PipelineConfig
from pipelines.modeling import load_model, load_tokenizer, seed_everything
from pipelines.training import (
    check_peft_supported, last_checkpoint, quantization_config, log_history_metrics, lora_config, save_trained, trainer_kwargs,
)


def loss_kwargs(dcfg: DPOStageConfig) -> dict:
    """TRL's loss list: the configured preference loss, plus the chosen answer's NLL when ``sft_loss_weight`` > 0."""
    if dcfg.sft_loss_weight > 0:
        return {"loss_type": [dcfg.loss_type, "sft"], "loss_weights": [1.0, dcfg.sft_loss_weight]}
    return {"loss_type": [dcfg.loss_type]}


def dpo(pairs: list[dict], model_dir: Path, dcfg: DPOStageConfig, seed: int, out_dir: Path,
        trust_remote_code: bool = False, work_dir: Path | None = None) -> StageOutput:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    check_peft_supported(dcfg.peft, "dpo")
    seed_everything(seed)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    qcfg = quantization_config(dcfg.peft)
    model = load_model(model_dir, trust_remote_code=trust_remote_code,
                       **({"quantization_config": qcfg} if qcfg is not None else {}))
    peft_cfg = lora_config(dcfg.peft)
    ref = None if peft_cfg is not None else load_model(model_dir, trust_remote_code=trust_remote_code)
    train = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    work_dir = work_dir or out_dir / "checkpoints"
    args = DPOConfig(**trainer_kwargs(dcfg, work_dir, seed), max_length=dcfg.max_length, beta=dcfg.beta,
                     label_smoothing=dcfg.label_smoothing, **loss_kwargs(dcfg))
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_cfg)
    trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))
    metrics = log_history_metrics(trainer)
    save_trained(trainer.model, tokenizer, out_dir / "model",
                 {"stage": "dpo", "task": "causal_lm", "config": dcfg.model_dump(), "metrics": metrics})
    acc = metrics.get("rewards/accuracies", float("nan"))
    return StageOutput(primary="model", metrics=metrics,
                       summary=f"{metrics['global_step']:.0f} steps, implicit reward accuracy {acc:.3f}")


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    return dpo(read_jsonl(inputs["preference"]), inputs["model"], cfg.dpo, cfg.seed, out_dir,
               cfg.model.trust_remote_code, inputs.get("work_dir"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--loss-type", default="sigmoid")
    ap.add_argument("--beta", type=float, default=DPOStageConfig().beta)
    args = ap.parse_args(argv)
    if not args.pairs.is_file():
        print(f"error: {args.pairs}: file not found", file=sys.stderr)
        return 2
    dcfg = DPOStageConfig(loss_type=args.loss_type, beta=args.beta)
    print(dpo(read_jsonl(args.pairs), args.model_dir, dcfg, 0, args.out_dir).summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
