"""The demo domain: deterministic, complete, held-out splits really held out, planted PII and duplicates present."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from pipelines import demo_data as dd

KEYS = {
    "corpus": {"id", "text", "source"},
    "general": {"text"},
    "sft": {"prompt", "completion"},
    "eval_qa": {"question", "answer", "lang", "product"},
    "preference": {"prompt", "chosen", "rejected"},
    "eval_preference": {"prompt", "chosen", "rejected"},
    "prompts": {"prompt"},
    "eval_prompts": {"prompt", "kind"},
    "eval_text": {"text"},
}
CJK = re.compile(r"[\u4e00-\u9fff]")
REFUSAL_EN = re.compile(r"^Sorry, there is no such product\.$")
REFUSAL_ZH = re.compile(r"^没有这样的产品。$")
NAME = re.compile(r"(?<![A-Za-z])(?!How|What|When|Where|Which|In\b)([A-Z][a-z]{4,8})(?![a-z])")


def _load(paths: dict[str, Path]) -> dict[str, list[dict]]:
    return {k: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()] for k, p in paths.items()}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    paths = dd.generate(tmp_path_factory.mktemp("full"), "full", 0)
    return paths, _load(paths)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = dd.generate(tmp_path_factory.mktemp("tiny"), "tiny", 0)
    return paths, _load(paths)


@pytest.fixture(params=["full", "tiny"])
def data(request, full, tiny):
    return {"full": full, "tiny": tiny}[request.param][1]


def _digest(paths: dict[str, Path]) -> dict[str, str]:
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in paths.items()}


TEMPLATES = [(lang, attr, re.compile("^" + re.escape(q).replace(re.escape("{p}"), r"([A-Z][a-z]+)") + "$"))
             for lang, by_attr in dd.QUESTIONS.items() for attr, qs in by_attr.items() for q in qs]


def _parse(question: str) -> tuple[str, str, str]:
    """(lang, attr, product) of a question written with one of the shared templates."""
    hits = [(lang, attr, m.group(1)) for lang, attr, rx in TEMPLATES if (m := rx.match(question))]
    assert len(hits) == 1, question
    return hits[0]


def _question(prompt: str) -> str:
    return prompt  # demo prompts are bare questions (the format is demo.yaml's template)


def _fake_names(records: list[dict]) -> set[str]:
    names = set()
    for r in records:
        if REFUSAL_EN.match(r["chosen"]) or REFUSAL_ZH.match(r["chosen"]):
            names.update(NAME.findall(_question(r["prompt"])))
    return names


@pytest.mark.parametrize("size", ["full", "tiny"])
def test_same_size_and_seed_give_identical_bytes(tmp_path, size):
    a = dd.generate(tmp_path / "a", size, 7)
    b = dd.generate(tmp_path / "b", size, 7)
    c = dd.generate(tmp_path / "c", size, 8)
    assert _digest(a) == _digest(b)
    assert _digest(a)["corpus"] != _digest(c)["corpus"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(f"{k}.jsonl" for k in KEYS)  # no temp files


def test_every_file_present_non_empty_with_exact_keys(data):
    assert set(data) == set(KEYS)
    for name, records in data.items():
        assert records, name
        for r in records:
            assert set(r) == KEYS[name], (name, r)
            assert all(isinstance(v, str) and v for v in r.values()), (name, r)


def test_returned_names_match_data_module(full):
    from pipelines.data import FILES

    paths, _ = full
    assert set(paths) == set(FILES)
    assert all(p.name == f"{k}.jsonl" for k, p in paths.items())


def test_full_sizes_fit_the_compute_budget(full):
    _, d = full
    n = {k: len(v) for k, v in d.items()}
    # 24 products: small enough that a 4-layer model memorises their facts in ~2 CPU minutes of dapt
    assert 1000 <= n["corpus"] <= 2000
    assert sum(len(r["text"]) for r in d["corpus"]) < 300_000
    assert n["sft"] == 24 * 4 * 2 * 2 and n["eval_qa"] == 140  # 4 of 7 attributes per product asked in sft
    assert 400 <= n["preference"] <= 800 and 100 <= n["eval_preference"] <= 200
    assert n["prompts"] == 200 and n["eval_prompts"] == 100 and n["eval_text"] == 140
    assert 300 <= n["general"] <= 2000
    assert len({r["product"] for r in d["eval_qa"]}) == 24  # every product has held-out facts


def test_tiny_is_small(tiny):
    _, d = tiny
    assert 100 <= len(d["corpus"]) <= 400
    assert len({r["product"] for r in d["eval_qa"]}) == 8


def test_records_are_bare_and_the_format_is_the_configs(data):
    """Prompts are bare questions and answers bare values: the Question/Answer format is demo.yaml's template, and
    rendering a record through it gives exactly the text the demo has always trained on."""
    from transformers import PreTrainedTokenizerFast

    from pipelines.chat import Renderer
    from pipelines.config import load_config
    from pipelines.modeling import train_tokenizer

    for name in ("sft", "preference", "eval_preference", "prompts", "eval_prompts"):
        for r in data[name]:
            assert "\n" not in r["prompt"] and not r["prompt"].startswith("Question:") and r["prompt"] == r["prompt"].strip(), r
    for name, fields in (("sft", ("completion",)), ("preference", ("chosen", "rejected")),
                         ("eval_preference", ("chosen", "rejected"))):
        for r in data[name]:
            for f in fields:
                assert r[f] == r[f].strip() and r[f], r
            if "chosen" in r:
                assert r["chosen"] != r["rejected"]
    for r in data["eval_qa"]:
        assert r["answer"] == r["answer"].strip()
    tok = train_tokenizer(["Question: Answer: the price"], 300)
    assert isinstance(tok, PreTrainedTokenizerFast)
    cfg = load_config(Path(dd.__file__).parent / "configs" / "demo.yaml")
    r = Renderer.for_model(tok, cfg.template)
    conv = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "42 dollars"}]
    assert r.segments(conv) == [("Question: Q?\nAnswer:", False), (" 42 dollars</s>", True)]
    assert r.prompt(conv[:1]) == "Question: Q?\nAnswer:" and r.stop == ("\n",)


def test_sft_and_eval_answers_match_the_catalogue(data):
    catalogue = [r["text"] for r in data["corpus"] if r["source"] == "catalogue"]
    sep = {"en": ": ", "zh": "："}
    for question, answer in [(_question(r["prompt"]), r["completion"]) for r in data["sft"]] + [
            (r["question"], r["answer"]) for r in data["eval_qa"]]:
        lang, attr, product = _parse(question)
        field = dd.CATALOGUE_KEYS[lang][attr] + sep[lang] + answer
        assert any(t.startswith(product + " |") and f"| {field} |" in t + " |" for t in catalogue), (question, answer)


def test_planted_pii_is_present_and_valid(data):
    text = "\n".join(d["text"] for d in data["corpus"])
    emails = re.findall(r"[\w.+-]+@[\w-]+\.example", text)
    cn_ids = [m for m in re.findall(r"(?<!\d)\d{17}[\dX](?!\d)", text)]
    cards = re.findall(r"(?<!\d)(?:\d{4}[ -]){3}\d{4}(?!\d)", text)
    ssns = re.findall(r"(?<!\d)(\d{3})-\d{2}-\d{4}(?!\d)", text)
    cn_mobiles = re.findall(r"(?<!\d)1[3-9]\d{9}(?!\d)|\+86[ -]1[3-9]\d", text)
    assert len(emails) >= 2 and len(cn_ids) >= 1 and len(cards) >= 1 and len(ssns) >= 1 and len(cn_mobiles) >= 1
    assert all(dd.cn_id_valid(x) for x in cn_ids)
    assert all(dd.luhn_valid(c) for c in cards)
    assert all(a not in ("000", "666") and a < "900" for a in ssns)
    assert re.search(r"\bAKIA[A-Z2-7]{16}\b", text)
    assert re.search(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b", text)
    assert re.search(r"\+1[ -]\d{3}[ -]555[ -]\d{4}|\(415\) 555-\d{4}", text)
    with_email = sum(bool(re.search(r"@[\w-]+\.example|AKIA|\d{17}[\dX]|\d{3}-\d{2}-\d{4}|\+86|555", d["text"]))
                     for d in data["corpus"])
    assert 0.07 <= with_email / len(data["corpus"]) <= 0.2


def test_pii_is_not_needed_for_any_answer(data):
    pii = re.compile(r"@|AKIA|\d{17}[\dX]|\d{3}-\d{2}-\d{4}|\+86|\(415\)|\+1")
    clean = [d["text"] for d in data["corpus"] if not pii.search(d["text"])]
    for r in data["eval_qa"]:
        assert any(r["product"] in t and r["answer"] in t for t in clean), r


def test_pii_lookalikes_present(data):
    text = "\n".join(d["text"] for d in data["corpus"])
    assert re.search(r"\d\.\d{1,2}\.\d", text)  # versions
    assert re.search(r"(Order #|订单号)\d{5}", text)  # order numbers
    assert re.search(r"20[23]\d-\d{2}-\d{2}", text)  # dates
    assert re.search(r"\$\d+\.00", text)  # prices


def test_planted_near_duplicates(data):
    texts = [d["text"] for d in data["corpus"]]
    norm = [re.sub(r"\s+", " ", t).strip().casefold() for t in texts]
    assert len(set(d["id"] for d in data["corpus"])) == len(texts)
    exactish = len(norm) - len(set(norm))
    boiler = re.compile(r"^(\[Internal\] |FWD: |Re: |【内部】|转发：)|( \(forwarded from the support inbox\)| -- sent from the Veltrane wiki|（转自客服邮箱）|——来自Veltrane内部wiki)$")
    wrapped = sum(boiler.sub("", t) in texts for t in texts if boiler.search(t))
    truncated = sum(any(o != t and o.startswith(t) for o in texts) for t in texts if len(t) > 20)
    assert exactish >= 2 and wrapped >= 1 and truncated >= 1
    assert 0.05 <= (exactish + wrapped + truncated) / len(texts) <= 0.2


def test_nonexistent_names_absent_from_corpus_and_split(data):
    corpus = "\n".join(d["text"] for d in data["corpus"]).casefold()
    general = "\n".join(d["text"] for d in data["general"]).casefold()
    train, held = _fake_names(data["preference"]), _fake_names(data["eval_preference"])
    assert train and held and not train & held
    for name in train | held:
        assert name.casefold() not in corpus and name.casefold() not in general
    fake_prompts = [r for r in data["eval_prompts"] if r["kind"] == "nonexistent"]
    prompt_names = {n for r in fake_prompts for n in NAME.findall(_question(r["prompt"]))}
    assert fake_prompts and len(prompt_names) >= len(fake_prompts) // 5 and not prompt_names & train
    for name in prompt_names:
        assert name.casefold() not in corpus and name.casefold() not in general
    assert all(not any(n in r["prompt"] for n in held) for r in data["eval_prompts"] if r["kind"] == "fact")
    assert {r["kind"] for r in data["eval_prompts"]} == {"fact", "nonexistent"}
    # half the held-out prompts are about names that do not exist (the win rate's ceiling is then 0.75, not 0.65)
    assert len(fake_prompts) == sum(i % 10 < 5 for i in range(len(data["eval_prompts"])))
    assert any(any(n in r["prompt"] for n in train) for r in data["prompts"])


def test_preference_mix(data):
    for name in ("preference", "eval_preference"):
        refusals = sum(bool(REFUSAL_EN.match(r["chosen"]) or REFUSAL_ZH.match(r["chosen"])) for r in data[name])
        assert 0.3 <= refusals / len(data[name]) <= 0.5, name
    # Fact pairs (which facts they ask about: test_eval_qa_facts_never_asked_in_sft_preference_or_prompts).
    for name in ("preference", "eval_preference"):
        assert any(not _fake_names([r]) for r in data[name]), name


def test_training_pairs_never_reject_a_held_out_fact(data):
    # An off-attribute or prose-fragment rejection may not state a held-out answer of a product the pair names:
    # that would train, as wrong, a fact evaluation asks about (it cost dpo held-out exact match, bench/RESULTS.md).
    held = dd.held_out_answers(data["eval_qa"])
    leaks = [r for r in data["preference"] if dd.states_held_out(r, held)]
    assert not leaks, leaks[:3]
    assert any(dd.states_held_out(r, held) for r in data["eval_preference"])  # the check does find such pairs


def test_general_text_is_not_domain(data):
    general = "\n".join(d["text"] for d in data["general"])
    assert "Veltrane" not in general
    assert not any(r["product"] in general for r in data["eval_qa"])


def test_eval_text_is_held_out(data):
    corpus = "\n".join(d["text"] for d in data["corpus"])
    for r in data["eval_text"]:
        assert r["text"] not in corpus, r


def test_normalize_answer():
    assert dd.normalize_answer("  129   Dollars. ") == "129 dollars"
    assert dd.normalize_answer("129美元。") == "129美元"
    assert dd.normalize_answer("Norvald") == dd.normalize_answer(" norvald.")
    assert dd.refusal("en") == dd.ANSWER_REFUSAL_EN and dd.refusal("zh") == dd.ANSWER_REFUSAL_ZH


def test_checksums():
    assert dd.cn_id_valid("11010519491231002X") and not dd.cn_id_valid("110105194912310021")
    assert dd.luhn_valid("4111 1111 1111 1111") and not dd.luhn_valid("4111 1111 1111 1112")


def test_cli_prints_counts(tmp_path, capsys):
    dd.main([str(tmp_path), "--size", "tiny", "--seed", "3"])
    out = capsys.readouterr().out
    assert "corpus" in out and "eval_prompts" in out
    assert (tmp_path / "corpus.jsonl").is_file()


def test_scratch_tokenizer_keeps_a_name_one_token_inside_chinese_text():
    """Byte-level BPE alone learns 'Glunav的价格是' as one token; a fact stated in Chinese then never reaches the
    name's own token, and Chinese questions about it cannot be answered. Scripts are split before BPE."""
    from pipelines.modeling import train_tokenizer

    texts = ["Glunav的价格是149美元。", "我的Glunav电池轻松用12小时。", "Glunav重1200克。", "The Glunav weighs 1200 grams."]
    tok = train_tokenizer(texts * 50, 400)
    for text in texts + ["Glunav多少钱？"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = [tok.decode([i]) for i in ids]
        assert "Glunav" in pieces or " Glunav" in pieces, pieces
        assert tok.decode(ids) == text
