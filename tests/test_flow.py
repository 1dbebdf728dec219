"""The real finetune flow under a real Prefect API and a temporary MLflow store, on the tiny demo slice.

Asserts what a user checks: one parent run and one child run per stage, artifacts where the contract puts them,
evaluation metrics on the parent, cache hits on a re-run, --only / config edits invalidating exactly the right
stages.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import TINY, copy_config

STAGES = ["sanitize", "dedup", "curriculum", "dapt", "sft", "reward", "dpo", "evaluate", "export"]


def children(parent_run_id: str) -> dict[str, object]:
    from pipelines import tracking

    c = tracking.client()
    runs = c.search_runs([tracking.experiment_id()], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.info.run_name: r for r in runs}


@pytest.fixture(scope="module")
def cfg_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("configs")


@pytest.fixture(scope="module")
def first(tw_home, prefect_api, cfg_dir):
    from flows.finetune import finetune
    from pipelines.config import load_config

    cfg = load_config(copy_config(TINY, cfg_dir, "tiny"))
    return cfg, finetune(cfg)


def test_first_run_computes_every_stage(first):
    from pipelines import tracking

    cfg, out = first
    assert list(out["stages"]) == STAGES
    assert all(s["cache"] == "miss" for s in out["stages"].values())
    c = tracking.client()
    parent = c.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tunewright.pipeline"] == "tiny"
    kids = children(out["parent_run_id"])
    assert sorted(kids) == sorted(STAGES)
    for name, run in kids.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["tunewright.stage"] == name
        assert run.data.tags["tunewright.cache"] == "miss"
        assert len(run.data.tags["tunewright.fingerprint"]) == 32
    # evaluation metrics on the parent, named <checkpoint>/<metric>
    m = parent.data.metrics
    for ck in ("base", "dapt", "sft", "dpo"):
        for metric in ("domain_ppl", "qa_exact_match", "qa_rouge_l"):
            assert f"{ck}/{metric}" in m, f"{ck}/{metric} missing"
    assert 0.0 <= m["dpo/rm_win_rate_vs_sft"] <= 1.0
    # the win rate split by prompt kind; the overall rate is their prompt-weighted mean
    from pipelines.artifacts import read_jsonl
    from pipelines.data import resolve_data

    kinds = [p["kind"] for p in read_jsonl(resolve_data(cfg)["eval_prompts"])]
    split = sum(kinds.count(k) * m[f"dpo/rm_win_rate_vs_sft_{k}"] for k in set(kinds)) / len(kinds)
    assert split == pytest.approx(m["dpo/rm_win_rate_vs_sft"], abs=1e-6)
    assert math.isfinite(m["dpo/kl_to_sft"])
    assert 0.0 <= m["reward/pairwise_accuracy"] <= 1.0
    assert m["dapt/domain_ppl"] < m["base/domain_ppl"], "even one tiny epoch of dapt lowers domain perplexity"
    assert out["evaluation"]["sft"]["qa_exact_match"] == m["sft/qa_exact_match"]


def test_artifacts_follow_the_contract(first):
    from pipelines import tracking
    from pipelines.modeling import MANIFEST

    _, out = first
    c = tracking.client()
    kids = children(out["parent_run_id"])

    def files(run_id: str, path: str = "") -> set[str]:
        return {Path(a.path).name for a in c.list_artifacts(run_id, path)}

    assert "records.jsonl" in files(kids["sanitize"].info.run_id, "data")
    assert "dedup_report.jsonl" in files(kids["dedup"].info.run_id)
    assert {"perplexity_histogram.png", "perplexity.jsonl"} <= files(kids["curriculum"].info.run_id)
    assert {"model.safetensors", MANIFEST, "tokenizer.json"} <= files(kids["dapt"].info.run_id, "model")
    sft_files = files(kids["sft"].info.run_id, "model")
    assert {"adapter_model.safetensors", "adapter_config.json", MANIFEST} <= sft_files
    assert not any(f.endswith(".bin") for f in sft_files)
    assert {"evaluation.png", "evaluation.md", "evaluation.json"} <= files(kids["evaluate"].info.run_id)
    # the sft adapter names, by reference, the exact dapt output it sits on
    local = tracking.fetch(__import__("pipelines.artifacts", fromlist=["ArtifactRef"]).ArtifactRef(
        kids["sft"].info.run_id, "model", kids["sft"].data.tags["tunewright.output_sha256"], "sft"))
    manifest = json.loads((local / MANIFEST).read_text())
    assert manifest["kind"] == "adapter"
    assert manifest["base"]["run_id"] == kids["dapt"].info.run_id
    assert manifest["base"]["sha256"] == kids["dapt"].data.tags["tunewright.output_sha256"]


def test_prefect_markdown_artifact_published(first):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tunewright-tiny"])))

    arts = asyncio.run(read())
    assert arts, "the run publishes a markdown artifact"
    text = arts[0].data
    assert "| stage | cache | seconds | result |" in text and "| dpo |" in text
    assert "qa_exact_match" in text


def test_second_run_is_all_cache_hits(first):
    from flows.finetune import finetune

    cfg, out1 = first
    out2 = finetune(cfg)
    assert {s: r["cache"] for s, r in out2["stages"].items()} == {s: "hit" for s in STAGES}
    kids1, kids2 = children(out1["parent_run_id"]), children(out2["parent_run_id"])
    for s in STAGES:
        assert kids2[s].data.tags["tunewright.source_run_id"] == kids1[s].info.run_id
    assert out2["evaluation"] == out1["evaluation"]
    from pipelines import tracking

    m = tracking.client().get_run(out2["parent_run_id"]).data.metrics
    assert m["sft/qa_exact_match"] == out1["evaluation"]["sft"]["qa_exact_match"]


def test_only_recomputes_one_stage(first):
    from flows.finetune import finetune

    cfg, out1 = first
    out = finetune(cfg, only="sft")
    assert {s: r["cache"] for s, r in out["stages"].items()} == {
        "sanitize": "hit", "dedup": "hit", "curriculum": "hit", "dapt": "hit", "sft": "miss"}
    # Training is deterministic and the manifest keeps no wall-clock numbers, so the recomputed adapter has the
    # first run's content hash and every later stage's cache still hits on it.
    def sft_sha(o):
        return children(o["parent_run_id"])["sft"].data.tags["tunewright.output_sha256"]

    assert sft_sha(out) == sft_sha(out1)


def test_editing_sft_config_invalidates_sft_and_after(first, cfg_dir):
    from flows.finetune import finetune
    from pipelines.config import load_config

    def edit(d):
        d["sft"]["learning_rate"] = 5.0e-3

    cfg = load_config(copy_config(TINY, cfg_dir, "tiny", edit))
    out = finetune(cfg)
    cache = {s: r["cache"] for s, r in out["stages"].items()}
    assert cache == {"sanitize": "hit", "dedup": "hit", "curriculum": "hit", "dapt": "hit",
                     "sft": "miss", "reward": "miss", "dpo": "miss", "evaluate": "miss", "export": "miss"}


STANDALONE = r'''
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
d, questions, out = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d).eval()
gc = GenerationConfig.from_pretrained(d)
rows = []
for msgs in questions:
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        logits = model(**enc).logits[0, -1]
        gen = model.generate(**enc, generation_config=gc, tokenizer=tok)[0, enc["input_ids"].shape[1]:]
    text = tok.decode(gen, skip_special_tokens=True)
    for s in gc.stop_strings or []:
        text = text.split(s, 1)[0]
    rows.append({"prompt": tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                 "answer": text, "logits": logits[:50].tolist()})
json.dump(rows, open(out, "w"))
'''


def test_export_loads_standalone_and_answers_like_evaluate(first, tmp_path):
    """The export run's model/ loads in a fresh process with plain transformers only (copied away from the run's
    cache): same prompt as evaluate rendered, same greedy answers, the same logits as the merged dpo checkpoint."""
    import shutil
    import subprocess
    import sys

    import torch

    from pipelines import tracking
    from pipelines.artifacts import ArtifactRef, read_jsonl
    from pipelines.data import resolve_data
    from pipelines.export import EXPORT_MANIFEST
    from pipelines.modeling import load_model, materialize

    cfg, out = first
    kids = children(out["parent_run_id"])
    ex = kids["export"]
    ref = ArtifactRef(ex.info.run_id, "model", ex.data.tags["tunewright.output_sha256"], "export")
    d = tmp_path / "standalone"
    shutil.copytree(tracking.fetch(ref), d)
    files = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "MLmodel", EXPORT_MANIFEST} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files) and "adapter_config.json" not in files
    manifest = json.loads((d / EXPORT_MANIFEST).read_text())
    assert manifest["checkpoint"] == "dpo"
    assert manifest["evaluation"] == out["evaluation"]["dpo"]
    for s in ("sanitize", "dedup", "curriculum", "dapt", "sft", "reward", "dpo", "evaluate"):
        assert manifest["lineage"][s]["run_id"] == kids[s].info.run_id
        assert manifest["lineage"][s]["sha256"] == kids[s].data.tags["tunewright.output_sha256"]
    qa = read_jsonl(resolve_data(cfg)["eval_qa"])[:6]
    (tmp_path / "q.json").write_text(json.dumps([q["messages"][:-1] for q in qa]))
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("TUNEWRIGHT", "MLFLOW", "PREFECT"))}
    subprocess.run([sys.executable, "-c", STANDALONE, str(d), str(tmp_path / "q.json"), str(tmp_path / "a.json")],
                   check=True, cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)
    got = json.loads((tmp_path / "a.json").read_text())
    pred_file = tracking.client().download_artifacts(kids["evaluate"].info.run_id, "qa_predictions.jsonl", str(tmp_path))
    preds = {p["question"]: p for p in read_jsonl(Path(pred_file)) if p["checkpoint"] == "dpo"}
    for q, g in zip(qa, got):
        p = preds[q["messages"][-2]["content"]]
        assert g["prompt"] == p["prompt_text"], "the export renders the prompt evaluate scored"
        assert g["answer"] == p["prediction"]
    merged = load_model(materialize(ArtifactRef(kids["dpo"].info.run_id, "model",
                                                kids["dpo"].data.tags["tunewright.output_sha256"], "dpo"))).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    enc = tok.apply_chat_template(qa[0]["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.inference_mode():
        ref_logits = merged(**enc).logits[0, -1, :50]
    assert torch.allclose(torch.tensor(got[0]["logits"]), ref_logits, atol=1e-4), "every adapter merged as trained"


def test_export_is_registered_as_a_version(first):
    from pipelines import tracking
    from pipelines.promote import TAG_CHECKPOINT, TAG_DECISION, TAG_EXPORT_RUN, TAG_METRICS

    cfg, out = first
    kids = children(out["parent_run_id"])
    c = tracking.client()
    versions = c.search_model_versions(f"name = '{cfg.registered_model()}'")
    ex_run = kids["export"].info.run_id
    mine = [v for v in versions if v.run_id == ex_run]
    assert len(mine) == 1
    v = mine[0]
    assert v.tags[TAG_CHECKPOINT] == "dpo" and v.tags[TAG_EXPORT_RUN] == ex_run
    assert json.loads(v.tags[TAG_METRICS]) == out["evaluation"]["dpo"]
    assert v.tags[TAG_DECISION] in ("promoted", "rejected")
    assert out["promotion"]["version"] == v.version and out["promotion"]["decision"] == v.tags[TAG_DECISION]


def test_cli_export_works_on_any_finished_run(first, tmp_path, tw_home):
    """``tunewright export RUN_ID OUT_DIR``: a parent run gives its export; a stage run (here sft, which has no
    export of its own) is exported now from its checkpoint; an unknown run is one line and exit code 2."""
    import os
    import subprocess
    import sys

    from pipelines.artifacts import sha256_path
    from pipelines.export import EXPORT_MANIFEST
    from tests.conftest import ROOT

    _, out = first
    kids = children(out["parent_run_id"])
    env = {**os.environ, "TUNEWRIGHT_HOME": str(tw_home)}

    def export(run_id: str, dest: Path):
        return subprocess.run([sys.executable, "-m", "flows.cli", "export", run_id, str(dest)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)

    r = export(out["parent_run_id"], tmp_path / "final")
    assert r.returncode == 0, r.stderr
    assert sha256_path(tmp_path / "final") == kids["export"].data.tags["tunewright.output_sha256"]
    r = export(kids["sft"].info.run_id, tmp_path / "sft")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "sft" / EXPORT_MANIFEST).read_text())
    assert m["checkpoint"] == "sft" and m["evaluation"] == out["evaluation"]["sft"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "sft")).chat_template
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "sft"))
    r = export("0" * 32, tmp_path / "none")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: run 000")
    assert not (tmp_path / "none").exists()


def test_serve_the_run_and_ask_held_out_questions(first, tmp_path, tw_home):
    """``tunewright serve PARENT_RUN_ID`` on a loopback port serves the run's export: held-out demo questions get
    the answers evaluate scored for the exported checkpoint (same template, same greedy decoding)."""
    from pipelines import tracking
    from pipelines.artifacts import read_jsonl
    from pipelines.data import resolve_data
    from tests.test_serve import complete, running, serve_env

    cfg, out = first
    kids = children(out["parent_run_id"])
    pred_file = tracking.client().download_artifacts(kids["evaluate"].info.run_id, "qa_predictions.jsonl", str(tmp_path))
    preds = {p["question"]: p["prediction"] for p in read_jsonl(Path(pred_file)) if p["checkpoint"] == "dpo"}
    qa = read_jsonl(resolve_data(cfg)["eval_qa"])[:4]
    with running([out["parent_run_id"]], serve_env(tw_home), tmp_path / "serve.log") as url:
        for q in qa:
            body = {"model": out["parent_run_id"], "messages": q["messages"][:-1],
                    "max_tokens": cfg.evaluate.max_new_tokens}
            answer = complete(url, body)["choices"][0]["message"]["content"]
            assert answer.strip() == preds[q["messages"][-2]["content"]].strip()


def test_ppo_with_demonstrations_reuses_the_stages_before_it(first, cfg_dir):
    """``preference.algorithm: ppo`` with ``ppo.sft_loss_weight`` and ``ppo.sft_mix_coef``: the flow hands ppo the
    preference pairs as demonstrations and the sft conversations as its instruction mix; every stage up to reward is
    the dpo pipeline's cache hit."""
    from flows.finetune import finetune
    from pipelines import tracking
    from pipelines.config import load_config

    def edit(d):
        d["preference"] = {"algorithm": "ppo", "min_reward_accuracy": 0.0}  # the tiny reward model is not gated
        d["ppo"] = {"max_steps": 2, "rollout_batch_size": 8, "mini_batch_size": 4, "batch_size": 4,
                    "max_new_tokens": 8, "max_length": 64, "sft_loss_weight": 1.0, "sft_mix_coef": 1.0,
                    "peft": {"method": "lora", "r": 4}}

    cfg = load_config(copy_config(TINY, cfg_dir, "tiny", edit))
    out = finetune(cfg)
    cache = {s: r["cache"] for s, r in out["stages"].items()}
    assert cache == {"sanitize": "hit", "dedup": "hit", "curriculum": "hit", "dapt": "hit", "sft": "hit",
                     "reward": "hit", "ppo": "miss", "evaluate": "miss", "export": "miss"}
    run = tracking.client().get_run(out["stages"]["ppo"]["run_id"])
    for term in ("ppo/sft_loss", "ppo/sft_mix_loss"):
        assert math.isfinite(run.data.metrics[term]) and run.data.metrics[term] > 0, term
    assert "ppo" in out["evaluation"]
