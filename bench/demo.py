"""Wall time of the demo pipeline per stage, first run vs cached re-run, in a fresh TUNEWRIGHT_HOME.

    .venv/bin/python -m bench.demo [--config pipelines/configs/demo.yaml] [--home /tmp/tw-bench]

Prints a markdown table (stage, first run seconds, re-run seconds, cache) and the evaluation table; the numbers
in bench/RESULTS.md come from this command.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="pipelines/configs/demo.yaml")
    ap.add_argument("--home", default="/tmp/tw-bench")
    args = ap.parse_args()
    shutil.rmtree(args.home, ignore_errors=True)
    os.environ["TUNEWRIGHT_HOME"] = args.home
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("TUNEWRIGHT_NO_PROGRESS", "1")
    from flows.finetune import finetune
    from pipelines.config import load_config
    from pipelines.evaluate import markdown_table

    cfg = load_config(args.config)
    t0 = time.time()
    first = finetune(cfg)
    t1 = time.time()
    second = finetune(cfg)
    t2 = time.time()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}")
    print(f"config: {args.config}\n")
    print("| stage | first run (s) | re-run (s) | re-run cache |\n|---|---:|---:|---|")
    for s, r in first["stages"].items():
        r2 = second["stages"][s]
        print(f"| {s} | {r['seconds']:.1f} | {r2['seconds']:.1f} | {r2['cache']} |")
    print(f"| **total (incl. flow, base model)** | {t1 - t0:.1f} | {t2 - t1:.1f} | ratio {(t2 - t1) / (t1 - t0):.3f} |\n")
    print(markdown_table(first["evaluation"]))


if __name__ == "__main__":
    main()
