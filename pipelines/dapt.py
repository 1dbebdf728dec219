"""dapt: domain-adaptive continued pretraining (causal LM) on the curriculum-ordered corpus.

Reads: ``inputs["records"]`` (curriculum output, in training order), ``inputs["model"]`` (base model directory).
With ``dapt.mix_sft`` > 0, ``inputs["sft"]`` (the sft conversations) is replayed, spread evenly through that order,
as the chat template renders them (``dapt.replay_format: template``, the one renderer, :mod:`pipelines.chat`) or as
their turns' plain contents (``text``); ``examples.jsonl`` shows the first replayed examples.
Writes: ``model/`` (full safetensors weights, or a LoRA adapter when ``dapt.peft.method`` is lora) + tokenizer +
manifest. Whole texts are packed once, in curriculum order (easy -> hard), into ``max_length`` rows, each text
attending only to itself (``modeling.pack_documents``); ``curriculum.schedule`` then orders the rows of every epoch
(``training.PacingSampler``: fixed easy -> hard, bucketed, competence-paced windows, or random).

The schedule orders packed rows, not documents: packing stays one deterministic pass (the trainer's epochs, steps
and resume are the usual ones), and since row k holds the documents that follow row k-1's in the ranking, the
easiest share of the rows is the easiest share of the documents (to one row at the window's edge). Which documents
share a row does not matter to what each learns: a document attends only to itself. A record counts as seen when
every row holding its tokens has been drawn; ``curriculum_unseen_rows`` in the metrics counts rows never drawn
(0 unless the run ends within one epoch of the ramp). Run alone::

    python -m pipelines.dapt RECORDS.jsonl MODEL_DIR OUT_DIR [--epochs 3] [--schedule fixed]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.artifacts import StageOutput, read_jsonl, write_jsonl
from pipelines.chat import Renderer
from pipelines.config import CurriculumConfig, DaptConfig, PipelineConfig, TemplateConfig
from pipelines.modeling import LoadSpec, load_spec, pack_documents, seed_everything
from pipelines.training import (
    EXAMPLES, N_EXAMPLES, last_checkpoint, load_trainable, log_history_metrics, lora_config, paced, save_trained,
    trainer_kwargs,
)


def interleave(texts: list[str], extra: list[str]) -> list[str]:
    """``extra`` spread evenly through ``texts``, keeping both orders (the curriculum order survives)."""
    if not extra:
        return list(texts)
    keyed = [(i / max(len(texts), 1), 0, i) for i in range(len(texts))]
    keyed += [((j + 0.5) / len(extra), 1, j) for j in range(len(extra))]
    return [texts[i] if src == 0 else extra[i] for _, src, i in sorted(keyed)]


def replay_texts(renderer, records: list[dict], copies: float, form: str = "template") -> list[str]:
    """``copies`` x the sft conversations as corpus text (a fractional part takes a prefix of one more copy).

    ``form`` "template": the text the renderer makes of them, the very format sft and evaluation use. "text": the
    turns' contents, one per line, with no role markers (question-answer text as a document holds it)."""
    whole, part = int(copies), copies - int(copies)
    if form == "text":
        texts = ["\n".join(m["content"] for m in r["messages"] if m.get("content")) for r in records]
    else:
        eos = renderer.tokenizer.eos_token or ""
        # pack_documents ends every document with EOS itself: a template's own closing EOS would double it
        texts = [t.removesuffix(eos) if eos else t for t in (renderer.text(r["messages"]) for r in records)]
    return texts * whole + texts[: round(part * len(texts))]


def block_dataset(tokenizer, texts: list[str], block: int):
    from datasets import Dataset

    return Dataset.from_list(pack_documents(tokenizer, texts, block))


def dapt(texts: list[str], model_dir: Path, dcfg: DaptConfig, seed: int, out_dir: Path,
         spec: LoadSpec | None = None, work_dir: Path | None = None, replay: list[dict] | None = None,
         template: TemplateConfig | None = None, curriculum: CurriculumConfig | None = None) -> StageOutput:
    """Continued pretraining on ``texts`` (ranked easy -> hard), read as ``curriculum.schedule`` says (default:
    fixed, in the given order); ``replay`` (sft conversations) is mixed in ``dcfg.mix_sft`` times."""
    from transformers import Trainer, TrainingArguments

    seed_everything(seed)
    tokenizer, model = load_trainable(model_dir, dcfg.peft, "dapt", spec)
    # the run's template is stored in the saved tokenizer (standalone, without one, the base model's is kept)
    renderer = None if template is None and not replay else Renderer.for_model(tokenizer, template or TemplateConfig(),
                                                                               str(model_dir))
    if replay and dcfg.mix_sft > 0:
        texts = interleave(texts, replay_texts(renderer, replay, dcfg.mix_sft, dcfg.replay_format))
    # what continued pretraining trains on, in ranked order, then the first replayed conversations as they read
    shown = replay_texts(renderer, replay[:2], 1.0, dcfg.replay_format) if replay and dcfg.mix_sft > 0 else []

    def example(t: str, **extra) -> dict:  # tokens: the text's own plus the EOS packing adds
        return {"trained_text": t, "tokens": len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1, **extra}

    write_jsonl(out_dir / EXAMPLES, [example(t) for t in texts[:N_EXAMPLES]] +
                [example(t, replayed=True, replay_format=dcfg.replay_format) for t in shown])
    peft_cfg = lora_config(dcfg.peft)
    if peft_cfg is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_cfg)
    train = block_dataset(tokenizer, texts, dcfg.max_length)
    # Packed rows rely on position_ids for the block-diagonal mask, which transformers skips when a KV cache is made.
    use_cache, model.config.use_cache = model.config.use_cache, False
    work_dir = work_dir or out_dir / "checkpoints"
    args = TrainingArguments(**trainer_kwargs(dcfg, work_dir, seed))
    trainer = paced(Trainer, curriculum or CurriculumConfig(), seed)(model=model, args=args, train_dataset=train)
    trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))
    metrics = log_history_metrics(trainer)
    metrics["curriculum_unseen_rows"] = float(trainer.pacing.unseen())
    model.config.use_cache = use_cache
    metrics["train_blocks"] = float(len(train))
    metrics["train_tokens_per_epoch"] = float(sum(x != -100 for b in train["labels"] for x in b))  # with a loss
    save_trained(trainer.model, tokenizer, out_dir / "model",
                 {"stage": "dapt", "task": "causal_lm", "config": dcfg.model_dump(), "metrics": metrics})
    return StageOutput(primary="model", metrics=metrics,
                       summary=f"{metrics['global_step']:.0f} steps, final loss {metrics.get('train_loss', float('nan')):.3f} "
                               f"(schedule {(curriculum or CurriculumConfig()).schedule})")


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    texts = [r[cfg.data.text_field] for r in read_jsonl(inputs["records"])]
    replay = read_jsonl(inputs["sft"]) if cfg.dapt.mix_sft > 0 else None
    return dapt(texts, inputs["model"], cfg.dapt, cfg.seed, out_dir, load_spec(cfg.model), inputs.get("work_dir"),
                replay, cfg.template, cfg.curriculum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--field", default="text")
    ap.add_argument("--epochs", type=float, default=DaptConfig().epochs)
    ap.add_argument("--schedule", default=CurriculumConfig().schedule,
                    choices=CurriculumConfig.model_fields["schedule"].annotation.__args__)
    args = ap.parse_args(argv)
    if not args.records.is_file():
        print(f"error: {args.records}: file not found", file=sys.stderr)
        return 2
    texts = [r[args.field] for r in read_jsonl(args.records)]
    print(dapt(texts, args.model_dir, DaptConfig(epochs=args.epochs), 0, args.out_dir,
               curriculum=CurriculumConfig(schedule=args.schedule)).summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
