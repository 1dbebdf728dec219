"""``update_scale`` (model averaging with the SFT model, Lin et al. 2024): what the preference stages save is
start + s x (trained - start), for a LoRA adapter and for full weights, checked tensor by tensor on a tiny Llama."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pipelines.config import PeftConfig
from pipelines.modeling import merge_adapter, save_model
from pipelines.training import lora_config, save_trained
from tests.conftest import tiny_llama

TEXTS = ["the red lamp costs 49 dollars", "the blue kite weighs 250 grams", "the old boat was made in Ambrevik"]


def weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_a_scaled_adapter_merges_to_the_average_of_start_and_trained(tmp_path):
    from peft import get_peft_model

    model, tok = tiny_llama(TEXTS, 20, vocab=120)
    save_model(model, tok, tmp_path / "sft", {"stage": "sft", "task": "causal_lm"})
    peft = get_peft_model(model, lora_config(PeftConfig(method="lora", r=4, alpha=8)))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained adapter: B is zero at init, so give it an update to scale
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    manifest = {"stage": "dpo", "task": "causal_lm"}
    save_trained(peft, tok, tmp_path / "trained", manifest)
    save_trained(peft, tok, tmp_path / "quarter", manifest, update_scale=0.25)
    merge_adapter(tmp_path / "sft", tmp_path / "trained", tmp_path / "m_trained")
    merge_adapter(tmp_path / "sft", tmp_path / "quarter", tmp_path / "m_quarter")
    start, trained, quarter = (weights(tmp_path / d) for d in ("sft", "m_trained", "m_quarter"))
    moved = [k for k in start if not torch.equal(start[k], trained[k])]
    assert len(moved) >= 7  # every linear layer LoRA touches (q k v o gate up down)
    for k in start:
        torch.testing.assert_close(quarter[k], start[k] + 0.25 * (trained[k] - start[k]), atol=1e-6, rtol=1e-5)


def test_full_weights_are_interpolated_with_the_start_model(tmp_path):
    model, tok = tiny_llama(TEXTS, 20, vocab=120)
    save_model(model, tok, tmp_path / "sft", {"stage": "sft", "task": "causal_lm"})
    trained = copy.deepcopy(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    save_trained(trained, tok, tmp_path / "full", {"stage": "ppo", "task": "causal_lm"})
    save_trained(trained, tok, tmp_path / "avg", {"stage": "ppo", "task": "causal_lm"}, update_scale=0.4,
                 start_dir=tmp_path / "sft")
    start, full, avg = (weights(tmp_path / d) for d in ("sft", "full", "avg"))
    assert set(avg) == set(full)
    for k in full:
        assert not torch.equal(full[k], start[k]), k
        torch.testing.assert_close(avg[k], start[k] + 0.4 * (full[k] - start[k]), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the model the stage started from"):
        save_trained(trained, tok, tmp_path / "none", {"stage": "ppo", "task": "causal_lm"}, update_scale=0.5)
    assert not (tmp_path / "none").exists()
