"""The demo's champion, picked up as a user would: from the registry, in a fresh process, with plain transformers.

1. Runs the demo pipeline (``tunewright run CONFIG``) unless the registry already has a champion of it.
2. ``models:/tunewright-<config>@champion`` -> downloaded into an empty directory (nothing else of the run).
3. A fresh ``python`` that imports only transformers and torch loads it (``AutoModelForCausalLM`` /
   ``AutoTokenizer`` / ``GenerationConfig.from_pretrained``) and answers every held-out question greedily, batched
   with left padding like evaluate, through the exported chat template and generation config.
4. Exact match of those answers (evaluate's normalisation) against the pipeline's evaluation of the checkpoint (the
   version's tags), per-question agreement with ``qa_predictions.jsonl``, export seconds and size, load time,
   generation tokens/s.

    TUNEWRIGHT_NO_PROGRESS=1 HF_HUB_OFFLINE=1 python -m bench.export_demo --home /tmp/tw-export [--config ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FRESH = r'''
import json, sys, time
t0 = time.time()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
d, questions, batch = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d).eval()
gc = GenerationConfig.from_pretrained(d)
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
load_s = time.time() - t0
answers, new_tokens, t1 = [], 0, time.time()
prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in questions]
for s in range(0, len(prompts), batch):
    enc = tok(prompts[s: s + batch], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=gc, tokenizer=tok)
    for row in out[:, enc["input_ids"].shape[1]:]:
        ids = row.tolist()
        stops = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        new_tokens += cut
        text = tok.decode(ids[:cut], skip_special_tokens=True)
        for st in gc.stop_strings or []:
            text = text.split(st, 1)[0]
        answers.append(text)
print(json.dumps({"answers": answers, "load_seconds": load_s, "generate_seconds": time.time() - t1,
                  "new_tokens": new_tokens}))
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True, help="TUNEWRIGHT_HOME of the run (created if missing)")
    ap.add_argument("--config", default="pipelines/configs/demo.yaml")
    ap.add_argument("--batch", type=int, default=32, help="evaluate.batch_size of the config")
    args = ap.parse_args(argv)
    os.environ["TUNEWRIGHT_HOME"] = str(args.home.resolve())
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import mlflow

    from pipelines import tracking
    from pipelines.config import load_config
    from pipelines.evaluate import normalize_answer
    from pipelines.promote import TAG_EXPORT_RUN, TAG_METRICS, TAG_PIPELINE_RUN, champion

    cfg = load_config(ROOT / args.config)
    name = cfg.registered_model()
    pipeline_s = None
    if champion(name) is None:
        t0 = time.time()
        subprocess.run([str(Path(sys.executable).parent / "tunewright"), "run", str(ROOT / args.config)], check=True,
                       cwd=ROOT)
        pipeline_s = time.time() - t0
    mv = champion(name)
    if mv is None:
        print(f"error: {name} has no champion after the run (see the version's tunewright.promotion tags)",
              file=sys.stderr)
        return 1
    c = tracking.client()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_registry_uri(tracking.tracking_uri())
    export_run = c.get_run(mv.tags[TAG_EXPORT_RUN])
    from pipelines.data import resolve_data

    qa = [json.loads(line) for line in open(resolve_data(cfg)["eval_qa"], encoding="utf-8")]
    qa = qa[: cfg.evaluate.max_qa] if cfg.evaluate.max_qa else qa
    with tempfile.TemporaryDirectory(prefix="tw-champion-") as tmp:
        t0 = time.time()
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@champion", dst_path=f"{tmp}/model")
        download_s = time.time() - t0
        (Path(tmp) / "q.json").write_text(json.dumps([q["messages"][:-1] for q in qa]))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNEWRIGHT", "MLFLOW", "PREFECT"))}
        r = subprocess.run([sys.executable, "-c", FRESH, local, f"{tmp}/q.json", str(args.batch)], cwd=tmp,
                           env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, check=True)
        fresh = json.loads(r.stdout.strip().splitlines()[-1])
        size = sum(p.stat().st_size for p in Path(local).rglob("*") if p.is_file())
    refs = [q["messages"][-1]["content"] for q in qa]
    em = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(fresh["answers"], refs)) / max(len(qa), 1)
    row = json.loads(mv.tags[TAG_METRICS])
    ev_run = [r for r in c.search_runs([tracking.experiment_id()],
                                       f"tags.mlflow.parentRunId = '{mv.tags[TAG_PIPELINE_RUN]}' and "
                                       "tags.`tunewright.stage` = 'evaluate'")][0]
    src = ev_run.data.tags.get(tracking.TAG_SOURCE, ev_run.info.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        preds = [json.loads(line) for line in open(c.download_artifacts(src, "qa_predictions.jsonl", tmp))]
    ck = mv.tags.get("tunewright.checkpoint", "dpo")
    pipeline_answers = [p["prediction"] for p in preds if p.get("checkpoint") == ck]
    agree = sum(a == b for a, b in zip(fresh["answers"], pipeline_answers)) / max(len(pipeline_answers), 1)
    result = {
        "registered_model": name, "version": mv.version, "checkpoint": ck,
        "pipeline_qa_exact_match": row.get("qa_exact_match"), "fresh_process_qa_exact_match": em,
        "same_answer_share": agree, "questions": len(qa),
        "export_seconds": export_run.data.metrics.get("export_seconds"),
        "export_mib": size / 2**20, "weights_mib": export_run.data.metrics.get("weights_bytes", 0) / 2**20,
        "download_seconds": download_s, "fresh_load_seconds": fresh["load_seconds"],
        "generate_tokens_per_second": fresh["new_tokens"] / fresh["generate_seconds"],
        "pipeline_seconds": pipeline_s,
    }
    print(json.dumps(result, indent=2))
    print("\n| measure | value |\n|---|---:|")
    for k, v in result.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return 0 if result["fresh_process_qa_exact_match"] == result["pipeline_qa_exact_match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
