"""grpo: group relative policy optimisation (Shao et al. 2024) with TRL's GRPOTrainer; the reward model scores.

Reads: ``inputs["prompts"]`` (JSONL ``{"prompt": ...}``), ``inputs["model"]`` (the SFT model, full weights),
``inputs["reward"]`` (the reward model, full weights) and ``inputs["work_dir"]`` (trainer checkpoints).
For every prompt the policy samples ``num_generations`` answers of at most ``max_completion_length`` tokens; each is
scored by the frozen reward model exactly as it was trained (prompt + answer + EOS, via ``pipelines.reward.score``);
an answer's advantage is its reward relative to its group's. No value model is needed. ``beta`` weights the KL
penalty to the reference, which with LoRA is the SFT network with the adapter disabled.
Writes: ``model/`` (LoRA adapter on the SFT model, or full weights) + tokenizer + manifest, ``grpo_history.jsonl``
(the trainer's log entries). Metrics keep TRL's names (``reward``, ``reward_std``, ``kl``, ``entropy``...). Run
alone::

    python -m pipelines.grpo PROMPTS.jsonl SFT_MODEL_DIR REWARD_MODEL_DIR OUT_DIR [--max-steps 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.artifacts import StageOutput, read_jsonl, write_jsonl
from pipelines.config import GRPOStageConfig, PipelineConfig
from pipelines.modeling import LoadSpec, load_model, load_spec, load_tokenizer, seed_everything
from pipelines.training import (
    check_peft_supported, last_checkpoint, log_history_metrics, lora_config, save_trained, trainer_kwargs,
)


def reward_function(reward_dir: Path, spec: LoadSpec | None = None, batch_size: int = 32, max_length: int = 512,
                    suffix: str | None = None):
    """The reward model as a GRPO reward function: ``f(prompts, completions, **_) -> list[float]``.

    A callable rather than the bare model because TRL scores ``prompt + completion`` without the EOS that the
    reward model saw in training; ``score`` appends it.
    """

    from pipelines.reward import score

    spec = spec or LoadSpec()
    model = load_model(reward_dir, task="reward", dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
    model.eval().requires_grad_(False).to(spec.torch_device())
    tokenizer = load_tokenizer(reward_dir, spec.trust_remote_code)

    def reward_model(prompts: list[str], completions: list[str], **_) -> list[float]:
        return score(model, tokenizer, list(prompts), list(completions), batch_size, max_length, suffix).tolist()

    return reward_model


def grpo(prompts: list[str], model_dir: Path, reward_dir: Path, gcfg: GRPOStageConfig, seed: int, out_dir: Path,
         spec: LoadSpec | None = None, work_dir: Path | None = None, suffix: str | None = None) -> StageOutput:
    """``prompts`` are rendered generation prompts (plain text to TRL, so it applies no template of its own)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    check_peft_supported(gcfg.peft, "grpo")
    group = gcfg.batch_size * gcfg.grad_accum * (gcfg.num_processes or 1)
    if group % gcfg.num_generations:
        raise ValueError(f"grpo.batch_size * grpo.grad_accum ({group}) must be a multiple of grpo.num_generations "
                         f"({gcfg.num_generations}): every prompt's group of answers is scored together")
    if not prompts:
        raise ValueError("grpo: no prompts")
    seed_everything(seed)
    spec = spec or LoadSpec()
    tokenizer = load_tokenizer(model_dir, spec.trust_remote_code)
    model = load_model(model_dir, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
    work_dir = Path(work_dir) if work_dir is not None else out_dir / "checkpoints"
    args = GRPOConfig(**{**trainer_kwargs(gcfg, work_dir, seed), "logging_steps": 1},
                      num_generations=gcfg.num_generations, max_completion_length=gcfg.max_completion_length,
                      beta=gcfg.beta, temperature=gcfg.temperature)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_function(reward_dir, spec, gcfg.batch_size,
                                                                    gcfg.max_length, suffix),
                          args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=tokenizer, peft_config=lora_config(gcfg.peft))
    trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))
    metrics = log_history_metrics(trainer)
    save_trained(trainer.model, tokenizer, out_dir / "model",
                 {"stage": "grpo", "task": "causal_lm", "config": gcfg.model_dump(mode="json"), "metrics": metrics},
                 gcfg.update_scale, model_dir)
    history = [e for e in trainer.state.log_history if "reward" in e]
    write_jsonl(out_dir / "grpo_history.jsonl", history)
    summary = f"{metrics['global_step']:.0f} GRPO steps"
    if history:
        summary += f": reward {history[0]['reward']:.3f} -> {history[-1]['reward']:.3f}"
        if "kl" in history[-1]:
            summary += f", KL to SFT {history[-1]['kl']:.3f}"
    return StageOutput(primary="model", metrics=metrics, summary=summary)


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    from pipelines.chat import rendered_prompts

    prompts, renderer, examples = rendered_prompts(cfg, inputs["model"], read_jsonl(inputs["prompts"]))
    write_jsonl(out_dir / "examples.jsonl", examples)
    return grpo(prompts, inputs["model"], inputs["reward"], cfg.grpo, cfg.seed, out_dir, load_spec(cfg.model),
                inputs.get("work_dir"), renderer.end_of_turn)


def main(argv: list[str] | None = None) -> int:
    d = GRPOStageConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", type=Path, help="JSONL with a 'prompt' field per record")
    ap.add_argument("model_dir", type=Path, help="SFT model directory (full weights)")
    ap.add_argument("reward_dir", type=Path, help="reward model directory (full weights)")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--max-steps", type=int, default=d.max_steps)
    ap.add_argument("--num-generations", type=int, default=d.num_generations)
    ap.add_argument("--beta", type=float, default=d.beta)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for p in (args.prompts, args.model_dir, args.reward_dir):
        if not p.exists():
            print(f"error: {p}: not found", file=sys.stderr)
            return 2
    gcfg = GRPOStageConfig(max_steps=args.max_steps, num_generations=args.num_generations, beta=args.beta)
    prompts = [r["prompt"] for r in read_jsonl(args.prompts)]
    print(grpo(prompts, args.model_dir, args.reward_dir, gcfg, args.seed, args.out_dir).summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
