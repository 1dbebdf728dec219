"""Evaluate's share of a pipeline run on a user's own chat model and files: this code vs the code before issue 11.

    .venv/bin/python -m bench.own_data [--home /tmp/tw-own] [--old-rev c37c80b]

Builds a tiny random-init Qwen2 (ChatML template, 1024 positions) and data as tests/_own.py does, plus document
questions whose Alpaca ``input`` is a long context (2,000-5,000 tokens, as document-QA sets have). Then, one after
the other on this machine:

- **new**: ``tunewright run`` on the Alpaca JSON array, ShareGPT and ``messages`` files, no held-out files;
- **old**: the commit before issue 11 in a git worktree, on the same train / held-out records converted to what it
  accepted (``prompt``/``completion`` strings, ``question``/``answer``, explicit held-out files), as a user had to.

Prints each run's stage seconds and evaluate's share of the run (the numbers in bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def long_docs(d: Path, n: int = 12) -> Path:
    from tests._own import facts

    rng = random.Random(1)
    filler = [f"The {p} is {c} and costs {price} dollars." for p, c, price in facts()]
    rows = []
    for i in range(n):
        p, c, _ = facts()[i % len(facts())]
        context = " ".join(rng.choice(filler) for _ in range(rng.randrange(250, 600)))
        rows.append({"instruction": f"Read the notes and say what colour the {p} is.", "input": context,
                     "output": f"The {p} is {c}."})
    out = d / "documents.json"
    out.write_text(json.dumps(rows))
    return out


def stage_seconds(home: Path) -> dict[str, float]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    c = mlflow.MlflowClient()
    exp = c.get_experiment_by_name("tunewright")
    parents = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    kids = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    out = {r.info.run_name: (r.info.end_time - r.info.start_time) / 1000 for r in kids}
    out["pipeline"] = parents[0].data.metrics.get("pipeline_seconds", float("nan"))
    return out


def run(cmd: list[str], cwd: Path, home: Path) -> float:
    env = {**os.environ, "TUNEWRIGHT_HOME": str(home), "TUNEWRIGHT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "PYTHONPATH": str(cwd)}
    env.pop("MLFLOW_TRACKING_URI", None)
    t = time.time()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return time.time() - t


def main() -> None:
    from tests._own import build_model, write_data
    from tests.test_own_data import own_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=Path("/tmp/tw-own"))
    ap.add_argument("--old-rev", default="c37c80b")
    a = ap.parse_args()
    shutil.rmtree(a.home, ignore_errors=True)
    a.home.mkdir(parents=True)
    model = build_model(a.home / "qwen2-tiny", "qwen2", positions=1024)
    files = write_data(a.home / "data")
    files["alpaca_docs"] = long_docs(a.home / "data")
    cfg_path = own_config(a.home, model, files)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"]["sft"].append(str(files["alpaca_docs"]))
    cfg["evaluate"] = {"max_new_tokens": 16, "batch_size": 16, "max_length": 1024}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    new_home = a.home / "new"
    run([sys.executable, "-m", "flows.cli", "run", str(cfg_path)], ROOT, new_home)
    new = stage_seconds(new_home)

    # the same split, in the formats the old code read
    os.environ["TUNEWRIGHT_HOME"] = str(new_home)
    from pipelines.config import load_config
    from pipelines.data import prepare

    prepared = prepare(load_config(cfg_path))
    rows = {k: [json.loads(x) for x in p.read_text().splitlines()] for k, p in prepared.items()}
    old_data = a.home / "old-data"
    old_data.mkdir()

    def flat(msgs: list[dict]) -> str:  # what the 35-line converter did: history and system flattened into text
        return "\n".join(m["content"] for m in msgs)

    def dump(name: str, recs: list[dict]) -> str:
        (old_data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        return str(old_data / f"{name}.jsonl")

    old_cfg = {k: v for k, v in cfg.items() if k not in ("template",)}
    old_cfg["model"] = {"name_or_path": str(model)}
    old_cfg["evaluate"] = {"max_new_tokens": 16, "batch_size": 16}
    old_cfg["data"] = {
        "corpus": str(files["corpus"]),
        "sft": dump("sft", [{"prompt": flat(r["messages"][:-1]), "completion": r["messages"][-1]["content"]}
                            for r in rows["sft"]]),
        "preference": dump("pref", [{"prompt": flat(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
                                    for r in rows["preference"]]),
        "eval_text": dump("eval_text", rows["eval_text"]),
        "eval_qa": dump("eval_qa", [{"question": flat(r["messages"][:-1]), "answer": r["messages"][-1]["content"]}
                                    for r in rows["eval_qa"]]),
        "eval_preference": dump("eval_pref", [{"prompt": flat(r["prompt"]), "chosen": r["chosen"],
                                               "rejected": r["rejected"]} for r in rows["eval_preference"]]),
        "eval_prompts": dump("eval_prompts", [{"prompt": flat(r["prompt"])} for r in rows["eval_prompts"]]),
    }
    old_cfg_path = a.home / "own-data-old.yaml"
    old_cfg_path.write_text(yaml.safe_dump(old_cfg, sort_keys=False))
    tree = a.home / "old-tree"
    subprocess.run(["git", "worktree", "add", "-f", "--detach", str(tree), a.old_rev], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        old_home = a.home / "old"
        run([sys.executable, "-m", "flows.cli", "run", str(old_cfg_path)], tree, old_home)
        old = stage_seconds(old_home)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)

    longest = max(len(flat(r["messages"][:-1]).split()) for r in rows["eval_qa"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"held-out instructions: {len(rows['eval_qa'])} (longest prompt {longest} words)")
    print("| stage | old (s) | new (s) |\n|---|---:|---:|")
    for s in ("sanitize", "dedup", "curriculum", "dapt", "sft", "reward", "dpo", "evaluate", "pipeline"):
        print(f"| {s} | {old.get(s, float('nan')):.1f} | {new.get(s, float('nan')):.1f} |")
    for name, t in (("old", old), ("new", new)):
        print(f"{name}: evaluate {t['evaluate']:.1f} s of {t['pipeline']:.1f} s ({t['evaluate'] / t['pipeline']:.0%})")


if __name__ == "__main__":
    main()
