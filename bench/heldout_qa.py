"""Held-out QA experiments: dapt + sft + evaluate on the demo data outside the flow, one variant per call.

    .venv/bin/python -m bench.heldout_qa --tag mix1 --mix-sft 1.0 [--epochs 25] [--lr 2e-3] [--scratch '{"hidden_size": 384}']

Builds (once per --work directory) the scratch base model, then trains dapt with the given settings, then sft as in
demo.yaml, and prints for the dapt and sft models:
- held-out exact match (overall and English only);
- domain perplexity;
- a recall probe: from the corpus's own sentences stating held-out facts, cut just before the value, does greedy
  decoding give the value? This shows whether facts are stored even when questions cannot reach them.

It also prints the majority-answer baseline: each held-out question answered with the commonest sft answer for its
attribute and language. The numbers in bench/RESULTS.md ("Demo pipeline") come from this script. It runs on the raw
corpus (no sanitize / dedup / curriculum), so it differs slightly from a pipeline run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import random
import re
import time
from pathlib import Path

from pipelines import demo_data
from pipelines.artifacts import read_jsonl
from pipelines.chat import Renderer
from pipelines.config import load_config
from pipelines.dapt import dapt, replay_texts
from pipelines.evaluate import domain_perplexity, generate, normalize_answer
from pipelines.formats import normalize
from pipelines.modeling import build_scratch, load_model, load_tokenizer, merge_adapter
from pipelines.sft import sft

ROOT = Path(__file__).resolve().parents[1]


def _template(question: str) -> tuple[str, str] | None:
    """(attribute, language) of a demo question, whatever product it names."""
    for lang, by_attr in demo_data.QUESTIONS.items():
        for attr, templates in by_attr.items():
            for t in templates:
                if re.fullmatch(re.escape(t).replace(re.escape("{p}"), r"\w+"), question):
                    return attr, lang
    return None


def majority_baseline(sft_pairs: list[dict], qa: list[dict]) -> float:
    counts: dict = collections.defaultdict(collections.Counter)
    for r in sft_pairs:
        counts[_template(r["prompt"])][r["completion"].strip()] += 1
    hits = [counts[_template(q["question"])].most_common(1)[0][0] == q["answer"] for q in qa]
    return sum(hits) / len(hits)


def recall_probe(model, tok, corpus: list[str], qa: list[dict], limit: int = 200) -> float:
    values: dict[str, set[str]] = collections.defaultdict(set)
    for q in qa:
        values[q["product"]].add(q["answer"])
    prefixes, targets = [], []
    for doc in corpus:
        for name, vals in values.items():
            if name not in doc:
                continue
            for v in vals:
                for m in re.finditer(re.escape(v), doc):
                    pre = doc[: m.start()]
                    if name in pre[-60:] and "|" not in pre:  # one product's sentence, not a catalogue row
                        prefixes.append(pre.rstrip())
                        targets.append(v)
    prefixes, targets = prefixes[:limit], targets[:limit]
    out, _ = generate(model, tok, prefixes, 8, 64)
    return sum(o.strip().startswith(t) for o, t in zip(out, targets)) / max(1, len(targets))


def report(tag: str, label: str, mdir: Path, files: dict[str, Path], corpus: list[str], template) -> None:
    tok, model = load_tokenizer(mdir), load_model(mdir)
    qa = read_jsonl(files["eval_qa"])
    renderer = Renderer.for_model(tok, template)  # demo.yaml's Question/Answer format
    answers, _ = generate(model, tok, [renderer.prompt([{"role": "user", "content": q["question"]}]) for q in qa], 24, 64)
    em = [normalize_answer(a) == normalize_answer(q["answer"]) for a, q in zip(answers, qa)]
    en = [e for e, q in zip(em, qa) if q["lang"] == "en"]
    ppl = domain_perplexity(model, tok, [r["text"] for r in read_jsonl(files["eval_text"])])
    probe = recall_probe(model, tok, corpus, qa)
    print(f"{tag} {label}: EM {sum(em) / len(em):.3f} (en {sum(en) / len(en):.3f}), domain ppl {ppl:.1f}, "
          f"recall probe {probe:.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tw-heldout"))
    ap.add_argument("--mix-sft", type=float, default=0.0)
    ap.add_argument("--epochs", type=float)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--scratch", default="{}", help="JSON overrides of model.scratch (changes need a new --work)")
    ap.add_argument("--sizes", default="{}", help="JSON overrides of demo_data.SIZES['full'] (need a new --work)")
    a = ap.parse_args(argv)
    demo_data.SIZES["full"] = dataclasses.replace(demo_data.SIZES["full"], **json.loads(a.sizes))
    cfg = load_config(ROOT / "pipelines" / "configs" / "demo.yaml")
    scratch = cfg.model.scratch.model_copy(update=json.loads(a.scratch))
    files = demo_data.generate(a.work / "data", "full", cfg.seed)
    corpus = [r["text"] for r in read_jsonl(files["corpus"])]
    if not (a.work / "base").exists():
        build_scratch(scratch, corpus, [r["text"] for r in read_jsonl(files["general"])], cfg.seed, a.work / "base")
    sft_pairs = read_jsonl(files["sft"])
    print(f"majority-answer baseline EM {majority_baseline(sft_pairs, read_jsonl(files['eval_qa'])):.3f}")
    conversations = [normalize(r, "conversation") for r in sft_pairs]
    texts = list(corpus)
    if a.mix_sft:
        texts += replay_texts(Renderer.for_model(load_tokenizer(a.work / "base"), cfg.template), conversations, a.mix_sft)
        random.Random(cfg.seed).shuffle(texts)
    dcfg = cfg.dapt.model_copy(update={k: v for k, v in (("epochs", a.epochs), ("learning_rate", a.lr)) if v})
    t = time.time()
    dapt(texts, a.work / "base", dcfg, cfg.seed, a.work / f"dapt_{a.tag}", work_dir=a.work / f"dapt_{a.tag}_ckpt",
         template=cfg.template)
    print(f"dapt {time.time() - t:.0f}s", flush=True)
    report(a.tag, "dapt", a.work / f"dapt_{a.tag}" / "model", files, corpus, cfg.template)
    sft(conversations, a.work / f"dapt_{a.tag}" / "model", cfg.sft, cfg.seed, a.work / f"sft_{a.tag}",
        work_dir=a.work / f"sft_{a.tag}_ckpt", template=cfg.template)
    merge_adapter(a.work / f"dapt_{a.tag}" / "model", a.work / f"sft_{a.tag}" / "model", a.work / f"sft_{a.tag}_merged")
    report(a.tag, "sft", a.work / f"sft_{a.tag}_merged", files, corpus, cfg.template)


if __name__ == "__main__":
    main()
