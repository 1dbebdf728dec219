"""Every input file of every role is checked before any stage starts: each bad-input kind in each role is one
line ``FILE:LINE: what is wrong`` and exit code 2 from `tunewright run`, no traceback, and no MLflow run exists
afterwards. Also: formats normalised into one conversation type, the held-out split, quarantine for every role.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.formats import normalize
from pipelines.records import RecordError

GOOD = {
    "corpus": [{"text": "The Obrix is red."}, {"text": "The Velora costs 20 dollars."}] * 10,
    "sft": [{"instruction": "Colour of the Obrix?", "input": "", "output": "Red."}] * 10,
    "preference": [{"prompt": "Colour?", "chosen": "Red.", "rejected": "Blue."}] * 10,
}
ROLES = ["corpus", "eval_text", "sft", "eval_qa", "preference", "eval_preference", "prompts", "eval_prompts"]
KIND = {"corpus": "text", "eval_text": "text", "sft": "conv", "eval_qa": "conv", "preference": "pref",
        "eval_preference": "pref", "prompts": "prompt", "eval_prompts": "prompt"}
GOOD_RECORD = {"text": {"text": "A sentence."},
               "conv": {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
               "pref": {"prompt": "Q?", "chosen": "A.", "rejected": "B."},
               "prompt": {"prompt": "Q?"}}
# (bad record, expected message) per role kind; None where the kind cannot have that fault
BAD = {
    "missing_field": {"text": ({"body": "x"}, "cannot tell the record's format"),
                      "conv": ({"instruction": "Q?", "input": ""}, "missing field 'output'"),
                      "pref": ({"prompt": "Q?", "chosen": "A."}, "missing field 'rejected'"),
                      "prompt": ({"id": 3}, "cannot tell the record's format")},
    "empty_conversation": {"conv": ({"messages": []}, "empty conversation"),
                           "pref": ({"prompt": [], "chosen": "A.", "rejected": "B."}, "empty conversation"),
                           "prompt": ({"prompt": []}, "empty conversation")},
    "wrong_role_order": {
        "conv": ({"conversations": [{"from": "gpt", "value": "A."}, {"from": "human", "value": "Q?"}]},
                 "wrong role order: turn 0 is 'assistant'"),
        "pref": ({"prompt": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q2"}],
                  "chosen": "A.", "rejected": "B."}, "wrong role order: turn 1 is 'user'"),
        "prompt": ({"messages": [{"role": "assistant", "content": "A."}]}, "wrong role order")},
}


def write_config(tmp: Path, role: str, bad_file: Path | None) -> Path:
    d = tmp / "data"
    d.mkdir(exist_ok=True)
    for name, rows in GOOD.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {k: f"data/{k}.jsonl" for k in GOOD}
    if bad_file is not None:
        data[role] = str(bad_file)
    cfg = {"data": data, "model": {"scratch": {"vocab_size": 256, "hidden_size": 16, "num_layers": 1,
                                               "num_heads": 1, "intermediate_size": 16}},
           "template": {"format": "plain", "user": "Q: {content}\nA:", "assistant": " {content}"}}
    import yaml

    p = tmp / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def run_cli(cfg: Path, home: Path, monkeypatch) -> tuple[int, str]:
    from flows.cli import app

    monkeypatch.setenv("TUNEWRIGHT_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = CliRunner().invoke(app, ["run", str(cfg)])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


def bad_files(tmp: Path, role: str):
    """(case name, file, the line the error must name, message part) for every fault this role can have."""
    kind = KIND[role]
    good = json.dumps(GOOD_RECORD[kind])
    cases = []
    p = tmp / f"{role}_unparsable.jsonl"
    p.write_text(good + "\n" + good + "\n" + '{"prompt": "Q?", oops}\n')
    cases.append(("unparsable_line", p, 3, "invalid JSON"))
    bad_rec, msg = BAD["missing_field"][kind]
    p = tmp / f"{role}_array.json"
    p.write_text("[\n" + good + ",\n" + json.dumps(bad_rec) + "\n]\n")
    cases.append(("json_array_bad_element", p, 3, msg))
    for fault in ("missing_field", "empty_conversation", "wrong_role_order"):
        if kind not in BAD[fault]:
            continue
        bad_rec, msg = BAD[fault][kind]
        p = tmp / f"{role}_{fault}.jsonl"
        p.write_text("\n".join([good] * 6 + [json.dumps(bad_rec)]) + "\n")
        cases.append((fault, p, 7, msg))
    return cases


@pytest.mark.parametrize("role", ROLES)
def test_each_bad_input_kind_in_each_role_stops_before_any_stage(tmp_path, role, monkeypatch):
    from pipelines import tracking

    for name, path, line, msg in bad_files(tmp_path, role):
        home = tmp_path / f"home-{name}"
        code, output = run_cli(write_config(tmp_path, role, path), home, monkeypatch)
        lines = [ln for ln in output.splitlines() if ln.strip()]
        assert code == 2, (name, output)
        assert len(lines) == 1 and "Traceback" not in output, (name, output)
        assert lines[0].startswith(f"error: {path}:{line}: "), (name, lines[0])
        assert msg in lines[0], (name, lines[0])
        # nothing was tracked: no store, or a store without runs
        db = home / "mlflow.db"
        if db.exists():
            c = tracking.client()
            assert not c.search_runs([tracking.experiment_id()]), name


def test_quarantine_sets_bad_records_aside_in_every_role(tmp_path, monkeypatch):
    from pipelines.config import load_config
    from pipelines.data import prepare, split_report

    monkeypatch.setenv("TUNEWRIGHT_HOME", str(tmp_path / "home"))
    bad = tmp_path / "sft_mixed.jsonl"
    rows = [json.dumps(GOOD_RECORD["conv"])] * 39 + ['{"messages": []}']
    bad.write_text("\n".join(rows) + "\n")
    cfg_path = write_config(tmp_path, "sft", bad)
    import yaml

    d = yaml.safe_load(cfg_path.read_text())
    d["data"]["bad_records"] = "quarantine"
    cfg_path.write_text(yaml.safe_dump(d))
    files = prepare(load_config(cfg_path))
    rejected_file = Path(split_report(files)["sft"]["rejected_file"])
    rejected = [json.loads(x) for x in rejected_file.read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [(40, "conversation: empty conversation")]
    assert split_report(files)["sft"]["rejected"] == 1
    report = split_report(files)
    assert report["sft"]["records"] + report["eval_qa"]["records"] == 39


def test_heldout_split_is_deterministic_and_disjoint(tmp_path, monkeypatch):
    from pipelines.config import load_config
    from pipelines.data import heldout_count, prepare

    monkeypatch.setenv("TUNEWRIGHT_HOME", str(tmp_path / "home"))
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}."}) + "\n" for i in range(100)))
    cfg = load_config(write_config(tmp_path, "sft", sft))
    a = prepare(cfg)
    train = [json.loads(x) for x in a["sft"].read_text().splitlines()]
    held = [json.loads(x) for x in a["eval_qa"].read_text().splitlines()]
    assert len(held) == 10 and len(train) == 90
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in held}
    monkeypatch.setenv("TUNEWRIGHT_HOME", str(tmp_path / "home2"))
    b = prepare(cfg)
    assert b["eval_qa"].read_bytes() == a["eval_qa"].read_bytes()
    assert heldout_count(20, 0.1, 8) == 5 and heldout_count(1000, 0.1, 8) == 100 and heldout_count(3, 0.1, 8) == 0


@pytest.mark.parametrize("rec, kind, want", [
    ({"instruction": "Translate", "input": "Hallo", "output": "Hello", "system": "S", "history": [["a", "b"]]},
     "conversation", [("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "Translate\nHallo"),
                      ("assistant", "Hello")]),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "S"},
     "conversation", [("system", "S"), ("user", "q"), ("assistant", "a")]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}]},
     "conversation", [("user", "q"), ("assistant", "a")]),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
     "conversation", [("user", "q"), ("assistant", "a")]),
    ({"question": "q", "answer": "a"}, "conversation", [("user", "q"), ("assistant", "a")]),
])
def test_formats_normalise_to_one_conversation(rec, kind, want):
    assert [(m["role"], m["content"]) for m in normalize(rec, kind)["messages"]] == want


def test_preference_formats():
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}],
                "chosen": {"from": "gpt", "value": "c"}, "rejected": {"from": "gpt", "value": "r"}}
    implicit = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}
    alpaca = {"instruction": "q", "input": "", "chosen": "c", "rejected": "r"}
    assert normalize(sharegpt, "preference") == {"prompt": [{"role": "system", "content": "S"},
                                                            {"role": "user", "content": "q"}],
                                                 "chosen": "c", "rejected": "r"}
    for rec in (implicit, alpaca):
        assert normalize(rec, "preference") == {"prompt": [{"role": "user", "content": "q"}], "chosen": "c",
                                                "rejected": "r"}
    assert normalize({"prompt": "q", "kind": "fact"}, "prompt") == {"prompt": [{"role": "user", "content": "q"}],
                                                                    "kind": "fact"}
    with pytest.raises(RecordError, match="unknown role 'narrator'"):
        normalize({"conversations": [{"from": "narrator", "value": "x"}]}, "conversation")
    assert normalize({"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]},
                     "conversation", tags={"narrator": "user"})["messages"][0]["role"] == "user"
