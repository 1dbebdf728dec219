"""curriculum: rank deduplicated records easy -> hard by their perplexity under a reference model.

Reads: ``inputs["records"]`` (JSONL from dedup), ``inputs["model"]`` (reference model directory: the base model).
Writes: ``data/records.jsonl`` (records ranked easy -> hard, each with its ``perplexity``), ``perplexity.jsonl``,
``perplexity_histogram.png``. This stage only ranks; ``curriculum.schedule`` is how dapt then reads the ranking
(``pipelines.training.PacingSampler``: fixed easy -> hard every epoch, bucketed, competence-paced, or random).
``schedule: off`` skips the scoring and keeps the records in their given order.

Perplexity is computed in batches of similar length (sorted by token count), so padding is minimal, and padding
never enters the loss (its label is -100). Run alone::

    python -m pipelines.curriculum RECORDS.jsonl MODEL_DIR OUT_DIR [--off]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch

from pipelines.artifacts import StageOutput, read_jsonl, write_jsonl
from pipelines.config import CurriculumConfig, PipelineConfig
from pipelines.modeling import LoadSpec, load_model, load_spec, load_tokenizer


@torch.inference_mode()
def perplexities(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 256,
                 progress: bool = True) -> np.ndarray:
    """Per-text perplexity = exp(mean token NLL over the text's real tokens), batched and length-bucketed."""
    from tqdm.auto import tqdm

    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
    pad = tokenizer.pad_token_id
    out = np.full(len(texts), np.nan, dtype=np.float64)
    model.eval()
    device = next(model.parameters()).device
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="curriculum: perplexity", disable=not progress, file=sys.stderr, mininterval=5):
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(enc[i])] = torch.tensor(enc[i])
            mask[row, : len(enc[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:]
        tmask = mask[:, 1:].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none") * tmask
        mean = nll.sum(1) / tmask.sum(1).clamp(min=1)
        out[idx] = torch.exp(mean).cpu().numpy()
    return out


def order_indices(ppl: np.ndarray, mode: str, buckets: int, seed: int) -> list[int]:
    """easy_to_hard: ascending perplexity (stable); bucketed: k quantile buckets, shuffled within; off: as given."""
    n = len(ppl)
    if mode == "off":
        return list(range(n))
    ranked = sorted(range(n), key=lambda i: (ppl[i], i))
    if mode == "easy_to_hard":
        return ranked
    rng = random.Random(seed)
    out: list[int] = []
    size = math.ceil(n / buckets) if n else 0
    for b in range(buckets):
        chunk = ranked[b * size: (b + 1) * size]
        rng.shuffle(chunk)
        out.extend(chunk)
    return out


def histogram(ppl: np.ndarray, path: Path, title: str = "Per-record perplexity under the reference model") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    finite = ppl[np.isfinite(ppl)]
    ax.hist(np.log10(finite), bins=40, color="#4C72B0")
    ax.set_xlabel("log10 perplexity")
    ax.set_ylabel("records")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curriculum(records: list[dict], field: str, model_dir: Path, ccfg: CurriculumConfig, seed: int,
               out_dir: Path, spec: LoadSpec | None = None) -> StageOutput:
    spec = spec or LoadSpec()
    texts = [r[field] for r in records]
    if ccfg.schedule == "off":
        ppl = np.full(len(texts), np.nan)
    else:
        tokenizer = load_tokenizer(model_dir, **spec.kwargs(model_dir))
        model = load_model(model_dir, dtype=spec.dtype, **spec.kwargs(model_dir)).to(spec.torch_device())
        ppl = perplexities(model, tokenizer, texts, ccfg.batch_size, ccfg.max_length)
    # always the plain ranking: bucketing, pacing and shuffling happen per epoch in the training stage's sampler
    order = order_indices(ppl, "off" if ccfg.schedule == "off" else "easy_to_hard", ccfg.buckets, seed)
    ordered = [{**records[i], "perplexity": None if np.isnan(ppl[i]) else round(float(ppl[i]), 4)} for i in order]
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "data" / "records.jsonl", ordered)
    write_jsonl(out_dir / "perplexity.jsonl", ({"index": i, "perplexity": r["perplexity"]} for i, r in zip(order, ordered)))
    metrics: dict[str, float] = {"records": float(len(records))}
    if ccfg.schedule != "off" and len(ppl):
        histogram(ppl, out_dir / "perplexity_histogram.png")
        q = np.percentile(ppl, [10, 50, 90])
        metrics.update({"ppl_p10": float(q[0]), "ppl_median": float(q[1]), "ppl_p90": float(q[2]),
                        "ppl_mean": float(np.mean(ppl))})
    summary = (f"{len(records)} records {'kept in their order' if ccfg.schedule == 'off' else 'ranked easy -> hard'} "
               f"(dapt schedule {ccfg.schedule}); median perplexity {metrics.get('ppl_median', float('nan')):.1f}")
    return StageOutput(primary="data", metrics=metrics, summary=summary)


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    records = read_jsonl(inputs["records"] / "records.jsonl" if inputs["records"].is_dir() else inputs["records"])
    return curriculum(records, cfg.data.text_field, inputs["model"], cfg.curriculum, cfg.seed, out_dir,
                      load_spec(cfg.model))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--field", default="text")
    ap.add_argument("--off", action="store_true", help="no scoring: keep the records in their given order")
    args = ap.parse_args(argv)
    if not args.records.is_file():
        print(f"error: {args.records}: file not found", file=sys.stderr)
        return 2
    out = curriculum(read_jsonl(args.records), args.field, args.model_dir,
                     CurriculumConfig(schedule="off" if args.off else "fixed"), 0, args.out_dir)
    print(out.summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
