"""reward: a reward model (sequence classifier, one score) trained on preference pairs with TRL's RewardTrainer.

Reads: ``inputs["preference"]`` and ``inputs["eval_preference"]`` (canonical ``prompt`` / ``chosen`` / ``rejected``
records), ``inputs["model"]`` (the SFT model, merged to full weights). Each pair is encoded by the one renderer
(:mod:`pipelines.chat`), prompt and answer exactly as the chat template writes them, and scored the same way.
Writes: ``model/`` (full weights with the ``score`` head, or a LoRA adapter that saves the head too), manifest,
``eval_scores.jsonl``, ``examples.jsonl``. Held-out pairwise accuracy is logged as ``pairwise_accuracy`` (and on the
parent run as ``reward/pairwise_accuracy``). After saving, the model is reloaded from disk and must give the same
scores: a missing score head (a known failure of ZeRO-3 saves) fails the stage. Run alone::

    python -m pipelines.reward PAIRS.jsonl EVAL_PAIRS.jsonl MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from pipelines.artifacts import StageOutput, read_jsonl, write_jsonl
from pipelines.chat import Renderer
from pipelines.config import PipelineConfig, RewardStageConfig, TemplateConfig
from pipelines.modeling import LoadSpec, load_model, load_spec, seed_everything
from pipelines.training import (
    EXAMPLES, N_EXAMPLES, last_checkpoint, load_trainable, log_history_metrics, lora_config, save_trained, trainer_kwargs,
)


@torch.inference_mode()
def score_ids(model, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Reward of each token sequence (the score at its last token), batched, length-sorted, on the model's device."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs))
    device = next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i])] = torch.tensor(list(seqs[i]))
            mask[row, : len(seqs[i])] = 1
        out[idx] = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().cpu()
    return out


def score(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 32,
          max_length: int = 512, suffix: str | None = None) -> torch.Tensor:
    """Reward of already-rendered ``prompt + completion + suffix`` texts (``suffix``: the template's end of turn,
    EOS by default), for rollouts whose prompts are rendered text (ppo, grpo)."""
    end = tokenizer.eos_token or "" if suffix is None else suffix
    enc = tokenizer([p + c + end for p, c in zip(prompts, completions)], truncation=True, max_length=max_length)
    return score_ids(model, enc["input_ids"], tokenizer.pad_token_id, batch_size)


def score_answers(model, renderer: Renderer, prompts: Sequence[Sequence[dict]], answers: Sequence[str],
                  max_length: int = 512, batch_size: int = 32) -> torch.Tensor:
    """Reward of each answer to its prompt (message lists), encoded by the renderer as in training."""
    seqs = [sum(renderer.encode_pair(p, a, max_length), []) for p, a in zip(prompts, answers)]
    return score_ids(model, seqs, renderer.tokenizer.pad_token_id, batch_size)


def pairwise_accuracy(model, renderer: Renderer, pairs: list[dict], max_length: int = 512) -> tuple[float, list[dict]]:
    model.eval()
    prompts = [p["prompt"] for p in pairs]
    chosen = score_answers(model, renderer, prompts, [p["chosen"] for p in pairs], max_length)
    rejected = score_answers(model, renderer, prompts, [p["rejected"] for p in pairs], max_length)
    rows = [{"prompt": p["prompt"], "chosen_score": round(float(c), 4), "rejected_score": round(float(r), 4),
             "correct": bool(c > r)} for p, c, r in zip(pairs, chosen, rejected)]
    return float((chosen > rejected).float().mean()) if pairs else float("nan"), rows


def reward(pairs: list[dict], eval_pairs: list[dict], model_dir: Path, rcfg: RewardStageConfig, seed: int,
           out_dir: Path, spec: LoadSpec | None = None, work_dir: Path | None = None,
           template: TemplateConfig | None = None) -> StageOutput:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    seed_everything(seed)
    tokenizer, model = load_trainable(model_dir, rcfg.peft, "reward", spec, task="reward")
    renderer = Renderer.for_model(tokenizer, template or TemplateConfig(), str(model_dir))
    rows = [renderer.encode_preference(p, rcfg.max_length) for p in pairs]
    train = Dataset.from_list([{"chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                                "rejected_ids": r["prompt_ids"] + r["rejected_ids"]} for r in rows])
    write_jsonl(out_dir / EXAMPLES, [renderer.preference_example(p, rcfg.max_length) for p in pairs[:N_EXAMPLES]])
    work_dir = work_dir or out_dir / "checkpoints"
    args = RewardConfig(**trainer_kwargs(rcfg, work_dir, seed), max_length=rcfg.max_length)
    # LoRA reward models must save the freshly initialised score head with the adapter.
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                            peft_config=lora_config(rcfg.peft, "SEQ_CLS", modules_to_save=["score"]))
    trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))
    metrics = log_history_metrics(trainer)
    acc, eval_rows = pairwise_accuracy(trainer.model, renderer, eval_pairs, rcfg.max_length)
    metrics["pairwise_accuracy"] = acc
    metrics["train_pairwise_accuracy"] = pairwise_accuracy(trainer.model, renderer, pairs[:256], rcfg.max_length)[0]
    save_trained(trainer.model, tokenizer, out_dir / "model",
                 {"stage": "reward", "task": "reward", "config": rcfg.model_dump(), "metrics": metrics})
    write_jsonl(out_dir / "eval_scores.jsonl", eval_rows)
    _check_score_head(out_dir / "model", trainer.model, renderer, eval_pairs[:8], spec or LoadSpec())
    return StageOutput(primary="model", metrics=metrics, parent_metrics={"reward/pairwise_accuracy": acc},
                       summary=f"held-out pairwise accuracy {acc:.3f} on {len(eval_pairs)} pairs")


def _check_score_head(saved: Path, live, renderer: Renderer, pairs: list[dict], spec: LoadSpec) -> None:
    """Reload what was saved, without the trainer, and insist it scores like the live model (head present)."""
    from pipelines.modeling import require_score_head

    require_score_head(saved)
    if (saved / "adapter_config.json").exists() or not pairs:
        return  # an adapter is checked once merged (tasks/), where its base is available
    reloaded = load_model(saved, task="reward", dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
    reloaded.to(next(live.parameters()).device)
    prompts, chosen = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    a = score_answers(live.eval(), renderer, prompts, chosen)
    b = score_answers(reloaded.eval(), renderer, prompts, chosen)
    if not torch.allclose(a, b, atol=1e-3):
        raise RuntimeError(f"{saved}: reloaded reward model scores differ from the trained one ({a[:3]} vs {b[:3]})")


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    return reward(read_jsonl(inputs["preference"]), read_jsonl(inputs["eval_preference"]), inputs["model"],
                  cfg.reward, cfg.seed, out_dir, load_spec(cfg.model), inputs.get("work_dir"), cfg.template)


def main(argv: list[str] | None = None) -> int:
    from pipelines.data import read_role
    from pipelines.records import BadInputError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", type=Path)
    ap.add_argument("eval_pairs", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--epochs", type=float, default=RewardStageConfig().epochs)
    args = ap.parse_args(argv)
    try:
        pairs, eval_pairs = read_role(args.pairs, "preference"), read_role(args.eval_pairs, "eval_preference")
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = reward(pairs, eval_pairs, args.model_dir, RewardStageConfig(epochs=args.epochs), 0, args.out_dir)
    print(out.summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
