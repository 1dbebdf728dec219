"""Promotion through the gate, on real pipelines in one MLflow store, and two exports promoted at once against a
real ``mlflow server``.

The pipelines differ in dapt only, which moves domain perplexity a long way and predictably (a hundredth of the
learning rate: barely adapted; three epochs: much lower). The test's gate is domain perplexity (lower is better),
so "worse" and "better" are known in advance; the default gate (reward-model win rate against sft) needs models
that learn, and the demo checks it (bench/export_demo.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, copy_config

GATE = {"metric": "domain_ppl", "higher_is_better": False, "margin": 1.0, "first_reference": 100000.0,
        "guards": [{"metric": "qa_exact_match", "max_drop": 0.05}]}


def _cfg(d: Path, edit_dapt: dict | None = None):
    from pipelines.config import load_config

    def edit(data):
        data["export"] = {"promote": GATE}
        data["dapt"].update(edit_dapt or {})

    sub = d / (json.dumps(edit_dapt, sort_keys=True).replace('"', "").replace(" ", "") if edit_dapt else "default")
    sub.mkdir(parents=True, exist_ok=True)
    return load_config(copy_config(TINY, sub, "promo", edit))


@pytest.fixture(scope="module")
def runs(tw_home, prefect_api, tmp_path_factory):
    from flows.finetune import finetune

    d = tmp_path_factory.mktemp("promo")
    out = {"first": finetune(_cfg(d))}
    out["worse"] = finetune(_cfg(d, {"learning_rate": 1.0e-5}))
    out["better"] = finetune(_cfg(d, {"epochs": 3}))
    return out


def _version(name: str, v: str):
    from pipelines import tracking

    return tracking.client().get_model_version(name, v)


def test_worse_run_keeps_the_champion_and_carries_its_numbers(runs):
    from pipelines.promote import TAG_DECISION, TAG_DETAIL, TAG_METRICS, champion

    first, worse = runs["first"]["promotion"], runs["worse"]["promotion"]
    ppl = {k: r["evaluation"]["dpo"]["domain_ppl"] for k, r in runs.items()}
    assert ppl["worse"] > ppl["first"] + 1.0 > ppl["better"] + 2.0, ppl  # the premise of the test
    assert first["decision"] == "promoted" and first["reference_version"] is None  # against its own sft bound
    assert worse["decision"] == "rejected" and worse["reference_version"] == first["version"]
    v = _version("tunewright-promo", worse["version"])
    assert v.tags[TAG_DECISION] == "rejected"
    detail = json.loads(v.tags[TAG_DETAIL])
    assert detail["candidate"] == pytest.approx(ppl["worse"]) and detail["reference"] == pytest.approx(ppl["first"])
    assert json.loads(v.tags[TAG_METRICS])["domain_ppl"] == pytest.approx(ppl["worse"])
    assert "domain_ppl" in v.tags["tunewright.promotion.reason"]
    # the decision is also in the run's report (run_report.json on the parent run; the Prefect artifact's table)
    from pipelines import tracking

    rep = tracking.client().download_artifacts(runs["worse"]["parent_run_id"], "run_report.json")
    assert json.loads(Path(rep).read_text())["promotion"]["decision"] == "rejected"
    champ = champion("tunewright-promo")
    assert champ is not None and champ.version == runs["better"]["promotion"]["version"]


def test_better_run_moves_the_champion(runs):
    from pipelines.promote import TAG_DECISION

    better = runs["better"]["promotion"]
    assert better["decision"] == "promoted"
    assert better["reference_version"] == runs["first"]["promotion"]["version"], "compared with the champion"
    assert _version("tunewright-promo", better["version"]).tags[TAG_DECISION] == "promoted"


def test_cached_rerun_registers_nothing_new(runs, tmp_path):
    from flows.finetune import finetune
    from pipelines import tracking

    c = tracking.client()
    before = len(c.search_model_versions("name = 'tunewright-promo'"))
    out = finetune(_cfg(tmp_path, {"epochs": 3}))
    assert out["stages"]["export"]["cache"] == "hit"
    assert out["promotion"]["decision"] == "unchanged" and out["promotion"]["version"] == runs["better"]["promotion"]["version"]
    assert len(c.search_model_versions("name = 'tunewright-promo'")) == before


def test_promote_by_hand_is_recorded(runs, tw_home):
    from pipelines.promote import TAG_DECISION, champion

    worse = runs["worse"]["promotion"]["version"]
    env = {**os.environ, "TUNEWRIGHT_HOME": str(tw_home)}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "promote", f"tunewright-promo/{worse}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "manual" in r.stdout
    assert champion("tunewright-promo").version == worse
    v = _version("tunewright-promo", worse)
    assert v.tags[TAG_DECISION] == "manual" and v.tags["tunewright.promotion.gate"] == "rejected"
    assert f"replacing version {runs['better']['promotion']['version']}" in v.tags["tunewright.promotion.reason"]
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "promote", "tunewright-promo/999"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no such model version" in bad.stderr


# --------------------------------------------------------------------------------------- two exports at once
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--serve-artifacts",
         "--artifacts-destination", str(d / "artifacts")],
        stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}, start_new_session=True)
    import requests

    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            raise RuntimeError((d / "server.log").read_text()[-2000:])
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


CONCURRENT = r'''
import json, sys, time
from pipelines.config import PromotionConfig
from pipelines.promote import promote_export
run_id, win, delay = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
time.sleep(delay)
d = promote_export("tunewright-race", run_id, {"rm_win_rate_vs_sft": win, "qa_exact_match": 0.5},
                   {"qa_exact_match": 0.5}, PromotionConfig(), checkpoint="dpo", log=lambda *_: None)
print(json.dumps(d.to_dict()))
'''


def test_two_exports_at_once_cannot_crown_the_worse(mlflow_server, tmp_path):
    """Both runs read "no champion" if nothing serialises them (a hold between reading the champion and moving the
    alias makes that certain), and the worse one, starting later, would move the alias last. Under the lease the
    second compares against the first: the better stays champion, the worse is rejected against it."""
    import mlflow

    from pipelines.config import TemplateConfig, ExportConfig
    from pipelines.export import export_model
    from tests._own import build_model

    d = export_model(build_model(tmp_path / "m"), tmp_path / "export", TemplateConfig(), ExportConfig(),
                     checkpoint="dpo", lineage={}, evaluation=None)
    assert d["checkpoint"] == "dpo"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "TUNEWRIGHT_PROMOTE_HOLD_SECONDS": "3",
           "TUNEWRIGHT_LEASE_SECONDS": "20", "TUNEWRIGHT_HOME": str(tmp_path / "home")}
    c = mlflow.tracking.MlflowClient(mlflow_server)
    exp = c.create_experiment("race")
    run_ids = []
    for _ in range(2):
        rid = c.create_run(exp).info.run_id
        c.log_artifacts(rid, str(tmp_path / "export"), "model")
        c.set_terminated(rid)
        run_ids.append(rid)
    better = subprocess.Popen([sys.executable, "-c", CONCURRENT, run_ids[0], "0.8", "0"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    worse = subprocess.Popen([sys.executable, "-c", CONCURRENT, run_ids[1], "0.6", "1.5"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, text=True)
    (b_out, _), (w_out, _) = better.communicate(timeout=300), worse.communicate(timeout=300)
    assert better.returncode == 0 and worse.returncode == 0
    b, w = json.loads(b_out.strip().splitlines()[-1]), json.loads(w_out.strip().splitlines()[-1])
    assert c.get_model_version_by_alias("tunewright-race", "champion").version == b["version"]
    # serialised: exactly one compared against no champion, the other against the first one's version
    assert sorted([b["reference_version"] is None, w["reference_version"] is None]) == [False, True]
    if w["reference_version"] == b["version"]:  # the better one went first (the usual order)
        assert b["decision"] == "promoted" and w["decision"] == "rejected" and w["reference"] == pytest.approx(0.8)
    else:  # the worse one went first and was champion until the better one beat it
        assert b["reference_version"] == w["version"] and b["reference"] == pytest.approx(0.6)
        assert w["decision"] == b["decision"] == "promoted"


# ------------------------------------------------------------------------------------------------ the gate alone
def test_gate_rules():
    from pipelines.config import PromotionConfig
    from pipelines.promote import gate

    p = PromotionConfig()
    sft = {"qa_exact_match": 0.40, "qa_rouge_l": 0.60}
    ok, why, d = gate({"rm_win_rate_vs_sft": 0.70, "qa_exact_match": 0.38, "qa_rouge_l": 0.58, "kl_to_sft": 5.0},
                      p, None, sft)
    assert ok and d["reference"] == 0.5 and "own sft" in why
    assert [g["status"] for g in d["guards"]] == ["ok", "ok", "n/a"]  # sft has no KL to itself in the table
    ok, why, _ = gate({"rm_win_rate_vs_sft": 0.70, "qa_exact_match": 0.30, "qa_rouge_l": 0.58}, p, None, sft)
    assert not ok and "qa_exact_match 0.300 vs 0.400 (drop 0.100 > 0.05)" in why
    champ = {"rm_win_rate_vs_sft": 0.70, "qa_exact_match": 0.40, "qa_rouge_l": 0.60, "kl_to_sft": 4.0}
    ok, why, _ = gate({**champ, "rm_win_rate_vs_sft": 0.70}, p, champ, sft)
    assert not ok and "not > by more than margin" in why  # a tie does not move the alias
    ok, why, _ = gate({**champ, "rm_win_rate_vs_sft": 0.75, "kl_to_sft": 6.5}, p, champ, sft)
    assert not ok and "kl_to_sft 6.500 vs 4.000 (rise 2.500 > 2.0)" in why
    ok, _, _ = gate({**champ, "rm_win_rate_vs_sft": 0.75, "kl_to_sft": 5.5}, p, champ, sft)
    assert ok
    ok, why, _ = gate({"qa_exact_match": 0.5}, p, champ, sft)
    assert not ok and "rm_win_rate_vs_sft is not in the evaluation" in why
    low = PromotionConfig(metric="domain_ppl", higher_is_better=False, margin=1.0, first_reference=None, guards=())
    assert gate({"domain_ppl": 8.0}, low, {"domain_ppl": 10.0}, None)[0]
    assert not gate({"domain_ppl": 9.5}, low, {"domain_ppl": 10.0}, None)[0]
    assert not gate({"domain_ppl": 8.0}, low, None, {"domain_ppl": 7.0})[0]  # first version: beat own sft
