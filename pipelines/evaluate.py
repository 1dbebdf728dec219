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
from pipelines.chat import Renderer
from pipelines.config import EvaluateConfig, PipelineConfig, TemplateConfig
from pipelines.modeling import LoadSpec, load_model, load_spec, load_tokenizer, seed_everything

CHECKPOINTS = ("base", "dapt", "sft", "dpo", "ppo", "grpo")
METRICS = ("domain_ppl", "qa_exact_match", "qa_rouge_l", "qa_f1", "rm_win_rate_vs_sft", "kl_to_sft")
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


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style token F1 (bag of words; characters for Chinese): partial credit for free-form answers."""
    from collections import Counter

    a, b = _tokens(pred), _tokens(ref)
    if not a or not b:
        return float(a == b)
    common = sum((Counter(a) & Counter(b)).values())
    if not common:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32,
                 do_sample: bool = False, stop_ids: list[int] | None = None) -> list[list[int]]:
    """Batched generation from token ids (left padding, on the model's device). Returns each answer's ids, up to
    and including the first stop token (EOS or the template's end of turn)."""
    stop = list(stop_ids or [tokenizer.eos_token_id])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    out_ids: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    model.eval()
    device = _device(model)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + list(prompts[i]) for i in idx], device=device)
        attn = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=pad, eos_token_id=stop,
                             **({"top_k": 0, "top_p": 1.0, "temperature": 1.0} if do_sample else {}))
        for row, i in enumerate(idx):
            gen = out[row, width:].tolist()
            cut = next((k for k, t in enumerate(gen) if t in stop), None)
            out_ids[i] = gen if cut is None else gen[: cut + 1]
    return out_ids


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32,
             do_sample: bool = False, stop_at_newline: bool = True) -> tuple[list[str], list[list[int]]]:
    """Generation from already-rendered prompt strings: decoded answers and their ids (tests, benches)."""
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids = generate_ids(model, tokenizer, enc, max_new_tokens, batch_size, do_sample)
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in ids]
    return [t.split("\n")[0] for t in texts] if stop_at_newline else texts, ids


@torch.inference_mode()
def sequence_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      batch_size: int = 32) -> torch.Tensor:
    """Sum of log p(response tokens | prompt) for each pair of id lists, batched with right padding."""
    out = torch.zeros(len(prompts))
    device = _device(model)
    for s in range(0, len(prompts), batch_size):
        p_ids, r_ids = prompts[s: s + batch_size], responses[s: s + batch_size]
        width = max(len(p) + len(r) for p, r in zip(p_ids, r_ids))
        ids = torch.full((len(p_ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        resp = torch.zeros_like(ids, dtype=torch.bool)
        for row, (p, r) in enumerate(zip(p_ids, r_ids)):
            ids[row, : len(p) + len(r)] = torch.tensor(list(p) + list(r))
            mask[row, : len(p) + len(r)] = 1
            resp[row, len(p): len(p) + len(r)] = True
        ids, mask, resp = ids.to(device), mask.to(device), resp.to(device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * resp[:, 1:]
        out[s: s + len(p_ids)] = tok.sum(1).cpu()
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


def context_limit(model, ecfg: EvaluateConfig) -> int:
    """Prompt + answer tokens this model can take: the configured length, capped by its positions."""
    pos = getattr(model.config, "max_position_embeddings", None) or ecfg.max_length
    return min(ecfg.max_length, int(pos))


def evaluate(models: dict[str, Path], reward_dir: Path | None, eval_text: list[str], eval_qa: list[dict],
             eval_prompts: list[dict], ecfg: EvaluateConfig, seed: int, out_dir: Path,
             spec: LoadSpec | None = None, template: TemplateConfig | None = None) -> StageOutput:
    """``eval_qa`` are canonical conversations (the last assistant turn is the reference), ``eval_prompts``
    canonical prompt records; every prompt is rendered by the checkpoint's own renderer (:mod:`pipelines.chat`)."""
    import time

    from tqdm.auto import tqdm

    from pipelines.reward import score_answers

    spec, template = spec or LoadSpec(), template or TemplateConfig()
    qa = eval_qa[: ecfg.max_qa] if ecfg.max_qa else eval_qa
    eprompts = eval_prompts[: ecfg.max_prompts] if ecfg.max_prompts else eval_prompts
    qa_msgs = [q["messages"][:-1] for q in qa]
    refs = [q["messages"][-1]["content"] for q in qa]
    prompt_msgs = [p["prompt"] for p in eprompts]
    table: dict[str, dict[str, float]] = {}
    predictions: list[dict] = []
    greedy: dict[str, list[str]] = {}
    sampled: dict[str, tuple[list[list[int]], list[list[int]], torch.Tensor]] = {}
    timings: dict[str, float] = {}
    device = spec.torch_device()
    renderers: dict[str, Renderer] = {}
    for name, path in tqdm(list(models.items()), desc="evaluate: checkpoints", file=sys.stderr):
        t0 = time.time()
        seed_everything(seed)
        tok = load_tokenizer(path, spec.trust_remote_code)
        renderer = renderers[name] = Renderer.for_model(tok, template, f"checkpoint {name}")
        model = load_model(path, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code).to(device)
        limit = context_limit(model, ecfg)
        row = {"domain_ppl": domain_perplexity(model, tok, eval_text, ecfg.batch_size, min(256, limit))}
        qa_ids = [renderer.encode_prompt(m, limit - ecfg.max_new_tokens) for m in qa_msgs]
        answers = [renderer.decode_answer(g) for g in
                   generate_ids(model, tok, qa_ids, ecfg.max_new_tokens, ecfg.batch_size, stop_ids=renderer.stop_ids)]
        em = [normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, refs)]
        if qa:
            row["qa_exact_match"] = float(np.mean(em))
            row["qa_rouge_l"] = float(np.mean([rouge_l(a, r) for a, r in zip(answers, refs)]))
            row["qa_f1"] = float(np.mean([token_f1(a, r) for a, r in zip(answers, refs)]))
            row["qa_answer_words"] = float(np.mean([len(_tokens(a)) for a in answers]))
            row["qa_reference_words"] = float(np.mean([len(_tokens(r)) for r in refs]))
        if name == next(iter(models)):
            predictions += [{"checkpoint": "prompt", "prompt_text": tok.decode(ids)} for ids in qa_ids[:3]]
        predictions += [{"checkpoint": name, "question": m[-1]["content"], "prompt_text": renderer.prompt(m),
                         "answer": r, "prediction": a, "exact_match": e}
                        for m, r, a, e in zip(qa_msgs, refs, answers, em)]
        if eprompts:
            p_ids = [renderer.encode_prompt(m, limit - ecfg.max_new_tokens) for m in prompt_msgs]
            greedy[name] = [renderer.decode_answer(g) for g in generate_ids(
                model, tok, p_ids, ecfg.max_new_tokens, ecfg.batch_size, stop_ids=renderer.stop_ids)]
            if name not in ("base", "dapt", "sft"):
                resp = generate_ids(model, tok, p_ids, ecfg.max_new_tokens, ecfg.batch_size, do_sample=True,
                                    stop_ids=renderer.stop_ids)
                sampled[name] = (p_ids, resp, sequence_logprobs(model, p_ids, resp, tok.pad_token_id, ecfg.batch_size))
        table[name] = row
        del model
        timings[name] = time.time() - t0
    if "sft" in models and eprompts:
        tok = load_tokenizer(models["sft"], spec.trust_remote_code)
        sft_model = load_model(models["sft"], dtype=spec.dtype, trust_remote_code=spec.trust_remote_code).to(device)
        for name, (p_ids, resp, logp) in sampled.items():
            ref_logp = sequence_logprobs(sft_model, p_ids, resp, tok.pad_token_id, ecfg.batch_size)
            table[name]["kl_to_sft"] = float(np.mean(logp.numpy() - ref_logp.numpy()))
        del sft_model
        if reward_dir is not None:
            rm = load_model(reward_dir, task="reward", dtype=spec.dtype,
                            trust_remote_code=spec.trust_remote_code).to(device).eval()
            rm_r = Renderer.for_model(load_tokenizer(reward_dir, spec.trust_remote_code), template, "the reward model")
            limit = context_limit(rm, ecfg)
            r_sft = score_answers(rm, rm_r, prompt_msgs, [a.strip() for a in greedy["sft"]], limit, ecfg.batch_size)
            for name, answers in greedy.items():
                if name == "sft":
                    continue
                r = score_answers(rm, rm_r, prompt_msgs, [a.strip() for a in answers], limit, ecfg.batch_size)
                # float64: a share of 100 prompts is k/100 exactly (float32 gave 0.65 as 0.6499999762)
                wins = (r > r_sft).double() + 0.5 * (r == r_sft).double()
                table[name]["rm_win_rate_vs_sft"] = float(wins.mean())
                for kind in sorted({p.get("kind") for p in eprompts} - {None}):  # e.g. fact / nonexistent
                    sel = torch.tensor([p.get("kind") == kind for p in eprompts])
                    table[name][f"rm_win_rate_vs_sft_{kind}"] = float(wins[sel].mean())
                table[name]["rm_mean_reward"] = float(r.mean())
            table["sft"]["rm_mean_reward"] = float(r_sft.mean())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "evaluation.json", table)
    write_json(out_dir / "timings.json", timings)
    write_jsonl(out_dir / "qa_predictions.jsonl", predictions)
    md = markdown_table(table)
    (out_dir / "evaluation.md").write_text(md + "\n", encoding="utf-8")
    chart(table, out_dir / "evaluation.png")
    parent = {f"{ck}/{m}": v for ck, row in table.items() for m, v in row.items()
              if np.isfinite(v) and not m.endswith("_words")}  # answer lengths stay on the child run
    head = f"{len(table)} checkpoints on {len(qa)} held-out questions and {len(eprompts)} held-out prompts"
    metrics = {**{f"{ck}/{m}": v for ck, row in table.items() for m, v in row.items() if np.isfinite(v)},
               **{f"seconds/{k}": v for k, v in timings.items()}}
    return StageOutput(primary="evaluation.json", metrics=metrics, parent_metrics=parent, summary=f"{head}\n\n{md}")


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
    eval_text = [r[cfg.data.text_field] for r in read_jsonl(inputs["eval_text"])] if "eval_text" in inputs else []
    eval_qa = read_jsonl(inputs["eval_qa"]) if "eval_qa" in inputs else []
    eval_prompts = read_jsonl(inputs["eval_prompts"]) if "eval_prompts" in inputs else []
    return evaluate(models, inputs.get("reward"), eval_text, eval_qa, eval_prompts, cfg.evaluate, cfg.seed, out_dir,
                    load_spec(cfg.model), cfg.template)


def main(argv: list[str] | None = None) -> int:
    from pipelines.data import read_role
    from pipelines.records import BadInputError

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
    try:
        texts = [r["text"] for r in read_role(args.eval_text, "eval_text")]
        qa = read_role(args.eval_qa, "eval_qa")
        prompts = read_role(args.eval_prompts, "eval_prompts") if args.eval_prompts else []
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = evaluate({k: Path(v) for k, v in models.items()}, args.reward, texts, qa, prompts, EvaluateConfig(), 0,
                   args.out_dir)
    print(out.summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
