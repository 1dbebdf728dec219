"""tracking.log_batch: params, tags and metrics in as few requests as MLflow's per-call limits allow (issue 12.5).

A real sqlite MLflow store; a spy on the real client records what each request carried.
"""

from __future__ import annotations

import math

import pytest


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEWRIGHT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from pipelines import tracking

    return tracking.client()


class Spy:
    """The real client; every log_batch call's sizes are recorded."""

    def __init__(self, c):
        self.c, self.calls = c, []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.calls.append((len(params), len(tags), len(metrics)))
        return self.c.log_batch(run_id, metrics=metrics, params=params, tags=tags)


def test_limits_are_mlflows():
    from mlflow.utils import validation

    from pipelines import tracking

    assert tracking._batch_limits() == (validation.MAX_PARAMS_TAGS_PER_BATCH, validation.MAX_METRICS_PER_BATCH,
                                        validation.MAX_ENTITIES_PER_BATCH) == (100, 1000, 1000)


def test_everything_logged_in_few_requests_within_the_limits(client):
    from pipelines import tracking

    run = client.create_run(tracking.experiment_id()).info.run_id
    params = {f"p{i:03d}": i for i in range(250)}
    tags = {f"t{i:03d}": f"v{i}" for i in range(150)}
    metrics = {f"m{i:04d}": i / 7 for i in range(1500)} | {"nan": math.nan, "inf": math.inf, "text": "x"}
    spy = Spy(client)
    n = tracking.log_batch(spy, run, params=params, tags=tags, metrics=metrics)
    # 250 params need 3 requests at 100 each; tags and the 1500 metrics fit into those 3 (1000 entities per request)
    assert n == len(spy.calls) == 3, spy.calls
    for p, t, m in spy.calls:
        assert p <= 100 and t <= 100 and m <= 1000 and p + t + m <= 1000, spy.calls
    data = client.get_run(run).data
    assert data.params == {k: str(v) for k, v in params.items()}
    assert {k: v for k, v in data.tags.items() if k.startswith("t")} == tags
    assert data.metrics == pytest.approx({k: v for k, v in metrics.items() if k.startswith("m")})
    assert not {"nan", "inf", "text"} & set(data.metrics), "non-finite and non-numeric metrics are skipped"


def test_nothing_to_log_sends_nothing(client):
    from pipelines import tracking

    spy = Spy(client)
    assert tracking.log_batch(spy, "no-such-run", params={}, tags=None, metrics={"x": "not a number"}) == 0
    assert spy.calls == []


def test_the_parent_runs_config_params_go_in_three_requests(client):
    """The ~220 params of a pipeline's parent run: 3 requests instead of one each."""
    from pipelines import tracking
    from pipelines.config import load_config
    from tests.conftest import TINY

    params = tracking.flatten(load_config(TINY).model_dump(mode="json", exclude={"base_dir"}))
    assert len(params) > 200
    run = client.create_run(tracking.experiment_id()).info.run_id
    spy = Spy(client)
    assert tracking.log_batch(spy, run, params=params) == math.ceil(len(params) / 100)
    assert client.get_run(run).data.params == params
