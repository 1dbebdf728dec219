"""dpo: direct preference optimisation with TRL's DPOTrainer; the reference is the SFT model.

Reads: ``inputs["preference"]`` (canonical ``{"prompt": [...], "chosen", "rejected"}`` records), ``inputs["model"]``
(the SFT model, merged to full weights). Prompt and answers are encoded by the one renderer (:mod:`pipelines.chat`)
and handed to TRL as token ids, so the trained text is exactly the chat template's. With LoRA (default) the
reference is the same network with the adapter disabled, so no second copy of the model is held.
``dpo.loss_type`` selects TRL's variants (sigmoid = DPO, ipo, robust, hinge...). With ``dpo.ptx_coef`` > 0,
``inputs["records"]`` (the corpus) is packed into rows as dapt packs it and each training step adds ``ptx_coef`` x
the language-modelling loss of one batch of those rows (PPO-ptx's pretraining mix, here for DPO), logged as
``ptx_loss``.
Writes: ``model/`` (LoRA adapter on the SFT model, or full weights) + tokenizer + manifest, ``examples.jsonl``.
Run alone (any preference format :mod:`pipelines.formats` reads)::

    python -m pipelines.dpo PAIRS.jsonl MODEL_DIR OUT_DIR [--loss-type sigmoid]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.artifacts import StageOutput, read_jsonl, write_jsonl
from pipelines.chat import Renderer
from pipelines.config import DPOStageConfig, PipelineConfig, TemplateConfig
from pipelines.modeling import LoadSpec, load_model, load_spec, pack_documents, seed_everything
from pipelines.training import (
    EXAMPLES, N_EXAMPLES, last_checkpoint, load_trainable, log_history_metrics, lora_config, save_trained,
    trainer_kwargs,
)


def loss_kwargs(dcfg: DPOStageConfig) -> dict:
    """TRL's loss list: the configured preference loss, plus the chosen answer's NLL when ``sft_loss_weight`` > 0."""
    if dcfg.sft_loss_weight > 0:
        return {"loss_type": [dcfg.loss_type, "sft"], "loss_weights": [1.0, dcfg.sft_loss_weight]}
    return {"loss_type": [dcfg.loss_type]}


class PtxRows:
    """Packed corpus rows served ``batch`` at a time, reshuffled (seeded) each time they run out."""

    def __init__(self, rows: list[dict], batch: int, seed: int) -> None:
        import torch

        self.rows = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}
        self.batch, self.n = min(batch, len(rows)), len(rows)
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.at = torch.randperm(self.n, generator=self.gen), 0

    def next(self, device) -> dict:
        import torch

        if self.at + self.batch > self.n:
            self.order, self.at = torch.randperm(self.n, generator=self.gen), 0
        idx = self.order[self.at : self.at + self.batch]
        self.at += self.batch
        return {k: v[idx].to(device) for k, v in self.rows.items()}


def dpo(pairs: list[dict], model_dir: Path, dcfg: DPOStageConfig, seed: int, out_dir: Path,
        spec: LoadSpec | None = None, work_dir: Path | None = None,
        template: TemplateConfig | None = None, corpus: list[str] | None = None) -> StageOutput:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class TokenizedDPOTrainer(DPOTrainer):
        """The rows are already token ids from the renderer: TRL's own tokenization would re-render them. With a
        pretraining mix, every training step's loss also carries ``ptx_coef`` x one corpus batch's LM loss."""

        ptx: PtxRows | None = None

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.ptx is None or not model.training:
                return out
            loss, rest = out if return_outputs else (out, None)
            batch = self.ptx.next(loss.device)
            ptx = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                        use_cache=False).loss
            self._metrics["train"]["ptx_loss"].append(self.accelerator.gather_for_metrics(ptx.detach()).mean().item())
            loss = loss + dcfg.ptx_coef * ptx
            return (loss, rest) if return_outputs else loss

    if dcfg.ptx_coef > 0 and not corpus:
        raise ValueError("dpo.ptx_coef > 0 needs the corpus (inputs['records'])")
    spec = spec or LoadSpec()
    seed_everything(seed)
    tokenizer, model = load_trainable(model_dir, dcfg.peft, "dpo", spec)
    renderer = Renderer.for_model(tokenizer, template or TemplateConfig(), str(model_dir))
    peft_cfg = lora_config(dcfg.peft)
    ref = None if peft_cfg is not None else load_model(model_dir, dtype=spec.dtype, **spec.kwargs(model_dir))
    train = Dataset.from_list([renderer.encode_preference(p, dcfg.max_length) for p in pairs])
    write_jsonl(out_dir / EXAMPLES, [renderer.preference_example(p, dcfg.max_length) for p in pairs[:N_EXAMPLES]])
    work_dir = work_dir or out_dir / "checkpoints"
    args = DPOConfig(**trainer_kwargs(dcfg, work_dir, seed), max_length=dcfg.max_length, beta=dcfg.beta,
                     label_smoothing=dcfg.label_smoothing, **loss_kwargs(dcfg))
    trainer = TokenizedDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=train,
                                  processing_class=tokenizer, peft_config=peft_cfg)
    if dcfg.ptx_coef > 0:
        trainer.ptx = PtxRows(pack_documents(tokenizer, corpus, dcfg.max_length), dcfg.batch_size, seed)
    trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))
    metrics = log_history_metrics(trainer)
    save_trained(trainer.model, tokenizer, out_dir / "model",
                 {"stage": "dpo", "task": "causal_lm", "config": dcfg.model_dump(), "metrics": metrics},
                 dcfg.update_scale, model_dir)
    acc = metrics.get("rewards/accuracies", float("nan"))
    return StageOutput(primary="model", metrics=metrics,
                       summary=f"{metrics['global_step']:.0f} steps, implicit reward accuracy {acc:.3f}")


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    corpus = [r[cfg.data.text_field] for r in read_jsonl(inputs["records"])] if cfg.dpo.ptx_coef > 0 else None
    return dpo(read_jsonl(inputs["preference"]), inputs["model"], cfg.dpo, cfg.seed, out_dir, load_spec(cfg.model),
               inputs.get("work_dir"), cfg.template, corpus)


def main(argv: list[str] | None = None) -> int:
    from pipelines.data import read_role
    from pipelines.records import BadInputError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--loss-type", default="sigmoid")
    ap.add_argument("--beta", type=float, default=DPOStageConfig().beta)
    args = ap.parse_args(argv)
    try:
        pairs = read_role(args.pairs, "preference")
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dcfg = DPOStageConfig(loss_type=args.loss_type, beta=args.beta)
    print(dpo(pairs, args.model_dir, dcfg, 0, args.out_dir).summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
