"""A user's own chat model and data files, end to end: a tiny random-init Qwen2 checkpoint with a ChatML template,
an Alpaca JSON array, ShareGPT and `messages` files mixed in the sft role, ShareGPT ranking preferences, and no
held-out files. The shipped example-own-data.yaml is the config, with the model and data paths swapped for local
ones. One renderer: the text sft and dpo train on and the prompt evaluate generates from are the chat template's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests._own import build_model, write_data
from tests.conftest import ROOT

EXAMPLE = ROOT / "pipelines" / "configs" / "example-own-data.yaml"


def own_config(tmp: Path, model: Path, files: dict[str, Path]) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["model"] = {"name_or_path": str(model), "dtype": "float32"}
    data["data"] = {"corpus": str(files["corpus"]),
                    "sft": [str(files["alpaca"]), {"path": str(files["sharegpt"]), "format": "sharegpt"},
                            str(files["messages"])],
                    "preference": str(files["pref"]), "val_size": 0.2, "val_min": 4}
    small = {"epochs": 1, "batch_size": 8, "max_length": 96, "bf16": False}
    for stage in ("dapt", "sft", "reward", "dpo"):
        data[stage] = {**data[stage], **small}
        data[stage]["peft"] = {"method": "lora", "r": 4, "alpha": 8} if stage != "reward" else {"method": "full"}
    data["dapt"]["peft"] = {"method": "full"}
    data["dedup"] = {"batch_size": 64}
    data["curriculum"] = {"batch_size": 16, "max_length": 64}
    data["evaluate"] = {"max_new_tokens": 8, "batch_size": 16, "max_length": 128}
    out = tmp / "own-data.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def own_run(tw_home, prefect_api, tmp_path_factory):
    from flows.finetune import finetune
    from pipelines.config import load_config

    tmp = tmp_path_factory.mktemp("own")
    model = build_model(tmp / "qwen2-tiny", "qwen2")
    files = write_data(tmp / "data")
    cfg = load_config(own_config(tmp, model, files))
    return cfg, model, finetune(cfg)


def _child(parent: str, stage: str):
    from pipelines import tracking

    c = tracking.client()
    runs = c.search_runs([tracking.experiment_id()],
                         f"tags.mlflow.parentRunId = '{parent}' and tags.`tunewright.stage` = '{stage}'")
    assert len(runs) == 1
    return runs[0]


def _artifact(run, path: str) -> Path:
    import mlflow

    from pipelines import tracking

    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path,
                                                    tracking_uri=tracking.tracking_uri()))


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def test_whole_pipeline_on_own_model_and_formats(own_run):
    from pipelines import tracking

    cfg, _, out = own_run
    assert list(out["stages"]) == ["sanitize", "dedup", "curriculum", "dapt", "sft", "reward", "dpo", "evaluate",
                                   "export"]
    parent = tracking.client().get_run(out["parent_run_id"])
    # the export keeps the model's own chat template (ChatML here), stopping at its end-of-turn token
    from transformers import AutoTokenizer, GenerationConfig

    from pipelines.artifacts import ArtifactRef

    ex = tracking.client().search_runs([tracking.experiment_id()], f"tags.mlflow.parentRunId = '{out['parent_run_id']}' "
                                       "and tags.`tunewright.stage` = 'export'")[0]
    d = tracking.fetch(ArtifactRef(ex.info.run_id, "model", ex.data.tags["tunewright.output_sha256"], "export"))
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok.chat_template == AutoTokenizer.from_pretrained(cfg.model.name_or_path).chat_template
    eos = GenerationConfig.from_pretrained(str(d)).eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    m = parent.data.metrics
    for ck in ("base", "dapt", "sft", "dpo"):
        assert m[f"{ck}/domain_ppl"] > 1.0
        assert 0.0 <= m[f"{ck}/qa_exact_match"] <= 1.0 and 0.0 <= m[f"{ck}/qa_f1"] <= 1.0
    assert 0.0 <= m["dpo/rm_win_rate_vs_sft"] <= 1.0 and "dpo/kl_to_sft" in m
    assert 0.0 <= m["reward/pairwise_accuracy"] <= 1.0
    # held-out splits: 12 Alpaca + 12 ShareGPT + 12 messages sft records, 36 preference pairs, 48 corpus texts
    split = json.loads(_artifact(parent, "inputs/split.json").read_text())
    assert split["eval_qa"]["source"] == "held out from data.sft"
    assert split["eval_qa"]["records"] == 7 and split["sft"]["records"] == 36 - 7
    assert split["eval_preference"]["records"] + split["preference"]["records"] == 36
    assert split["eval_text"]["records"] == round(0.2 * 48) and len(split["eval_qa"]["heldout_sha256"]) == 7


def test_heldout_records_are_never_trained_on(own_run):
    cfg, _, out = own_run
    from pipelines.data import prepare

    files = prepare(cfg)
    train = {json.dumps(r["messages"]) for r in _jsonl(files["sft"])}
    held = {json.dumps(r["messages"]) for r in _jsonl(files["eval_qa"])}
    assert held and not train & held
    pref_prompts = {json.dumps(r["prompt"]) for r in _jsonl(files["preference"])}
    eval_prompts = [json.dumps(r["prompt"]) for r in _jsonl(files["eval_prompts"])]
    assert eval_prompts and all(p in {json.dumps(r["prompt"]) for r in _jsonl(files["eval_preference"])}
                                for p in eval_prompts)
    assert len(pref_prompts) > 0


def test_training_and_evaluation_render_with_the_models_chat_template(own_run):
    from transformers import AutoTokenizer

    cfg, model_dir, out = own_run
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    parent = out["parent_run_id"]
    from pipelines.data import prepare

    files = prepare(cfg)
    sft_rows = _jsonl(files["sft"])
    sft_examples = _jsonl(_artifact(_child(parent, "sft"), "examples.jsonl"))
    assert len(sft_examples) == 5
    for ex, rec in zip(sft_examples, sft_rows):
        assert ex["trained_text"] == tok.apply_chat_template(rec["messages"], tokenize=False)
        assert ex["prompt_text"] == tok.apply_chat_template(rec["messages"][:-1], tokenize=False,
                                                            add_generation_prompt=True)
        assert 0 < ex["trained_tokens"] < ex["tokens"]
    pref = _jsonl(files["preference"])
    dpo_examples = _jsonl(_artifact(_child(parent, "dpo"), "examples.jsonl"))
    for ex, rec in zip(dpo_examples, pref):
        chosen = rec["prompt"] + [{"role": "assistant", "content": rec["chosen"]}]
        rejected = rec["prompt"] + [{"role": "assistant", "content": rec["rejected"]}]
        assert ex["trained_text"] == tok.apply_chat_template(chosen, tokenize=False)
        assert ex["rejected_text"] == tok.apply_chat_template(rejected, tokenize=False)
    preds = [p for p in _jsonl(_artifact(_child(parent, "evaluate"), "qa_predictions.jsonl"))
             if p["checkpoint"] == "sft"]
    held = _jsonl(files["eval_qa"])
    assert len(preds) == len(held)
    for p, rec in zip(preds, held):
        assert p["prompt_text"] == tok.apply_chat_template(rec["messages"][:-1], tokenize=False,
                                                           add_generation_prompt=True)
        assert p["answer"] == rec["messages"][-1]["content"]


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_multi_turn_loss_covers_every_assistant_turn_and_nothing_else(tmp_path, arch):
    from transformers import AutoTokenizer

    from pipelines.chat import Renderer
    from pipelines.config import TemplateConfig

    tok = AutoTokenizer.from_pretrained(str(build_model(tmp_path / arch, arch)))
    r = Renderer.for_model(tok, TemplateConfig())
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour of the Obrix?"},
            {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And its price?"},
            {"role": "assistant", "content": "99 dollars."}]
    ids, mask = r.encode(msgs, 512)
    assert ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "Red.<|im_end|>\n99 dollars.<|im_end|>\n"
    assert r.stop_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    p_ids = r.encode_prompt(msgs[:-1], 512)
    assert tok.decode(p_ids).endswith("<|im_start|>user\nAnd its price?<|im_end|>\n<|im_start|>assistant\n")
    assert r.decode_answer(tok("99 dollars.<|im_end|>\nextra", add_special_tokens=False)["input_ids"]) == "99 dollars."


def test_one_loading_description_reaches_every_load():
    from pipelines.config import ModelConfig
    from pipelines.modeling import load_spec

    spec = load_spec(ModelConfig(name_or_path="org/model", revision="abc123", dtype="bfloat16", trust_remote_code=True))
    assert spec.kwargs("org/model") == {"trust_remote_code": True, "revision": "abc123"}
    assert spec.kwargs("/runs/sft/model") == {"trust_remote_code": True}  # the run's own checkpoints: no revision
    assert spec.dtype == "bfloat16" and spec.torch_device().type in ("cpu", "cuda")
