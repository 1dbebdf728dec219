"""The CLI as a user types it: bad input is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, TINY, copy_config


def tw(*args: str, env_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNEWRIGHT_HOME": str(env_home), "PREFECT_HOME": str(env_home / "prefect")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


def test_config_error_names_key_and_file(tmp_path):
    bad = copy_config(TINY, tmp_path, "bad", lambda d: d["dapt"].update({"epoch": 3}))
    line = one_error_line(tw("run", str(bad), env_home=tmp_path))
    assert line.startswith(f"error: {bad}:")
    assert line.endswith("dapt.epoch: unknown key (not part of the schema; check the spelling)")


def test_missing_config_file(tmp_path):
    line = one_error_line(tw("run", str(tmp_path / "none.yaml"), env_home=tmp_path))
    assert line == f"error: {tmp_path / 'none.yaml'}: config file not found"


def test_missing_input_file(tmp_path):
    cfg = tmp_path / "real.yaml"
    cfg.write_text("data:\n  corpus: missing.jsonl\n  sft: s.jsonl\n  preference: p.jsonl\n  eval_text: t.jsonl\n"
                   "  eval_qa: q.jsonl\nmodel:\n  scratch: {}\n")
    line = one_error_line(tw("run", str(cfg), env_home=tmp_path))
    assert line == f"error: {tmp_path / 'missing.jsonl'}: file not found (data.corpus)"


def test_bad_record_in_corpus_stops_before_any_stage(tmp_path):
    for name in ("s", "p", "t", "q"):
        (tmp_path / f"{name}.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "corpus.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    cfg = tmp_path / "real.yaml"
    cfg.write_text("data:\n  corpus: corpus.jsonl\n  sft: s.jsonl\n  preference: p.jsonl\n  eval_text: t.jsonl\n"
                   "  eval_qa: q.jsonl\nmodel:\n  scratch: {}\n")
    line = one_error_line(tw("run", str(cfg), env_home=tmp_path))
    assert line.startswith(f"error: {tmp_path / 'corpus.jsonl'}:2: ")
    assert not (tmp_path / "mlflow.db").exists(), "nothing was started"


def test_unknown_stage_selection(tmp_path):
    line = one_error_line(tw("run", str(TINY), "--only", "ppo", env_home=tmp_path))
    assert line.startswith("error: --only ppo: not a stage of this pipeline")


def test_stages_lists_the_contract_order(tmp_path):
    p = tw("stages", env_home=tmp_path)
    assert p.returncode == 0
    names = [ln.split()[0] for ln in p.stdout.splitlines()]
    assert names == ["sanitize", "dedup", "curriculum", "dapt", "sft", "reward", "dpo", "ppo", "grpo", "evaluate",
                     "export"]


def test_every_stage_runs_alone_with_help():
    for stage in ("sanitize", "dedup", "curriculum", "dapt", "sft", "reward", "dpo", "evaluate", "export", "promote"):
        p = subprocess.run([sys.executable, "-m", f"pipelines.{stage}", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, (stage, p.stderr)
        assert "usage:" in p.stdout


def test_prefect_artifact_key_from_any_config_name():
    """The markdown artifact's key comes from the config file's stem; Prefect rejects dots and capitals."""
    from flows.finetune import artifact_key

    assert artifact_key("demo-b1.0") == "tunewright-demo-b1-0"
    assert artifact_key("My_Pipeline v2") == "tunewright-my-pipeline-v2"
    assert artifact_key("...") == "tunewright-pipeline"
