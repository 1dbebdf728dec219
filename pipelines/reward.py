"""reward: a reward model (sequence classifier, one score) trained on preference pairs with TRL's RewardTrainer.

Reads: ``inputs["preference"]`` and ``inputs["eval_preference"]`` (JSONL ``prompt``/``chosen``/``rejected``),
``inputs["model"]`` (the SFT model, merged to full weights).
Writes: ``model/`` (full weights with the ``score`` head, or a LoRA adapter that saves the head too), manifest,
``eval_scores.jsonl``. Held-out pairwise accuracy is logged as ``pairwise_accuracy`` (and on the parent run as
``reward/pairwise_accuracy``). After saving, the model is reloaded from disk and must give the same scores: a
missing score head (a known failure of ZeRO-3 saves) fails the stage. Run alone::

    python -m pipelines.reward PAIRS.jsonl EVAL_PAIRS.jsonl MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipelines.artifacts import StageOutput, read_jsonl, write_jsonl
from pipelines.config import PipelineConfig, RewardStageConfig
from pipelines.modeling import load_model, load_tokenizer, seed_everything
from pipelines.training import (
    check_peft_supported, last_checkpoint, quantization_config, log_history_metrics, lora_config, save_trained, trainer_kwargs,
)


@torch.inference_mode()
def score(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 32,
          max_length: int = 512) -> torch.Tensor:
    """Reward of each ``prompt + completion + EOS`` (the text RewardTrainer trains on), batched, length-sorted."""
    texts = [p + c + (tokenizer.eos_token or "") for p, c in zip(prompts, completions)]
    enc = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
    out = torch.empty(len(texts))
    pad = tokenizer.pad_token_id
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, : len(enc[i])] = torch.tensor(enc[i])
            mask[row, : len(enc[i])] = 1
        device = next(model.parameters()).device
        out[idx] = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().cpu()
    return out


def pairwise_accuracy(model, tokenizer, pairs: list[dict]) -> tuple[float, list[dict]]:
    model.eval()
    prompts = [p["prompt"] for p in pairs]
    chosen = score(model, tokenizer, prompts, [p["chosen"] for p in pairs])
    rejected = score(model, tokenizer, prompts, [p["rejected"] for p in pairs])
    rows = [{"prompt": p["prompt"], "chosen_score": round(float(c), 4), "rejected_score": round(float(r), 4),
             "correct": bool(c > r)} for p, c, r in zip(pairs, chosen, rejected)]
    return float((chosen > rejected).float().mean()) if pairs else float("nan"), rows


def reward(pairs: list[dict], eval_pairs: list[dict], model_dir: Path, rcfg: RewardStageConfig, seed: int,
           out_dir: Path, trust_remote_code: bool = False, work_dir: Path | None = None) -> StageOutput:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    check_peft_supported(rcfg.peft, "reward")
    seed_everything(seed)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    qcfg = quantization_config(rcfg.peft)
    model = load_model(model_dir, task="reward", trust_remote_code=trust_remote_code,
                       **({"quantization_config": qcfg} if qcfg is not None else {}))
    train = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    work_dir = work_dir or out_dir / "checkpoints"
    args = RewardConfig(**trainer_kwargs(rcfg, work_dir, seed), max_length=rcfg.max_length)
    # LoRA reward models must save the freshly initialised score head with the adapter.
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                            peft_config=lora_config(rcfg.peft, "SEQ_CLS", modules_to_save=["score"]))
    trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))
    metrics = log_history_metrics(trainer)
    acc, rows = pairwise_accuracy(trainer.model, tokenizer, eval_pairs)
    metrics["pairwise_accuracy"] = acc
    metrics["train_pairwise_accuracy"] = pairwise_accuracy(trainer.model, tokenizer, pairs[:256])[0]
    save_trained(trainer.model, tokenizer, out_dir / "model",
                 {"stage": "reward", "task": "reward", "config": rcfg.model_dump(), "metrics": metrics})
    write_jsonl(out_dir / "eval_scores.jsonl", rows)
    _check_score_head(out_dir / "model", trainer.model, tokenizer, eval_pairs[:8])
    return StageOutput(primary="model", metrics=metrics, parent_metrics={"reward/pairwise_accuracy": acc},
                       summary=f"held-out pairwise accuracy {acc:.3f} on {len(eval_pairs)} pairs")


def _check_score_head(saved: Path, live, tokenizer, pairs: list[dict]) -> None:
    """Reload what was saved, without the trainer, and insist it scores like the live model (head present)."""
    from pipelines.modeling import require_score_head

    require_score_head(saved)
    if (saved / "adapter_config.json").exists() or not pairs:
        return  # an adapter is checked once merged (tasks/), where its base is available
    reloaded = load_model(saved, task="reward")
    a = score(live.eval(), tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    b = score(reloaded.eval(), tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    if not torch.allclose(a, b, atol=1e-3):
        raise RuntimeError(f"{saved}: reloaded reward model scores differ from the trained one ({a[:3]} vs {b[:3]})")


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    return reward(read_jsonl(inputs["preference"]), read_jsonl(inputs["eval_preference"]), inputs["model"],
                  cfg.reward, cfg.seed, out_dir, cfg.model.trust_remote_code, inputs.get("work_dir"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", type=Path)
    ap.add_argument("eval_pairs", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--epochs", type=float, default=RewardStageConfig().epochs)
    args = ap.parse_args(argv)
    for p in (args.pairs, args.eval_pairs):
        if not p.is_file():
            print(f"error: {p}: file not found", file=sys.stderr)
            return 2
    out = reward(read_jsonl(args.pairs), read_jsonl(args.eval_pairs), args.model_dir,
                 RewardStageConfig(epochs=args.epochs), 0, args.out_dir)
    print(out.summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
