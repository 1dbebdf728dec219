"""Config schema: every shipped YAML validates; each rule has a rejected and an accepted case."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, PipelineConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "pipelines" / "configs").glob("*.yaml")) + sorted((ROOT / "tests" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.active_stages()[:6] == ["sanitize", "dedup", "curriculum", "dapt", "sft", "reward"]
    assert cfg.active_stages()[-2:] == ["evaluate", "export"]
    assert path.read_text().lstrip().startswith("#"), "every shipped config opens with a header comment"


def test_demo_is_offline_scratch():
    cfg = load_config(ROOT / "pipelines" / "configs" / "demo.yaml")
    assert cfg.data.demo and cfg.model.scratch is not None and cfg.model.name_or_path is None
    assert cfg.model.trust_remote_code is False
    assert cfg.preference.algorithm == "dpo"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


BASE = "data:\n  demo: true\nmodel:\n  scratch: {}\n"


def test_unknown_key_names_key_file_and_line(tmp_path):
    p = _write(tmp_path, BASE + "sft:\n  epochs: 2\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}:7: sft.learning_rat: unknown key (not part of the schema; check the spelling)"


def test_bad_value_and_bounds(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml:6: sft.epochs: Input should be greater than 0"):
        load_config(_write(tmp_path, BASE + "sft:\n  epochs: 0\n"))
    with pytest.raises(ConfigError, match=r"preference.algorithm: Input should be 'dpo', 'ppo' or 'grpo'"):
        load_config(_write(tmp_path, BASE + "preference: {algorithm: kto}\n"))
    assert load_config(_write(tmp_path, BASE + "preference: {algorithm: ppo}\n")).active_stages()[-3] == "ppo"


def test_model_needs_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match="model needs exactly one of model.name_or_path and model.scratch"):
        load_config(_write(tmp_path, "data: {demo: true}\nmodel: {name_or_path: x, scratch: {}}\n"))
    with pytest.raises(ConfigError, match="model needs exactly one"):
        load_config(_write(tmp_path, "data: {demo: true}\nmodel: {}\n"))
    assert load_config(_write(tmp_path, "data: {demo: true}\nmodel: {name_or_path: /models/x}\n")).model.scratch is None


def test_scratch_heads_must_divide_hidden(tmp_path):
    with pytest.raises(ConfigError, match="hidden_size must be divisible by model.scratch.num_heads"):
        load_config(_write(tmp_path, "data: {demo: true}\nmodel: {scratch: {hidden_size: 100, num_heads: 3}}\n"))
    assert load_config(_write(tmp_path, "data: {demo: true}\nmodel: {scratch: {hidden_size: 96, num_heads: 3}}\n"))


def test_real_data_requires_files(tmp_path):
    with pytest.raises(ConfigError, match="data.corpus is required unless data.demo is true"):
        load_config(_write(tmp_path, "data: {}\nmodel: {scratch: {}}\n"))


def test_unknown_pii_type(tmp_path):
    with pytest.raises(ConfigError, match="unknown entity type 'PASSPORT'"):
        load_config(_write(tmp_path, BASE + "sanitize: {entities: [EMAIL, PASSPORT]}\n"))


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml:3: invalid YAML"):
        load_config(_write(tmp_path, "data:\n  demo: [true\nmodel: x\n"))
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]
    assert isinstance(cfg, PipelineConfig)


def test_export_block(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.registered_model() == f"tunewright-{cfg.name}" and cfg.export.promote.alias == "champion"
    off = load_config(_write(tmp_path, BASE + "export: {enabled: false}\n"))
    assert "export" not in off.active_stages()
    named = load_config(_write(tmp_path, BASE + "export: {registered_model: acme-support}\n"))
    assert named.registered_model() == "acme-support"
    with pytest.raises(ConfigError, match="exactly one of max_drop"):
        load_config(_write(tmp_path, BASE + "export: {promote: {guards: [{metric: qa_f1}]}}\n"))
    with pytest.raises(ConfigError, match="exactly one of max_drop"):
        load_config(_write(tmp_path, BASE + "export: {promote: {guards: [{metric: qa_f1, max_drop: 0.1, max_rise: 1}]}}\n"))
    with pytest.raises(ConfigError, match=r"export\.dtype"):
        load_config(_write(tmp_path, BASE + "export: {dtype: int3}\n"))


def test_curriculum_schedule_and_the_old_mode_key(tmp_path):
    cfg = load_config(_write(tmp_path, BASE + "curriculum: {schedule: competence_root, c0: 0.1, ramp: 0.3}\n"))
    assert (cfg.curriculum.schedule, cfg.curriculum.c0, cfg.curriculum.ramp) == ("competence_root", 0.1, 0.3)
    assert load_config(_write(tmp_path, BASE)).curriculum.schedule == "competence_root"  # measured best (issue 14)
    with pytest.raises(ConfigError, match=r"cfg.yaml:5: curriculum: curriculum.mode is now curriculum.schedule "
                                          r"\(easy_to_hard -> fixed, bucketed -> bucketed, off -> off"):
        load_config(_write(tmp_path, BASE + "curriculum:\n  mode: easy_to_hard\n"))
    with pytest.raises(ConfigError, match=r"curriculum.schedule: Input should be 'fixed', 'bucketed'"):
        load_config(_write(tmp_path, BASE + "curriculum: {schedule: sorted}\n"))
    with pytest.raises(ConfigError, match=r"curriculum.c0: Input should be greater than 0"):
        load_config(_write(tmp_path, BASE + "curriculum: {schedule: competence_linear, c0: 0}\n"))
    with pytest.raises(ConfigError, match=r"curriculum.ramp: Input should be less than or equal to 1"):
        load_config(_write(tmp_path, BASE + "curriculum: {ramp: 1.5}\n"))


def test_dedup_paraphrase_policy(tmp_path):
    cfg = load_config(_write(tmp_path, BASE + "dedup: {paraphrases: keep_k, paraphrase_k: 3}\n"))
    assert (cfg.dedup.paraphrases, cfg.dedup.paraphrase_k) == ("keep_k", 3)
    assert load_config(_write(tmp_path, BASE)).dedup.paraphrases == "drop"
    with pytest.raises(ConfigError, match=r"dedup.paraphrases: Input should be 'drop', 'keep' or 'keep_k'"):
        load_config(_write(tmp_path, BASE + "dedup: {paraphrases: merge}\n"))
    with pytest.raises(ConfigError, match=r"dedup.paraphrase_k: Input should be greater than or equal to 1"):
        load_config(_write(tmp_path, BASE + "dedup: {paraphrases: keep_k, paraphrase_k: 0}\n"))
