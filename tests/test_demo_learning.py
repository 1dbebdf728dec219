"""The shipped demo, end to end, shows real learning (the numbers a newcomer sees after `make demo`).

Slow (the full demo: a few minutes on 2 CPU cores), and the strongest check we have: every stage trains a real
model and the evaluation table must show dapt, sft and the reward model doing their jobs.
"""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, copy_config


@pytest.mark.slow
def test_demo_learns_and_reruns_from_cache(tw_home, prefect_api, tmp_path):
    from flows.finetune import finetune
    from pipelines import tracking
    from pipelines.config import load_config

    cfg = load_config(copy_config(ROOT / "pipelines" / "configs" / "demo.yaml", tmp_path, "demo"))
    out = finetune(cfg)
    ev = out["evaluation"]
    # measured on this machine: base 3754, dapt 4.4 (held-out text of the corpus's own kinds)
    assert ev["dapt"]["domain_ppl"] < ev["base"]["domain_ppl"] / 10, ev
    # measured: base 0.000 / 0.000, sft 0.329 / 0.540 (exact match / ROUGE-L on facts no sft pair asks about; the
    # answer prior alone scores about 0.18): issue 2's target is sft >= base + 0.2
    assert ev["sft"]["qa_exact_match"] >= ev["base"]["qa_exact_match"] + 0.2, ev
    assert ev["sft"]["qa_rouge_l"] >= ev["base"]["qa_rouge_l"] + 0.3, ev
    parent = tracking.client().get_run(out["parent_run_id"]).data.metrics
    assert parent["reward/pairwise_accuracy"] >= 0.8
    # issue 4's targets for dpo: win >= 0.6 against sft (measured 0.705) and exact match within 0.05 of sft's
    # (measured 0.307 vs 0.329); it learnt to refuse names that do not exist, which sft never does
    assert ev["dpo"]["rm_win_rate_vs_sft"] >= 0.6, ev
    assert ev["dpo"]["qa_exact_match"] >= ev["sft"]["qa_exact_match"] - 0.05, ev
    assert ev["dpo"]["rm_win_rate_vs_sft_nonexistent"] >= 0.7, ev
    assert parent["sft/qa_exact_match"] == ev["sft"]["qa_exact_match"]

    again = finetune(cfg)
    assert all(s["cache"] == "hit" for s in again["stages"].values())
    assert again["evaluation"] == ev
    # (how much faster the cached re-run is, is measured in bench/RESULTS.md, not asserted here)
