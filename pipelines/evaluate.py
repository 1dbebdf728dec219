"""evaluate: one comparison of every checkpoint of the run on held-out sets.

Reads: model directories ``inputs["base"|"dapt"|"sft"|"dpo"|"ppo"|"grpo"]`` (those present, full weights),
``inputs["reward"]`` (reward model), and the held-out files ``eval_text``, ``eval_qa``, ``eval_prompts``.
Writes: ``evaluation.json``, ``evaluation.md`` (the table), ``evaluation.png`` (the chart), ``qa_predictions.jsonl``.
Metrics per checkpoint (logged on the parent run as ``<checkpoint>/<metric>``):
- ``domain_ppl``: perplexity of the held-out domain text (token-weighted, padding excluded);
- ``qa_exact_match`` / ``qa_rouge_l``: greedy answers to held-out questions vs the reference answers;
- ``rm_win_rate_vs_sft``: share of held-out prompts where the reward model prefers the checkpoint's greedy answer
  to the SFT model's (ties count half);
- ``kl_to_sft``: mean over held-out prompts of sum_t log p(y_t) - log p_sft(y_t) on answers sampled from the
  checkpoint (a Monte-Carlo estimate of KL(policy || sft), in nats per answer).
Run alone::

    python -m pipelines.evaluate --model sft=DIR --model dpo=DIR --reward DIR --eval-qa QA.jsonl ... OUT_DIR
"""

from __future__ import annotations

import argparse
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np
import torch

from pipelines.artifacts import StageOutput, read_jsonl, write_json, write_jsonl
from pipelines.config import EvaluateConfig, PipelineConfig
from pipelines.modeling import load_model, load_tokenizer, seed_everything

CHECKPOINTS = ("base", "dapt", "sft", "dpo", "ppo", "grpo")
METRICS = ("domain_ppl", "qa_exact_match", "qa_rouge_l", "rm_win_rate_vs_sft", "kl_to_sft")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def normalize_answer(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).strip().casefold()
    s = re.sub(r"\s+", " ", s)
    return s.rstrip(" .。!！")


def _tokens(s: str) -> list[str]:
    s = normalize_answer(s)
    return [c for c in s if not c.isspace()] if _CJK.search(s) else s.split()


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 on words (on characters for Chinese text)."""
    a, b = _tokens(pred), _tokens(ref)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32,
             do_sample: bool = False, stop_at_newline: bool = True) -> tuple[list[str], list[list[int]]]:
    """Batched generation (left padding). Returns decoded answers and their token ids (up to and incl. EOS)."""
    tokenizer.padding_side = "left"
    texts: list[str] = [""] * len(prompts)
    ids_out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    model.eval()
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             **({"top_k": 0, "top_p": 1.0, "temperature": 1.0} if do_sample else {}))
        for row, i in enumerate(idx):
            gen = out[row, enc["input_ids"].shape[1]:].tolist()
            if tokenizer.eos_token_id in gen:
                gen = gen[: gen.index(tokenizer.eos_token_id) + 1]
            ids_out[i] = gen
            text = tokenizer.decode(gen, skip_special_tokens=True)
            texts[i] = text.split("\n")[0] if stop_at_newline else text
    tokenizer.padding_side = "right"
    return texts, ids_out


@torch.inference_mode()
def sequence_logprobs(model, tokenizer, prompts: list[str], responses: list[list[int]], batch_size: int = 32) -> torch.Tensor:
    """Sum of log p(response tokens | prompt) for each pair, batched with right padding."""
    out = torch.zeros(len(prompts))
    for s in range(0, len(prompts), batch_size):
        p_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[s: s + batch_size]]
        r_ids = responses[s: s + batch_size]
        width = max(len(p) + len(r) for p, r in zip(p_ids, r_ids))
        ids = torch.full((len(p_ids), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        resp = torch.zeros_like(ids, dtype=torch.bool)
        for row, (p, r) in enumerate(zip(p_ids, r_ids)):
            ids[row, : len(p) + len(r)] = torch.tensor(p + r)
            mask[row, : len(p) + len(r)] = 1
            resp[row, len(p): len(p) + len(r)] = True
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * resp[:, 1:]
        out[s: s + len(p_ids)] = tok.sum(1)
    return out


@torch.inference_mode()
def domain_perplexity(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 256) -> float:
    """Token-weighted perplexity over all held-out texts."""
    from pipelines.curriculum import perplexities

    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    n = np.array([max(len(e) - 1, 0) for e in enc], dtype=np.float64)
    ppl = perplexities(model, tokenizer, texts, batch_size, max_length, progress=False)
    keep = n > 0
    return float(np.exp(np.sum(np.log(ppl[keep]) * n[keep]) / n[keep].sum()))


def evaluate(models: dict[str, Path], reward_dir: Path | None, eval_text: list[str], eval_qa: list[dict],
             eval_prompts: list[dict], ecfg: EvaluateConfig, seed: int, out_dir: Path) -> StageOutput:
    from tqdm.auto import tqdm

    from pipelines.reward import score

    qa = eval_qa[: ecfg.max_qa] if ecfg.max_qa else eval_qa
    qa_prompts = [f"Question: {q['question']}\nAnswer:" for q in qa]
    prompts = [p["prompt"] for p in eval_prompts]
    table: dict[str, dict[str, float]] = {}
    predictions: list[dict] = []
    greedy: dict[str, list[str]] = {}
    sampled: dict[str, list[list[int]]] = {}
    for name, path in tqdm(list(models.items()), desc="evaluate: checkpoints", file=sys.stderr):
        seed_everything(seed)
        tok = load_tokenizer(path)
        model = load_model(path)
        row = {"domain_ppl": domain_perplexity(model, tok, eval_text, ecfg.batch_size)}
        answers, _ = generate(model, tok, qa_prompts, ecfg.max_new_tokens, ecfg.batch_size)
        em = [normalize_answer(a) == normalize_answer(q["answer"]) for a, q in zip(answers, qa)]
        row["qa_exact_match"] = float(np.mean(em)) if qa else float("nan")
        row["qa_rouge_l"] = float(np.mean([rouge_l(a, q["answer"]) for a, q in zip(answers, qa)])) if qa else float("nan")
        predictions += [{"checkpoint": name, "question": q["question"], "answer": q["answer"], "prediction": a,
                         "exact_match": e} for a, q, e in zip(answers, qa, em)]
        if prompts:
            greedy[name] = generate(model, tok, prompts, ecfg.max_new_tokens, ecfg.batch_size)[0]
            if name not in ("base", "dapt", "sft"):
                sampled[name] = generate(model, tok, prompts, ecfg.max_new_tokens, ecfg.batch_size, do_sample=True,
                                         stop_at_newline=False)[1]
                sampled[name + ":logp"] = sequence_logprobs(model, tok, prompts, sampled[name]).tolist()
        table[name] = row
        del model
    if "sft" in models and prompts:
        tok = load_tokenizer(models["sft"])
        sft_model = load_model(models["sft"])
        for name in sampled:
            if name.endswith(":logp"):
                continue
            ref_logp = sequence_logprobs(sft_model, tok, prompts, sampled[name])
            table[name]["kl_to_sft"] = float(np.mean(np.array(sampled[name + ":logp"]) - ref_logp.numpy()))
        del sft_model
        if reward_dir is not None:
            rm = load_model(reward_dir, task="reward").eval()
            rm_tok = load_tokenizer(reward_dir)
            r_sft = score(rm, rm_tok, prompts, [" " + a.strip() for a in greedy["sft"]])
            for name, answers in greedy.items():
                if name == "sft":
                    continue
                r = score(rm, rm_tok, prompts, [" " + a.strip() for a in answers])
                wins = (r > r_sft).float() + 0.5 * (r == r_sft).float()
                table[name]["rm_win_rate_vs_sft"] = float(wins.mean())
                for kind in sorted({p.get("kind") for p in eval_prompts} - {None}):  # e.g. fact / nonexistent
                    sel = torch.tensor([p.get("kind") == kind for p in eval_prompts])
                    table[name][f"rm_win_rate_vs_sft_{kind}"] = float(wins[sel].mean())
                table[name]["rm_mean_reward"] = float(r.mean())
            table["sft"]["rm_mean_reward"] = float(r_sft.mean())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "evaluation.json", table)
    write_jsonl(out_dir / "qa_predictions.jsonl", predictions)
    md = markdown_table(table)
    (out_dir / "evaluation.md").write_text(md + "\n", encoding="utf-8")
    chart(table, out_dir / "evaluation.png")
    parent = {f"{ck}/{m}": v for ck, row in table.items() for m, v in row.items() if np.isfinite(v)}
    head = f"{len(table)} checkpoints on {len(qa)} held-out questions and {len(prompts)} held-out prompts"
    return StageOutput(primary="evaluation.json", metrics=dict(parent), parent_metrics=parent, summary=f"{head}\n\n{md}")


def markdown_table(table: dict[str, dict[str, float]]) -> str:
    cols = [m for m in METRICS if any(m in r for r in table.values())]
    lines = ["| checkpoint | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in table.items():
        cells = [f"{row[m]:.3f}" if m in row else "–" for m in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(table: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    rates = [m for m in ("qa_exact_match", "qa_rouge_l", "rm_win_rate_vs_sft") if any(m in r for r in table.values())]
    width = 0.8 / max(len(rates), 1)
    for k, m in enumerate(rates):
        vals = [table[n].get(m, 0.0) for n in names]
        ax1.bar(np.arange(len(names)) + k * width, vals, width, label=m)
    ax1.set_xticks(np.arange(len(names)) + width * (len(rates) - 1) / 2, names)
    ax1.set_ylim(0, 1.05)
    ax1.set_title("Held-out QA and reward-model win rate (higher is better)")
    ax1.legend(fontsize=8)
    ax2.bar(names, [table[n]["domain_ppl"] for n in names], color="#C44E52")
    ax2.set_yscale("log")
    ax2.set_title("Domain perplexity (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    models = {k: inputs[k] for k in CHECKPOINTS if k in inputs}
    eval_text = [r["text"] for r in read_jsonl(inputs["eval_text"])]
    eval_prompts = read_jsonl(inputs["eval_prompts"]) if "eval_prompts" in inputs else []
    return evaluate(models, inputs.get("reward"), eval_text, read_jsonl(inputs["eval_qa"]), eval_prompts,
                    cfg.evaluate, cfg.seed, out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="NAME=DIR, NAME in " + ", ".join(CHECKPOINTS))
    ap.add_argument("--reward", type=Path)
    ap.add_argument("--eval-text", type=Path, required=True)
    ap.add_argument("--eval-qa", type=Path, required=True)
    ap.add_argument("--eval-prompts", type=Path)
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.model)
    bad = [k for k in models if k not in CHECKPOINTS]
    if bad:
        print(f"error: --model {bad[0]}: unknown checkpoint name", file=sys.stderr)
        return 2
    out = evaluate({k: Path(v) for k, v in models.items()}, args.reward, [r["text"] for r in read_jsonl(args.eval_text)],
                   read_jsonl(args.eval_qa), read_jsonl(args.eval_prompts) if args.eval_prompts else [],
                   EvaluateConfig(), 0, args.out_dir)
    print(out.summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
