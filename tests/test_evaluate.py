"""Evaluation metrics against hand-worked values."""

from __future__ import annotations

import pytest

from pipelines.evaluate import markdown_table, normalize_answer, rouge_l, token_f1


def test_normalize_answer():
    assert normalize_answer("  129 Dollars. ") == "129 dollars"
    assert normalize_answer("129美元。") == "129美元"
    assert normalize_answer("１２９ dollars") == "129 dollars"  # full-width digits (NFKC)


def test_rouge_l_hand_worked():
    assert rouge_l("129 dollars", "129 dollars") == 1.0
    # LCS("the price is 129 dollars", "129 dollars") = 2; P = 2/5, R = 2/2 -> F = 2*0.4*1/1.4
    assert rouge_l("the price is 129 dollars", "129 dollars") == pytest.approx(0.8 / 1.4)
    assert rouge_l("teal", "navy") == 0.0
    # Chinese is compared by characters: LCS("129美元", "149美元") = 4 of 5 -> P = R = F = 0.8
    assert rouge_l("129美元", "149美元") == pytest.approx(0.8)
    assert rouge_l("", "x") == 0.0


def test_markdown_table():
    md = markdown_table({"base": {"domain_ppl": 100.0, "qa_exact_match": 0.0},
                         "sft": {"domain_ppl": 10.0, "qa_exact_match": 0.5, "rm_win_rate_vs_sft": 0.5}})
    assert md.splitlines()[0] == "| checkpoint | domain_ppl | qa_exact_match | rm_win_rate_vs_sft |"
    assert md.splitlines()[2] == "| base | 100.000 | 0.000 | – |"
    assert md.splitlines()[3] == "| sft | 10.000 | 0.500 | 0.500 |"


def test_token_f1_hand_worked():
    assert token_f1("129 dollars", "129 dollars.") == 1.0
    # common {129, dollars} = 2; P = 2/5, R = 2/2 -> F = 2*0.4/1.4
    assert token_f1("it costs 129 us dollars", "129 dollars") == pytest.approx(0.8 / 1.4)
    assert token_f1("teal", "navy") == 0.0 and token_f1("", "") == 1.0
