"""The operations stack for real: `make up`'s servers and worker, `tunewright deploy`, a run triggered over REST.

One stack per session (tests/_ops.py): Prefect server (basic auth), MLflow basic-auth server, a process worker on
pool `cpu`, on free loopback ports. Checks what an operator checks: the deployments and their form, the nightly
schedule producing runs, an ad-hoc run completing with its MLflow runs finished and both UIs linking to each other,
`make down` stopping exactly the stack's processes, the compose file for a server.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests._ops import STAGES, first_run, ops
from tests.conftest import ROOT

slow = pytest.mark.slow


@slow
def test_make_up_generates_private_random_credentials():
    o = ops()
    env_file = o.base / ".env"
    mode = stat.S_IMODE(env_file.stat().st_mode)
    assert mode == 0o600, f".env is {oct(mode)}"
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#")
    user, password = values["PREFECT_SERVER_API_AUTH_STRING"].split(":", 1)
    assert user == "admin" and len(password) >= 24
    assert len(values["MLFLOW_TRACKING_PASSWORD"]) >= 24 and values["MLFLOW_TRACKING_PASSWORD"] != "password1234"
    assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode == 0, ".env must be git-ignored"
    status = o.stack.status()
    assert all(status[s] for s in ("prefect-server", "mlflow-server", "worker-cpu")), status


@slow
def test_deployments_registered_with_schedule_and_typed_form():
    o = ops()
    nightly, adhoc = o.deployment("nightly"), o.deployment("adhoc")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert all(s["active"] for s in nightly["schedules"])
    assert adhoc["schedules"] == []
    assert nightly["work_pool_name"] == adhoc["work_pool_name"] == "cpu"
    props = adhoc["parameter_openapi_schema"]["properties"]
    assert list(props) == ["config", "from_stage", "only", "force"]
    assert "config file" in props["config"]["description"]
    for p in ("from_stage", "only", "force"):
        assert props[p]["description"], p
    # One enum per field, no union: the UI renders an `anyOf` as "str | None" tabs with a free-text field, an enum
    # (null included: "None") as a select of stage names, an array of an enum as a multi-select (test_browser).
    stage_enum = props["only"]["enum"]
    assert "anyOf" not in props["only"] and "anyOf" not in props["from_stage"] and "anyOf" not in props["force"]
    assert {"sanitize", "sft", "dpo", "evaluate"} <= set(stage_enum) and None in stage_enum
    assert props["from_stage"]["enum"] == stage_enum
    assert props["force"]["type"] == "array" and props["force"]["items"]["enum"] == [s for s in stage_enum if s]
    assert props["force"]["default"] == [] and props["only"]["default"] is None


@slow
def test_deploy_creates_the_work_pools_on_a_fresh_server(tmp_path):
    """`tunewright deploy` against a bare `prefect server start` (basic auth, no pools: what `prefect deploy` alone
    refuses with "work pool 'cpu' does not exist"): it creates cpu and gpu (process), registers the deployments, and
    run again leaves the pools as they are. A server that refuses or is not there: one line, exit code 2."""
    import requests

    from deployments.stack import Stack, basic_auth_header, free_port

    s = Stack.ephemeral(tmp_path / "stack", tunewright_home=tmp_path / "home")
    s.start_prefect()
    try:
        h = basic_auth_header(s.prefect_auth)

        def get(path: str):
            return requests.get(f"{s.prefect_api}{path}", headers=h, timeout=30)

        def deployments() -> dict[str, dict]:
            r = requests.post(f"{s.prefect_api}/deployments/filter", headers=h, json={}, timeout=30)
            r.raise_for_status()
            return {d["name"]: d for d in r.json()}

        def deploy(env: dict[str, str]) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "flows.cli", "deploy"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=600)

        assert get("/work_pools/cpu").status_code == 404 and get("/work_pools/gpu").status_code == 404
        env = s._env(**s.client_env())
        first = deploy(env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "work pools: created cpu, gpu (type process)" in first.stdout, first.stdout
        pools = {p: get(f"/work_pools/{p}").json() for p in ("cpu", "gpu")}
        assert {p: w["type"] for p, w in pools.items()} == {"cpu": "process", "gpu": "process"}
        # Prefect's process job template from the start (env, working dir...), not an empty one until a worker comes
        assert all("command" in w["base_job_template"]["job_configuration"] for w in pools.values())
        deps = deployments()
        assert {d: deps[d]["work_pool_name"] for d in ("nightly", "adhoc", "gpu")} == \
            {"nightly": "cpu", "adhoc": "cpu", "gpu": "gpu"}
        assert "finetune/nightly (cpu)" in first.stdout and "run-stage/gpu (gpu)" in first.stdout, first.stdout

        # an operator's change to a pool survives the next deploy; the deployments are updated, not duplicated
        requests.patch(f"{s.prefect_api}/work_pools/cpu", headers=h, timeout=30,
                       json={"concurrency_limit": 3, "description": "ours"}).raise_for_status()
        again = deploy(env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "work pools: cpu, gpu already exist (left as they are)" in again.stdout, again.stdout
        cpu = get("/work_pools/cpu").json()
        assert (cpu["concurrency_limit"], cpu["description"]) == (3, "ours")
        assert {k: v["id"] for k, v in deployments().items()} == {k: v["id"] for k, v in deps.items()}

        # refused (wrong or no credentials) and unreachable: one line that says what to set, exit 2, no traceback
        no_auth = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}
        wrong = "admin:" + "not-the-password-" + "x" * 8
        cases = {"wrong credentials": ({**no_auth, "PREFECT_API_AUTH_STRING": wrong}, ("401", "PREFECT_API_AUTH_STRING")),
                 "no credentials": (no_auth, ("401", "PREFECT_API_AUTH_STRING")),
                 "no server": ({**env, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"},
                               ("cannot reach", "PREFECT_API_URL"))}
        for case, (e, hints) in cases.items():
            r = deploy(e)
            out = r.stdout + r.stderr
            assert r.returncode == 2, f"{case}: exit {r.returncode}\n{out}"
            assert "Traceback" not in out, f"{case}:\n{out}"
            lines = [line for line in r.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}:\n{out}"
            assert all(x in lines[0] for x in hints), f"{case}: {lines[0]}"
            assert not any(x in out for x in [wrong, wrong.split(":")[1], *s.secrets()]), f"{case}: a secret leaked"
    finally:
        s.stop("prefect-server")


@slow
def test_nightly_schedule_creates_scheduled_runs():
    """The server's scheduler turns the cron schedule into scheduled flow runs (02:00 UTC), for the cpu pool."""
    o = ops()
    dep = o.deployment("nightly")
    runs = []
    for _ in range(45):
        runs = o.post("/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})
        if runs:
            break
        time.sleep(2)
    assert runs, "the scheduler created no runs for finetune/nightly; see prefect-server.log:\n" + \
        "\n".join(line for line in o.stack.tail("prefect-server", 400).splitlines() if "Error" in line)[-3000:]
    assert all(r["expected_start_time"].endswith("T02:00:00Z") for r in runs)
    # a slot already due (a test running just after 02:00 UTC) may have been picked up by the worker
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    assert all(r["state_type"] == "SCHEDULED" for r in runs if r["expected_start_time"][:19] > now)
    assert any(r["expected_start_time"][:19] > now for r in runs), "the next nightly run is scheduled"


@slow
def test_adhoc_run_over_rest_completes_and_links_both_uis():
    o = ops()
    res = first_run()
    fr = res["flow_run"]
    assert fr["state_type"] == "COMPLETED", o.stack.tail("worker-cpu", 80)
    parent = o.parent_of(fr["id"])
    # named after the flow run, linked both ways
    assert parent.info.run_name == fr["name"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tunewright.pipeline"] == "tiny"
    assert parent.data.tags["prefect.flow_run_url"] == f"{o.stack.prefect_ui}/flow-runs/flow-run/{fr['id']}"
    assert f"mlflow:{parent.info.run_id}" in fr["tags"]
    arts = o.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}})
    links = [a["data"] for a in arts if a["key"] == "mlflow-run"]  # a link artifact (stored as markdown)
    mlflow_url = f"{o.stack.mlflow_url}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    assert links == [f"[MLflow run {parent.info.run_id}]({mlflow_url})"]
    r = o.mlflow()  # the link resolves: the run page's API answers for that run
    assert r.get_run(parent.info.run_id).info.run_name == fr["name"]
    # every stage a finished child run; the run's metrics and the published tables are there
    kids = o.children(parent.info.run_id)
    assert sorted(kids) == sorted(STAGES)
    assert {k: v.info.status for k, v in kids.items()} == {s: "FINISHED" for s in STAGES}
    assert "sft/qa_exact_match" in parent.data.metrics
    md = [a["data"] for a in arts if a["key"] == "tunewright-tiny"]
    assert len(md) == 1 and "| dpo |" in md[0] and parent.info.run_id in md[0]
    print(f"first ad-hoc run through the worker: {res['seconds']:.0f}s")


@slow
def test_down_stops_exactly_the_stack_processes(tmp_path):
    """`make down` signals the process groups in its pid files, and nothing else (not the other stack's servers)."""
    from deployments.stack import Stack, group_alive

    o = ops()
    s = o.stack
    mine = Stack(tmp_path / "stack", s.prefect_port, s.mlflow_port, s.prefect_auth, s.mlflow_user, s.mlflow_password,
                 s.flask_secret, tunewright_home=tmp_path / "home")
    mine.start_worker(name="worker-cpu")  # a second worker: the only process of this stack
    worker_pid = mine.pid("worker-cpu")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        env = {**os.environ, "TUNEWRIGHT_STACK_DIR": str(tmp_path / "stack"), "TUNEWRIGHT_ENV_FILE": str(o.base / ".env")}
        out = subprocess.run([sys.executable, "-m", "deployments.stack", "down"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "worker-cpu" in out.stdout
        assert not group_alive(worker_pid), "the worker's process group is still running"
        assert bystander.poll() is None, "down killed an unrelated process"
        assert s.pid("prefect-server") and s.pid("mlflow-server"), "down stopped another stack's servers"
        assert not list((tmp_path / "stack" / "pids").glob("*.pid"))
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait()


def test_compose_describes_the_server_stack():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "worker-cpu", "worker-gpu"} <= set(services)
    assert services["worker-cpu"]["build"]["dockerfile"].endswith("Dockerfile.cpu")
    assert services["worker-gpu"]["build"]["dockerfile"].endswith("Dockerfile.gpu")
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--app-name basic-auth" in mlflow_cmd and "postgresql" in mlflow_cmd and "s3://" in mlflow_cmd
    # credentials only by reference to the environment / .env, never literal
    for name, svc in services.items():
        env = svc.get("environment", {})
        for k, v in (env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)):
            if any(w in k for w in ("PASSWORD", "SECRET", "AUTH_STRING")):
                assert str(v).startswith("${") and ":?" in str(v), f"{name}.{k} must come from .env: {v}"
        for port in svc.get("ports", []):
            assert str(port).startswith(("127.0.0.1:", "${")), f"{name} publishes {port} beyond loopback"
