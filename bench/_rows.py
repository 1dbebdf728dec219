"""One result row of a bench grid: stamped, appended to its JSONL file (so a long grid can resume) and printed."""

from __future__ import annotations

import json
import time
from pathlib import Path


def append_row(path: Path, rec: dict) -> None:
    rec = {**rec, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with Path(path).open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)
