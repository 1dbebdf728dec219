"""Launching training stages (fast part): the generated DeepSpeed JSON for each option, the launcher command lines,
the config rules, QLoRA refused on CPU before anything loads, and the checks a saved model must pass.

The real ZeRO-3 jobs (accelerate / deepspeed launchers, 1 and 2 CPU ranks) are in tests/test_zero3.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from pipelines.config import ConfigError, PipelineConfig, SFTStageConfig, load_config
from pipelines.launch import (
    DS_CONFIG, _failure_message, _record, deepspeed_config, gathered_state_dict, launch_command, launch_stage,
    preflight, verify_saved,
)
from pipelines.training import QLoRAUnavailableError

ROOT = Path(__file__).resolve().parents[1]
AUTO_TOP = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
            "gradient_clipping": "auto",
            "optimizer": {"type": "AdamW",
                          "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}}
ZERO3_AUTO = {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto",
              "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}
COLOURS = ["red", "blue", "green"]
PAIRS = [{"prompt": f"Q: what colour is item {i}?\nA:", "completion": f" item {i} is {COLOURS[i % 3]}."}
         for i in range(48)]


def sft_cfg(**sft) -> PipelineConfig:
    return PipelineConfig.model_validate({"data": {"demo": True}, "model": {"scratch": {}}, "sft": sft})


def build_tiny_base(out: Path, seed: int = 0, hidden: int = 32, tied: bool = True) -> Path:
    """A 2-layer, 32-wide Llama with a BPE tokenizer trained on PAIRS, saved like a stage output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.modeling import save_model, train_tokenizer

    torch.manual_seed(seed)
    tok = train_tokenizer([p["prompt"] + p["completion"] for p in PAIRS] * 3, 300)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    save_model(model, tok, out, {"stage": "base", "kind": "full", "task": "causal_lm"})
    return out


# ------------------------------------------------------------------------------------------ DeepSpeed JSON
def test_default_block_is_zero3_with_auto_values_hf_fills():
    assert deepspeed_config(SFTStageConfig(launcher="accelerate", deepspeed={})) == {
        "zero_optimization": {"stage": 3, **ZERO3_AUTO, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": False}, **AUTO_TOP}


def test_zero2_with_optimizer_offload_to_cpu():
    tcfg = SFTStageConfig(launcher="deepspeed", deepspeed={"zero_stage": 2, "offload_optimizer": "cpu"})
    got = deepspeed_config(tcfg)
    assert got == {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                         "overlap_comm": True, "contiguous_gradients": True,
                                         "reduce_bucket_size": "auto"},
                   "bf16": {"enabled": False}, **AUTO_TOP}


def test_zero3_with_nvme_offload_bf16_and_no_16bit_gather():
    tcfg = SFTStageConfig(launcher="deepspeed", bf16=True, deepspeed={
        "zero_stage": 3, "offload_optimizer": "nvme", "offload_param": "nvme", "nvme_path": "/local_nvme",
        "gather_16bit_weights_on_model_save": False})
    assert deepspeed_config(tcfg) == {
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "nvme", "pin_memory": True, "nvme_path": "/local_nvme"},
            "offload_param": {"device": "nvme", "pin_memory": True, "nvme_path": "/local_nvme"},
            **ZERO3_AUTO, "stage3_gather_16bit_weights_on_model_save": False},
        "bf16": {"enabled": True}, **AUTO_TOP}


def test_zero3_param_offload_to_cpu_and_stage0():
    z = deepspeed_config(SFTStageConfig(launcher="accelerate", deepspeed={"offload_param": "cpu"}))["zero_optimization"]
    assert z == {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True}, **ZERO3_AUTO,
                 "stage3_gather_16bit_weights_on_model_save": True}
    assert deepspeed_config(SFTStageConfig(launcher="accelerate", deepspeed={"zero_stage": 0})) == {
        "zero_optimization": {"stage": 0}, "bf16": {"enabled": False}, **AUTO_TOP}


def test_bf16_follows_the_stage_unless_set_and_then_must_agree():
    assert deepspeed_config(SFTStageConfig(launcher="accelerate", bf16=True, deepspeed={}))["bf16"] == {"enabled": True}
    assert deepspeed_config(SFTStageConfig(launcher="accelerate", bf16=True, deepspeed={"bf16": True}))["bf16"] == {
        "enabled": True}
    with pytest.raises(ValidationError, match="deepspeed.bf16 differs from bf16"):
        SFTStageConfig(launcher="accelerate", deepspeed={"bf16": True})


@pytest.mark.parametrize("block, message", [
    ({"offload_optimizer": "nvme"}, "nvme_path is required"),
    ({"zero_stage": 2, "offload_param": "cpu"}, "offload_param needs zero_stage 3"),
    ({"zero_stage": 0, "offload_optimizer": "cpu"}, "offload_optimizer needs zero_stage 1, 2 or 3"),
])
def test_deepspeed_block_rules(block, message):
    with pytest.raises(ValidationError, match=message):
        SFTStageConfig(launcher="deepspeed", deepspeed=block)
    ok = {**block, "nvme_path": "/nvme", "zero_stage": 3}
    assert SFTStageConfig(launcher="deepspeed", deepspeed=ok).deepspeed.zero_stage == 3


def test_launcher_rules_are_one_line_config_errors(tmp_path):
    with pytest.raises(ValidationError, match="launcher 'deepspeed' needs a deepspeed block"):
        SFTStageConfig(launcher="deepspeed")
    with pytest.raises(ValidationError, match="hostfile is read by launcher 'deepspeed'"):
        SFTStageConfig(launcher="accelerate", hostfile="hosts")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {demo: true}\nmodel: {scratch: {}}\nsft:\n  launcher: accelerate\n"
                   "  deepspeed: {offload_param: nvme}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value) == f"{bad}:5: sft.deepspeed: nvme_path is required when an offload device is 'nvme'"


# ------------------------------------------------------------------------------------------- command lines
def test_launch_commands(tmp_path):
    spec, ds = tmp_path / "spec.json", tmp_path / DS_CONFIG
    acc = launch_command(SFTStageConfig(launcher="accelerate", deepspeed={}), spec, ds, 29999)
    assert acc[1:] == ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                       "--main_process_port", "29999", "--dynamo_backend", "no", "--use_deepspeed",
                       "--deepspeed_config_file", str(ds), "-m", "pipelines.launch", str(spec)]
    dsl = launch_command(SFTStageConfig(launcher="deepspeed", num_processes=4, deepspeed={}), spec, ds, 29999)
    assert dsl[1:] == ["-m", "deepspeed.launcher.runner", "--master_port", "29999", "--no_local_rank",
                       "--num_gpus", "4", "--module", "pipelines.launch", str(spec)]
    multi = launch_command(SFTStageConfig(launcher="deepspeed", hostfile="/etc/hosts", num_processes=8, deepspeed={}),
                           spec, ds, 29999)
    assert multi[6:11] == ["--hostfile", "/etc/hosts", "--num_gpus", "8", "--module"]


def test_demo_zero3_is_the_demo_with_training_stages_under_zero3():
    """The shipped config validates, trains dapt/sft/reward/dpo under ZeRO-3, and otherwise equals demo.yaml."""
    cfg = load_config(ROOT / "pipelines/configs/demo-zero3.yaml")
    demo = yaml.safe_load((ROOT / "pipelines/configs/demo.yaml").read_text())
    zero3 = yaml.safe_load((ROOT / "pipelines/configs/demo-zero3.yaml").read_text())
    for stage in ("dapt", "sft", "reward", "dpo"):
        tcfg = cfg.stage_config(stage)
        assert tcfg.launcher in ("accelerate", "deepspeed") and tcfg.deepspeed.zero_stage == 3, stage
        for key in ("launcher", "deepspeed", "num_processes"):
            zero3[stage].pop(key, None)
    assert zero3 == demo, "demo-zero3.yaml drifted from demo.yaml: copy demo.yaml's change over"
    assert cfg.name == "demo-zero3"


# --------------------------------------------------------------------------------------------------- QLoRA
def test_qlora_on_cpu_fails_in_one_line_before_anything_loads_or_starts(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = sft_cfg(launcher="accelerate", deepspeed={}, peft={"method": "qlora"})
    t0 = time.time()
    with pytest.raises(QLoRAUnavailableError) as e:  # the model path does not even exist: nothing is loaded
        launch_stage("sft", cfg, {"sft": tmp_path / "none.jsonl", "model": tmp_path / "no-model"}, tmp_path / "out")
    assert time.time() - t0 < 5
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("sft.peft.method is 'qlora' (4-bit NF4 via bitsandbytes), which needs a CUDA GPU")
    assert not (tmp_path / "out" / DS_CONFIG).exists()
    # The whole-config check: every local training stage, before any stage runs; the gpu pool checks its own.
    with pytest.raises(QLoRAUnavailableError, match="^dpo.peft.method is 'qlora'"):
        preflight(PipelineConfig.model_validate({"data": {"demo": True}, "model": {"scratch": {}},
                                                 "dpo": {"peft": {"method": "qlora"}}}))
    preflight(PipelineConfig.model_validate({"data": {"demo": True}, "model": {"scratch": {}},
                                             "dpo": {"peft": {"method": "qlora"}, "work_pool": "gpu"}}))


# ------------------------------------------------------------------------------------- checks on saved models
def test_verify_saved_passes_the_same_model_and_rejects_a_different_one(tmp_path):
    from pipelines.modeling import load_model, load_tokenizer

    # Untied heads: a random tied model just repeats the prompt's last token, whatever its seed.
    base = build_tiny_base(tmp_path / "a", seed=0, tied=False)
    model, tok = load_model(base), load_tokenizer(base)
    prompts = [{"prompt": p["prompt"]} for p in PAIRS[:3]]
    probes = _record(model, tok, "causal_lm", prompts, world=1)
    assert probes["dtype"] == "float32" and len(probes["items"][0]["tokens"]) == 16
    verify_saved(base, {}, probes)
    other = build_tiny_base(tmp_path / "b", seed=1, tied=False)
    with pytest.raises(RuntimeError, match="the saved weights do not reproduce the trained model"):
        verify_saved(other, {}, probes)


def test_verify_saved_rejects_empty_tensors_and_a_reward_model_without_score_head(tmp_path):
    from safetensors.torch import load_file, save_file

    from pipelines.artifacts import write_json

    base = build_tiny_base(tmp_path / "a")
    weights = load_file(base / "model.safetensors")
    name = next(iter(weights))
    save_file({**weights, name: torch.empty(0)}, base / "model.safetensors")
    with pytest.raises(RuntimeError, match=f"tensor {name} is empty"):
        verify_saved(base, {}, {"dtype": "float32", "items": []})
    save_file(weights, base / "model.safetensors")
    write_json(base / "tunewright_manifest.json", {"stage": "reward", "kind": "full", "task": "reward"})
    with pytest.raises(RuntimeError, match="the saved reward model has no score head"):
        verify_saved(base, {}, {"dtype": "float32", "items": []})


def test_gathered_state_dict_of_a_plain_model_is_its_state_dict_with_tied_weights_shared(tmp_path):
    from pipelines.modeling import load_model

    model = load_model(build_tiny_base(tmp_path / "a"))
    sd = gathered_state_dict(model)
    ref = model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]


def test_failure_message_names_the_rank_that_failed_first(tmp_path):
    from pipelines.artifacts import write_json

    errors = tmp_path / "errors"
    write_json(errors / "rank0.json", {"rank": 0, "time": 2.0, "error": "RuntimeError: peer closed",
                                       "traceback": ["Traceback\n", "RuntimeError: peer closed\n"]})
    write_json(errors / "rank1.json", {"rank": 1, "time": 1.0, "error": "ValueError: boom",
                                       "traceback": ["Traceback (most recent call last):\n", "ValueError: boom\n"]})
    msg = _failure_message("sft", 1, errors, [])
    assert msg.splitlines()[0] == "sft: rank 1 failed: ValueError: boom"
    killed = _failure_message("sft", -9, tmp_path / "none", ["step 1", "Traceback (most recent call last):",
                                                             "  File x", "MemoryError: out of memory"])
    assert killed.splitlines()[0] == "sft: the launched job exited with code -9: MemoryError: out of memory"


# ------------------------------------------------------------------------------------------- gpu pool dispatch
@pytest.mark.slow
def test_run_on_pool_runs_the_stage_on_a_run_stage_worker_and_rebuilds_its_result(tw_home, prefect_api, tmp_path):
    """A real deployment ``run-stage/gpu`` served by a runner (a worker in miniature), a real flow run in another
    process: the input file reaches it through MLflow, and the result comes back; the second time a cache hit."""
    import asyncio
    import threading

    from prefect import flow
    from prefect.runner import Runner

    from flows.dispatch import run_on_pool, run_stage
    from pipelines import tracking
    from pipelines.artifacts import ArtifactRef, sha256_path, write_jsonl

    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"text": "write to bob@example.com"}, {"text": "nothing to hide here"}])
    cfg = PipelineConfig.model_validate({"data": {"demo": True}, "model": {"scratch": {}}})
    c = tracking.client()
    parent = c.create_run(tracking.experiment_id(), run_name="dispatch-test").info.run_id
    inputs = {"records": ArtifactRef(None, str(corpus), sha256_path(corpus), "input")}

    runner = Runner(name="gpu-worker-test", query_seconds=1, pause_on_shutdown=False)
    runner.add_flow(run_stage, name="gpu")
    threading.Thread(target=lambda: asyncio.run(runner.start()), daemon=True).start()

    @flow
    def orchestrate(force: bool):
        return run_on_pool("gpu", "sanitize", cfg, inputs, parent, force)

    try:
        first, second = orchestrate(True), orchestrate(False)
    finally:
        runner.stop()
    child = c.get_run(first.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent and child.data.tags["tunewright.stage"] == "sanitize"
    assert child.data.tags["tunewright.input.records"] == f"input:{parent}:{inputs['records'].sha256[:12]}"
    assert first.ref == ArtifactRef(first.run_id, "data", child.data.tags["tunewright.output_sha256"], "sanitize")
    assert not first.cache_hit and "EMAIL" in first.summary
    assert second.cache_hit and second.ref == first.ref and second.run_id != first.run_id
    records = read_jsonl_ref(first.ref)
    assert records[0]["text"] == "write to [EMAIL]"


def read_jsonl_ref(ref):
    from pipelines.artifacts import read_jsonl
    from tasks.stages import materialize

    return read_jsonl(materialize(ref))
