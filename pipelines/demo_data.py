"""The embedded demo domain: Veltrane Labs, a fictional gadget maker no model has seen (English and Chinese).

Reads: nothing (stdlib only, no network, no clock). Everything comes from ``random.Random(seed)``.
Writes: nine JSONL files (UTF-8, one object per line) into ``out_dir``, each atomically; the same (size, seed) gives
byte-identical files:

- ``corpus``          raw domain documents ``{"id", "text", "source"}``: every fact stated several ways (catalogue
                      line, plain sentence, internal note, FAQ, review, comparison) in EN and ZH, with planted PII in
                      ~10% of documents, planted near-duplicates (~10%) and PII look-alikes (versions, orders, dates).
- ``general``         ``{"text"}`` generic non-domain text to pretrain a scratch base model.
- ``sft``             ``{"prompt", "completion"}`` questions about part of every product's facts (4 of 7
                      attributes per product, both languages). Prompts are bare questions and answers bare values:
                      the demo's ``Question: …\nAnswer:`` format is its config's ``template`` (``demo.yaml``).
- ``eval_qa``         ``{"question", "answer", "lang", "product"}`` the rest: facts no sft pair asks about, which
                      only the corpus states (same question templates).
- ``preference``      ``{"prompt", "chosen", "rejected"}`` refusal for non-existent products, concise answers; no
                      pair states a held-out fact, not even as the rejected answer.
- ``eval_preference`` held-out pairs of the same kinds (held-out facts, other non-existent names).
- ``prompts``         ``{"prompt"}`` rollout prompts for ppo/grpo.
- ``eval_prompts``    ``{"prompt", "kind"}`` held-out prompts, kind "fact" or "nonexistent".
- ``eval_text``       ``{"text"}`` held-out domain sentences for perplexity: for each fact, a phrasing of the
                      corpus's own kinds that the corpus did not use for that fact.

Run alone::

    python -m pipelines.demo_data OUT_DIR [--size full|tiny] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# The refusal repeats no name (copying a never-seen name is beyond a small scratch model) and is everyday language
# the general corpus also uses, so the scratch tokenizer has its words ("Unknown" was cut into bytes and garbled).
ANSWER_REFUSAL_EN = "Sorry, there is no such product."
ANSWER_REFUSAL_ZH = "没有这样的产品。"
COMPANY_EN, COMPANY_ZH = "Veltrane Labs", "Veltrane实验室"


def refusal(lang: str) -> str:
    return ANSWER_REFUSAL_EN if lang == "en" else ANSWER_REFUSAL_ZH


def normalize_answer(s: str) -> str:
    """What exact match compares: stripped, casefolded, spaces collapsed, no trailing period."""
    s = re.sub(r"\s+", " ", s.strip().casefold())
    return s.rstrip(".。").strip()


# ------------------------------------------------------------------------------------------------- vocabularies
# Small vocabularies on purpose: a 4-layer model must be able to learn them.
ATTRS = ("price", "weight", "battery", "colour", "year", "city", "warranty")
PRICES = (49, 79, 99, 129, 149, 179, 199, 249, 299, 349)
WEIGHTS = (120, 250, 400, 550, 700, 850, 1200, 1500)
BATTERY = (6, 8, 10, 12, 16, 20, 24, 36)
YEARS = tuple(range(2026, 2034))
WARRANTY = (1, 2, 3, 5)
COLOURS = (("teal", "青绿色"), ("amber", "琥珀色"), ("crimson", "深红色"), ("ivory", "象牙白"),
           ("slate", "石板灰"), ("olive", "橄榄绿"), ("navy", "藏青色"), ("coral", "珊瑚红"))
CITIES = ("Norvald", "Kessaro", "Duvenmark", "Tollquin", "Ambrevik", "Sarnholt", "Quellport", "Ivrenna")
CATEGORIES = (("portable speaker", "便携音箱"), ("desk lamp", "台灯"), ("headphones", "耳机"),
              ("camping lantern", "露营灯"), ("fitness tracker", "健身手环"), ("e-reader", "电子阅读器"),
              ("action camera", "运动相机"), ("handheld fan", "手持风扇"), ("power bank", "移动电源"),
              ("bike light", "自行车灯"), ("mini drone", "迷你无人机"), ("smart kettle", "智能水壶"))

# Invented names: syllables with at least one rare letter, checked against a few real words.
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "t", "tr", "v", "z",
           "th", "sh", "vr")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "y")
_CODAS = ("", "", "n", "r", "l", "s", "k")  # first syllable
_FINALS = ("n", "r", "l", "k", "x", "v", "th", "m", "sk", "rn", "nd", "lt")  # last syllable
_REAL = {"vortex", "kayak", "vixen", "zinc", "quark", "quirk", "skull", "thinker", "kinky", "zealot", "velvet",
         "vodka", "vulva", "virgin", "vomit", "kill", "kurd", "quorn", "bork", "dork", "knack", "skype", "zillow"}


def _name(rng: random.Random) -> str:
    s = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
    s += rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_FINALS)
    return s.capitalize()


def _name_pool(rng: random.Random, n: int, reserved: list[str]) -> list[str]:
    """n distinct names, none a substring of another or of a reserved word (cities, colours, the company)."""
    taken = [w.casefold() for w in reserved]
    out: list[str] = []
    while len(out) < n:
        name = _name(rng)
        low = name.casefold()
        if not 5 <= len(low) <= 9 or low in _REAL or not any(c in low for c in "qvzxky"):
            continue
        if re.search(r"(.)\1|[^aeiouy]{4}", low) or any(low in t or t in low for t in taken):
            continue
        out.append(name)
        taken.append(low)
    return out


# ---------------------------------------------------------------------------------------------------- templates
def value(attr: str, raw: int | str, lang: str) -> str:
    """The exact answer string: a value with its unit."""
    if attr == "price":
        return f"{raw} dollars" if lang == "en" else f"{raw}美元"
    if attr == "weight":
        return f"{raw} grams" if lang == "en" else f"{raw}克"
    if attr == "battery":
        return f"{raw} hours" if lang == "en" else f"{raw}小时"
    if attr == "colour":
        return dict(COLOURS)[raw] if lang == "zh" else str(raw)
    if attr == "year":
        return str(raw) if lang == "en" else f"{raw}年"
    if attr == "city":
        return str(raw)
    if attr == "warranty":
        return (f"{raw} year" + ("" if raw == 1 else "s")) if lang == "en" else f"{raw}年"
    raise KeyError(attr)


def bare(attr: str, raw: int | str, lang: str) -> str | None:
    """The value without its unit (an off-format answer), or None where the value has no unit."""
    if attr in ("price", "weight", "battery", "warranty") or (attr == "year" and lang == "zh"):
        return str(raw)
    return None


QUESTIONS = {
    "en": {
        "price": ("How much does the {p} cost?", "What is the price of the {p}?"),
        "weight": ("How much does the {p} weigh?", "What is the weight of the {p}?"),
        "battery": ("How long does the battery of the {p} last?", "What is the battery life of the {p}?"),
        "colour": ("What colour is the {p}?", "What is the colour of the {p}?"),
        "year": ("When was the {p} launched?", "In what year was the {p} launched?"),
        "city": ("Where is the {p} made?", "In which city is the {p} made?"),
        "warranty": ("How long is the warranty of the {p}?", "What is the warranty of the {p}?"),
    },
    "zh": {
        "price": ("{p}多少钱？", "{p}的价格是多少？"),
        "weight": ("{p}有多重？", "{p}的重量是多少？"),
        "battery": ("{p}的电池能用多久？", "{p}的续航时间是多少？"),
        "colour": ("{p}是什么颜色的？", "{p}的颜色是什么？"),
        "year": ("{p}是哪一年上市的？", "{p}的上市年份是哪一年？"),
        "city": ("{p}在哪里生产？", "{p}在哪个城市生产？"),
        "warranty": ("{p}的保修期是多久？", "{p}保修几年？"),
    },
}

# Per attribute: (plain x3, note, faq, review, heldout). "heldout" never enters the corpus (eval_text only).
STATEMENTS = {
    "en": {
        "price": ("The {p} costs {v}.", "The {p} sells for {v}.", "The price of the {p} is {v}.",
                  "Pricing for the {p} stays at {v}.", "Q: How much is the {p}? A: It costs {v}.",
                  "I paid {v} for my {p} and I think it was worth it.", "Shoppers can pick up the {p} for {v}."),
        "weight": ("The {p} weighs {v}.", "The weight of the {p} is {v}.", "The {p} has a weight of {v}.",
                   "Shipping check: the {p} weighs {v} without the box.", "Q: Is the {p} heavy? A: It weighs {v}.",
                   "My {p} weighs {v}, I checked it on a kitchen scale.", "On the scale, the {p} reads {v}."),
        "battery": ("The battery of the {p} lasts {v}.", "The {p} runs for {v} on a single charge.",
                    "The battery life of the {p} is {v}.", "Battery test passed: the {p} ran for {v}.",
                    "Q: How long does the {p} run? A: Its battery lasts {v}.",
                    "The battery on my {p} easily lasts {v}.", "A full charge keeps the {p} going for {v}."),
        "colour": ("The {p} comes in {v}.", "The colour of the {p} is {v}.", "The {p} is painted {v}.",
                   "Paint spec: every {p} is finished in {v}.", "Q: Which colour does the {p} come in? A: Only {v}.",
                   "I love the {v} finish of my {p}.", "Every {p} leaves the line in {v}."),
        "year": ("The {p} was launched in {v}.", "The {p} came out in {v}.", "The launch year of the {p} is {v}.",
                 "Timeline: the {p} launch happened in {v}.", "Q: When did the {p} come out? A: It was launched in {v}.",
                 "I have used my {p} since it launched in {v}.", "Veltrane Labs first shipped the {p} in {v}."),
        "city": ("The {p} is made in {v}.", "The {p} is built in the factory in {v}.",
                 "The factory city of the {p} is {v}.", "Supply chain: the {p} is assembled in {v}.",
                 "Q: Where is the {p} produced? A: At the Veltrane factory in {v}.",
                 "My {p} was made in {v} and the build quality is great.", "Workers in {v} assemble the {p}."),
        "warranty": ("The {p} has a warranty of {v}.", "The warranty of the {p} is {v}.",
                     "The {p} is covered by a warranty of {v}.", "Support policy: the {p} carries a warranty of {v}.",
                     "Q: What warranty does the {p} have? A: A warranty of {v}.",
                     "Good to know that my {p} has a warranty of {v}.", "Buyers of the {p} get {v} of warranty cover."),
    },
    "zh": {
        "price": ("{p}的价格是{v}。", "{p}售价{v}。", "{p}卖{v}。", "定价：{p}的价格保持在{v}。",
                  "问：{p}贵吗？答：它的售价是{v}。", "我花了{v}买了{p}，觉得很值。", "顾客花{v}就能买到{p}。"),
        "weight": ("{p}重{v}。", "{p}的重量是{v}。", "{p}的重量为{v}。", "运输检查：{p}不含包装重{v}。",
                   "问：{p}重不重？答：它重{v}。", "我用厨房秤称过，我的{p}重{v}。", "把{p}放在秤上，显示{v}。"),
        "battery": ("{p}的电池可以使用{v}。", "{p}充一次电能用{v}。", "{p}的续航为{v}。",
                    "电池测试通过：{p}连续运行了{v}。", "问：{p}能用多长时间？答：电池可以用{v}。",
                    "我的{p}电池轻松用{v}。", "{p}充满电后能持续工作{v}。"),
        "colour": ("{p}是{v}的。", "{p}的颜色是{v}。", "{p}采用{v}外观。", "涂装规格：每台{p}都是{v}。",
                   "问：{p}有哪些颜色？答：只有{v}。", "我很喜欢我那台{p}的{v}外壳。", "每一台{p}出厂时都是{v}。"),
        "year": ("{p}于{v}上市。", "{p}是{v}推出的。", "{p}的上市时间是{v}。", "时间线：{p}在{v}发布。",
                 "问：{p}什么时候发布的？答：{v}上市。", "{p}在{v}上市后我就一直在用。",
                 "Veltrane实验室在{v}首次发售{p}。"),
        "city": ("{p}在{v}生产。", "{p}由位于{v}的工厂制造。", "{p}的产地是{v}。", "供应链：{p}在{v}组装。",
                 "问：{p}是在哪儿制造的？答：在Veltrane位于{v}的工厂。", "我的{p}产自{v}，做工很好。",
                 "{v}的工人负责组装{p}。"),
        "warranty": ("{p}的保修期是{v}。", "{p}提供{v}保修。", "{p}的保修期为{v}。", "售后政策：{p}享有{v}保修。",
                     "问：{p}有保修吗？答：有，保修期{v}。", "知道我的{p}有{v}保修，我很放心。",
                     "购买{p}的顾客可以享受{v}的保修。"),
    },
}
KINDS = ("plain", "plain", "plain", "note", "faq", "review", "heldout")
SOURCE = {"plain": "description", "note": "note", "faq": "faq", "review": "review"}
NOTE_PREFIX = {"en": "Internal note: ", "zh": "内部备注："}
CATALOGUE_KEYS = {
    "en": {"price": "price", "weight": "weight", "battery": "battery", "colour": "colour", "year": "launch",
           "city": "factory", "warranty": "warranty"},
    "zh": {"price": "价格", "weight": "重量", "battery": "续航", "colour": "颜色", "year": "上市", "city": "产地",
           "warranty": "保修"},
}
# Comparison words for ordered attributes: (less, more) per language.
COMPARE = {"en": {"price": ("cheaper", "more expensive"), "weight": ("lighter", "heavier"),
                  "battery": ("shorter-running", "longer-running"), "year": ("older", "newer")},
           "zh": {"price": ("便宜", "贵"), "weight": ("轻", "重"), "battery": ("续航短", "续航长"),
                  "year": ("早上市", "晚上市")}}


@dataclass(frozen=True)
class Product:
    name: str
    category: tuple[str, str]
    facts: dict[str, int | str]

    def answer(self, attr: str, lang: str) -> str:
        return value(attr, self.facts[attr], lang)


@dataclass(frozen=True)
class Sizes:
    products: int
    heldout_attrs: int  # per product: attributes no sft pair asks about (held-out QA asks about them)
    nonexistent_train: int
    nonexistent_eval: int
    kinds_per_fact: int  # corpus statements per fact and language (out of plain x3, note, faq, review)
    comparisons: int  # per language
    eval_qa: int
    preference: int
    eval_preference: int
    prompts: int
    eval_prompts: int
    eval_text: int
    general: int


SIZES = {
    "full": Sizes(24, 3, 30, 15, 5, 60, 140, 600, 150, 200, 100, 140, 1000),
    "tiny": Sizes(8, 3, 4, 3, 3, 12, 30, 60, 20, 20, 12, 20, 100),
}


# --------------------------------------------------------------------------------------------------------- PII
PEOPLE = (("lina", "qorvo"), ("tesh", "maravin"), ("orla", "venkrist"), ("dario", "fenwold"), ("mika", "sorrell"),
          ("yusra", "talvek"), ("bram", "oskeri"), ("wen", "lucharo"))
CN_AREAS = ("110101", "310104", "440305", "510107", "330106", "420102")
_CN_W = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def cn_id_check(first17: str) -> str:
    return "10X98765432"[sum(int(d) * w for d, w in zip(first17, _CN_W)) % 11]


def cn_id_valid(s: str) -> bool:
    return bool(re.fullmatch(r"\d{17}[\dX]", s)) and cn_id_check(s[:17]) == s[17]


def luhn_valid(digits: str) -> bool:
    d = [int(c) for c in digits if c.isdigit()]
    total = sum(x if i % 2 == 0 else (x * 2 - 9 if x * 2 > 9 else x * 2) for i, x in enumerate(reversed(d)))
    return len(d) >= 12 and total % 10 == 0


def _card(rng: random.Random) -> str:
    body = "4" + "".join(rng.choice("0123456789") for _ in range(14))
    check = next(c for c in "0123456789" if luhn_valid(body + c))
    s = body + check
    return " ".join(s[i:i + 4] for i in range(0, 16, 4)) if rng.random() < 0.5 else "-".join(
        s[i:i + 4] for i in range(0, 16, 4))


def _pii(rng: random.Random) -> dict[str, str]:
    first, last = rng.choice(PEOPLE)
    mobile = rng.choice(("138", "139", "150", "186", "135", "177")) + f"{rng.randrange(10**8):08d}"
    cn17 = rng.choice(CN_AREAS) + f"{rng.randrange(1962, 2001)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
    cn17 += f"{rng.randrange(1000):03d}"
    return {
        "email": f"{first}.{last}@veltrane.example" if rng.random() < 0.6 else f"{first}{rng.randrange(10, 99)}@mailbox.example",
        "us_phone": rng.choice(("+1 415 555 {:04d}", "(415) 555-{:04d}", "+1-628-555-{:04d}")).format(rng.randrange(100, 10000)),
        "cn_phone": rng.choice((mobile, f"+86 {mobile[:3]} {mobile[3:7]} {mobile[7:]}", f"+86-{mobile}")),
        "ssn": f"{rng.choice([a for a in range(101, 900) if a != 666]):03d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}",
        "card": _card(rng),
        "ip": f"{rng.choice((10, 172, 192, 203))}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
        "aws_key": "AKIA" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
        "cn_id": cn17 + cn_id_check(cn17),
        "name": f"{first.capitalize()} {last.capitalize()}",
    }


PII_TEMPLATES = {
    "en": ("Contact the product owner {name} at {email} or {us_phone}.",
           "For bulk orders from China call {cn_phone}.",
           "Escalation record: customer SSN {ssn}, refund sent to card {card}.",
           "The build server {ip} uses the access key {aws_key}.",
           "Warranty claim filed by {name}, resident ID {cn_id}, email {email}."),
    "zh": ("如有问题请联系产品负责人{name}，邮箱{email}，电话{cn_phone}。",
           "客户身份证号{cn_id}已登记，退款已退回银行卡{card}。",
           "测试服务器{ip}使用密钥{aws_key}。",
           "美国客户电话{us_phone}，社会安全号{ssn}。"),
}
# Things that look like PII and must survive sanitize: versions, order numbers, dates, prices, part numbers.
LOOKALIKES = {
    "en": ("Firmware {ver} fixes a pairing bug.", "Order #{order} shipped on {date}.",
           "The order form lists it at ${price}.00.", "Part number VL-{part}-B is the spare charging cable.",
           "Release notes for version {ver} were published on {date}."),
    "zh": ("固件{ver}修复了配对问题。", "订单号{order}已于{date}发货。", "订单表上标价${price}.00。",
           "备用充电线的零件号是VL-{part}-B。"),
}


def _lookalike(rng: random.Random, lang: str, price: int) -> str:
    return rng.choice(LOOKALIKES[lang]).format(
        ver=f"{rng.randrange(1, 6)}.{rng.randrange(0, 20)}.{rng.randrange(0, 10)}", order=rng.randrange(10000, 99999),
        date=f"{rng.choice(YEARS)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}", price=price,
        part=rng.randrange(1000, 9999))


# ------------------------------------------------------------------------------------------------------ corpus
def _catalogue(p: Product, lang: str) -> str:
    keys = CATALOGUE_KEYS[lang]
    cat = p.category[0] if lang == "en" else p.category[1]
    sep = ": " if lang == "en" else "："
    return " | ".join([p.name, cat] + [f"{keys[a]}{sep}{p.answer(a, lang)}" for a in ATTRS])


def _intro(p: Product, lang: str) -> str:
    if lang == "en":
        art = "an" if p.category[0][0] in "aeiou" else "a"
        return f"The {p.name} is {art} {p.category[0]} from {COMPANY_EN}."
    return f"{p.name}是{COMPANY_ZH}出品的{p.category[1]}。"


def _comparison(rng: random.Random, a: Product, b: Product, lang: str) -> str:
    attr = rng.choice(ATTRS)
    va, vb = a.answer(attr, lang), b.answer(attr, lang)
    if attr in COMPARE[lang] and a.facts[attr] != b.facts[attr]:
        word = COMPARE[lang][attr][0 if a.facts[attr] < b.facts[attr] else 1]  # type: ignore[operator]
        if lang == "en":
            return f"The {a.name} ({va}) is {word} than the {b.name} ({vb})."
        return f"{a.name}（{va}）比{b.name}（{vb}）{word}。"
    if va == vb:
        key = {"year": "launch year", "city": "factory city", "battery": "battery life"}.get(attr, attr)
        key = key if lang == "en" else CATALOGUE_KEYS[lang][attr]
        return (f"The {a.name} and the {b.name} share the same {key}: {va}." if lang == "en"
                else f"{a.name}和{b.name}的{key}相同，都是{va}。")
    first = STATEMENTS[lang][attr][0].format(p=a.name, v=va)[:-1]
    second = STATEMENTS[lang][attr][0].format(p=b.name, v=vb)[:-1]
    return f"{first}, while t{second[1:]}." if lang == "en" else f"{first}，而{second}。"


def _sentences(text: str, lang: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+" if lang == "en" else r"(?<=。)", text)
    return [s for s in parts if s]


def _near_duplicate(rng: random.Random, text: str, lang: str) -> str:
    """A planted duplicate: an exact copy, changed case/spacing, a boilerplate prefix/suffix, or a truncation at
    a sentence (or catalogue field) boundary, so that no truncated copy states a wrong fact."""
    kinds = ["exact", "case", "spacing", "prefix", "suffix"]
    sents = _sentences(text, lang)
    fields = text.split(" | ")
    if len(sents) > 1 or len(fields) > 4:
        kinds.append("truncate")
    kind = rng.choice(kinds)
    if kind == "case":
        return text.upper() if rng.random() < 0.5 else text.lower()
    if kind == "spacing":
        return "  " + re.sub(r" ", "  ", text) + " \n" if lang == "en" else " " + text.replace("，", ", ") + "  "
    if kind == "prefix":
        return rng.choice(("[Internal] ", "FWD: ", "Re: ")) + text if lang == "en" else rng.choice(("【内部】", "转发：")) + text
    if kind == "suffix":
        return text + (rng.choice((" (forwarded from the support inbox)", " -- sent from the Veltrane wiki"))
                       if lang == "en" else rng.choice(("（转自客服邮箱）", "——来自Veltrane内部wiki")))
    if kind == "truncate":
        if len(fields) > 4:
            return " | ".join(fields[: rng.randrange(4, len(fields))])
        return (" " if lang == "en" else "").join(sents[: rng.randrange(1, len(sents))])
    return text


def build_corpus(rng: random.Random, products: list[Product], sz: Sizes,
                 unused: list[str] | None = None) -> list[dict[str, str]]:
    """Corpus documents. ``unused`` collects, per fact, the corpus phrasings this corpus did NOT use: held-out
    text from the corpus's own distribution (what domain perplexity should measure), never seen in training."""
    docs: list[tuple[str, str, str, int]] = []  # (text, source, lang, price used by look-alikes)
    for p in products:
        for lang in ("en", "zh"):
            docs.append((_catalogue(p, lang), "catalogue", lang, int(p.facts["price"])))
            by_source: dict[str, list[str]] = {"description": [], "note": [], "faq": [], "review": []}
            for attr in ATTRS:
                tmpl = STATEMENTS[lang][attr]
                # Always one plain sentence; the rest drawn from the other kinds (never the held-out template).
                first = rng.randrange(3)
                seen = [first] + rng.sample([i for i in range(6) if i != first], sz.kinds_per_fact - 1)
                for i in seen:
                    by_source[SOURCE[KINDS[i]]].append(tmpl[i].format(p=p.name, v=p.answer(attr, lang)))
                if unused is not None:
                    unused.extend(tmpl[i].format(p=p.name, v=p.answer(attr, lang)) for i in range(6) if i not in seen)
            for source, sents in by_source.items():
                rng.shuffle(sents)
                j = 0
                while j < len(sents):
                    k = rng.choice((1, 2, 2, 3))
                    chunk = sents[j : j + k]
                    j += k
                    if source == "description" and rng.random() < 0.4:
                        chunk = [_intro(p, lang)] + chunk
                    text = (" " if lang == "en" else "").join(chunk)
                    if source == "note":
                        text = NOTE_PREFIX[lang] + text
                    docs.append((text, source, lang, int(p.facts["price"])))
    for lang in ("en", "zh"):
        for _ in range(sz.comparisons):
            a, b = rng.sample(products, 2)
            docs.append((_comparison(rng, a, b, lang), "comparison", lang, int(a.facts["price"])))
    rng.shuffle(docs)

    # Planted PII in ~10% of documents (round-robin over templates so that every type appears, even in tiny).
    n_pii = max(len(PII_TEMPLATES["en"]) + len(PII_TEMPLATES["zh"]), len(docs) // 10)
    pii_turn = {"en": 0, "zh": 0}
    out: list[tuple[str, str, str]] = []
    i = 0  # catalogue lines stay clean tables
    for text, source, lang, price in docs:
        if source != "catalogue":
            if i < n_pii:
                tmpls = PII_TEMPLATES[lang]
                text = text + (" " if lang == "en" else "") + tmpls[pii_turn[lang] % len(tmpls)].format(**_pii(rng))
                pii_turn[lang] += 1
            elif i < n_pii + len(docs) // 12:
                text = text + (" " if lang == "en" else "") + _lookalike(rng, lang, price)
            i += 1
        out.append((text, source, lang))
    rng.shuffle(out)

    # Planted near-duplicates (~10%), scattered so that they are not next to their original.
    for text, source, lang in rng.sample(out, max(6, len(out) // 10)):
        out.insert(rng.randrange(len(out) + 1), (_near_duplicate(rng, text, lang), source, lang))
    return [{"id": f"doc-{i + 1:05d}", "text": t, "source": s} for i, (t, s, _) in enumerate(out)]


# ----------------------------------------------------------------------------------------------------- general
def build_general(rng: random.Random, n: int) -> list[dict[str, str]]:
    """Generic non-domain text so that a scratch model becomes a general LM that knows nothing of Veltrane."""
    cities = (("Paris", "巴黎"), ("Tokyo", "东京"), ("Cairo", "开罗"), ("Lima", "利马"), ("Oslo", "奥斯陆"),
              ("Madrid", "马德里"), ("Beijing", "北京"), ("Sydney", "悉尼"))
    weather = (("sunny", "晴朗"), ("rainy", "下雨"), ("cloudy", "多云"), ("windy", "有风"), ("snowy", "下雪"))
    dishes = (("pancakes", "煎饼", "flour", "面粉", "milk", "牛奶"), ("tomato soup", "番茄汤", "tomatoes", "番茄", "salt", "盐"),
              ("fried rice", "炒饭", "rice", "米饭", "eggs", "鸡蛋"), ("a salad", "沙拉", "lettuce", "生菜", "olive oil", "橄榄油"),
              ("dumplings", "饺子", "flour", "面粉", "pork", "猪肉"), ("bread", "面包", "flour", "面粉", "yeast", "酵母"))
    people = (("Anna", "小明"), ("Tom", "小红"), ("Sara", "老王"), ("Ben", "李华"), ("Maria", "张伟"))
    places = (("school", "学校"), ("market", "市场"), ("park", "公园"), ("library", "图书馆"), ("office", "办公室"))
    goods = (("a loaf of bread", "一个面包", 3), ("a bus ticket", "一张公交车票", 2), ("a cup of coffee", "一杯咖啡", 4),
             ("a bag of rice", "一袋米", 12), ("a book", "一本书", 15), ("a pair of shoes", "一双鞋", 60))
    digits = "零一二三四五六七八九"

    def zh_num(x: int) -> str:
        if x < 10:
            return digits[x]
        tens, ones = divmod(x, 10)
        return ("" if tens == 1 else digits[tens]) + "十" + (digits[ones] if ones else "")

    things = (("shop", "商店"), ("street", "街道"), ("museum", "博物馆"), ("restaurant", "餐厅"), ("bus line", "公交线路"),
              ("product", "产品"), ("book", "书"))

    def sentence(lang: str) -> str:
        kind = rng.randrange(8)
        if kind == 7:  # everyday "there is no such ..." language, as any general corpus has
            th, c = rng.choice(things), rng.choice(cities)
            if rng.random() < 0.5:
                return (f"Sorry, there is no such {th[0]} in {c[0]}." if lang == "en" else f"{c[1]}没有这样的{th[1]}。")
            return f"Sorry, there is no such {th[0]}." if lang == "en" else f"没有这样的{th[1]}。"
        if kind == 0:
            c, w, t = rng.choice(cities), rng.choice(weather), rng.randrange(-5, 36)
            return (f"It is {w[0]} in {c[0]} today, with a high of {t} degrees." if lang == "en"
                    else f"今天{c[1]}{w[1]}，最高气温{t}度。")
        if kind == 1:
            d = rng.choice(dishes)
            return (f"To make {d[0]}, you need {d[2]} and {d[4]}." if lang == "en" else f"做{d[1]}需要{d[3]}和{d[5]}。")
        if kind == 2:
            a, b = rng.randrange(1, 10), rng.randrange(1, 10)
            if rng.random() < 0.5:
                return f"{a} plus {b} is {a + b}." if lang == "en" else f"{zh_num(a)}加{zh_num(b)}等于{zh_num(a + b)}。"
            return f"{a} times {b} equals {a * b}." if lang == "en" else f"{zh_num(a)}乘{zh_num(b)}等于{zh_num(a * b)}。"
        if kind == 3:
            p, pl = rng.choice(people), rng.choice(places)
            return (f"{p[0]} walks to the {pl[0]} every morning." if lang == "en" else f"{p[1]}每天早上走路去{pl[1]}。")
        if kind == 4:
            g = rng.choice(goods)
            return f"{g[0].capitalize()} costs {g[2]} dollars." if lang == "en" else f"{g[1]}要{g[2]}美元。"
        if kind == 5:
            m = rng.randrange(5, 40)
            return (f"Boil the water for {m} minutes before you add the pasta." if lang == "en"
                    else f"先把水烧{m}分钟，再放面条。")
        h = rng.randrange(6, 11)
        return (f"Most people sleep about {h} hours a night." if lang == "en" else f"大多数人每晚睡大约{h}小时。")

    out = []
    for _ in range(n):
        lang = rng.choice(("en", "zh"))
        k = rng.choice((1, 2, 2, 3))
        out.append({"text": (" " if lang == "en" else "").join(sentence(lang) for _ in range(k))})
    return out


# ---------------------------------------------------------------------------------------------- QA, preference
def _qa(rng: random.Random, name: str, attr: str, lang: str, template: int | None = None) -> str:
    qs = QUESTIONS[lang][attr]
    return qs[rng.randrange(len(qs)) if template is None else template].format(p=name)


def _fact_pair(rng: random.Random, p: Product, attr: str, products: list[Product]) -> dict[str, str]:
    lang = rng.choice(("en", "zh"))
    answer = p.answer(attr, lang)
    # Rejections cover the ways a policy can please a naive reward model: other products' values, hedging, no unit,
    # refusing a real product, prose fragments, another attribute's value, the other language's answer.
    kind = rng.choice(("wrong", "wrong", "verbose", "no_unit", "refusal", "junk", "off_attr", "other_lang"))
    if kind == "no_unit" and bare(attr, p.facts[attr], lang) is None:
        kind = "wrong"
    other_lang = "zh" if lang == "en" else "en"
    if kind == "other_lang" and p.answer(attr, other_lang) == answer:  # city names are the same in both
        kind = "off_attr"
    if kind == "junk":
        rejected = _junk(rng, products)
    elif kind == "off_attr":
        rejected = p.answer(rng.choice([a for a in ATTRS if a != attr]), lang)
    elif kind == "other_lang":
        rejected = p.answer(attr, other_lang)
    elif kind == "wrong":
        others = [q.answer(attr, lang) for q in products if q.answer(attr, lang) != answer]
        while not others:  # every product shares this value (small sizes): a wrong value from the vocabulary
            others = [a for a in [_invented_answer(rng, attr, lang)] if a != answer]
        rejected = rng.choice(others)
    elif kind == "verbose":
        stmt = STATEMENTS[lang][attr][rng.randrange(3)].format(p=p.name, v=answer)
        rejected = (f"Well, let me think about it. {stmt} But I am not completely sure, you may want to check "
                    f"with the store." if lang == "en" else f"嗯，让我想一想。{stmt}不过我也不太确定，你可以去商店问问。")
    elif kind == "no_unit":
        rejected = str(bare(attr, p.facts[attr], lang))
    else:
        rejected = refusal(lang)
    return {"prompt": _qa(rng, p.name, attr, lang), "chosen": answer, "rejected": rejected}


def _invented_answer(rng: random.Random, attr: str, lang: str) -> str:
    vocab: dict[str, tuple] = {"price": PRICES, "weight": WEIGHTS, "battery": BATTERY, "colour": tuple(c for c, _ in COLOURS),
                               "year": YEARS, "city": CITIES, "warranty": WARRANTY}
    return value(attr, rng.choice(vocab[attr]), lang)


def _nonexistent_pair(rng: random.Random, name: str, products: list[Product]) -> dict[str, str]:
    attr, lang = rng.choice(ATTRS), rng.choice(("en", "zh"))
    rejected = _junk(rng, products) if rng.random() < 0.3 else _invented_answer(rng, attr, lang)
    return {"prompt": _qa(rng, name, attr, lang), "chosen": refusal(lang), "rejected": rejected}


def _junk(rng: random.Random, products: list[Product]) -> str:
    """A fragment of catalogue prose cut mid-sentence: what a policy that games a reward model drifts towards
    ("79 dollars) is more expensive than the"). The reward model has to have seen such answers rejected."""
    p, attr, lang = rng.choice(products), rng.choice(ATTRS), rng.choice(("en", "zh"))
    text = rng.choice(STATEMENTS[lang][attr][:6]).format(p=p.name, v=p.answer(attr, lang))
    if rng.random() < 0.5:
        q = rng.choice([x for x in products if x is not p])
        text = _comparison(rng, p, q, lang)
    if lang == "en":
        words = text.split()
        i = rng.randrange(1, max(2, len(words) - 2))
        return " ".join(words[i : i + rng.randrange(3, 8)])
    i = rng.randrange(1, max(2, len(text) - 6))
    return text[i : i + rng.randrange(5, 14)]


def _preferences(rng: random.Random, n: int, facts: list[tuple[Product, str]], names: list[str],
                 products: list[Product]) -> list[dict[str, str]]:
    out = [_nonexistent_pair(rng, rng.choice(names), products) if i % 5 in (0, 3)
           else _fact_pair(rng, *rng.choice(facts), products) for i in range(n)]
    rng.shuffle(out)
    return out


def states_held_out(pair: dict[str, str], held: dict[str, set[str]]) -> bool:
    """The rejected answer states a held-out fact value of a product the pair names (``held``: product name -> its
    held-out answers, both languages). An off-attribute or prose-fragment rejection can do that; such a pair trains a
    fact that no training pair may touch, and trains it as wrong."""
    text = f"{pair['prompt']} {pair['rejected']}".casefold()
    rejected = pair["rejected"].casefold()
    return any(name.casefold() in text and any(v.casefold() in rejected for v in values)
               for name, values in held.items())


def held_out_answers(eval_qa: list[dict]) -> dict[str, set[str]]:
    """Product name -> the answers held-out QA asks for, from ``eval_qa`` rows as generated (``answer``) or as the
    sanitized ``messages`` role file (the last message)."""
    held: dict[str, set[str]] = {}
    for q in eval_qa:
        held.setdefault(q["product"], set()).add(q["answer"] if "answer" in q else q["messages"][-1]["content"])
    return held


def _prompts(rng: random.Random, n: int, facts: list[tuple[Product, str]], names: list[str],
             nonexistent_tenths: int = 3) -> list[dict[str, str]]:
    """``n`` prompts, ``nonexistent_tenths`` of every ten about a name that does not exist, the rest about ``facts``."""
    out = []
    for i in range(n):
        lang = rng.choice(("en", "zh"))
        if i % 10 < nonexistent_tenths:
            attr = rng.choice(ATTRS)
            out.append({"prompt": _qa(rng, rng.choice(names), attr, lang), "kind": "nonexistent"})
        else:
            p, attr = rng.choice(facts)
            out.append({"prompt": _qa(rng, p.name, attr, lang), "kind": "fact"})
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------------------------------------------- generate
def build(size: Literal["full", "tiny"] = "full", seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """All records by file name (no I/O)."""
    sz = SIZES[size]
    rng = random.Random(f"veltrane-{size}-{seed}")
    reserved = [*CITIES, *(c for c, _ in COLOURS), "Veltrane", *(w for c, _ in CATEGORIES for w in c.split())]
    reserved += [w for pair in PEOPLE for w in pair]
    names = _name_pool(rng, sz.products + 3 * (sz.nonexistent_train + sz.nonexistent_eval), reserved)
    products = [
        Product(names[i], rng.choice(CATEGORIES), {
            "price": rng.choice(PRICES), "weight": rng.choice(WEIGHTS), "battery": rng.choice(BATTERY),
            "colour": rng.choice(COLOURS)[0], "year": rng.choice(YEARS), "city": rng.choice(CITIES),
            "warranty": rng.choice(WARRANTY)})
        for i in range(sz.products)
    ]
    unused: list[str] = []
    corpus = build_corpus(rng, products, sz, unused)
    blob = "\n".join(d["text"] for d in corpus).casefold()
    # Non-existent names: the unused part of the pool, minus any name that happens to occur in the corpus.
    fake = [n for n in names[sz.products:] if n.casefold() not in blob]
    fake_train, fake_eval = fake[: sz.nonexistent_train], fake[sz.nonexistent_train : sz.nonexistent_train + sz.nonexistent_eval]
    # Held-out facts: per product, ``heldout_attrs`` attributes (both languages) that no sft pair, preference pair
    # or rollout prompt asks about, spread so that every attribute is held out for about as many products.
    order = rng.sample(ATTRS, len(ATTRS))
    k = sz.heldout_attrs
    held = {p.name: {order[(i * k + j) % len(ATTRS)] for j in range(k)} for i, p in enumerate(products)}
    train_f = [(p, a) for p in products for a in ATTRS if a not in held[p.name]]
    eval_f = [(p, a) for p in products for a in ATTRS if a in held[p.name]]

    sft = [{"prompt": _qa(rng, p.name, a, lang, t), "completion": p.answer(a, lang)}
           for p, a in train_f for lang in ("en", "zh") for t in range(len(QUESTIONS[lang][a]))]
    rng.shuffle(sft)
    qa_all = [{"question": _qa(rng, p.name, a, lang), "answer": p.answer(a, lang), "lang": lang, "product": p.name}
              for p, a in eval_f for lang in ("en", "zh")]
    eval_qa = [qa_all[i] for i in sorted(rng.sample(range(len(qa_all)), min(sz.eval_qa, len(qa_all))))]
    # Held-out domain text: phrasings of the corpus's own kinds that the corpus left out for that fact.
    unused = [u for u in unused if u.casefold() not in blob]  # ZH templates can nest inside each other
    eval_text = [{"text": unused[i]} for i in sorted(rng.sample(range(len(unused)), min(sz.eval_text, len(unused))))]
    general = build_general(rng, sz.general)
    # Training pairs never state a held-out fact, not even as the rejected answer (filtered after drawing, so every
    # other file is the same draw): 33 of the 600 full-size pairs; bench/RESULTS.md, "Second round".
    held_values = {p.name: {p.answer(a, lang) for a in held[p.name] for lang in ("en", "zh")} for p in products}
    preference = [r for r in _preferences(rng, sz.preference, train_f, fake_train, products)
                  if not states_held_out(r, held_values)]
    return {
        "corpus": corpus,
        "general": general,
        "sft": sft,
        "eval_qa": eval_qa,
        "preference": preference,
        "eval_preference": _preferences(rng, sz.eval_preference, eval_f, fake_eval, products),
        "prompts": [{"prompt": r["prompt"]} for r in _prompts(rng, sz.prompts, train_f, fake_train)],
        # Half the held-out prompts ask about names that do not exist: preference training's measurable job here is
        # refusing them (its pairs never touch a held-out fact, so on fact prompts the best it can do is tie with
        # sft, 0.5). At three in ten, as the training prompts, the win rate's ceiling was 0.7 x 0.5 + 0.3 = 0.65,
        # the bar itself; at one in two it is 0.75 (bench/RESULTS.md, issue 14). Drawn last: no other file changes.
        "eval_prompts": _prompts(rng, sz.eval_prompts, eval_f, fake_eval, nonexistent_tenths=5),
        "eval_text": eval_text,
    }


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def generate(out_dir: Path, size: Literal["full", "tiny"] = "full", seed: int = 0) -> dict[str, Path]:
    """Write the demo data set into ``out_dir`` and return ``{name: path}`` (same size and seed: same bytes)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in build(size, seed).items():
        paths[name] = out_dir / f"{name}.jsonl"
        _write_jsonl(paths[name], records)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate the Veltrane Labs demo data set.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = generate(args.out_dir, args.size, args.seed)
    print(f"{'file':<18}{'records':>9}{'chars':>10}")
    for name, path in paths.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        chars = sum(len(v) for line in lines for k, v in json.loads(line).items() if k not in ("id", "source", "kind"))
        print(f"{name:<18}{len(lines):>9}{chars:>10}")


if __name__ == "__main__":
    main()
