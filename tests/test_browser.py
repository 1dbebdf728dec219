"""The UIs in a real (headless) browser: Debian's Chromium driven by Playwright, against the shared stack.

Log in to the Prefect UI with the auth string, start finetune/adhoc from the deployment's "Run > Custom run" form
with the quick tiny config and a stage picked from the stage-name select, open the finished flow run's page (its
stage logs, work pool, and the stage/evaluation tables artifact), then MLflow's run comparison for two pipeline runs
and the parent run's page. One test per page (see "one page per test" below for adding one).
Screenshots go to .tunewright/test-artifacts/screenshots/ (TUNEWRIGHT_TEST_ARTIFACTS overrides);
TUNEWRIGHT_UPDATE_SCREENSHOTS=1 also copies them to docs/screenshots/ for the README.

Needs `make browser-deps` (apt's chromium + the playwright package); the test itself installs nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import get_args
from urllib.parse import quote

import pytest

from flows.finetune import StageName
from tests._ops import STAGES, first_run, ops
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


# ------------------------------------------------------------------------------------------------ one page per test
# Each page a user meets is one test on module-scoped fixtures: `prefect_page` (logged in to the Prefect UI),
# `mlflow_page` (HTTP basic auth), `ui_run` (the run started from the form, finished). Another page is another test
# on them: assert what a user must see there, then `_shot(page, name)`.


@pytest.fixture(scope="module")
def prefect_page(browser):
    """A page logged in to the Prefect UI with the auth string (what a user types into the login form)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=120_000)  # both UIs are large bundles; slow on a busy 2-core runner
    s = ops().stack
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{s.prefect_ui}/deployments")
    page.get_by_placeholder("admin:pass").fill(s.prefect_auth)
    page.get_by_role("button", name="Login").click()
    expect(page.get_by_text("adhoc", exact=True)).to_be_visible()
    page.reload()  # drop the "Authentication failed" toasts of the page before the login
    expect(page.get_by_text("nightly", exact=True)).to_be_visible()
    yield page
    ctx.close()


@pytest.fixture(scope="module")
def mlflow_page(browser):
    s = ops().stack
    ctx = browser.new_context(viewport={"width": 1600, "height": 2400},  # every metric row of the comparison
                              http_credentials={"username": s.mlflow_user, "password": s.mlflow_password})
    page = ctx.new_page()
    page.set_default_timeout(120_000)  # the MLflow UI is a large bundle; slow on a busy 2-core runner
    yield page
    ctx.close()


# the form's run picks `only: evaluate`: the stages up to it run (evaluate recomputed), any after it are skipped
UPTO_EVALUATE = STAGES[:STAGES.index("evaluate") + 1]


def _form_select(page, name: str):
    """The select of the custom-run form's parameter ``name``, opened (the options list is a pop-over)."""
    from playwright.sync_api import expect

    prop = page.locator(".schema-form-property").filter(
        has=page.locator(".schema-form-property__label", has_text=re.compile(rf"^{name} \(Optional\)$"))).first
    control = prop.locator(".p-select-button__control")
    expect(control).to_be_visible()  # a select, not the "str | None" tabs with a free-text field
    control.focus()
    page.keyboard.press("ArrowDown")  # opens it (a mouse click toggles it twice in headless Chromium)
    expect(page.locator(".p-select-option").first).to_be_visible()
    return prop


def _options(page) -> list[str]:
    return [t.strip() for t in page.locator(".p-select-option").all_inner_texts()]


@pytest.fixture(scope="module")
def ui_run(prefect_page) -> dict:
    """finetune/adhoc started from the deployment's "Run > Custom run" form, the tiny config typed in and one stage
    picked from the `only` select (evaluate: recomputed, everything upstream a cache hit of the first run); finished."""
    from playwright.sync_api import expect

    o, page = ops(), prefect_page
    first = first_run()
    assert first["flow_run"]["state_type"] == "COMPLETED"
    dep = o.deployment("adhoc")
    page.goto(f"{o.stack.prefect_ui}/deployments/deployment/{dep['id']}")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    config = page.locator("textarea").first
    expect(config).to_have_value("pipelines/configs/demo.yaml")  # the deployment's default, in a typed form
    config.fill("tests/configs/tiny.yaml")  # relative to the project root; same stages as the first run: cache hits
    expect(page.get_by_text("Recompute this stage alone")).to_be_visible()  # parameter descriptions
    stages = list(get_args(StageName))  # the flow's stage names, in pipeline order
    assert set(STAGES) <= set(stages)
    page.set_viewport_size({"width": 1400, "height": 1300})  # the open list of stage names fits
    for name in ("force", "from_stage"):
        _form_select(page, name)
        assert _options(page) == stages + ([] if name == "force" else ["None"]), name
        page.keyboard.press("Escape")
    only = _form_select(page, "only")
    assert _options(page) == stages + ["None"]
    _shot(page, "prefect-custom-run")
    page.get_by_role("option", name="evaluate", exact=True).click()
    expect(only.locator(".p-select-button__value")).to_have_text("evaluate")
    page.keyboard.press("Escape")  # the options pop-over must be gone, or a click on Submit only closes it
    expect(page.locator(".p-select-option").first).to_be_hidden()
    expect(only.locator(".p-select-button__value")).to_have_text("evaluate")
    page.set_viewport_size({"width": 1400, "height": 900})
    before = {r["id"] for r in o.post("/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})}
    submit = page.get_by_role("button", name="Submit")
    new: list[dict] = []
    for _ in range(3):  # on a quiet machine a click can land while the form is still settling: click again
        submit.click()
        t0 = time.time()
        while not new and time.time() - t0 < 30:
            new = [r for r in o.post("/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})
                   if r["id"] not in before]
            time.sleep(1)
        if new or "/flow-run/" in page.url:
            break
    if not new:
        _shot(page, "prefect-custom-run-not-submitted")
    assert len(new) == 1, "the form submitted exactly one flow run"
    run = new[0]
    assert run["parameters"]["config"] == "tests/configs/tiny.yaml"
    assert run["parameters"]["only"] == "evaluate" and not run["parameters"].get("from_stage")
    assert not run["parameters"].get("force")
    done = o.wait(run["id"], timeout=900)
    assert done["state_type"] == "COMPLETED", o.stack.tail("worker-cpu", 60)
    # The flow run's logs reach the API once its process has flushed them (after the state turned Completed):
    # a page loaded before then says "Waiting for logs...". Wait for the run's last line.
    t0 = time.time()
    while not any("pipeline tiny finished" in line["message"] for line in o.logs(run["id"])):
        assert time.time() - t0 < 60, "the flow run's last log line never reached the Prefect API"
        time.sleep(1)
    return {"first": first, "run": done}


def test_prefect_deployments(prefect_page):
    from playwright.sync_api import expect

    expect(prefect_page.get_by_text("nightly", exact=True)).to_be_visible()
    _shot(prefect_page, "prefect-deployments")


def test_prefect_custom_run_recomputes_the_picked_stage(ui_run):
    """The stage picked in the form reached the flow: evaluate recomputed, the rest cache hits (its stage table)."""
    o, run = ops(), ui_run["run"]
    arts = o.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    md = [a["data"] for a in arts if a["key"] == "tunewright-tiny"]
    assert len(md) == 1
    table = md[0].split("## Stages", 1)[1].split("## Evaluation", 1)[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in STAGES}
    assert rows == {s: "miss" if s == "evaluate" else "hit" for s in UPTO_EVALUATE}, md[0]  # later ones skipped


def test_prefect_flow_run_page_shows_logs_pool_and_tables(prefect_page, ui_run):
    """The finished run's page as a user opens it: the stage logs, the flow, the work pool (not "No access"), and
    the stage/evaluation tables one click away in its Artifacts tab."""
    from playwright.sync_api import expect

    o, page, run = ops(), prefect_page, ui_run["run"]
    page.set_viewport_size({"width": 1400, "height": 1700})  # the graph, then the stage logs below it
    page.goto(f"{o.stack.prefect_ui}/flow-runs/flow-run/{run['id']}")
    expect(page.get_by_text("Completed").first).to_be_visible()
    expect(page.get_by_text(run["name"]).first).to_be_visible()
    # everything the page loads after the flow run itself: until then it shows "No access", "Waiting for logs..."
    expect(page.locator(".flow-run-work-pool").get_by_text("cpu", exact=True)).to_be_visible()
    expect(page.locator(".flow-run-flow").get_by_text("finetune", exact=True)).to_be_visible()
    expect(page.get_by_text(re.compile(r"^sanitize: cache hit")).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"^evaluate: computing")).first).to_be_visible()
    expect(page.get_by_text("Waiting for logs")).to_have_count(0)
    expect(page.get_by_text("No access")).to_have_count(0)
    _shot(page, "prefect-flow-run")

    page.set_viewport_size({"width": 1400, "height": 1400})
    page.get_by_text("Artifacts", exact=True).first.click()
    card = page.get_by_text("tunewright-tiny", exact=True).first
    expect(card).to_be_visible()
    expect(page.get_by_text("mlflow-run", exact=True).first).to_be_visible()
    card.click()
    expect(page.get_by_role("heading", name="Stages")).to_be_visible()
    expect(page.get_by_role("heading", name="Evaluation")).to_be_visible()
    table = page.locator("table").first
    for stage in UPTO_EVALUATE:
        expect(table.get_by_role("cell", name=stage, exact=True)).to_be_visible()
    evaluation = page.locator("table").nth(1)  # one row per checkpoint, one column per metric
    expect(evaluation.get_by_role("columnheader", name="qa_exact_match", exact=True)).to_be_visible()
    expect(evaluation.get_by_role("cell", name="dpo", exact=True)).to_be_visible()
    _shot(page, "prefect-artifact")
    page.set_viewport_size({"width": 1400, "height": 900})


def test_mlflow_compare(mlflow_page, ui_run):
    """MLflow's run comparison for the first run and the one started from the form."""
    from playwright.sync_api import expect

    o, page, s = ops(), mlflow_page, ops().stack
    runs = [o.parent_of(ui_run["first"]["flow_run"]["id"]), o.parent_of(ui_run["run"]["id"])]
    assert runs[1].info.run_name == ui_run["run"]["name"]
    assert sorted(o.children(runs[1].info.run_id)) == sorted(UPTO_EVALUATE)  # `only: evaluate` skips what follows
    assert set(o.children(runs[0].info.run_id)) == set(STAGES)
    exp = runs[0].info.experiment_id
    ids = json.dumps([r.info.run_id for r in runs], separators=(",", ":"))
    page.goto(f"{s.mlflow_url}/#/compare-runs?runs={quote(ids)}&experiments={quote(json.dumps([exp]))}")
    expect(page.get_by_text("Comparing 2 Runs")).to_be_visible()
    _close_assistant(page)
    for r in runs:
        expect(page.get_by_text(r.info.run_name).first).to_be_visible()
    expect(page.get_by_text("reward/pairwise_accuracy").first).to_be_visible()  # a metric of both runs
    _shot(page, "mlflow-compare")


def test_mlflow_run_page(mlflow_page, ui_run):
    """The parent run page of the form's run: named after the flow run, with its Prefect flow run link tag."""
    from playwright.sync_api import expect

    o, page = ops(), mlflow_page
    parent = o.parent_of(ui_run["run"]["id"])
    page.goto(f"{o.stack.mlflow_url}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}")
    expect(page.get_by_text(ui_run["run"]["name"]).first).to_be_visible()
    _shot(page, "mlflow-run")


def test_mlflow_model_registry_shows_the_champion(mlflow_page, ui_run, monkeypatch):
    """The registered model of the first run's export, with the `champion` alias. On the tiny config the gate
    rejects its version (its dpo answers tie sft's: win rate 0.5), so it is promoted by hand here, which the version
    then records (`tunewright.promotion=manual`, the gate's verdict kept beside it)."""
    from playwright.sync_api import expect

    from pipelines.promote import TAG_DECISION, champion, promote_version

    o, page = ops(), mlflow_page
    parent = o.parent_of(ui_run["first"]["flow_run"]["id"])
    export_run = o.children(parent.info.run_id)["export"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", o.stack.mlflow_url)
    c = o.mlflow()
    mine = [v for v in c.search_model_versions("name = 'tunewright-tiny'")
            if v.run_id == export_run.data.tags.get("tunewright.source_run_id", export_run.info.run_id)]
    assert len(mine) == 1 and mine[0].tags[TAG_DECISION] in ("promoted", "rejected")
    if mine[0].tags[TAG_DECISION] == "rejected":
        promote_version("tunewright-tiny", mine[0].version, by="browser-test")
    champ = champion("tunewright-tiny")
    assert champ is not None and champ.version == mine[0].version
    page.goto(f"{o.stack.mlflow_url}/#/models/tunewright-tiny")
    _close_assistant(page)
    expect(page.get_by_text("tunewright-tiny").first).to_be_visible()
    expect(page.get_by_text("champion").first).to_be_visible()
    expect(page.get_by_text(f"Version {champ.version}").first).to_be_visible()
    _shot(page, "mlflow-registry")
