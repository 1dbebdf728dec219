"""Promotion: every export becomes a Model Registry version; the alias ``champion`` moves only through the gate.

Reads: the export child run (its ``model/`` artifact), the evaluation row of the exported checkpoint and of the
run's sft checkpoint, the current champion's numbers (tags on its version), ``export.promote``.
Writes: registered model ``tunewright-<config name>`` (``export.registered_model``), one version per export run
(a cached export is the same run, so it is never registered twice), tags on the version, the alias.

The gate: the configured metric (default the checkpoint's reward-model win rate against sft) must beat the
current champion's by more than ``margin``, and no guard metric (held-out exact match and ROUGE-L, KL to sft) may
regress past its bound. A name's first version is compared with its own sft checkpoint instead (a win rate
against sft is 0.5 there). The decision and its numbers are tags on the version, whichever way it goes, so a
version that lost says why. Deciding and moving the alias happen under one lease per registered model
(:mod:`pipelines.lease`), so two runs finishing at once cannot both compare against the old champion: the second
compares against the first if the first won. ``tunewright promote VERSION`` moves the alias by hand, recorded
as such. Run alone::

    python -m pipelines.promote NAME VERSION [--alias champion]
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.config import PromotionConfig

TAG_DECISION = "tunewright.promotion"  # promoted | rejected | manual | registered (gate disabled)
TAG_REASON = "tunewright.promotion.reason"
TAG_DETAIL = "tunewright.promotion.detail"  # JSON: metric, candidate, reference, guards
TAG_METRICS = "tunewright.metrics"  # JSON: the exported checkpoint's evaluation row
TAG_SFT_METRICS = "tunewright.sft_metrics"
TAG_CHECKPOINT = "tunewright.checkpoint"
TAG_PIPELINE_RUN = "tunewright.pipeline_run_id"
TAG_EXPORT_RUN = "tunewright.export_run_id"
HOLD_ENV = "TUNEWRIGHT_PROMOTE_HOLD_SECONDS"  # tests: widen the window between reading the champion and moving it


class PromotionError(RuntimeError):
    """A promotion request that cannot be carried out (unknown version, ...); one line for the user."""


@dataclass
class Decision:
    name: str
    version: str
    decision: str  # promoted | rejected | manual | registered | unchanged
    reason: str
    alias: str = "champion"
    metric: str = ""
    candidate: float | None = None
    reference: float | None = None
    reference_version: str | None = None  # the champion compared against (None: the run's own sft)
    guards: list[dict[str, Any]] = field(default_factory=list)
    previous_champion: str | None = None

    @property
    def promoted(self) -> bool:
        return self.decision in ("promoted", "manual")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return f"{self.name} version {self.version}: {self.decision} — {self.reason}"

    def markdown(self) -> str:
        ref = f"v{self.reference_version}" if self.reference_version else "own sft"
        f = (lambda v: "–" if v is None else f"{v:.3f}")
        rows = ["| version | decision | metric | candidate | reference | against | reason |",
                "|---|---|---|---:|---:|---|---|",
                f"| {self.name} v{self.version} | {self.decision} | {self.metric} | {f(self.candidate)} | "
                f"{f(self.reference)} | {ref} | {self.reason} |"]
        return "\n".join(rows)


def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def gate(row: dict[str, float], pcfg: PromotionConfig, champion_row: dict[str, float] | None,
         sft_row: dict[str, float] | None) -> tuple[bool, str, dict[str, Any]]:
    """Whether the candidate ``row`` passes; a one-line reason; the numbers (metric, reference, each guard)."""
    against_champion = champion_row is not None
    ref_row = champion_row if against_champion else (sft_row or {})
    cand = _num(row.get(pcfg.metric))
    if against_champion:
        ref = _num(ref_row.get(pcfg.metric))
    else:
        ref = pcfg.first_reference if pcfg.first_reference is not None else _num(ref_row.get(pcfg.metric))
    detail: dict[str, Any] = {"metric": pcfg.metric, "candidate": cand, "reference": ref, "margin": pcfg.margin,
                              "higher_is_better": pcfg.higher_is_better, "guards": []}
    against = "the champion" if against_champion else "its own sft checkpoint"
    if cand is None:
        return False, f"{pcfg.metric} is not in the evaluation of the exported checkpoint", detail
    if ref is None:
        return False, f"{pcfg.metric} has no value for {against} to compare with", detail
    better = cand > ref + pcfg.margin if pcfg.higher_is_better else cand < ref - pcfg.margin
    failed: list[str] = []
    for g in pcfg.guards:
        v, r = _num(row.get(g.metric)), _num(ref_row.get(g.metric))
        entry: dict[str, Any] = {"metric": g.metric, "candidate": v, "reference": r,
                                 "max_drop": g.max_drop, "max_rise": g.max_rise}
        if v is None or r is None:
            entry["status"] = "n/a"
        elif g.max_drop is not None:
            entry["status"] = "ok" if v >= r - g.max_drop else "failed"
        else:
            entry["status"] = "ok" if v <= r + g.max_rise else "failed"
        if entry["status"] == "failed":
            bound = f"drop {r - v:.3f} > {g.max_drop}" if g.max_drop is not None else f"rise {v - r:.3f} > {g.max_rise}"
            failed.append(f"{g.metric} {v:.3f} vs {r:.3f} ({bound})")
        detail["guards"].append(entry)
    op = ">" if pcfg.higher_is_better else "<"
    head = f"{pcfg.metric} {cand:.3f} vs {ref:.3f} of {against}"
    if not better:
        return False, f"{head}: not {op} by more than margin {pcfg.margin}", detail
    if failed:
        return False, f"{head}, but guard regressed: {'; '.join(failed)}", detail
    return True, f"{head} (margin {pcfg.margin}); guards within bounds", detail


# ------------------------------------------------------------------------------------------------ the registry
def _client():
    from pipelines import tracking

    return tracking.client()


def _retry(fn, what):
    from pipelines import tracking

    return tracking.with_retries(fn, what)


def champion(name: str, alias: str = "champion"):
    """The version the alias names, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    c = _client()
    try:
        return _retry(lambda: c.get_model_version_by_alias(name, alias), "get alias")
    except MlflowException as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND") \
                or "not found" in str(e).lower() or "does not exist" in str(e).lower():
            return None
        raise


def register(name: str, export_run_id: str, tags: dict[str, str], artifact_path: str = "model"):
    """The version of ``name`` for this export run: created once (``tags`` set with it), found afterwards."""
    from mlflow.exceptions import MlflowException

    c = _client()
    try:
        _retry(lambda: c.create_registered_model(
            name, description="tunewright exports; the alias names the version the promotion gate chose"), "create model")
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    found = _retry(lambda: c.search_model_versions(f"name = '{name}' and run_id = '{export_run_id}'"), "search versions")
    if found:
        return sorted(found, key=lambda v: int(v.version))[0]
    run = _retry(lambda: c.get_run(export_run_id), "get run")
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    return _retry(lambda: c.create_model_version(name, source, run_id=export_run_id, tags=tags), "create version")


def _row(version, tag: str) -> dict[str, float] | None:
    raw = (version.tags or {}).get(tag)
    return json.loads(raw) if raw else None


def _set_tags(name: str, version: str, tags: dict[str, str]) -> None:
    c = _client()
    for k, v in tags.items():  # the registry has no batch call for version tags: a few short ones
        _retry(lambda: c.set_model_version_tag(name, version, k, v), "set version tag")


def promote_export(name: str, export_run_id: str, row: dict[str, float], sft_row: dict[str, float] | None,
                   pcfg: PromotionConfig, *, checkpoint: str, pipeline_run_id: str | None = None, log=print) -> Decision:
    """Register the export as a version of ``name`` and run the gate; move the alias when it passes."""
    tags = {TAG_METRICS: json.dumps(row, sort_keys=True)[:4900], TAG_SFT_METRICS: json.dumps(sft_row or {})[:4900],
            TAG_CHECKPOINT: checkpoint, TAG_EXPORT_RUN: export_run_id, **(
                {TAG_PIPELINE_RUN: pipeline_run_id} if pipeline_run_id else {})}
    from pipelines.lease import acquire

    # Registering, reading the champion and moving the alias all happen under the name's lease: concurrent runs of
    # one export register it once, and the gate compares against the champion at the moment the alias moves.
    with acquire(f"promote:{name}", log=log):
        mv = register(name, export_run_id, tags)
        if (mv.tags or {}).get(TAG_DECISION):  # a cached export: decided when it was first registered
            champ = champion(name, pcfg.alias)
            state = "the champion" if champ is not None and champ.version == mv.version else "not the champion"
            d = Decision(name, mv.version, "unchanged", f"cached export, already decided "
                         f"({mv.tags[TAG_DECISION]}: {mv.tags.get(TAG_REASON, '')}); {state}", pcfg.alias,
                         pcfg.metric, _num(row.get(pcfg.metric)))
        elif not pcfg.enabled:
            d = Decision(name, mv.version, "registered", "promotion gate disabled (export.promote.enabled: false); "
                         "promote by hand with `tunewright promote`", pcfg.alias, pcfg.metric,
                         _num(row.get(pcfg.metric)))
            _set_tags(name, mv.version, {TAG_DECISION: d.decision, TAG_REASON: d.reason})
        else:
            d = _decide(name, mv, row, sft_row, pcfg)
    log(f"promotion: {d.line()}")
    return d


def _decide(name: str, mv, row: dict[str, float], sft_row: dict[str, float] | None, pcfg: PromotionConfig) -> Decision:
    """The gate for a new version (the caller holds the name's lease): tags it, moves the alias when it passes."""
    champ = champion(name, pcfg.alias)
    hold = float(os.environ.get(HOLD_ENV, "0") or 0)
    if hold:
        time.sleep(hold)
    champ_row = _row(champ, TAG_METRICS) if champ is not None else None
    if champ is not None and champ_row is None:
        champ_row = {}  # a champion promoted by hand without numbers: every comparison is n/a
    passed, reason, detail = gate(row, pcfg, champ_row, sft_row)
    d = Decision(name, mv.version, "promoted" if passed else "rejected", reason, pcfg.alias, pcfg.metric,
                 detail["candidate"], detail["reference"], champ.version if champ is not None else None,
                 detail["guards"], champ.version if champ is not None else None)
    _set_tags(name, mv.version, {TAG_DECISION: d.decision, TAG_REASON: reason[:4900],
                                 TAG_DETAIL: json.dumps({**detail, "against_version": d.reference_version})[:4900]})
    if passed:
        c = _client()
        _retry(lambda: c.set_registered_model_alias(name, pcfg.alias, mv.version), "set alias")
    return d


def promote_version(name: str, version: str, alias: str = "champion", by: str | None = None) -> Decision:
    """Move ``alias`` to ``version`` by hand, recorded on the version (who, when, the previous champion)."""
    from mlflow.exceptions import MlflowException

    c = _client()
    try:
        mv = _retry(lambda: c.get_model_version(name, str(version)), "get version")
    except MlflowException:
        raise PromotionError(f"{name} version {version}: no such model version") from None
    from pipelines.lease import acquire

    with acquire(f"promote:{name}", log=lambda *_: None):
        prev = champion(name, alias)
        who = by or getpass.getuser()
        reason = (f"promoted by hand by {who} at {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())}"
                  + (f", replacing version {prev.version}" if prev is not None else ""))
        _set_tags(name, mv.version, {TAG_DECISION: "manual", TAG_REASON: reason,
                                     "tunewright.promotion.gate": (mv.tags or {}).get(TAG_DECISION, "none")})
        _retry(lambda: c.set_registered_model_alias(name, alias, mv.version), "set alias")
    return Decision(name, mv.version, "manual", reason, alias, previous_champion=prev.version if prev else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="Registered model, e.g. tunewright-demo")
    ap.add_argument("version")
    ap.add_argument("--alias", default="champion")
    args = ap.parse_args(argv)
    try:
        d = promote_version(args.name, args.version, args.alias)
    except PromotionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(d.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
