"""Issue 14 grid: curriculum schedule x dedup paraphrase policy on the demo data, each row on one budget and seed.

    TUNEWRIGHT_HOME=/tmp/tw-grid .venv/bin/python -m bench.curriculum_grid --out /tmp/tw-grid/grid.jsonl \
        [--rows fixed:drop,competence_root:keep,...]

The stages run as the pipeline runs them, outside the flow (no MLflow, no reward/dpo): the prepared demo inputs
(``pipelines.data.resolve_data``), then per paraphrase policy once: sanitize -> dedup -> scratch base (built on the
deduped corpus, as ``tasks.base`` builds it) -> curriculum (the perplexity ranking, the same for every schedule);
then per row: dapt (``curriculum.schedule`` = the row's schedule) -> sft -> the evaluate stage's function on the
dapt and the merged sft checkpoints (held-out exact match, ROUGE-L, domain perplexity). Everything else is
``pipelines/configs/demo.yaml``. Each finished row is appended to ``--out`` as one JSON line (with seconds and
/proc/loadavg), so a partial grid keeps its rows. Stage outputs are cached per work dir: a rerun skips what exists.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench._rows import append_row

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("fixed:drop", "competence_root:keep", "random:keep", "fixed:keep", "competence_linear:keep",
         "competence_root:drop", "random:drop", "competence_linear:drop")


def _load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def _row_name(schedule: str, policy: str, sets: list[str]) -> str:
    return "_".join([schedule, policy, *(s.replace("=", "-") for s in sets)])


def _with(cfg, dotted: str, value: str):
    """``cfg`` with one nested field replaced (``dapt.mix_sft=0``); the value is parsed as YAML."""
    import yaml

    head, _, rest = dotted.partition(".")
    if not rest:
        v = yaml.safe_load(value)
        if isinstance(v, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        return cfg.model_copy(update={head: v})
    return cfg.model_copy(update={head: _with(getattr(cfg, head), rest, value)})


def _sft_hits(work: Path, row: dict) -> list[bool]:
    p = work / _row_name(row["schedule"], row["paraphrases"], row.get("set", [])) / "evaluate" / "qa_predictions.jsonl"
    return [json.loads(line)["exact_match"] for line in p.open() if '"checkpoint": "sft"' in line]


def table(out: Path, work: Path | None) -> int:
    """Markdown of the rows; vs row 1: sft EM difference and its paired discordant counts (b = only this row right,
    c = only row 1 right) with the McNemar normal-approximation standard error sqrt(b + c) / n."""
    import math

    from pipelines.tracking import home

    work = work or home() / "grid"
    rows = [json.loads(line) for line in out.open()]
    ref = _sft_hits(work, rows[0])
    print("| schedule | paraphrases | dapt EM | dapt ROUGE-L | sft EM | sft ROUGE-L | sft - dapt | domain ppl dapt / sft | "
          "vs row 1 (sft EM, b/c, paired SE) | dapt s | load (1/5/15 min) at start |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for r in rows:
        hits = _sft_hits(work, r)
        label = " ".join([r["schedule"], *r.get("set", [])])
        b = sum(h and not g for h, g in zip(hits, ref))
        c = sum(g and not h for h, g in zip(hits, ref))
        vs = f"{(b - c) / len(ref):+.3f}, {b}/{c}, ±{math.sqrt(b + c) / len(ref):.3f}" if r is not rows[0] else "–"
        print(f"| {label} | {r['paraphrases']} ({int(r['dedup_records_out'])} rec) | {r['dapt_qa_exact_match']:.3f} | "
              f"{r['dapt_qa_rouge_l']:.3f} | **{r['sft_qa_exact_match']:.3f}** | {r['sft_qa_rouge_l']:.3f} | "
              f"{r['sft_qa_exact_match'] - r['dapt_qa_exact_match']:+.3f} | {r['dapt_domain_ppl']:.2f} / {r['sft_domain_ppl']:.2f} | {vs} | "
              f"{r['dapt_s']:.0f} | {' '.join(eval(r['loadavg_start']))} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="default: $TUNEWRIGHT_HOME/grid")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", default=",".join(ORDER), help="schedule:policy[:section.key=value...],... in the order to run them; "
                    "e.g. competence_root:keep:dapt.mix_sft=0 (any other config field, applied to that row only)")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of --out's rows, with the "
                    "paired sft difference to the first row (questions one gets right and the other wrong)")
    a = ap.parse_args(argv)
    if a.table:
        return table(a.out, a.work)

    from pipelines import curriculum, dapt, dedup, sanitize, sft
    from pipelines.artifacts import read_jsonl
    from pipelines.config import load_config
    from pipelines.data import resolve_data
    from pipelines.evaluate import evaluate
    from pipelines.modeling import build_scratch, load_spec, merge_adapter
    from pipelines.tracking import home

    cfg = load_config(ROOT / "pipelines" / "configs" / "demo.yaml")
    work = a.work or home() / "grid"
    work.mkdir(parents=True, exist_ok=True)
    files = resolve_data(cfg)
    spec = load_spec(cfg.model)

    # sanitize once: the corpus and every other role (the flow's SANITIZED roles), as the pipeline's first stage
    san = work / "sanitize"
    roles = ("sft", "preference", "prompts", "eval_text", "eval_qa", "eval_preference", "eval_prompts")
    if not (san / "sanitize_report.json").is_file():
        t = time.time()
        sanitize.run(cfg, {"records": files["corpus"], **{r: files[r] for r in roles if r in files}}, san)
        print(f"sanitize {time.time() - t:.1f}s", flush=True)
    role = {r: san / "roles" / f"{r}.jsonl" for r in roles if (san / "roles" / f"{r}.jsonl").is_file()}
    eval_text = [r[cfg.data.text_field] for r in read_jsonl(role["eval_text"])]
    eval_qa = read_jsonl(role["eval_qa"])

    prepared: dict[str, dict] = {}

    def policy_data(policy: str) -> dict:
        if policy in prepared:
            return prepared[policy]
        pcfg = cfg.model_copy(update={"dedup": cfg.dedup.model_copy(update={"paraphrases": policy})})
        d = work / policy
        info: dict = {}
        t = time.time()
        if not (d / "dedup" / "data" / "records.jsonl").is_file():
            out = dedup.run(pcfg, {"records": san / "data" / "records.jsonl"}, d / "dedup")
            (d / "dedup" / "metrics.json").write_text(json.dumps(out.metrics))
        info["dedup"] = json.loads((d / "dedup" / "metrics.json").read_text())
        info["dedup_s"] = round(time.time() - t, 1)
        t = time.time()
        if not (d / "base" / "config.json").is_file():  # tasks.base: tokenizer + model on the deduped corpus
            texts = [r[cfg.data.text_field] for r in read_jsonl(d / "dedup" / "data" / "records.jsonl")]
            general = [r["text"] for r in read_jsonl(files["general"])] if "general" in files else []
            build_scratch(cfg.model.scratch, texts, general, cfg.seed, d / "base")
        info["base_s"] = round(time.time() - t, 1)
        t = time.time()
        if not (d / "curriculum" / "data" / "records.jsonl").is_file():
            curriculum.run(pcfg, {"records": d / "dedup" / "data" / "records.jsonl", "model": d / "base"},
                           d / "curriculum")
        info["curriculum_s"] = round(time.time() - t, 1)
        info["dir"] = d
        print(f"data[{policy}]: {json.dumps({k: v for k, v in info.items() if k != 'dir'}, default=str)}", flush=True)
        prepared[policy] = info
        return info

    for row in [r.strip() for r in a.rows.split(",") if r.strip()]:
        schedule, policy, *sets = row.split(":")
        info = policy_data(policy)
        d = info["dir"]
        rcfg = cfg.model_copy(update={"dedup": cfg.dedup.model_copy(update={"paraphrases": policy}),
                                      "curriculum": cfg.curriculum.model_copy(update={"schedule": schedule})})
        for kv in sets:
            rcfg = _with(rcfg, *kv.split("=", 1))
        r = work / _row_name(schedule, policy, sets)
        # a row whose overrides are all sft.* reuses the dapt model of the row without them (trained once)
        rd = work / _row_name(schedule, policy, [kv for kv in sets if not kv.startswith("sft.")]) / "dapt"
        load0 = _load()
        t0 = time.time()
        if not (rd / "grid_metrics.json").is_file():
            dout = dapt.run(rcfg, {"records": d / "curriculum" / "data" / "records.jsonl", "model": d / "base",
                                   "sft": role["sft"], "work_dir": rd.parent / "dapt_ckpt"}, rd)
            (rd / "grid_metrics.json").write_text(json.dumps({**dout.metrics, "seconds": time.time() - t0}))
        dmetrics = json.loads((rd / "grid_metrics.json").read_text())
        t1 = time.time()
        sout = sft.run(rcfg, {"sft": role["sft"], "model": rd / "model", "work_dir": r / "sft_ckpt"}, r / "sft")
        merge_adapter(rd / "model", r / "sft" / "model", r / "sft_merged", spec)
        t2 = time.time()
        ev = evaluate({"dapt": rd / "model", "sft": r / "sft_merged"}, None, eval_text, eval_qa, [],
                      rcfg.evaluate, rcfg.seed, r / "evaluate", spec, rcfg.template)
        t3 = time.time()
        m = ev.metrics
        rec = {"schedule": schedule, "paraphrases": policy, "set": sets, "dedup_records_out": info["dedup"].get("records_out"),
               "paraphrases_kept": info["dedup"].get("paraphrases_kept"),
               **{f"{ck}_{k}": round(m[f"{ck}/{k}"], 4) for ck in ("dapt", "sft")
                  for k in ("qa_exact_match", "qa_rouge_l", "domain_ppl") if f"{ck}/{k}" in m},
               "dapt_s": round(dmetrics["seconds"], 1), "sft_s": round(t2 - t1, 1), "evaluate_s": round(t3 - t2, 1),
               "row_s": round(t3 - t0, 1), "dapt_steps": dmetrics.get("global_step"),
               "dapt_train_loss": dmetrics.get("train_loss"), "sft_train_loss": sout.metrics.get("train_loss"),
               "curriculum_unseen_rows": dmetrics.get("curriculum_unseen_rows"),
               "n_qa": len(eval_qa), "loadavg_start": load0, "loadavg_end": _load()}
        append_row(a.out, rec)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TUNEWRIGHT_NO_PROGRESS", "1")
    raise SystemExit(main())
