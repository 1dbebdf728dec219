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
    # measured (bench/RESULTS.md, issue 14): base 1833, dapt 4.1 (held-out text of the corpus's kinds)
    assert ev["dapt"]["domain_ppl"] < ev["base"]["domain_ppl"] / 10, ev
    # Held-out exact match (facts no sft pair asks about; the answer prior alone scores about 0.18). dapt replays
    # the sft pairs as plain text, not through the chat template, so dapt knows the facts but not the format
    # (0.079 on the Intel Xeon dev machine) and sft is what makes the model answer (0.836; bench/RESULTS.md, issue 14).
    assert ev["sft"]["qa_exact_match"] >= 0.60, ev
    assert ev["sft"]["qa_exact_match"] >= ev["dapt"]["qa_exact_match"], ev
    assert ev["sft"]["qa_rouge_l"] >= ev["base"]["qa_rouge_l"] + 0.3, ev
    parent = tracking.client().get_run(out["parent_run_id"]).data.metrics
    assert parent["reward/pairwise_accuracy"] >= 0.8
    # dpo: issue 14's bars, win rate >= 0.65 and exact match >= sft - 0.02. dpo has no pair about a held-out fact,
    # so on fact prompts it can at best tie with sft (0.5); its job is refusing the names that do not exist, half of
    # the held-out prompts (bench/RESULTS.md).
    assert ev["dpo"]["rm_win_rate_vs_sft"] >= 0.65, ev
    assert ev["dpo"]["rm_win_rate_vs_sft_nonexistent"] >= 0.9, ev
    assert ev["dpo"]["qa_exact_match"] >= ev["sft"]["qa_exact_match"] - 0.02, ev
    assert ev["dpo"]["qa_exact_match"] >= 0.75, ev
    assert parent["sft/qa_exact_match"] == ev["sft"]["qa_exact_match"]

    again = finetune(cfg)
    assert all(s["cache"] == "hit" for s in again["stages"].values())
    assert again["evaluation"] == ev
    # (how much faster the cached re-run is, is measured in bench/RESULTS.md, not asserted here)
