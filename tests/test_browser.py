"""The UIs in a real (headless) browser: Debian's Chromium driven by Playwright, against the shared stack.

Log in to the Prefect UI with the auth string, start finetune/adhoc from the deployment's "Run > Custom run" form
with the quick tiny config, see the flow run Completed, then open MLflow's run comparison for two pipeline runs.
Screenshots go to .tunewright/test-artifacts/screenshots/ (TUNEWRIGHT_TEST_ARTIFACTS overrides);
TUNEWRIGHT_UPDATE_SCREENSHOTS=1 also copies them to docs/screenshots/ for the README.

Needs `make browser-deps` (apt's chromium + the playwright package); the test itself installs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tests._ops import first_run, ops
from tests.conftest import ROOT

CHROMIUM = os.environ.get("TUNEWRIGHT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
try:
    import playwright  # noqa: F401

    HAVE_PLAYWRIGHT = True
except ImportError:
    HAVE_PLAYWRIGHT = False

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (HAVE_PLAYWRIGHT and Path(CHROMIUM).is_file()),
                       reason=f"needs the playwright package and {CHROMIUM}: run `make browser-deps`"),
]
SHOTS = Path(os.environ.get("TUNEWRIGHT_TEST_ARTIFACTS", ROOT / ".tunewright" / "test-artifacts")) / "screenshots"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get("TUNEWRIGHT_UPDATE_SCREENSHOTS") == "1":
        docs = ROOT / "docs" / "screenshots"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, docs / path.name)
    return path


def _close_assistant(page) -> None:
    """MLflow 3 opens an "Assistant" side panel; close it so the screenshot shows the comparison."""
    try:
        page.get_by_role("button", name="Close", exact=True).first.click(timeout=5000)
    except Exception:  # cosmetic only
        pass


def test_prefect_ui_run_then_mlflow_compare(browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=120_000)  # both UIs are large bundles; slow on a busy 2-core runner
    o = ops()
    first = first_run()
    assert first["flow_run"]["state_type"] == "COMPLETED"
    s = o.stack
    dep = o.deployment("adhoc")

    # ---- Prefect UI: log in with the auth string, start a custom run of finetune/adhoc
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{s.prefect_ui}/deployments")
    page.get_by_placeholder("admin:pass").fill(s.prefect_auth)
    page.get_by_role("button", name="Login").click()
    expect(page.get_by_text("adhoc", exact=True)).to_be_visible()
    page.reload()  # drop the "Authentication failed" toasts of the page before the login
    expect(page.get_by_text("nightly", exact=True)).to_be_visible()
    _shot(page, "prefect-deployments")

    page.goto(f"{s.prefect_ui}/deployments/deployment/{dep['id']}")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    config = page.locator("textarea").first
    expect(config).to_have_value("pipelines/configs/demo.yaml")  # the deployment's default, in a typed form
    config.fill("tests/configs/tiny.yaml")  # relative to the project root; same stages as the first run: cache hits
    expect(page.get_by_text("Recompute this stage alone")).to_be_visible()  # parameter descriptions
    _shot(page, "prefect-custom-run")
    before = {r["id"] for r in o.post("/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})}
    page.get_by_role("button", name="Submit").click()

    t0 = time.time()
    new = []
    while not new and time.time() - t0 < 60:
        new = [r for r in o.post("/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})
               if r["id"] not in before]
        time.sleep(1)
    assert len(new) == 1, "the form submitted exactly one flow run"
    run = new[0]
    assert run["parameters"]["config"] == "tests/configs/tiny.yaml"
    done = o.wait(run["id"], timeout=900)
    assert done["state_type"] == "COMPLETED", s.tail("worker-cpu", 60)
    page.goto(f"{s.prefect_ui}/flow-runs/flow-run/{run['id']}")
    expect(page.get_by_text("Completed").first).to_be_visible()
    expect(page.get_by_text(run["name"]).first).to_be_visible()
    _shot(page, "prefect-flow-run")
    ctx.close()

    # ---- MLflow UI (HTTP basic auth): compare the two pipeline runs
    runs = [o.parent_of(first["flow_run"]["id"]), o.parent_of(run["id"])]
    assert runs[1].info.run_name == run["name"]
    assert sorted(o.children(runs[1].info.run_id)) == sorted(o.children(runs[0].info.run_id))
    exp = runs[0].info.experiment_id
    ctx = browser.new_context(viewport={"width": 1600, "height": 2400},  # every metric row of the comparison
                              http_credentials={"username": s.mlflow_user, "password": s.mlflow_password})
    page = ctx.new_page()
    page.set_default_timeout(120_000)  # the MLflow UI is a large bundle; slow on a busy 2-core runner
    ids = json.dumps([r.info.run_id for r in runs], separators=(",", ":"))
    page.goto(f"{s.mlflow_url}/#/compare-runs?runs={quote(ids)}&experiments={quote(json.dumps([exp]))}")
    expect(page.get_by_text("Comparing 2 Runs")).to_be_visible()
    _close_assistant(page)
    for r in runs:
        expect(page.get_by_text(r.info.run_name).first).to_be_visible()
    expect(page.get_by_text("reward/pairwise_accuracy").first).to_be_visible()  # a metric of both runs
    _shot(page, "mlflow-compare")
    # the parent run page: its Prefect flow run link tag
    page.goto(f"{s.mlflow_url}/#/experiments/{exp}/runs/{runs[1].info.run_id}")
    expect(page.get_by_text(run["name"]).first).to_be_visible()
    _shot(page, "mlflow-run")
    ctx.close()
