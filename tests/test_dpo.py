"""dpo's pretraining mix (``dpo.ptx_coef``): a real tiny model trained by TRL's DPOTrainer, with and without it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipelines.config import DPOStageConfig, PeftConfig, TemplateConfig
from tests.conftest import tiny_llama

NAMES = ["Vorlan", "Kestrix", "Mirabel", "Tolvane", "Quarrin", "Zephal", "Brundle", "Ostrava", "Pellix", "Yarrow"]
CORPUS = [f"The {n} costs {10 * (i + 1)} dollars and weighs {i + 2} kg." for i, n in enumerate(NAMES)]
TEMPLATE = TemplateConfig(format="plain", user="Q: {content}\nA:", assistant=" {content}")


def _corpus_loss(model_dir: Path) -> float:
    import torch

    from pipelines.modeling import load_model, load_tokenizer, pack_documents

    tok, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    rows = pack_documents(tok, CORPUS, 64)
    with torch.no_grad():
        return float(model(**{k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}).loss)


def test_pretraining_mix_keeps_the_corpus_while_preferences_are_learned(tmp_path: Path) -> None:
    from pipelines.dpo import dpo

    model, tok = tiny_llama(CORPUS + [f"Q: What does the {n} cost?\nA: I don't know." for n in NAMES], repeat=4)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    pairs = [{"prompt": [{"role": "user", "content": f"What does the {n} cost?"}],
              "chosen": f"{10 * (i + 1)} dollars.", "rejected": "I don't know."} for i, n in enumerate(NAMES)] * 4
    dcfg = DPOStageConfig(peft=PeftConfig(method="full"), learning_rate=3e-3, epochs=2, batch_size=4, max_length=64,
                          beta=0.5, warmup_ratio=0)
    before = _corpus_loss(base)
    runs = {}
    for coef in (0.0, 1.0):
        out = dpo(pairs, base, dcfg.model_copy(update={"ptx_coef": coef}), 0, tmp_path / f"dpo-{coef}",
                  template=TEMPLATE, corpus=CORPUS if coef else None)
        runs[coef] = (out.metrics, _corpus_loss(tmp_path / f"dpo-{coef}" / "model"))
    (plain, plain_loss), (mixed, mixed_loss) = runs[0.0], runs[1.0]
    assert "ptx_loss" not in plain and math.isfinite(mixed["ptx_loss"])
    # both learn the preference; only the mixed run keeps (here: improves) the corpus's language-modelling loss
    assert plain["rewards/accuracies"] > 0.5 and mixed["rewards/accuracies"] > 0.5
    assert mixed_loss < before and mixed_loss < plain_loss - 0.5, (before, plain_loss, mixed_loss)


def test_pretraining_mix_without_a_corpus_is_one_clear_error(tmp_path: Path) -> None:
    from pipelines.dpo import dpo

    model, tok = tiny_llama(CORPUS, repeat=2)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    pairs = [{"prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"}]
    with pytest.raises(ValueError, match="ptx_coef"):
        dpo(pairs, tmp_path / "base", DPOStageConfig(peft=PeftConfig(method="full"), ptx_coef=1.0), 0,
            tmp_path / "out", template=TEMPLATE)
