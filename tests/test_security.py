"""Security: both servers refuse unauthenticated requests, MLflow's old default admin password is refused, no secret
leaks into logs / MLflow params and tags / Prefect results, weights load from safetensors only, remote code runs
only when the config says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from deployments.stack import free_port
from tests._ops import PLANTED_ENV_SECRET, PLANTED_PATH_TOKEN, first_run, ops
from tests.conftest import ROOT

slow = pytest.mark.slow


@slow
def test_unauthenticated_requests_are_refused():
    o = ops()
    s = o.stack
    # Prefect: the API and the UI's settings need the auth string
    for auth in (None, ("admin", "wrong"), ("admin", "password1234")):
        r = requests.post(f"{s.prefect_api}/flows/filter", json={}, auth=auth, timeout=30)
        assert r.status_code == 401, (auth, r.status_code)
    user, password = s.prefect_auth.split(":", 1)
    assert requests.post(f"{s.prefect_api}/flows/filter", json={}, auth=(user, password), timeout=30).status_code == 200
    # MLflow: tracking API, artifacts and the UI
    for path in ("/api/2.0/mlflow/experiments/search?max_results=1", "/api/2.0/mlflow-artifacts/artifacts", "/"):
        for auth in (None, ("admin", "password1234"), (s.mlflow_user, "x" + s.mlflow_password)):
            r = requests.get(f"{s.mlflow_url}{path}", auth=auth, timeout=30)
            assert r.status_code == 401, (path, auth, r.status_code)
    r = requests.get(f"{s.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1",
                     auth=(s.mlflow_user, s.mlflow_password), timeout=30)
    assert r.status_code == 200


@pytest.mark.parametrize("password", ["password1234", "", "short"])
def test_default_or_weak_mlflow_admin_password_is_refused_at_start_up(tmp_path, password):
    env = {**os.environ, "TUNEWRIGHT_ENV_FILE": str(tmp_path / ".env"), "TUNEWRIGHT_STACK_DIR": str(tmp_path / "stack"),
           "MLFLOW_TRACKING_PASSWORD": password, "TUNEWRIGHT_PREFECT_PORT": str(free_port()),
           "TUNEWRIGHT_MLFLOW_PORT": str(free_port())}
    r = subprocess.run([sys.executable, "-m", "deployments.stack", "up"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "MLFLOW_TRACKING_PASSWORD" in r.stderr and "refusing to start" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "stack").glob("pids/*.pid")), "nothing may start"


def _scan(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s and s in text]


@slow
def test_no_secret_in_logs_mlflow_params_tags_or_prefect_results():
    """The e2e run had a token in its worker's environment and a token-looking directory in its config path."""
    o = ops()
    res = first_run()
    fr = res["flow_run"]
    assert PLANTED_PATH_TOKEN in str(res["config"]) and fr["state_type"] == "COMPLETED"
    secrets = [PLANTED_ENV_SECRET, PLANTED_PATH_TOKEN, *o.stack.secrets()]
    found: dict[str, list[str]] = {}

    # every log the stack wrote (servers, worker and the flow runs it ran)
    for log in (o.stack.state_dir / "logs").glob("*.log"):
        found[f"log {log.name}"] = _scan(log.read_text(errors="replace"), secrets)
    # the flow run's logs as the Prefect UI shows them
    found["prefect flow-run logs"] = _scan(json.dumps(o.logs(fr["id"])), secrets)
    # Prefect results and states: the flow run (all but the parameters the user typed), its task runs, artifacts
    fr_public = {k: v for k, v in o.flow_run(fr["id"]).items() if k != "parameters"}
    found["prefect flow run"] = _scan(json.dumps(fr_public), secrets)
    tasks = o.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [fr["id"]]}}})
    found["prefect task runs"] = _scan(json.dumps(tasks), secrets)
    found["prefect artifacts"] = _scan(json.dumps(o.post("/artifacts/filter", {})), secrets)
    found["prefect deployments/pools"] = _scan(json.dumps([o.deployment("adhoc"), o.deployment("nightly"),
                                                           o.get("/work_pools/cpu")]), secrets)
    # stack secrets may not even be in the flow run's parameters
    found["prefect flow-run parameters"] = _scan(json.dumps(o.flow_run(fr["id"])["parameters"]), o.stack.secrets())
    # MLflow params and tags of every run (parent and children)
    for run in o.all_runs():
        found[f"mlflow run {run.info.run_name}"] = _scan(json.dumps([run.data.params, run.data.tags]), secrets)
    leaks = {k: v for k, v in found.items() if v}
    assert not leaks, f"secrets found: {leaks}"
    assert len(found) > 10


# ---------------------------------------------------------------------------------------- model loading rules
def _tiny_llama(path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    return model


def test_weights_load_from_safetensors_only(tmp_path):
    import torch

    from pipelines.modeling import load_model

    model = _tiny_llama(tmp_path / "safe")
    loaded = load_model(tmp_path / "safe")
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    # the same weights as a pickle (.bin) only: refused, never unpickled
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "safe" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_model(pickled)


REMOTE_CODE = '''
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM

MARKER = Path(r"{marker}")
MARKER.write_text("remote code ran")


class TwCustomConfig(LlamaConfig):
    model_type = "tw_custom"


class TwCustomModel(LlamaForCausalLM):
    config_class = TwCustomConfig
'''


def _remote_code_model(path: Path, marker: Path) -> None:
    _tiny_llama(path)
    (path / "tw_custom.py").write_text(REMOTE_CODE.format(marker=marker))
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="tw_custom", architectures=["TwCustomModel"],
               auto_map={"AutoConfig": "tw_custom.TwCustomConfig", "AutoModelForCausalLM": "tw_custom.TwCustomModel"})
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("config_says", [None, False, True])
def test_trust_remote_code_only_when_the_config_says_so(tmp_path, monkeypatch, config_says):
    import yaml

    from pipelines.config import load_config
    from pipelines.modeling import load_model

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    model_dir, marker = tmp_path / "model", tmp_path / "marker"
    _remote_code_model(model_dir, marker)
    data = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    data["model"] = {"name_or_path": str(model_dir)}
    if config_says is not None:
        data["model"]["trust_remote_code"] = config_says
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.trust_remote_code is bool(config_says)
    if config_says:
        model = load_model(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        assert type(model).__name__ == "TwCustomModel" and marker.is_file()
    else:
        with pytest.raises(ValueError, match="trust_remote_code"):
            load_model(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        assert not marker.exists(), "the checkpoint's code ran without trust_remote_code"
