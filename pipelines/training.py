"""What the training stages share: trainer arguments, PEFT adapters, ordered and paced sampling, saving with a
manifest.

Reads: a stage's :class:`TrainConfig` subclass. Writes: nothing by itself; the stage modules call it.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from pipelines.config import CurriculumConfig, PeftConfig, TrainConfig
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


# ----------------------------------------------------------------------------------------------- pacing sampler
def competence(t: float, schedule: str, c0: float, ramp: float) -> float:
    """Share of the ranked set a competence schedule draws from at training progress ``t`` in [0, 1] (Platanios
    et al., NAACL 2019): linear c = t(1-c0)/ramp + c0, root c = sqrt(t(1-c0^2)/ramp + c0^2), at most 1; other
    schedules draw from the whole set."""
    if schedule == "competence_linear":
        return min(1.0, t * (1 - c0) / ramp + c0)
    if schedule == "competence_root":
        return min(1.0, math.sqrt(t * (1 - c0 * c0) / ramp + c0 * c0))
    return 1.0


class PacingSampler(torch.utils.data.Sampler):
    """The order in which a training stage reads a set that is ranked easy -> hard (row 0 is the easiest).

    Every epoch yields ``n`` indices (the trainer's steps per epoch do not change), computed from (schedule, seed,
    epoch) alone, so a run resumed mid-epoch skips into the very same order:

    - ``fixed`` / ``off``: 0, 1, ..., n-1 every epoch (the curriculum's order, or the given one);
    - ``bucketed``: the ranking cut into ``buckets`` equal buckets, each shuffled anew every epoch;
    - ``random``: a fresh shuffle of the whole set every epoch;
    - ``competence_linear`` / ``competence_root``: draw ``p`` of ``total`` (progress t = p / total) comes from
      the window of the easiest ceil(c(t) n) rows (:func:`competence`), without replacement: each epoch starts a
      shuffled pass over the window, rows entering the window as it grows join the pass, and when every row of
      the window has been drawn a new shuffled pass begins (easy rows repeat early in training: the point).

    Every record seen: an epoch that starts after the ramp (t >= ramp) is one shuffle of the whole set, so a run
    that completes such an epoch has drawn every row (a one-epoch run with the default c0 0.2 and ramp 0.5 does
    too: its window grows about as fast as rows are drawn). Otherwise the run may end with rows never drawn:
    :meth:`unseen` counts them, and dapt logs it as ``curriculum_unseen_rows``.
    """

    def __init__(self, n: int, schedule: str, seed: int, total: int, c0: float = 1.0, ramp: float = 1.0,
                 buckets: int = 1) -> None:
        self.n, self.schedule, self.seed, self.total = n, schedule, seed, max(1, total)
        self.c0, self.ramp, self.buckets = c0, ramp, buckets
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it before each epoch (through accelerate)
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(self.order(self.epoch))

    def window(self, p: int) -> int:
        """How many of the easiest rows draw ``p`` may come from."""
        c = competence(min(1.0, p / self.total), self.schedule, self.c0, self.ramp)
        return min(self.n, max(1, math.ceil(c * self.n - 1e-9)))

    def order(self, epoch: int) -> list[int]:
        import random

        n = self.n
        rng = random.Random(f"pacing:{self.schedule}:{self.seed}:{epoch}")
        if self.schedule in ("fixed", "off") or n == 0:
            return list(range(n))
        if self.schedule == "random":
            out = list(range(n))
            rng.shuffle(out)
            return out
        if self.schedule == "bucketed":
            size = math.ceil(n / self.buckets)
            out = []
            for b in range(0, n, size):
                chunk = list(range(b, min(n, b + size)))
                rng.shuffle(chunk)
                out += chunk
            return out
        start = epoch * n
        w = self.window(start)
        pool = list(range(w))
        out = []
        for p in range(start, start + n):
            grown = self.window(p)
            if grown > w:
                pool += range(w, grown)
                w = grown
            if not pool:
                pool = list(range(w))  # the window is drawn through: a new pass
            j = rng.randrange(len(pool))
            pool[j], pool[-1] = pool[-1], pool[j]
            out.append(pool.pop())
        return out

    def unseen(self) -> int:
        """Rows never drawn in the first ``total`` draws (0 whenever an epoch starts after the ramp)."""
        seen: set[int] = set()
        for e in range(math.ceil(self.total / max(1, self.n))):
            seen.update(self.order(e)[: self.total - e * self.n])
        return self.n - len(seen)


def planned_draws(args, n: int) -> int:
    """Rows a trainer with these TrainingArguments reads in all (what progress t = 1 means for the sampler)."""
    if args.max_steps and args.max_steps > 0:
        return args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return math.ceil(args.num_train_epochs * n)


def paced(trainer_cls, ccfg: CurriculumConfig, seed: int):
    """A Trainer subclass that reads its training set (ranked easy -> hard) through a :class:`PacingSampler`."""

    class Paced(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):
            ds = self.train_dataset
            self.pacing = PacingSampler(len(ds), ccfg.schedule, seed, planned_draws(self.args, len(ds)),
                                        ccfg.c0, ccfg.ramp, ccfg.buckets)
            return self.pacing

    Paced.__name__ = f"Paced{trainer_cls.__name__}"
    return Paced


def log_history_metrics(trainer) -> dict[str, float]:
    """The trainer's final numbers, under the trainer's own names (``train_loss``, ``train_runtime``...)."""
    out: dict[str, float] = {}
    for entry in trainer.state.log_history:
        for k, v in entry.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                out[k] = float(v)
    out["global_step"] = float(trainer.state.global_step)
    return out


def save_trained(model, tokenizer, out_dir: Path, manifest: dict[str, Any], update_scale: float = 1.0,
                 start_dir: Path | None = None) -> None:
    """Save a trained model: the adapter when it is a PEFT model (its base named by ``base_input``), else full.
    ``update_scale`` < 1 saves ``start_dir`` + that x (trained - start) instead (:func:`scale_update`)."""
    from peft import PeftModel

    kind = "adapter" if isinstance(model, PeftModel) else "full"
    transform = None
    if update_scale < 1:
        if kind == "full" and start_dir is None:
            raise ValueError("update_scale < 1 on full weights needs the model the stage started from")
        transform = lambda tmp: scale_update(tmp, update_scale, start_dir)  # noqa: E731
    save_model(model, tokenizer, out_dir, {**manifest, "kind": kind, **({"base_input": "model"} if kind == "adapter" else {})},
               transform)


def scale_update(saved: Path, s: float, start_dir: Path | None) -> None:
    """Model averaging in place: the weights saved in ``saved`` become start + ``s`` x (trained - start).

    An adapter (``adapter_model.safetensors``): every LoRA B matrix is scaled by ``s``, so the merged model is
    W + s BA, exactly the average of the base it was trained on and the trained model. Full weights: every floating
    tensor is interpolated with the tensor of the same name in ``start_dir``'s safetensors (same architecture)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def rewrite(f: Path, edit) -> None:
        with safe_open(str(f), "pt") as st:
            meta = st.metadata()
            tensors = {k: edit(k, st.get_tensor(k)) for k in st.keys()}
        tmp = f.with_name(f".{f.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, f)

    adapter = saved / "adapter_model.safetensors"
    if adapter.exists():
        with safe_open(str(adapter), "pt") as st:
            if not any("lora_B" in k for k in st.keys()):
                raise ValueError(f"{adapter}: no LoRA B matrices to scale (update_scale needs a LoRA adapter)")
        rewrite(adapter, lambda k, t: t * s if "lora_B" in k else t)
        return
    with ExitStack() as stack:
        start: dict[str, Any] = {}  # tensor name -> the open start shard that holds it
        for f in sorted(Path(start_dir).glob("*.safetensors")):
            st = stack.enter_context(safe_open(str(f), "pt"))
            start.update(dict.fromkeys(st.keys(), st))

        def average(k: str, t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point():
                return t
            if k not in start:
                raise ValueError(f"update_scale: {start_dir} has no tensor {k}; the start and the trained model differ")
            w0 = start[k].get_tensor(k).to(torch.float32)
            return (w0 + s * (t.to(torch.float32) - w0)).to(t.dtype)

        for f in sorted(saved.glob("*.safetensors")):
            rewrite(f, average)
