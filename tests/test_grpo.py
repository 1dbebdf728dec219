"""GRPO on the tiny world of test_ppo: TRL's trainer with our reward model runs, logs reward, saves an adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipelines import grpo as G
from pipelines.config import GRPOStageConfig, PeftConfig, PipelineConfig
from tests.test_ppo import RAW, _prompt, build_tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(2)
    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))


def test_reward_function_scores_like_the_reward_model(world):
    f = G.reward_function(world["reward"])
    r = f(prompts=[_prompt("Is the red box heavy?")] * 2, completions=[" yes", " no"], completion_ids=None)
    assert len(r) == 2 and r[0] > r[1] + 2  # the tiny reward model prefers " yes"


def test_grpo_runs_logs_reward_and_saves_an_adapter(world, tmp_path):
    from safetensors import safe_open

    from pipelines.modeling import read_manifest

    gcfg = GRPOStageConfig(max_steps=3, batch_size=8, num_generations=4, max_completion_length=6, beta=0.04,
                           learning_rate=1e-3, lr_scheduler="constant", max_length=64,
                           peft=PeftConfig(method="lora", r=8, alpha=16))
    cfg = PipelineConfig(data={"demo": True}, model={"scratch": {}}, grpo=gcfg.model_dump(), template=RAW)
    out = G.run(cfg, {**world, "work_dir": tmp_path / "work"}, tmp_path / "out")
    assert out.primary == "model" and out.metrics["global_step"] == 3
    assert math.isfinite(out.metrics["reward"]) and "reward_std" in out.metrics and "kl" in out.metrics
    assert "rewards/reward_model/mean" in out.metrics
    hist = [json.loads(line) for line in (tmp_path / "out" / "grpo_history.jsonl").read_text().splitlines()]
    assert len(hist) == 3 and all(math.isfinite(h["reward"]) for h in hist)
    man = read_manifest(tmp_path / "out" / "model")
    assert man["stage"] == "grpo" and man["kind"] == "adapter"
    with safe_open(str(tmp_path / "out" / "model" / "adapter_model.safetensors"), "pt") as st:
        keys = list(st.keys())
        assert keys and all("lora_" in k for k in keys)
        assert any(float(st.get_tensor(k).abs().sum()) > 0 for k in keys if "lora_B" in k)  # it trained


def test_group_size_is_checked_before_loading(world, tmp_path):
    gcfg = GRPOStageConfig(batch_size=6, num_generations=4)
    with pytest.raises(ValueError, match="multiple of grpo.num_generations"):
        G.grpo(["p"], world["model"], world["reward"], gcfg, 0, tmp_path)


def test_cli_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pipelines.grpo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "reward_dir" in out.stdout
