"""What the training stages share: trainer arguments, PEFT adapters, ordered sampling, saving with a manifest.

Reads: a stage's :class:`TrainConfig` subclass. Writes: nothing by itself; the stage modules call it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipelines.config import PeftConfig, TrainConfig
from pipelines.modeling import LoadSpec, load_model, load_tokenizer, save_model

EXAMPLES = "examples.jsonl"
N_EXAMPLES = 5


class QLoRAUnavailableError(RuntimeError):
    """QLoRA asked for where it cannot run (no CUDA GPU or no bitsandbytes); raised before any model loads."""


def check_peft_supported(pcfg: PeftConfig, stage: str) -> None:
    if pcfg.method != "qlora":
        return
    if not torch.cuda.is_available():
        raise QLoRAUnavailableError(
            f"{stage}.peft.method is 'qlora' (4-bit NF4 via bitsandbytes), which needs a CUDA GPU; "
            "this machine has none. Use 'lora' or 'full' on CPU."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QLoRAUnavailableError(f"{stage}.peft.method is 'qlora' but bitsandbytes is not installed") from None


def load_trainable(model_dir: Path, pcfg: PeftConfig, stage: str, spec: LoadSpec | None = None,
                   task: str = "causal_lm"):
    """(tokenizer, model) for a training stage, loaded as ``model.*`` says (QLoRA: 4-bit, checked first)."""
    spec = spec or LoadSpec()
    check_peft_supported(pcfg, stage)
    tokenizer = load_tokenizer(model_dir, **spec.kwargs(model_dir))
    qcfg = quantization_config(pcfg)
    model = load_model(model_dir, task=task, dtype=spec.dtype, **spec.kwargs(model_dir),
                       **({"quantization_config": qcfg} if qcfg is not None else {}))
    return tokenizer, model


def quantization_config(pcfg: PeftConfig):
    if pcfg.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def lora_config(pcfg: PeftConfig, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """A PEFT LoraConfig, or None for full fine-tuning."""
    if pcfg.method == "full":
        return None
    from peft import LoraConfig

    targets = pcfg.target_modules if isinstance(pcfg.target_modules, str) else list(pcfg.target_modules)
    return LoraConfig(r=pcfg.r, lora_alpha=pcfg.alpha, lora_dropout=pcfg.dropout, target_modules=targets,
                      task_type=task_type, modules_to_save=modules_to_save, bias="none")


def trainer_kwargs(tcfg: TrainConfig, out_dir: Path, seed: int) -> dict[str, Any]:
    """Arguments every (TRL) TrainingArguments subclass takes, from our config.

    ``save_strategy`` follows ``save_steps`` so a killed run can resume from ``out_dir/checkpoint-*``.
    """
    kw: dict[str, Any] = dict(
        output_dir=str(out_dir), max_steps=tcfg.max_steps, num_train_epochs=tcfg.epochs,
        learning_rate=tcfg.learning_rate, per_device_train_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=tcfg.grad_accum, warmup_steps=tcfg.warmup_ratio, weight_decay=tcfg.weight_decay,
        lr_scheduler_type=tcfg.lr_scheduler, bf16=tcfg.bf16,
        seed=seed, data_seed=seed, report_to=[], logging_steps=10, save_strategy="steps" if tcfg.save_steps else "no",
        save_steps=tcfg.save_steps or 500, save_total_limit=2, dataloader_num_workers=0,
        disable_tqdm=os.environ.get("TUNEWRIGHT_NO_PROGRESS") == "1", use_cpu=not torch.cuda.is_available(),
    )
    # Always explicit: TRL's configs default to True, which costs ~30% speed where memory is no problem.
    kw["gradient_checkpointing"] = tcfg.gradient_checkpointing
    if tcfg.deepspeed is not None and tcfg.launcher != "inprocess":
        kw["deepspeed"] = os.environ.get("TUNEWRIGHT_DEEPSPEED_CONFIG")
    return kw


def last_checkpoint(out_dir: Path) -> str | None:
    """Newest complete ``checkpoint-N`` under ``out_dir`` (a checkpoint being written is not complete yet)."""
    if not Path(out_dir).is_dir():
        return None
    cands = sorted(
        (p for p in Path(out_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    return str(cands[-1]) if cands else None


def sequential(trainer_cls):
    """A Trainer subclass that feeds the training set in its given order (the curriculum), never shuffled.

    Trainer's default RandomSampler would silently undo a curriculum.
    """

    class Ordered(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    Ordered.__name__ = f"Sequential{trainer_cls.__name__}"
    return Ordered


def log_history_metrics(trainer) -> dict[str, float]:
    """The trainer's final numbers, under the trainer's own names (``train_loss``, ``train_runtime``...)."""
    out: dict[str, float] = {}
    for entry in trainer.state.log_history:
        for k, v in entry.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                out[k] = float(v)
    out["global_step"] = float(trainer.state.global_step)
    return out


def save_trained(model, tokenizer, out_dir: Path, manifest: dict[str, Any]) -> None:
    """Save a trained model: the adapter when it is a PEFT model (its base named by ``base_input``), else full."""
    from peft import PeftModel

    kind = "adapter" if isinstance(model, PeftModel) else "full"
    save_model(model, tokenizer, out_dir, {**manifest, "kind": kind, **({"base_input": "model"} if kind == "adapter" else {})})
