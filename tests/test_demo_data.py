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
REFUSAL_EN = re.compile(r"^ Sorry, there is no such product\.$")
REFUSAL_ZH = re.compile(r"^ 没有这样的产品。$")
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
    return prompt.removeprefix("Question: ").removesuffix("\nAnswer:")


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


def test_prompt_format_and_leading_space(data):
    assert dd.format_prompt("Q?") == dd.PROMPT_TEMPLATE.format(question="Q?") == "Question: Q?\nAnswer:"
    pattern = re.compile(r"^Question: [^\n]+\nAnswer:$")
    for name in ("sft", "preference", "eval_preference", "prompts", "eval_prompts"):
        for r in data[name]:
            assert pattern.match(r["prompt"]), r
    for name, fields in (("sft", ("completion",)), ("preference", ("chosen", "rejected")),
                         ("eval_preference", ("chosen", "rejected"))):
        for r in data[name]:
            for f in fields:
                assert r[f].startswith(" ") and not r[f].startswith("  ") and r[f] == r[f].rstrip(), r
            if "chosen" in r:
                assert r["chosen"] != r["rejected"]
    for r in data["eval_qa"]:
        assert dd.format_prompt(r["question"]) and r["answer"] == r["answer"].strip()


def test_both_languages_everywhere(data):
    for name, records in data.items():
        texts = [" ".join(r.values()) for r in records]
        assert any(CJK.search(t) for t in texts), name
        assert any(not CJK.search(t) for t in texts), name
    assert {r["lang"] for r in data["eval_qa"]} == {"en", "zh"}
    for r in data["eval_qa"]:
        assert bool(CJK.search(r["question"])) == (r["lang"] == "zh")


def _fact(prompt_or_question: str) -> tuple[str, str]:
    _, attr, product = _parse(_question(prompt_or_question))
    return product, attr


def test_eval_qa_facts_never_asked_in_sft_preference_or_prompts(data):
    held = {_fact(r["question"]) for r in data["eval_qa"]}
    asked = {_fact(r["prompt"]) for r in data["sft"]}
    assert held and asked and not held & asked
    # Every held-out fact's product is asked about in sft (other attributes): the split is by fact, not product.
    assert {p for p, _ in held} <= {p for p, _ in asked}
    per_attr = [sum(a == attr for _, a in held) for attr in dd.ATTRS]
    assert min(per_attr) >= 1 and max(per_attr) - min(per_attr) <= max(2, len(held) // 10)
    train_facts = [_fact(r["prompt"]) for r in data["preference"] if not _fake_names([r])]
    assert train_facts and not held & set(train_facts) and set(train_facts) <= asked
    eval_facts = [_fact(r["prompt"]) for r in data["eval_preference"] if not _fake_names([r])]
    assert eval_facts and not set(eval_facts) & asked
    fact_prompts = [_fact(r["prompt"]) for r in data["eval_prompts"] if r["kind"] == "fact"]
    assert fact_prompts and not set(fact_prompts) & asked
    real = {p for p, _ in asked}
    assert not {f for f in map(_fact, (r["prompt"] for r in data["prompts"])) if f[0] in real} & held
    # ...and the same question templates as sft, so that the format transfers.
    sft_templates = {rx.pattern for r in data["sft"] for _, _, rx in TEMPLATES if rx.match(_question(r["prompt"]))}
    qa_templates = {rx.pattern for r in data["eval_qa"] for _, _, rx in TEMPLATES if rx.match(r["question"])}
    assert qa_templates <= sft_templates and len(sft_templates) == len(TEMPLATES)
    for r in data["eval_qa"]:
        assert _parse(r["question"])[::2] == (r["lang"], r["product"]), r


def test_every_eval_qa_answer_is_stated_in_the_corpus(data):
    docs = [d["text"] for d in data["corpus"] if d["source"] != "comparison"]
    for r in data["eval_qa"]:
        stating = [t for t in docs if r["product"] in t and r["answer"] in t]
        assert len(stating) >= 3, r  # stated several ways
    # The catalogue line states it in the usual field form.
    catalogue: dict[str, str] = {}  # the longest line per product and language (planted copies may be truncated)
    for d in data["corpus"]:
        if d["source"] == "catalogue" and not d["text"].startswith(("[", "FWD", "Re", "【", "转")):
            key = d["text"].split(" | ")[0] + ("zh" if CJK.search(d["text"]) else "en")
            catalogue[key] = max(catalogue.get(key, ""), d["text"], key=len)
    for r in data["eval_qa"]:
        assert r["answer"] in catalogue[r["product"] + r["lang"]], r


def test_sft_and_eval_answers_match_the_catalogue(data):
    catalogue = [r["text"] for r in data["corpus"] if r["source"] == "catalogue"]
    sep = {"en": ": ", "zh": "："}
    for question, answer in [(_question(r["prompt"]), r["completion"][1:]) for r in data["sft"]] + [
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
    assert any(any(n in r["prompt"] for n in train) for r in data["prompts"])


def test_preference_mix(data):
    for name in ("preference", "eval_preference"):
        refusals = sum(bool(REFUSAL_EN.match(r["chosen"]) or REFUSAL_ZH.match(r["chosen"])) for r in data[name])
        assert 0.3 <= refusals / len(data[name]) <= 0.5, name
    # Fact pairs (which facts they ask about: test_eval_qa_facts_never_asked_in_sft_preference_or_prompts).
    for name in ("preference", "eval_preference"):
        assert any(not _fake_names([r]) for r in data[name]), name


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
