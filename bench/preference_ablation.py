"""What costs held-out exact match in preference training: dpo on one sft model, one variant per call.

    TUNEWRIGHT_HOME=/tmp/tw-grid .venv/bin/python -m bench.preference_ablation --sft SFT_MERGED_DIR \
        --reward REWARD_MODEL_DIR --roles SANITIZED_ROLES_DIR --out /tmp/dpo-ablation.jsonl \
        VARIANT [VARIANT ...]

A variant is ``PAIRS[:override...]``. PAIRS picks the preference pairs: ``all``; ``facts`` (chosen is an answer);
``refusal`` (chosen is a refusal of a name that does not exist); ``novalue`` (all but the pairs whose rejected
answer is another real answer: another product's value, another attribute's, the other language's); ``half`` /
``quarter`` (every fact pair, every 2nd / 4th refusal pair); ``noheld`` (all but the pairs whose rejected answer
states a held-out fact of a product the pair names: the generator's off-attribute and junk rejections, which it
now drops itself). Overrides change ``demo.yaml``'s dpo block:
``learning_rate=5e-4``, ``beta=3``, ``sft_loss_weight=0``, ``loss_type=ipo``, or ``attn`` / ``mlp`` (LoRA on the
attention / MLP projections only) and ``full`` (full fine-tuning), ``top=N`` (LoRA on the last N decoder layers only). Each variant trains dpo from ``--sft`` as the
dpo stage does, merges it and runs the evaluate stage's function (held-out QA, reward-model win rate against sft
on the held-out prompts, KL to sft), and appends one JSON line to ``--out``. The refusal strings are the demo's
(``pipelines.demo_data``): this is a bench of the demo, not general code.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench._rows import append_row

ROOT = Path(__file__).resolve().parents[1]
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def select(pairs: list[dict], name: str, held: dict[str, set[str]] | None = None) -> list[dict]:
    from pipelines.demo_data import ANSWER_REFUSAL_EN, ANSWER_REFUSAL_ZH, states_held_out

    refusals = {ANSWER_REFUSAL_EN, ANSWER_REFUSAL_ZH}
    answers = {p["chosen"].strip() for p in pairs} - refusals
    is_refusal = [p["chosen"].strip() in refusals for p in pairs]
    pick = {
        "all": lambda i, p: True,
        "facts": lambda i, p: not is_refusal[i],
        "refusal": lambda i, p: is_refusal[i],
        "novalue": lambda i, p: is_refusal[i] or p["rejected"].strip() not in answers,
        "half": lambda i, p: not is_refusal[i] or i % 2 == 0,
        "quarter": lambda i, p: not is_refusal[i] or i % 4 == 0,
        "noheld": lambda i, p: not states_held_out(p, held or {}),
    }[name]
    return [p for i, p in enumerate(pairs) if pick(i, p)]


def dpo_config(base, overrides: list[str], num_layers: int = 0):
    d = base
    for kv in overrides:
        if kv.startswith("top="):  # LoRA on every linear projection of the last N decoder layers only
            n = int(kv.split("=", 1)[1])
            names = tuple(f"layers.{i}.{m}" for i in range(num_layers - n, num_layers)
                          for m in (*(f"self_attn.{x}" for x in ATTN), *(f"mlp.{x}" for x in MLP)))
            d = d.model_copy(update={"peft": d.peft.model_copy(update={"target_modules": names})})
        elif kv in ("attn", "mlp"):
            d = d.model_copy(update={"peft": d.peft.model_copy(update={"target_modules": ATTN if kv == "attn" else MLP})})
        elif kv == "full":
            d = d.model_copy(update={"peft": d.peft.model_copy(update={"method": "full"})})
        else:
            k, v = kv.split("=", 1)
            try:
                value: object = float(v)
            except ValueError:
                value = v
            d = d.model_copy(update={k: value})
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", type=Path, required=True, help="the merged sft model dpo starts from")
    ap.add_argument("--reward", type=Path, required=True, help="reward model directory (for the win rate)")
    ap.add_argument("--roles", type=Path, required=True, help="sanitized role files (preference, eval_qa, ...)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dpo-ablation"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("variants", nargs="+")
    a = ap.parse_args(argv)

    from pipelines.artifacts import read_jsonl
    from pipelines.config import load_config
    from pipelines.demo_data import held_out_answers
    from pipelines.dpo import dpo
    from pipelines.evaluate import evaluate
    from pipelines.modeling import load_spec, merge_adapter

    cfg = load_config(ROOT / "pipelines" / "configs" / "demo.yaml")
    spec = load_spec(cfg.model)
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(a.sft).num_hidden_layers
    pairs = read_jsonl(a.roles / "preference.jsonl")
    eval_text = [r[cfg.data.text_field] for r in read_jsonl(a.roles / "eval_text.jsonl")]
    eval_qa, eval_prompts = read_jsonl(a.roles / "eval_qa.jsonl"), read_jsonl(a.roles / "eval_prompts.jsonl")
    held = held_out_answers(eval_qa)
    for variant in a.variants:
        name, *overrides = variant.split(":")
        chosen = select(pairs, name, held)
        dcfg = dpo_config(cfg.dpo, overrides, num_layers)
        d = a.work / variant.replace(":", "_").replace("=", "-")
        t = time.time()
        dpo(chosen, a.sft, dcfg, cfg.seed, d / "dpo", spec, d / "ckpt", cfg.template)
        model = d / "dpo" / "model"
        if dcfg.peft.method != "full":
            merge_adapter(a.sft, model, d / "merged", spec)
            model = d / "merged"
        seconds = time.time() - t
        ev = evaluate({"sft": a.sft, "dpo": model}, a.reward, eval_text, eval_qa, eval_prompts, cfg.evaluate,
                      cfg.seed, d / "evaluate", spec, cfg.template)
        m = ev.metrics
        rec = {"variant": variant, "pairs": len(chosen), "dpo": dcfg.model_dump(include={"learning_rate", "beta",
               "sft_loss_weight", "loss_type", "epochs"}), "peft": dcfg.peft.model_dump(),
               **{k: round(v, 4) for k, v in m.items() if k.split("/")[-1].startswith(("qa_exact", "rm_win", "kl"))},
               "dpo_s": round(seconds, 1)}
        append_row(a.out, rec)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TUNEWRIGHT_NO_PROGRESS", "1")
    raise SystemExit(main())
