"""sanitize: replace PII and secrets in a record file's text field with typed placeholders.

Reads: a record file (JSONL, JSON array, CSV, Parquet or a ``datasets.save_to_disk`` directory, see
``pipelines.records``). Writes: JSONL with every field of every record kept and only the text field changed,
atomically; ``OUTPUT.rejected.jsonl`` in quarantine mode (with PII masked in the raw text it keeps too);
in a pipeline run also ``sanitize_report.json`` (per-type counts). Raw values are never logged or reported.

Types and placeholders: ``[EMAIL] [PHONE] [CN_MOBILE] [SSN] [CN_ID] [CARD] [IBAN] [IP] [SECRET]``. Each
candidate is validated, not just pattern-matched: phone numbers by ``phonenumbers``' matcher, SSN area/group/serial
rules, Chinese resident ids by MOD 11-2 check digit and birth date, cards by Luhn + issuer prefix, IBAN by mod-97,
IPs by ``ipaddress``. Look-alikes (dates, versions, ISBNs, order/build numbers, decimals, prices) stay untouched.

Speed: cheap per-text gates (``'@' in text``, "is there a 7-digit run", ...) choose which branches can match at
all, then ONE compiled alternation with named groups scans the text once; validators run only on candidates.

Run alone::

    python -m pipelines.sanitize INPUT OUTPUT [--field text] [--bad-records fail|quarantine]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import json
import re
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import phonenumbers
from phonenumbers import Leniency, PhoneNumberMatcher

from pipelines.artifacts import StageOutput, write_json
from pipelines.config import PII_TYPES, PipelineConfig, SanitizeConfig
from pipelines.executor import add_executor_args, executor_from_args
from pipelines.records import BadInputError, process_file

PLACEHOLDERS: dict[str, str] = {t: f"[{t}]" for t in PII_TYPES}
_PLACEHOLDER_SET = frozenset(PLACEHOLDERS.values())


class SanitizeError(ValueError):
    """A sanitize setting that cannot be honoured, phrased as one line."""


# ----------------------------------------------------------------------------------------------------- branches
# Each branch starts by consuming a character class and only then looks behind: the regex engine rejects most
# positions on the first character instead of evaluating a lookbehind everywhere.
_A = "A-Za-z0-9"
_BRANCHES: dict[str, str] = {
    "pem": r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?s:.*?)-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----",
    "jwt": rf"e(?<![{_A}_-]e)yJ[{_A}_-]{{8,}}\.eyJ[{_A}_-]{{8,}}\.[{_A}_-]{{8,}}",
    "aws": rf"A(?<![{_A}]A)(?:KIA|SIA)[A-Z0-9]{{16}}(?![{_A}])",
    "gh": rf"g(?<![{_A}_]g)(?:h[pousr]_[{_A}]{{36,255}}|ithub_pat_[{_A}_]{{22,255}})(?![{_A}_])",
    "slack": rf"x(?<![{_A}]x)ox[abpr]s?-[{_A}-]{{10,}}",
    "assign": r"(?P<key>(?i:(?<![a-z0-9])[a-z_]*?(?:password|passwd|pwd|passphrase|secret|api[_-]?key|apikey|"
    r"access[_-]?key|private[_-]?key|access[_-]?token|auth[_-]?token|token))[\"']?[ \t]*[:=][ \t]*)"
    r"(?P<val>\"[^\"\n]{1,200}\"|'[^'\n]{1,200}'|[^\s,;\"'<>\x80-\U0010ffff]{1,200})",
    "email": rf"[{_A}](?<![{_A}._%+-][{_A}])[{_A}._%+-]{{0,63}}+@[{_A}](?:[{_A}-]{{0,62}}[{_A}])?"
    rf"(?:\.[{_A}](?:[{_A}-]{{0,62}}[{_A}])?)*\.[A-Za-z]{{2,24}}(?![{_A}-])",
    "iban": rf"[A-Z](?<![{_A}][A-Z])[A-Z]\d\d(?: ?[A-Z0-9]{{4}}){{2,7}}(?: ?[A-Z0-9]{{1,4}})?(?![{_A}])",
    "ipv4": rf"\d(?<![{_A}_.]\d)\d{{0,2}}\.(?:\d{{1,3}}\.){{2}}\d{{1,3}}(?![{_A}_]|\.\d)",
    # only active when the text holds 'x:y:' (see _active_branches), so the leading lookaround costs little
    "ipv6": rf"(?=[0-9A-Fa-f:])(?<![{_A}_:.])(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}"
    rf"(?:[0-9A-Fa-f]{{1,4}}|(?:\d{{1,3}}\.){{3}}\d{{1,3}})?(?![{_A}_:]|\.\d)",
    # digit runs with phone/card-style separators; what they are is decided by _classify_number
    "num": rf"(?:[+(](?<![{_A}_.+/\-][+(])\+?\d|\d(?<![{_A}_.+/\-]\d))(?:[ .\-()]{{0,3}}\d)+[Xx]?(?![{_A}_])",
}
_BRANCH_TYPE = {"pem": "SECRET", "jwt": "SECRET", "aws": "SECRET", "gh": "SECRET", "slack": "SECRET",
                "assign": "SECRET", "email": "EMAIL", "iban": "IBAN", "ipv4": "IP", "ipv6": "IP"}
_NUM_TYPES = frozenset({"PHONE", "CN_MOBILE", "SSN", "CN_ID", "CARD"})
_ORDER = tuple(_BRANCHES)  # specific before generic: a PEM block or JWT wins over anything inside it

_GATE_7DIGITS = re.compile(r"\d(?:[ .\-()]{0,3}\d){6}")
_GATE_IBAN = re.compile(r"[A-Z]{2}\d\d")
_GATE_IPV4 = re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")
_GATE_IPV6 = re.compile(r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:")
_SECRET_WORDS = ("pass", "pwd", "secret", "key", "token")


def _active_branches(text: str, entities: frozenset[str]) -> tuple[str, ...]:
    """Branches that could match at all: substring tests run at C speed and skip most of the work."""
    on: list[str] = []
    if "SECRET" in entities:
        if "-----BEGIN" in text:
            on.append("pem")
        if "eyJ" in text:
            on.append("jwt")
        if "AKIA" in text or "ASIA" in text:
            on.append("aws")
        if "_" in text and ("gh" in text or "github_pat_" in text):
            on.append("gh")
        if "xox" in text:
            on.append("slack")
        if ("=" in text or ":" in text) and any(w in text.lower() for w in _SECRET_WORDS):
            on.append("assign")
    if "EMAIL" in entities and "@" in text:
        on.append("email")
    if "IBAN" in entities and _GATE_IBAN.search(text):
        on.append("iban")
    if "IP" in entities:
        if "." in text and _GATE_IPV4.search(text):
            on.append("ipv4")
        if ":" in text and _GATE_IPV6.search(text):
            on.append("ipv6")
    if entities & _NUM_TYPES and _GATE_7DIGITS.search(text):
        on.append("num")
    return tuple(on)


_RE_IPV4 = re.compile(_BRANCHES["ipv4"])


@lru_cache(maxsize=256)
def _combined(branches: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?P<{b}>{_BRANCHES[b]})" for b in branches))


# --------------------------------------------------------------------------------------------------- validators
def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_prefix_ok(d: str) -> bool:
    """Issuer (IIN) ranges of the networks in use: random Luhn-valid digit strings mostly fall outside."""
    n, p2, p4 = len(d), int(d[:2]), int(d[:4])
    if d[0] == "4":
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16
    if p2 in (34, 37):
        return n == 15
    if d.startswith("6011") or 644 <= int(d[:3]) <= 649 or p2 == 65 or p2 == 62:
        return 16 <= n <= 19
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19
    if 300 <= int(d[:3]) <= 305 or p2 in (36, 38, 39):
        return 14 <= n <= 19
    return p2 in (50, 56, 57, 58, 63, 67) and 12 <= n <= 19  # Maestro


def ssn_ok(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


_CN_W = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def cn_id_ok(s: str) -> bool:
    """18-character resident id: region digit, real birth date not in the future, MOD 11-2 check character."""
    if len(s) != 18 or not s[:17].isdigit() or s[0] not in "12345678":
        return False
    try:
        born = _dt.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    if not (1900 <= born.year and born <= _dt.date.today()):
        return False
    check = "10X98765432"[sum(int(c) * w for c, w in zip(s[:17], _CN_W)) % 11]
    return s[17].upper() == check


_IBAN_LEN = {"AD": 24, "AE": 23, "AT": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21, "CY": 28, "CZ": 24,
             "DE": 22, "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28,
             "IE": 22, "IL": 23, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31,
             "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
             "TR": 26, "UA": 29}


def iban_ok(s: str) -> bool:
    s = s.replace(" ", "")
    expected = _IBAN_LEN.get(s[:2])
    if (expected and len(s) != expected) or not 15 <= len(s) <= 34:
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


_RE_SSN = re.compile(r"(\d{3})([- ])(\d{2})\2(\d{4})")
_RE_CN_MOBILE = re.compile(r"(?:(?:\+|00)86[ -]?|\(\+?86\)[ -]?)?1[3-9]\d(?:([ -]?)\d{4}\1\d{4})")
_RE_CARD = re.compile(r"\d{13,19}|\d{4}(?P<s>[ -])\d{3,6}(?:(?P=s)\d{1,6}){1,3}")
_CTX_ISBN = re.compile(r"(?i)isbn(?:-1[03])?[:\s]*$")
_CTX_SSN = re.compile(r"(?i)(?:ssn|social security(?: number| no\.?)?)[:#\s]*$")
_CTX_NOT_PHONE = re.compile(r"(?i)(?:order|invoice|ticket|build|tracking|ref|id|no\.?|#|number|版本|订单号?)[:#\s]*$")
_CTX_VERSION = re.compile(r"(?i)(?<![a-z])(?:version|ver\.?|release|v)\s*$")


def _classify_number(s: str, before: str, entities: frozenset[str], region: str) -> str | None:
    """Which PII type the whole digit run ``s`` is, or None. ``before`` is the text just before it."""
    digits = re.sub(r"\D", "", s)
    if len(digits) < 7 or _CTX_ISBN.search(before):
        return None
    if "SSN" in entities:
        m = _RE_SSN.fullmatch(s)
        if m and ssn_ok(m[1], m[3], m[4]):
            return "SSN"
        if len(s) == 9 and s.isdigit() and _CTX_SSN.search(before) and ssn_ok(s[:3], s[3:5], s[5:]):
            return "SSN"
    if "CN_ID" in entities and len(s) == 18 and cn_id_ok(s):
        return "CN_ID"
    if s[-1] in "Xx":
        return None
    if "CN_MOBILE" in entities and _RE_CN_MOBILE.fullmatch(s):
        return "CN_MOBILE"
    if "CARD" in entities and _RE_CARD.fullmatch(s) and 13 <= len(digits) <= 19:
        if luhn_ok(digits) and _card_prefix_ok(digits):
            return "CARD"
    if "PHONE" in entities and len(digits) <= 15 and not _CTX_NOT_PHONE.search(before):
        for m in PhoneNumberMatcher(s, region, leniency=Leniency.VALID):
            if m.start == 0 and m.end == len(s):
                return "PHONE"
    return None


# ------------------------------------------------------------------------------------------------------ scanning
def _secret_value_ok(val: str) -> bool:
    """Replace quoted values and values that look like credentials, not prose ('password: must be...')."""
    if val in _PLACEHOLDER_SET:
        return False
    if val[0] in "\"'":
        inner = val[1:-1]
        return bool(inner.strip()) and inner not in _PLACEHOLDER_SET
    return len(val) >= 6 or (len(val) >= 4 and not val.isalpha())


def sanitize_text(
    text: str, entities: Iterable[str] = PII_TYPES, phone_region: str = "US"
) -> tuple[str, dict[str, int]]:
    """Return ``text`` with every detected entity replaced by its placeholder, and per-type counts (all types)."""
    ents = frozenset(entities)
    counts = dict.fromkeys(ents, 0) if isinstance(entities, (set, frozenset)) else dict.fromkeys(entities, 0)
    branches = _active_branches(text, ents)
    if not branches:
        return text, counts

    def replace(m: re.Match[str]) -> str:
        kind = m.lastgroup
        s = m.group(kind)
        if kind == "num":
            out = _replace_number(s, text[max(0, m.start() - 24) : m.start()], ents, phone_region, counts)
            # a phone-style run may open with "(" and so swallow an address: "(192.168.1.1)" is still an IP
            return _replace_ipv4(s, text, m.start(), counts) if out == s and "ipv4" in branches else out
        if kind == "assign":
            val = m.group("val")
            if not _secret_value_ok(val):
                return s
            counts["SECRET"] += 1
            q = val[0] if val[0] in "\"'" else ""
            return m.group("key") + q + PLACEHOLDERS["SECRET"] + q
        if kind == "email":
            local = s.split("@", 1)[0]
            if ".." in local or local.endswith("."):
                return s
        elif kind == "iban":
            return _replace_iban(s, counts)
        elif kind == "ipv4":
            if _CTX_VERSION.search(text[max(0, m.start() - 10) : m.start()]) or not _ip_ok(s):
                return s
        elif kind == "ipv6":
            if not _ip_ok(s) or s.count(":") < 2 or not re.search(r"[0-9A-Fa-f]", s):
                return s
        t = _BRANCH_TYPE[kind]
        counts[t] += 1
        return PLACEHOLDERS[t]

    return _combined(branches).sub(replace, text), counts


def _replace_ipv4(s: str, text: str, at: int, counts: dict[str, int]) -> str:
    """IPv4 addresses inside ``s`` (which starts at ``text[at]``), judged as the ipv4 branch judges them."""

    def one(m: re.Match[str]) -> str:
        start = at + m.start()
        if _CTX_VERSION.search(text[max(0, start - 10) : start]) or not _ip_ok(m.group()):
            return m.group()
        counts["IP"] += 1
        return PLACEHOLDERS["IP"]

    return _RE_IPV4.sub(one, s)


def _ip_ok(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


def _replace_iban(s: str, counts: dict[str, int]) -> str:
    """The greedy match may run into a following word ('... 00 EUR'): drop trailing groups until it validates."""
    parts = s.split(" ")
    for k in range(len(parts), 0, -1):
        head = " ".join(parts[:k])
        if iban_ok(head):
            counts["IBAN"] += 1
            return PLACEHOLDERS["IBAN"] + s[len(head) :]
    return s


def _replace_number(s: str, before: str, ents: frozenset[str], region: str, counts: dict[str, int]) -> str:
    t = _classify_number(s, before, ents, region)
    if t:
        counts[t] += 1
        return PLACEHOLDERS[t]
    # Separators may join two neighbours ("call 555-0143 or 4111 1111 1111 1111"): try the longest sub-runs of
    # space-separated chunks, left to right. Bounded: at most 8 chunks.
    chunks = s.split(" ")
    if len(chunks) < 2 or len(chunks) > 8:
        return s
    out: list[str] = []
    i = 0
    while i < len(chunks):
        for j in range(len(chunks), i, -1):
            if j - i == len(chunks):
                continue
            sub = " ".join(chunks[i:j])
            t = _classify_number(sub, before + " ".join(chunks[:i]), ents, region) if sub[:1] not in ".-)" else None
            if t:
                counts[t] += 1
                out.append(PLACEHOLDERS[t])
                i = j
                break
        else:
            out.append(chunks[i])
            i += 1
    return " ".join(out)


def check_ner(cfg: SanitizeConfig) -> None:
    if cfg.ner:
        raise SanitizeError(
            "sanitize.ner: no NER backend is available (presidio-analyzer needs a spaCy model that cannot be "
            "installed offline); set sanitize.ner: false"
        )


# ---------------------------------------------------------------------------------------------------------- files
def sanitize_file(input: Path, output: Path, cfg: SanitizeConfig, field: str) -> dict:
    """Sanitize ``input`` into ``output`` (JSONL, atomic). Returns {"records_in","records_out","rejected","counts"}."""
    check_ner(cfg)
    ents = frozenset(cfg.entities)
    counts = dict.fromkeys(cfg.entities, 0)

    def transform(rec: dict) -> dict:
        new, c = sanitize_text(rec[field], ents, cfg.phone_region)
        for k, v in c.items():
            counts[k] += v
        return {**rec, field: new}

    def scrub(raw: str) -> str:
        return sanitize_text(raw, ents, cfg.phone_region)[0]

    report = process_file(Path(input), Path(output), field, cfg.bad_records, cfg.max_bad_fraction, transform, scrub)
    return {**report, "counts": counts}


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    """Pipeline entry point: ``inputs["records"]`` -> ``out_dir/data/records.jsonl`` + ``sanitize_report.json``."""
    field = cfg.sanitize.field or cfg.data.text_field
    out_dir = Path(out_dir)
    src, dst = Path(inputs["records"]), out_dir / "data" / "records.jsonl"
    from pipelines.shards import sanitize_records

    dst.parent.mkdir(parents=True, exist_ok=True)
    report = sanitize_records(src, dst, cfg.sanitize, field, cfg.executor)
    roles = sanitize_roles(cfg, inputs, out_dir, report["counts"])
    write_json(out_dir / "sanitize_report.json", {**report, "field": field, "config": cfg.sanitize.model_dump(),
                                                  "roles": roles})
    counts = {t: report["counts"].get(t, 0) for t in PII_TYPES}
    metrics = {k: float(report[k]) for k in ("records_in", "records_out", "rejected")}
    metrics.update({f"pii_{t.lower()}": float(n) for t, n in counts.items()})
    metrics["pii_total"] = float(sum(counts.values()))
    rows = "\n".join(f"| {t} | {n} |" for t, n in counts.items())
    summary = (f"**sanitize**: {report['records_out']} records, {report['rejected']} rejected, "
               f"{int(metrics['pii_total'])} replacements\n\n| type | count |\n|---|---|\n{rows}")
    metrics.update({f"{role}_pii": float(n) for role, n in roles.items()})
    return StageOutput(primary="data", metrics=metrics, summary=summary,
                       outputs={role: f"roles/{role}.jsonl" for role in roles})


def sanitize_roles(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path, counts: dict[str, int]) -> dict[str, int]:
    """Every other role's text (instructions, answers, preference pairs, prompts, held-out sets) masked the same
    way as the corpus: ``roles/<role>.jsonl``. Returns the replacements per role (``counts`` gets them too)."""
    from pipelines.artifacts import read_jsonl, write_jsonl
    from pipelines.formats import map_text

    ents = frozenset(cfg.sanitize.entities)
    per_role: dict[str, int] = {}
    for role, path in inputs.items():
        if role in ("records", "work_dir"):
            continue
        n = 0

        def mask(text: str) -> str:
            nonlocal n
            new, c = sanitize_text(text, ents, cfg.sanitize.phone_region)
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
                n += v
            return new

        write_jsonl(out_dir / "roles" / f"{role}.jsonl",
                    (map_text(r, mask, cfg.data.text_field) for r in read_jsonl(path)))
        per_role[role] = n
    return per_role


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.sanitize", description=__doc__.split("\n")[0])
    p.add_argument("input", type=Path, help="record file or dataset directory")
    p.add_argument("output", type=Path, help="JSONL to write")
    p.add_argument("--field", default="text", help="text field (default: text)")
    p.add_argument("--bad-records", choices=["fail", "quarantine"], default="fail")
    p.add_argument("--max-bad-fraction", type=float, default=SanitizeConfig().max_bad_fraction)
    p.add_argument("--entities", default=",".join(PII_TYPES), help="comma-separated types")
    p.add_argument("--phone-region", default=SanitizeConfig().phone_region)
    add_executor_args(p)
    a = p.parse_args(argv)
    try:
        from pipelines.shards import sanitize_records

        cfg = SanitizeConfig(bad_records=a.bad_records, max_bad_fraction=a.max_bad_fraction,
                             entities=tuple(e.strip() for e in a.entities.split(",") if e.strip()),
                             phone_region=a.phone_region)
        report = sanitize_records(a.input, a.output, cfg, a.field, executor_from_args(a))
    except (BadInputError, SanitizeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # pydantic: unknown entity type and the like
        print(f"error: {str(e).splitlines()[-1].strip()}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
