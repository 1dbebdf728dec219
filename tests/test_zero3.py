"""Training stages as real DeepSpeed ZeRO-3 jobs on CPU (gloo): through the task with MLflow, two ranks; the
``deepspeed`` launcher; a failing rank. Tiny scratch models, a handful of steps.

What a user checks: the stage's MLflow run has ``deepspeed_config.json`` (the exact JSON it trained with) and a
model whose safetensors hold real, trained tensors (not the 40-byte ZeRO-3 LoRA of TRL #4416) that load WITHOUT
DeepSpeed and generate what the trained model generated. The first run on a machine builds two DeepSpeed CPU ops
(~1-2 min, cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pipelines.artifacts import ArtifactRef, read_jsonl, sha256_path, write_jsonl
from pipelines.config import PipelineConfig
from pipelines.launch import CHECK, DS_CONFIG, deepspeed_config, launch_stage
from tests.test_launch import PAIRS, build_tiny_base

pytestmark = pytest.mark.slow
HIDDEN = 32
RAW = {"format": "plain", "user": "{content}", "assistant": "{content}"}  # PAIRS carry their own prompt format


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("zero3")
    from pipelines.formats import normalize

    # canonical records, as pipelines.data prepares them; the prompts carry their own format (RAW template)
    write_jsonl(d / "sft.jsonl", [normalize(p, "conversation") for p in PAIRS])
    write_jsonl(d / "pref.jsonl", [normalize({"prompt": p["prompt"], "chosen": p["completion"],
                                              "rejected": " no idea, maybe a large purple elephant."}, "preference")
                                   for p in PAIRS[:32]])
    return {"sft": d / "sft.jsonl", "preference": d / "pref.jsonl", "model": build_tiny_base(d / "base", hidden=HIDDEN)}


def test_zero3_sft_on_two_ranks_logs_its_config_and_a_model_that_reloads_without_deepspeed(data, tw_home):
    from pipelines import tracking
    from tasks.stages import execute_stage

    cfg = PipelineConfig.model_validate({"data": {"demo": True}, "model": {"scratch": {}}, "template": RAW, "sft": {
        "max_steps": 4, "batch_size": 8, "max_length": 32, "learning_rate": 5e-3, "launcher": "accelerate",
        "num_processes": 2, "deepspeed": {"zero_stage": 3}, "peft": {"method": "lora", "r": 16, "alpha": 32}}})
    c = tracking.client()
    parent = c.create_run(tracking.experiment_id(), run_name="zero3-test").info.run_id
    inputs = {k: ArtifactRef(None, str(data[k]), sha256_path(data[k]), "input") for k in ("sft", "model")}
    res = execute_stage("sft", cfg, inputs, parent)

    run = c.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["launch_world_size"] == 2
    assert run.data.metrics["global_step"] == 4
    logged = {a.path for a in c.list_artifacts(res.run_id)}
    assert {DS_CONFIG, CHECK, "model"} <= logged
    ds = json.loads(Path(c.download_artifacts(res.run_id, DS_CONFIG, str(tw_home / "dl"))).read_text())
    assert ds == deepspeed_config(cfg.sft) and ds["zero_optimization"]["stage"] == 3

    model_dir = tracking.fetch(res.ref)
    lora = tensors(model_dir / "adapter_model.safetensors")
    assert lora and all(t.numel() > 0 for t in lora.values())
    # Each LoRA matrix is above ZeRO-3's persistence threshold (10 x hidden, HF's "auto"), so ZeRO-3 did shard it:
    # without the gather the stage would have written empty tensors (TRL #4416), and check_saved would fail it.
    assert all(t.numel() > 10 * HIDDEN for t in lora.values())
    assert all(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k), "lora_B starts at zero: it trained"

    # Reload in this process (no DeepSpeed engine or config here) and generate what the trained model generated.
    from peft import PeftModel
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from pipelines.modeling import load_model, load_tokenizer

    assert not is_deepspeed_zero3_enabled()
    check = json.loads(Path(c.download_artifacts(res.run_id, CHECK, str(tw_home / "dl"))).read_text())
    model = PeftModel.from_pretrained(load_model(data["model"]), str(model_dir)).eval()
    tok = load_tokenizer(model_dir)
    assert [p["prompt"] for p in check["items"]] == [p["prompt"] for p in PAIRS[:3]]
    for probe in check["items"]:
        ids = tok(probe["prompt"], return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=len(probe["tokens"]), do_sample=False, pad_token_id=tok.pad_token_id)
        assert out[0, ids["input_ids"].shape[1]:].tolist() == probe["tokens"]
    base_out = load_model(data["model"]).generate(**ids, max_new_tokens=len(probe["tokens"]), do_sample=False,
                                                  pad_token_id=tok.pad_token_id)
    assert base_out[0, ids["input_ids"].shape[1]:].tolist() != probe["tokens"], "the adapter changes the output"

    # The export of the ZeRO-3-trained checkpoint stands alone: full weights with no empty tensor, loaded with
    # plain transformers, generating what the trained model generated.
    from transformers import AutoModelForCausalLM

    ex = execute_stage("export", cfg, {"model": res.ref, "lineage.sft": res.ref}, parent)
    export_dir = tracking.fetch(ex.ref)
    weights = tensors(export_dir / "model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert not (export_dir / "adapter_config.json").exists()
    standalone = AutoModelForCausalLM.from_pretrained(str(export_dir)).eval()
    out = standalone.generate(**ids, max_new_tokens=len(probe["tokens"]), do_sample=False, pad_token_id=tok.pad_token_id)
    assert out[0, ids["input_ids"].shape[1]:].tolist() == probe["tokens"]


def test_zero3_reward_model_under_the_deepspeed_launcher_keeps_its_score_head(data, tmp_path):
    cfg = PipelineConfig.model_validate({"data": {"demo": True}, "model": {"scratch": {}}, "template": RAW, "reward": {
        "max_steps": 3, "batch_size": 8, "max_length": 96, "launcher": "deepspeed", "deepspeed": {"zero_stage": 3},
        "peft": {"method": "full"}}})
    inputs = {"preference": data["preference"], "eval_preference": data["preference"], "model": data["model"]}
    lines: list[str] = []
    out = launch_stage("reward", cfg, inputs, tmp_path / "out", log=lines.append)

    assert out.parent_metrics["reward/pairwise_accuracy"] == out.metrics["pairwise_accuracy"]
    assert any("deepspeed.launcher.runner" in line for line in lines)
    assert any("'train_loss'" in line for line in lines), "the job's output is streamed to the stage log"
    assert json.loads((tmp_path / "out" / DS_CONFIG).read_text()) == deepspeed_config(cfg.reward)
    weights = tensors(tmp_path / "out" / "model" / "model.safetensors")
    assert weights["score.weight"].shape == (1, HIDDEN) and all(t.numel() > 0 for t in weights.values())

    from pipelines.modeling import load_model, load_tokenizer
    from pipelines.reward import score

    check = json.loads((tmp_path / "out" / CHECK).read_text())
    reloaded = load_model(tmp_path / "out" / "model", task="reward").eval()
    got = score(reloaded, load_tokenizer(tmp_path / "out" / "model"), [p["prompt"] for p in check["items"]],
                [p["completion"] for p in check["items"]])
    torch.testing.assert_close(got, torch.tensor([p["score"] for p in check["items"]]), atol=1e-4, rtol=1e-4)


def test_a_failing_rank_fails_the_stage_with_its_own_error(data, tmp_path):
    bad = tmp_path / "sft.jsonl"
    write_jsonl(bad, [{"conversation": r["messages"]} for r in read_jsonl(data["sft"])])  # not the canonical key
    cfg = PipelineConfig.model_validate({"data": {"demo": True}, "model": {"scratch": {}}, "template": RAW, "sft": {
        "max_steps": 2, "launcher": "accelerate", "num_processes": 2, "deepspeed": {"zero_stage": 3}}})
    with pytest.raises(RuntimeError) as e:
        launch_stage("sft", cfg, {"sft": bad, "model": data["model"]}, tmp_path / "out", log=lambda line: None)
    first = str(e.value).splitlines()[0]
    assert re.fullmatch(r"sft: rank [01] failed: KeyError: 'messages'", first), first
    assert 'r["messages"]' in str(e.value), "the failing rank's traceback follows"


def test_throughput_bench_smoke_runs_a_recipe_pair_and_zero3_on_cpu(tmp_path, capsys):
    """bench/train_throughput.py --smoke: the plumbing of the GPU benchmark (numbers on CPU mean nothing)."""
    from bench.train_throughput import main

    out = tmp_path / "bench.json"
    assert main(["--smoke", "--variants", "trl-lora,tunewright-lora-zero3", "--steps", "3", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["trl-lora"]["packing"] is False and rows["trl-lora"]["gradient_checkpointing"] is True
    assert rows["tunewright-lora-zero3"]["packing"] and rows["tunewright-lora-zero3"]["padding_free"]
    assert rows["tunewright-lora-zero3"]["zero3"] and rows["tunewright-lora-zero3"]["world_size"] == 1
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["steps_timed"] == 2 for r in rows.values())
    assert res["cross_contamination"] < 1e-4, "packed examples must not attend to each other"
    table = capsys.readouterr().out
    assert "| trl-lora |" in table and "no cross-contamination" in table
