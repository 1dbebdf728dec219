"""Faults, for real: a worker SIGKILLed in the middle of sft, a SIGTERMed flow run, an MLflow outage.

- SIGKILL the worker (its whole process group: the worker and the flow run it runs) while sft trains, then run
  again: sft resumes from its newest *complete* checkpoint (an interrupted one is never chosen), ends at the
  configured number of steps, and no finished upstream stage is recomputed.
- SIGTERM the flow-run process in the middle of sft: the stage's MLflow run ends KILLED (or FAILED), never RUNNING.
- MLflow down for a few seconds: calls are retried with backoff and create no duplicate run; a validation error
  is raised at once, not retried.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests._ops import FINAL, first_run, ops

slow = pytest.mark.slow
SFT_STEPS, SAVE_STEPS = 60, 10
UPSTREAM = ["sanitize", "dedup", "curriculum", "dapt"]


def _faults_config(o):
    def edit(d):
        d["sft"].update(max_steps=SFT_STEPS, save_steps=SAVE_STEPS)

    return o.config("faults", edit)


def _sft_child(o, fid: str):
    """The running sft child run of a flow run's parent, once both exist (else None)."""
    parents = [r for r in o.all_runs() if r.data.tags.get("prefect.flow_run_id") == fid]
    if not parents:
        return None
    return o.children(parents[0].info.run_id).get("sft")


def _wait_for_checkpoint(o, fid: str, timeout: float = 900.0) -> tuple[object, Path]:
    """Wait until sft of flow run ``fid`` trains and has written a complete checkpoint; return (child run, work dir)."""
    t0, child, work = time.time(), None, None
    while time.time() - t0 < timeout:
        fr = o.flow_run(fid)
        assert fr["state_type"] not in FINAL, f"flow run ended ({fr['state_type']}) before sft checkpointed"
        if child is None:
            child = _sft_child(o, fid)
            if child is not None:
                work = o.stack.tunewright_home / "work" / "sft" / child.data.tags["tunewright.fingerprint"]
            time.sleep(1)
            continue
        if any((p / "trainer_state.json").is_file() for p in work.glob("checkpoint-*")):
            return child, work
        time.sleep(0.2)
    raise TimeoutError(f"sft of {fid} wrote no checkpoint in {timeout:.0f}s")


def _complete_steps(work: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in work.glob("checkpoint-*") if (p / "trainer_state.json").is_file())


def _crash(o, fid: str, why: str) -> None:
    o.post(f"/flow_runs/{fid}/set_state", {"state": {"type": "CRASHED", "name": "Crashed", "message": why},
                                            "force": True})


def _computed(o, stages) -> dict[str, int]:
    runs = o.all_runs()
    return {s: sum(1 for r in runs if r.info.run_name == s and r.data.tags.get("tunewright.cache") == "miss"
                   and r.data.tags.get("mlflow.parentRunId")) for s in stages}


@slow
def test_sigkill_worker_mid_sft_resumes_from_last_complete_checkpoint():
    o = ops()
    assert first_run()["flow_run"]["state_type"] == "COMPLETED"  # upstream stages are cached
    computed_before = _computed(o, UPSTREAM)
    cfg = _faults_config(o)

    run_a = o.trigger({"config": str(cfg), "only": "sft"})
    child_a, work = _wait_for_checkpoint(o, run_a["id"])
    os.killpg(o.stack.pid("worker-cpu"), signal.SIGKILL)  # the worker and the flow run it is running
    o.stack.pid_file("worker-cpu").unlink()
    time.sleep(1)
    steps = _complete_steps(work)
    assert steps and steps[-1] < SFT_STEPS, f"killed too late: checkpoints {steps}"
    assert o.mlflow().get_run(child_a.info.run_id).info.status != "FINISHED"
    # A checkpoint interrupted while being written: weights half there, no trainer_state.json (written last).
    torn = work / f"checkpoint-{steps[-1] + SAVE_STEPS // 2}"
    shutil.copytree(work / f"checkpoint-{steps[-1]}", torn)
    (torn / "trainer_state.json").unlink()
    for f in torn.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    _crash(o, run_a["id"], "worker killed (test)")

    log = o.stack.log_file("worker-cpu")
    offset = log.stat().st_size
    o.stack.start_worker()
    run_b = o.wait(o.trigger({"config": str(cfg), "only": "sft"})["id"])
    assert run_b["state_type"] == "COMPLETED", o.stack.tail("worker-cpu", 80)

    new_log = log.read_bytes()[offset:].decode(errors="replace")
    resumed = re.findall(r"Loading model from \S*/checkpoint-(\d+)", new_log)
    # transformers may print the line more than once (logger + captured stdout); every mention must be the last
    # complete checkpoint, never the torn one and never a fresh start
    assert resumed and set(resumed) == {str(steps[-1])}, f"expected a resume from checkpoint-{steps[-1]}, log says {resumed}"
    parent = o.parent_of(run_b["id"])
    kids = o.children(parent.info.run_id)
    assert {s: kids[s].data.tags["tunewright.cache"] for s in UPSTREAM} == {s: "hit" for s in UPSTREAM}
    assert _computed(o, UPSTREAM) == computed_before, "a finished upstream stage was recomputed"
    sft = kids["sft"]
    assert sft.info.status == "FINISHED" and sft.data.tags["tunewright.cache"] == "miss"
    assert sft.data.metrics["global_step"] == SFT_STEPS
    assert not work.exists(), "checkpoints are removed once the stage has finished"


def _flow_run_process(worker_pid: int):
    import psutil

    for p in psutil.Process(worker_pid).children(recursive=True):
        try:
            if "prefect.engine" in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    return None


@slow
def test_sigterm_ends_the_stage_run_killed_not_running():
    o = ops()
    first_run()
    run_c = o.trigger({"config": str(_faults_config(o)), "only": "sft"})
    child, _ = _wait_for_checkpoint(o, run_c["id"])
    proc = _flow_run_process(o.stack.pid("worker-cpu"))
    assert proc is not None, "no flow-run process under the worker"
    proc.send_signal(signal.SIGTERM)
    c = o.mlflow()
    t0 = time.time()
    while c.get_run(child.info.run_id).info.status == "RUNNING" and time.time() - t0 < 120:
        time.sleep(1)
    assert c.get_run(child.info.run_id).info.status in ("KILLED", "FAILED")
    parent_id = child.data.tags["mlflow.parentRunId"]
    while c.get_run(parent_id).info.status == "RUNNING" and time.time() - t0 < 120:
        time.sleep(1)
    assert c.get_run(parent_id).info.status in ("KILLED", "FAILED")
    fr = o.wait(run_c["id"], timeout=180)
    assert fr["state_type"] != "COMPLETED"


# ------------------------------------------------------------------------------------------------ MLflow outage
class Outage:
    """A TCP relay in front of the MLflow server that can refuse connections for a while (the network, mocked)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = _free_port()
        self.requests = 0
        self._srv: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self.up()

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._srv = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        """The server disappears: the port refuses connections, open connections are cut."""
        srv, self._srv = self._srv, None
        if srv is not None:
            srv.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        self._conns = []

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                r, _, _ = select.select([a, b], [], [], 30)
                if not r:
                    return
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is a:
                        self.requests += len(re.findall(rb"(?:GET|POST|PATCH|DELETE) /api/", data))
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def outage(monkeypatch):
    o = ops()
    relay = Outage(o.stack.mlflow_port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{relay.port}")
    yield relay
    relay.down()


def _blip(relay: Outage, seconds: float) -> threading.Thread:
    relay.down()
    t = threading.Timer(seconds, relay.up)
    t.start()
    return t


@slow
@pytest.mark.parametrize("mlflow_http_retries", ["default", "0"])
def test_mlflow_outage_is_retried_without_duplicate_runs(outage, monkeypatch, mlflow_http_retries):
    """With MLflow's own HTTP retries (default) and without them ("0": only tracking.with_retries remains)."""
    from pipelines import tracking

    if mlflow_http_retries == "0":
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    c = tracking.client()
    exp = tracking.experiment_id()
    marker = uuid.uuid4().hex
    calls = []

    def create():
        calls.append(time.time())
        return c.create_run(exp, run_name="outage", tags={"test.outage": marker})

    t0 = time.time()
    timer = _blip(outage, 3.0)
    run = tracking.with_retries(create, "create run")
    timer.join()
    assert time.time() - t0 >= 2.5, "the call cannot have succeeded while the server was down"
    if mlflow_http_retries == "0":
        assert len(calls) >= 2, "tracking.with_retries retried"
        gaps = [b - a for a, b in zip(calls, calls[1:])]
        assert all(g2 > g1 for g1, g2 in zip(gaps, gaps[1:])), f"backoff grows: {gaps}"
    same = c.search_runs([exp], filter_string=f"tags.`test.outage` = '{marker}'")
    assert [r.info.run_id for r in same] == [run.info.run_id], "exactly one run, no duplicate"
    tracking.with_retries(lambda: c.set_terminated(run.info.run_id, "FINISHED"), "end run")


@slow
def test_validation_error_is_not_retried(outage):
    from mlflow.exceptions import MlflowException

    from pipelines import tracking

    c = tracking.client()
    run = c.create_run(tracking.experiment_id(), run_name="validation")
    c.log_param(run.info.run_id, "lr", "0.1")
    before, calls = outage.requests, []

    def change_param():
        calls.append(1)
        c.log_param(run.info.run_id, "lr", "0.2")  # MLflow refuses to change a logged param

    t0 = time.time()
    with pytest.raises(MlflowException) as e:
        tracking.with_retries(change_param, "log param")
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    assert len(calls) == 1 and outage.requests - before == 1, "one request, no retry"
    assert time.time() - t0 < 5
    c.set_terminated(run.info.run_id, "FINISHED")


# -------------------------------------------------------------------------------------------- checkpoint choice
def _checkpoint(work: Path, step: int, complete: bool) -> None:
    d = work / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_an_interrupted_checkpoint_is_never_chosen(tmp_path):
    from pipelines.training import last_checkpoint

    _checkpoint(tmp_path / "a", 10, True)
    _checkpoint(tmp_path / "a", 20, True)
    _checkpoint(tmp_path / "a", 30, False)  # killed while writing
    assert last_checkpoint(tmp_path / "a") == str(tmp_path / "a" / "checkpoint-20")
    _checkpoint(tmp_path / "b", 10, False)  # killed while writing the first one: start over, do not load it
    assert last_checkpoint(tmp_path / "b") is None
    assert last_checkpoint(tmp_path / "missing") is None
