"""Benchmark and labelled eval sets for the data stages (sanitize, dedup): naive approaches vs ours.

Reads: nothing (all data generated deterministically from seeds). Writes: ``tests/data/pii_eval.jsonl`` and
``tests/data/dedup_eval.jsonl`` (``make-eval``); a markdown table on stdout (``run``).

    python -m bench.data_stages make-eval
    python -m bench.data_stages run --n 10000            # also --n 50000 / 100000; --skip-naive-dedup
    python -m bench.data_stages eval                     # per-type precision/recall on the labelled sets

Each method runs in its own subprocess so that its peak RSS (``resource.getrusage``) is its own.
Naive sanitize = one bare ``re.sub`` per pattern; naive dedup = embeddings + full n*n cosine matrix + threshold.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import platform
import random
import re
import resource
import string
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import phonenumbers

from pipelines.config import PII_TYPES, DedupConfig
from pipelines.sanitize import PLACEHOLDERS, luhn_ok, sanitize_text

ROOT = Path(__file__).resolve().parents[1]
PII_EVAL = ROOT / "tests" / "data" / "pii_eval.jsonl"
DEDUP_EVAL = ROOT / "tests" / "data" / "dedup_eval.jsonl"

# ------------------------------------------------------------------------------------------------ PII values
FIRST = ["alice", "bob", "carol", "dmitri", "elena", "farid", "grace", "hiro", "ines", "jamal", "kenji", "lena"]
LAST = ["chen", "smith", "garcia", "novak", "okafor", "tanaka", "muller", "rossi", "kim", "silva"]
DOMAINS = ["example.com", "mail.example.org", "corp.example.co.uk", "uni-example.edu", "example.cn", "qq.example.com"]


def _email(r: random.Random) -> str:
    sep = r.choice([".", "_", "", "+news."])
    local = r.choice(FIRST) + sep + r.choice(LAST) + (str(r.randint(1, 99)) if r.random() < 0.3 else "")
    return (local.title() if r.random() < 0.2 else local) + "@" + r.choice(DOMAINS)


def _phone(r: random.Random) -> str:
    region = r.choice(["US", "US", "US", "GB", "DE", "FR", "JP", "IN", "AU", "BR", "CA"])
    ex = phonenumbers.example_number_for_type(region, r.choice([phonenumbers.PhoneNumberType.MOBILE,
                                                               phonenumbers.PhoneNumberType.FIXED_LINE]))
    for _ in range(50):  # vary the example's last digits, keep only numbers the library calls valid
        nat = str(ex.national_number)
        cand = phonenumbers.parse(f"+{ex.country_code}{nat[:-3]}{r.randint(0, 999):03d}")
        if phonenumbers.is_valid_number(cand):
            break
    else:
        cand = ex
    fmt = r.choice(["intl", "e164", "nat"]) if region == "US" else r.choice(["intl", "e164"])
    if fmt == "nat":
        return phonenumbers.format_number(cand, phonenumbers.PhoneNumberFormat.NATIONAL)
    if fmt == "e164":
        return phonenumbers.format_number(cand, phonenumbers.PhoneNumberFormat.E164)
    return phonenumbers.format_number(cand, phonenumbers.PhoneNumberFormat.INTERNATIONAL)


def _cn_mobile(r: random.Random) -> str:
    d = f"1{r.choice('3456789')}{r.randint(0, 9)}{r.randint(0, 99999999):08d}"
    return r.choice([d, f"+86 {d[:3]} {d[3:7]} {d[7:]}", f"+86-{d}", f"{d[:3]}-{d[3:7]}-{d[7:]}", f"+86{d}"])


def _ssn(r: random.Random) -> str:
    area = r.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{r.randint(1, 99):02d}-{r.randint(1, 9999):04d}"


_W = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def _cn_id(r: random.Random, valid: bool = True) -> str:
    body = r.choice(["110105", "310101", "440305", "510104", "330106"]) + \
        f"{r.randint(1950, 2005)}{r.randint(1, 12):02d}{r.randint(1, 28):02d}{r.randint(0, 999):03d}"
    check = "10X98765432"[sum(int(c) * w for c, w in zip(body, _W)) % 11]
    if not valid:
        check = r.choice([c for c in "0123456789" if c != check])
    return body + check


def _card(r: random.Random, valid: bool = True) -> str:
    prefix, n = r.choice([("4", 16), ("51", 16), ("55", 16), ("37", 15), ("6011", 16), ("4", 16)])
    body = prefix + "".join(r.choice(string.digits) for _ in range(n - len(prefix) - 1))
    check = next(c for c in string.digits if luhn_ok(body + c))
    if not valid:
        check = str((int(check) + r.randint(1, 9)) % 10)
    d = body + check
    style = r.choice(["bare", "space", "dash"])
    if n == 15:
        groups = [d[:4], d[4:10], d[10:]]
    else:
        groups = [d[i:i + 4] for i in range(0, n, 4)]
    return d if style == "bare" else (" " if style == "space" else "-").join(groups)


def _iban(r: random.Random, valid: bool = True) -> str:
    cc, bban = r.choice([("DE", lambda: "".join(r.choice(string.digits) for _ in range(18))),
                         ("GB", lambda: "WEST" + "".join(r.choice(string.digits) for _ in range(14))),
                         ("FR", lambda: "".join(r.choice(string.digits) for _ in range(23))),
                         ("NL", lambda: "ABNA" + "".join(r.choice(string.digits) for _ in range(10)))])
    b = bban()
    num = int("".join(str(int(c, 36)) for c in b + cc + "00"))
    check = 98 - num % 97
    if not valid:
        check = (check + r.randint(1, 50)) % 97 + 2
    s = f"{cc}{check:02d}{b}"
    return s if r.random() < 0.5 else " ".join(s[i:i + 4] for i in range(0, len(s), 4))


def _ip(r: random.Random) -> str:
    if r.random() < 0.6:
        return str(ipaddress.IPv4Address(r.randint(0x0B000000, 0xDF000000)))
    a = ipaddress.IPv6Address(r.getrandbits(128) & ~((1 << 64) - 1) | 0x20010DB8 << 96)
    return a.compressed if r.random() < 0.5 else a.exploded


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def _secret(r: random.Random) -> tuple[str, str]:
    """(text with the secret, expected) — assignments keep their key, only the value is replaced."""
    rnd = lambda n, al=string.ascii_letters + string.digits: "".join(r.choice(al) for _ in range(n))  # noqa: E731
    kind = r.randrange(8)
    if kind == 0:
        v = "AKIA" + rnd(16, string.ascii_uppercase + string.digits)
    elif kind == 1:
        v = r.choice(["ghp_", "gho_"]) + rnd(36)
    elif kind == 2:
        v = "github_pat_" + rnd(22) + "_" + rnd(59)
    elif kind == 3:
        v = f"xox{r.choice('abpr')}-{r.randint(10**9, 10**10)}-{rnd(24)}"
    elif kind == 4:
        v = _b64({"alg": "HS256", "typ": "JWT"}) + "." + _b64({"sub": rnd(8), "iat": r.randint(10**9, 2 * 10**9)}) + "." + rnd(43)
    elif kind == 5:
        v = "-----BEGIN RSA PRIVATE KEY-----\n" + rnd(64) + "\n" + rnd(40) + "\n-----END RSA PRIVATE KEY-----"
    else:
        key = r.choice(["password", "api_key", "secret", "DB_PASSWORD", "access_token", "client_secret"])
        val = rnd(r.randint(10, 24))
        sep = r.choice(["=", ": ", " = "])
        if r.random() < 0.4:
            return f'{key}{sep}"{val}"', f'{key}{sep}"[SECRET]"'
        return f"{key}{sep}{val}", f"{key}{sep}[SECRET]"
    return v, "[SECRET]"


GEN = {"EMAIL": _email, "PHONE": _phone, "CN_MOBILE": _cn_mobile, "SSN": _ssn, "CN_ID": _cn_id, "CARD": _card,
       "IBAN": _iban, "IP": _ip}
EN_T = ["Please contact {} for details.", "Customer record: {}, updated yesterday.", "Send it to {} before Friday.",
        "The value {} was found in the log.", "Reach me at {} any time"]
ZH_T = ["请联系{}获取详情。", "客户资料：{}，昨天已更新。", "我的信息是{}，谢谢。", "日志中发现了{}。", "备注：{}"]
NEG = {
    "date": ["2024-01-15", "15/01/2024", "2023年12月31日", "Jan 15, 2024", "1999-12-31T23:59:59"],
    "time": ["12:30", "12:30:45", "下午3:45", "09:00-17:30", "T+00:05:00"],
    "version": ["1.2.3", "v10.0.1", "version 2.10.4", "Python 3.11.4", "release 1.2.3.4", "v2.0.0-rc.1"],
    "isbn": ["ISBN 978-3-16-148410-0", "ISBN-13: 9780306406157", "ISBN 0-306-40615-2"],
    "order": ["Order #12345678", "订单号 2024011512345", "ORD-2024-000123", "order number 5550143210",
              "invoice INV-88231-77", "ticket 4412"],
    "build": ["build 20240115093012345", "build id 7f3a9c2e1b", "commit 3f2a1b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a",
              "run 1705312345678"],
    "decimal": ["3.14159265358979", "0.000123456789", "2.718281828", "6.02214076e23"],
    "hyperparam": ["lr=3e-4", "batch_size=32", "max_new_tokens=256", "weight_decay=0.01", "temperature: 0.7",
                   "seed=42", "warmup_steps=500", "num_tokens: 4096"],
    "price": ["$1,299.99", "¥12,800", "€49.90", "USD 1,000,000", "￥3999元"],
    "prose_secret": ["password: must be at least 8 characters", "the secret is good food", "key=value",
                     "token count: 512", "tokens=512"],
}


def _neg_values(r: random.Random, kind: str) -> str:
    if kind == "luhn_invalid":
        return _card(r, valid=False)
    if kind == "cn_id_bad_check":
        return _cn_id(r, valid=False)
    if kind == "iban_bad_check":
        return _iban(r, valid=False)
    if kind == "ssn_invalid":
        return r.choice(["000", "666", "900", "987"]) + f"-{r.randint(10, 99)}-{r.randint(1000, 9999)}" \
            if r.random() < 0.7 else f"{r.randint(100, 599)}-00-{r.randint(1000, 9999)}"
    if kind == "ip_invalid":
        return r.choice(["999.10.1.1", "256.1.2.3", "00:1A:2B:3C:4D:5E", "10.0.19041.1", "1.2.3"])
    return r.choice(NEG[kind])


def make_pii_eval(seed: int = 0, per_type: int = 30, per_neg: int = 16) -> list[dict]:
    r = random.Random(seed)
    items: list[dict] = []
    for t in PII_TYPES:
        for k in range(per_type):
            lang = "en" if k % 2 == 0 else "zh"
            tmpl = r.choice(EN_T if lang == "en" else ZH_T)
            if t == "SECRET":
                v, ph = _secret(r)
            else:
                v, ph = GEN[t](r), PLACEHOLDERS[t]
            items.append({"id": f"pos-{t}-{k:03d}", "kind": "positive", "category": t, "lang": lang,
                          "text": tmpl.format(v), "expected": tmpl.format(ph)})
    kinds = [*NEG, "luhn_invalid", "cn_id_bad_check", "iban_bad_check", "ssn_invalid", "ip_invalid"]
    for kind in kinds:
        for k in range(per_neg):
            lang = "en" if k % 2 == 0 else "zh"
            tmpl = r.choice(EN_T if lang == "en" else ZH_T)
            text = tmpl.format(_neg_values(r, kind))
            items.append({"id": f"neg-{kind}-{k:03d}", "kind": "negative", "category": kind, "lang": lang,
                          "text": text, "expected": text})
    return items


def pii_scores(items: list[dict], fn) -> dict:
    """Per-type precision/recall from placeholder counts (expected vs produced), plus untouched negatives."""
    tp = dict.fromkeys(PII_TYPES, 0)
    fp, fn_ = dict(tp), dict(tp)
    neg_ok = neg = exact = 0
    for it in items:
        out = fn(it["text"])
        exact += out == it["expected"]
        for t in PII_TYPES:
            ph = PLACEHOLDERS[t]
            e, g = it["expected"].count(ph), out.count(ph)
            tp[t] += min(e, g)
            fn_[t] += max(0, e - g)
            fp[t] += max(0, g - e)
        if it["kind"] == "negative":
            neg += 1
            neg_ok += out == it["text"]
    per = {t: {"precision": tp[t] / max(1, tp[t] + fp[t]), "recall": tp[t] / max(1, tp[t] + fn_[t]),
               "tp": tp[t], "fp": fp[t], "fn": fn_[t]} for t in PII_TYPES}
    return {"per_type": per, "negatives_untouched": neg_ok / max(1, neg), "exact_output": exact / len(items)}


# -------------------------------------------------------------------------------------------------- dedup data
BRANDS = ["Zorblat", "Quenti", "Marvox", "Tellura", "Brixon", "Valdor", "Kestrel", "Nimbrel"]
COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Soylent", "Stark"]
ROLES = ["engineer", "designer", "analyst", "manager", "chemist", "pilot"]
CITIES = ["Lisbon", "Osaka", "Denver", "Nairobi", "Tallinn", "Hobart", "Quito", "Bergen"]
BOILER_PRE = ["Posted by admin. ", "Home > Products > ", "[Archived] ", "From the catalogue: "]
BOILER_SUF = [" Click here to subscribe.", " Read more...", " All rights reserved.", " Share this post!"]
FIRSTN = [f.title() for f in FIRST] + ["Oskar", "Priya", "Quinn", "Rafael", "Sofia", "Tomas", "Uma", "Viktor"]
LASTN = [x.title() for x in LAST] + ["Ivanova", "Haddad", "Lindqvist", "Moreau", "Patel", "Reyes"]


def _fact(r: random.Random) -> tuple[tuple, list[str]]:
    """A random fact as (key, [phrasings]): phrasings[0] is the plain one, the rest are paraphrases."""
    kind = r.randrange(4)
    if kind == 0:
        b, code, w, p = r.choice(BRANDS), f"{r.choice('XQZKT')}{r.choice('RMV')}-{r.randint(100, 999)}", r.randint(2, 90), r.randint(20, 4000)
        return (kind, b, code, w, p), [f"The {b} {code} weighs {w} kg and costs {p} dollars.",
                                       f"The {b} {code} costs {p} dollars and weighs {w} kg.",
                                       f"Weighing {w} kg, the {b} {code} sells for {p} dollars."]
    if kind == 1:
        f, l, c, y, role = r.choice(FIRSTN), r.choice(LASTN), r.choice(COMPANIES), r.randint(1990, 2023), r.choice(ROLES)
        return (kind, f, l, c, y, role), [f"{f} {l} joined {c} in {y} as a {role}.",
                                          f"In {y}, {f} {l} joined {c} as a {role}.",
                                          f"{c} hired {f} {l} as a {role} in {y}."]
    if kind == 2:
        city, t, d = r.choice(CITIES), r.randint(-10, 35), r.randint(1, 28)
        return (kind, city, t, d), [f"On March {d} the temperature in {city} reached {t} degrees Celsius.",
                                    f"The temperature in {city} reached {t} degrees Celsius on March {d}.",
                                    f"{city} saw {t} degrees Celsius on March {d}."]
    b, code, cap, h = r.choice(BRANDS), f"{r.choice('ABC')}{r.randint(10, 99)}", r.randint(1, 64), r.randint(2, 48)
    return (kind, b, code, cap, h), [f"{b}{code}型号电池容量为{cap}千瓦时，续航{h}小时。",
                                     f"{b}{code}型号的电池容量是{cap}千瓦时，可续航{h}小时。",
                                     f"续航{h}小时的{b}{code}型号，电池容量为{cap}千瓦时。"]


def _variant(r: random.Random, base: str, paraphrases: list[str], kind: str) -> str:
    if kind == "exact":
        return base
    if kind == "spacing":
        t = re.sub(" ", lambda _: r.choice([" ", "  ", " \t"]), base)
        return r.choice([t.lower(), t.upper(), "  " + t + " ", t.rstrip(".。") + "!"])
    if kind == "boilerplate":
        return r.choice(BOILER_PRE) + base + r.choice(BOILER_SUF)
    if kind == "paraphrase":
        return r.choice(paraphrases)
    words = base.split(" ")  # truncation: cut at 60-85% of the text
    if len(words) > 3:
        return " ".join(words[: max(3, int(len(words) * r.uniform(0.6, 0.85)))])
    return base[: max(8, int(len(base) * 0.7))]


def make_dedup_records(n: int, seed: int = 0, dup_fraction: float = 0.3) -> list[dict]:
    """n records: distinct same-template facts plus duplicate variants. ``group`` = the fact a record states."""
    r = random.Random(seed)
    seen: set[tuple] = set()
    facts: list[list[str]] = []
    out: list[dict] = []
    kinds = ["exact", "spacing", "boilerplate", "paraphrase", "truncation"]
    while len(out) < n:
        if facts and r.random() < dup_fraction:
            g = r.randrange(len(facts))
            kind = r.choice(kinds)
            text = _variant(r, facts[g][0], facts[g][1:], kind)
        else:
            key, phr = _fact(r)
            if key in seen:
                continue
            seen.add(key)
            g, kind, text = len(facts), "base", phr[0]
            facts.append(phr)
        out.append({"id": f"r{len(out):06d}", "group": g, "variant": kind, "text": text})
    return out


def dedup_scores(records: list[dict], keep: list[bool], twin: dict[int, int]) -> dict:
    """Removal precision/recall against the ``group`` labels; distinct facts kept; groups reduced to one."""
    groups: dict[int, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(rec["group"], []).append(i)
    removed = [i for i in range(len(records)) if not keep[i]]
    correct = sum(records[twin[i]]["group"] == records[i]["group"] for i in removed)
    should = sum(len(m) - 1 for m in groups.values())
    multi = [m for m in groups.values() if len(m) > 1]
    by_variant: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        if rec["variant"] != "base":
            by_variant.setdefault(rec["variant"], []).append(0 if keep[i] else 1)
    return {"precision": correct / max(1, len(removed)), "recall": correct / max(1, should),
            "facts_kept": sum(any(keep[i] for i in m) for m in groups.values()) / len(groups),
            "groups_reduced_to_one": sum(sum(keep[i] for i in m) == 1 for m in multi) / max(1, len(multi)),
            "removed_by_variant": {k: sum(v) / len(v) for k, v in sorted(by_variant.items())}}


# ------------------------------------------------------------------------------------------------ naive methods
NAIVE_PATTERNS = [  # specific before generic, so the phone pattern does not eat cards and ids first
    ("SECRET", r"AKIA[0-9A-Z]{16}|gh[po]_\w{36}|xox[abpr]-[\w-]+|(?i:password|secret|api_key)\s*[:=]\s*\S+"),
    ("EMAIL", r"[\w.+-]+@[\w-]+\.[\w.]+"), ("IBAN", r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,3})?"),
    ("IP", r"(?:\d{1,3}\.){3}\d{1,3}"), ("SSN", r"\d{3}-\d{2}-\d{4}"), ("CN_ID", r"\d{17}[\dXx]"),
    ("CARD", r"\d{4}[ -]?\d{4}[ -]?\d{4}[ -]?\d{1,7}"), ("CN_MOBILE", r"(?:\+86[ -]?)?1[3-9]\d{9}"),
    ("PHONE", r"\+?\(?\d[\d\s().-]{7,}\d"),
]
_NAIVE = [(re.compile(p), PLACEHOLDERS[t]) for t, p in NAIVE_PATTERNS]


def naive_sanitize(text: str) -> str:
    for pat, ph in _NAIVE:
        text = pat.sub(ph, text)
    return text


def corpus(n: int, seed: int = 1) -> list[str]:
    """Benchmark text: facts, ~30% with one PII value, ~20% with a look-alike number."""
    r = random.Random(seed)
    recs = make_dedup_records(n, seed)
    out = []
    for rec in recs:
        t = rec["text"]
        x = r.random()
        if x < 0.3:
            ty = r.choice(PII_TYPES)
            v = _secret(r)[0] if ty == "SECRET" else GEN[ty](r)
            t += f" Contact: {v}."
        elif x < 0.5:
            t += f" Ref {_neg_values(r, r.choice(list(NEG)))}."
        out.append(t)
    return out


TRACE = True


def _peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux


def method(name: str, n: int) -> dict:
    """One measurement, run inside a fresh subprocess."""
    if name.startswith("sanitize"):
        texts = corpus(n)
        mb = sum(len(t.encode()) for t in texts) / 1e6
        fn = naive_sanitize if name == "sanitize_naive" else (lambda t: sanitize_text(t)[0])
        t0 = time.perf_counter()
        for t in texts:
            fn(t)
        dt = time.perf_counter() - t0
        ev = pii_scores(make_pii_eval(), fn)
        rec = sum(v["tp"] for v in ev["per_type"].values()) / sum(v["tp"] + v["fn"] for v in ev["per_type"].values())
        prec = sum(v["tp"] for v in ev["per_type"].values()) / max(1, sum(v["tp"] + v["fp"] for v in ev["per_type"].values()))
        return {"method": name, "n": n, "seconds": dt, "mb_per_s": mb / dt, "peak_rss_mib": _peak(),
                "precision": prec, "recall": rec, "negatives_untouched": ev["negatives_untouched"]}
    import numpy as np

    from pipelines.dedup import embed, find_duplicates

    recs = make_dedup_records(n, seed=2)
    texts = [x["text"] for x in recs]
    from pipelines.embedders import load_encoder

    load_encoder(DedupConfig().embedding_model, DedupConfig().embedding_backend)  # loading is not part of either cost
    t0 = time.perf_counter()
    if name == "dedup_naive":
        emb = embed(texts, DedupConfig().embedding_model, 256, progress=False, backend=DedupConfig().embedding_backend)
        t1 = time.perf_counter()
        tracemalloc.start()
        sim = emb @ emb.T  # the n*n matrix this method is about
        np.fill_diagonal(sim, 0)
        keep, twin = [True] * n, {}
        for i in range(n):
            if not keep[i]:
                continue
            for j in np.nonzero(sim[i, i + 1:] >= DedupConfig().threshold)[0] + i + 1:
                if keep[j]:
                    keep[j], twin[int(j)] = False, i
        del sim
        search_peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        stats = {"embed_s": t1 - t0, "search_s": time.perf_counter() - t1, "lexical_s": 0.0, "verify_s": 0.0,
                 "candidate_pairs": 0, "lexical_pairs": 0}
    else:
        if TRACE:  # tracemalloc slows the Python-heavy parts (verification, shingles) 2-4x: --no-trace for timings
            tracemalloc.start()
        keep, removed, stats = find_duplicates(texts, DedupConfig(), progress=False)
        search_peak = tracemalloc.get_traced_memory()[1] / 2**20 if TRACE else float("nan")
        tracemalloc.stop()
        twin = {x["removed_index"]: x["kept_index"] for x in removed}
    dt = time.perf_counter() - t0
    return {"method": name, "n": n, "seconds": dt, "peak_rss_mib": _peak(), "traced_peak_mib": search_peak,
            **{k: stats[k] for k in ("embed_s", "search_s", "lexical_s", "verify_s", "candidate_pairs", "lexical_pairs")},
            **dedup_scores(recs, keep, twin)}


def _sub(name: str, n: int) -> dict:
    p = subprocess.run([sys.executable, "-m", "bench.data_stages", "_method", name, "--n", str(n),
                        *([] if TRACE else ["--no-trace"])], cwd=ROOT,
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.data_stages", description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["make-eval", "eval", "run", "_method"])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--skip-naive-dedup", action="store_true")
    ap.add_argument("--skip-dedup", action="store_true")
    ap.add_argument("--no-trace", action="store_true", help="time dedup without tracemalloc (no traced peak)")
    a = ap.parse_args(argv)
    global TRACE
    TRACE = not a.no_trace
    if a.cmd == "make-eval":
        PII_EVAL.parent.mkdir(parents=True, exist_ok=True)
        PII_EVAL.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in make_pii_eval()), "utf-8")
        DEDUP_EVAL.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in make_dedup_records(600, 7)),
                              "utf-8")
        print(f"wrote {PII_EVAL} and {DEDUP_EVAL}")
    elif a.cmd == "eval":
        items = [json.loads(x) for x in PII_EVAL.read_text("utf-8").splitlines()]
        for label, fn in (("ours", lambda t: sanitize_text(t)[0]), ("naive", naive_sanitize)):
            s = pii_scores(items, fn)
            print(f"\n{label}: negatives untouched {s['negatives_untouched']:.3f}, exact output {s['exact_output']:.3f}")
            print("| type | precision | recall | tp | fp | fn |\n|---|---|---|---|---|---|")
            for t, v in s["per_type"].items():
                print(f"| {t} | {v['precision']:.3f} | {v['recall']:.3f} | {v['tp']} | {v['fp']} | {v['fn']} |")
    elif a.cmd == "_method":
        print(json.dumps(method(a.name, a.n)))
    else:
        rows = [_sub("sanitize_naive", a.n), _sub("sanitize_ours", a.n)]
        if not a.skip_dedup:
            fits = a.n * a.n * 4 * 2 < 8 * 2**30  # sim matrix + comparison temporaries
            if fits and not a.skip_naive_dedup:
                rows.append(_sub("dedup_naive", a.n))
            else:
                print(f"dedup_naive skipped at n={a.n}: the n*n float32 matrix needs {a.n * a.n * 4 / 2**30:.1f} GiB")
            rows.append(_sub("dedup_ours", a.n))
        print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
