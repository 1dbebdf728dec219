"""The record formats users already have, normalised once into one conversation type.

Reads: one record (a dict) of any role's input file; :mod:`pipelines.records` streams the files.
Writes: nothing; :func:`normalizer` returns the function that turns a record into its canonical form or raises
:class:`~pipelines.records.RecordError` (a bad record, reported as ``FILE:LINE: what is wrong``).

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``: an optional system turn
first, then user and assistant turns alternating, starting with user. The canonical record of each kind of role:

============  =======================================================  ===================================
kind          roles                                                    canonical record
============  =======================================================  ===================================
text          ``corpus``, ``eval_text``                                the record itself (its text field)
conversation  ``sft``, ``eval_qa``                                     ``{"messages": [... assistant]}``
preference    ``preference``, ``eval_preference``                      ``{"prompt": [... user], "chosen",
                                                                       "rejected"}`` (answer strings)
prompt        ``prompts``, ``eval_prompts``                            ``{"prompt": [... user]}``
============  =======================================================  ===================================

Other scalar fields of a record (``kind``, ``lang``, an id...) are kept beside these keys.

Formats, detected from each record's keys or named per dataset (``format:``):

- ``text``: the text field (``data.text_field``);
- ``prompt_completion``: TRL's ``prompt`` / ``completion``, strings (one user and one assistant turn) or message
  lists;
- ``messages``: OpenAI / TRL ``messages`` (``role`` / ``content``; content may be a list of text parts);
- ``alpaca``: ``instruction`` (+ ``input``) / ``output``, optional ``system`` and ``history`` (``[[q, a], ...]``);
  with ``chosen`` / ``rejected`` instead of ``output`` it is an Alpaca ranking (preference) record;
- ``sharegpt``: ``conversations`` of ``from`` / ``value`` (human/user, gpt/assistant/bot/model, system; other
  tags through the dataset's ``role_tags``), optional ``system``; with ``chosen`` / ``rejected`` turn objects it
  is a ShareGPT ranking (preference) record, as LLaMA-Factory ships them;
- ``preference``: ``prompt`` / ``chosen`` / ``rejected`` (strings or message lists); without ``prompt``, TRL's
  implicit-prompt form: ``chosen`` and ``rejected`` are whole conversations that share the prompt;
- ``prompt``: ``prompt`` alone (a string or a message list);
- ``qa``: ``question`` / ``answer``.

A role takes every format that can give its kind: a prompt role also reads conversations (the prompt is every
turn before the last answer) and preference records (their prompt).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from pipelines.records import RecordError

Kind = Literal["text", "conversation", "preference", "prompt"]
FORMATS = ("text", "prompt_completion", "messages", "alpaca", "sharegpt", "preference", "prompt", "qa")
ROLE_KIND: dict[str, Kind] = {
    "corpus": "text", "eval_text": "text", "general": "text",
    "sft": "conversation", "eval_qa": "conversation",
    "preference": "preference", "eval_preference": "preference",
    "prompts": "prompt", "eval_prompts": "prompt",
}
ROLE_TAGS = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
}
_CONSUMED = {"prompt", "completion", "messages", "conversations", "instruction", "input", "output", "system",
             "history", "chosen", "rejected", "question", "answer"}


def _kind(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), type(v).__name__)


def _text(v: Any, where: str, allow_empty: bool = False) -> str:
    if isinstance(v, list) and all(isinstance(p, dict) for p in v):  # OpenAI content parts
        kinds = {p.get("type") for p in v}
        if kinds - {"text"}:
            raise RecordError(f"{where}: only text content is supported (got parts of type "
                              f"{', '.join(sorted(str(k) for k in kinds - {'text'}))})")
        v = "".join(str(p.get("text", "")) for p in v)
    if not isinstance(v, str):
        raise RecordError(f"{where} is not a string (got {_kind(v)})")
    if not allow_empty and not v.strip():
        raise RecordError(f"{where} is empty")
    return v


def _messages(v: Any, where: str, tags: Mapping[str, str] | None = None, role_key: str = "role",
              content_key: str = "content") -> list[dict[str, str]]:
    """A list of turn objects as canonical messages (roles mapped, content checked); order is checked later."""
    if not isinstance(v, list):
        raise RecordError(f"{where} is not a list of turns (got {_kind(v)})")
    out = []
    for i, turn in enumerate(v):
        if not isinstance(turn, dict):
            raise RecordError(f"{where}[{i}] is not an object (got {_kind(turn)})")
        rk, ck = role_key, content_key
        if rk not in turn and "from" in turn:  # ShareGPT turns inside a messages-style record, or the reverse
            rk, ck = "from", "value"
        elif rk not in turn and "role" in turn:
            rk, ck = "role", "content"
        if rk not in turn:
            raise RecordError(f"{where}[{i}] has no {role_key!r}")
        tag = turn[rk]
        role = (tags or {}).get(tag) or ROLE_TAGS.get(str(tag).lower()) if isinstance(tag, str) else None
        if role is None:
            known = sorted(set(ROLE_TAGS) | set(tags or {}))
            raise RecordError(f"{where}[{i}]: unknown role {tag!r} (known: {', '.join(known)}; map others with "
                              "the dataset's role_tags)")
        out.append({"role": role, "content": _text(turn.get(ck), f"{where}[{i}].{ck}")})
    return out


def check_order(msgs: list[dict[str, str]], where: str, ends_with: Literal["user", "assistant"]) -> list[dict[str, str]]:
    """Optional system first, then user/assistant alternating from user, ending with ``ends_with``."""
    if not msgs:
        raise RecordError(f"{where}: empty conversation")
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not body:
        raise RecordError(f"{where}: only a system prompt, no user turn")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            pos = i + (len(msgs) - len(body))
            raise RecordError(f"{where}: wrong role order: turn {pos} is {m['role']!r}, expected {want!r} "
                              "(optional system first, then user and assistant alternating)")
    if body[-1]["role"] != ends_with:
        raise RecordError(f"{where}: the conversation must end with a{'n' if ends_with == 'assistant' else ''} "
                          f"{ends_with} turn, not {body[-1]['role']!r}")
    return msgs


def _turns(v: Any, where: str, role: str) -> list[dict[str, str]]:
    """A prompt or completion given as a string (one turn of ``role``) or as a message list."""
    if isinstance(v, str):
        return [{"role": role, "content": _text(v, where)}]
    return _messages(v, where)


def detect(obj: Mapping[str, Any], text_field: str) -> str:
    keys = set(obj)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys:
        return "alpaca"
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "question" in keys and "answer" in keys:
        return "qa"
    if "prompt" in keys:
        return "prompt"
    if text_field in keys:
        return "text"
    shown = ", ".join(sorted(map(str, keys))[:8]) or "none"
    raise RecordError(f"cannot tell the record's format from its keys ({shown}); expected {text_field!r}, "
                      "prompt/completion, messages, instruction/output (Alpaca), conversations (ShareGPT), "
                      "prompt/chosen/rejected or question/answer")


# --------------------------------------------------------------------------------------------- per format parsing
def _alpaca_prompt(obj: Mapping[str, Any]) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    if obj.get("system"):
        msgs.append({"role": "system", "content": _text(obj["system"], "system")})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RecordError(f"history is not a list of [instruction, response] pairs (got {_kind(history)})")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RecordError(f"history[{i}] is not an [instruction, response] pair")
        msgs += [{"role": "user", "content": _text(pair[0], f"history[{i}][0]")},
                 {"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")}]
    if "instruction" not in obj:
        raise RecordError("missing field 'instruction'")
    instruction = _text(obj["instruction"], "instruction", allow_empty=bool(obj.get("input")))
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RecordError(f"input is not a string (got {_kind(extra)})")
    content = "\n".join(s for s in (instruction, extra or "") if s.strip())  # LLaMA-Factory joins them so
    return msgs + [{"role": "user", "content": content}]


def _sharegpt(obj: Mapping[str, Any], tags: Mapping[str, str] | None) -> list[dict[str, str]]:
    msgs = _messages(obj["conversations"], "conversations", tags, "from", "value")
    if obj.get("system") and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": _text(obj["system"], "system")}] + msgs
    return msgs


def _answer(v: Any, where: str, tags: Mapping[str, str] | None) -> str:
    """A preference answer: a string, one assistant turn object, or a list holding one assistant turn."""
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list):
        msgs = _messages(v, where, tags)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise RecordError(f"{where}: expected one assistant turn (got {len(msgs)} turns)")
        return msgs[0]["content"]
    return _text(v, where)


def _conversation(fmt: str, obj: Mapping[str, Any], text_field: str, tags) -> list[dict[str, str]]:
    if fmt == "prompt_completion":
        return _turns(obj["prompt"], "prompt", "user") + _turns(obj["completion"], "completion", "assistant")
    if fmt == "messages":
        return _messages(obj["messages"], "messages", tags)
    if fmt == "alpaca":
        if "output" not in obj:
            raise RecordError("missing field 'output' (Alpaca: instruction, input, output)")
        return _alpaca_prompt(obj) + [{"role": "assistant", "content": _text(obj["output"], "output")}]
    if fmt == "sharegpt":
        return _sharegpt(obj, tags)
    if fmt == "qa":
        return [{"role": "user", "content": _text(obj["question"], "question")},
                {"role": "assistant", "content": _text(obj["answer"], "answer")}]
    raise RecordError(f"a {fmt!r} record is not a conversation")


def _preference(fmt: str, obj: Mapping[str, Any], tags) -> dict[str, Any]:
    for k in ("chosen", "rejected"):
        if k not in obj or obj[k] is None:
            raise RecordError(f"missing field {k!r} (a preference record needs a prompt, chosen and rejected)")
    if fmt == "alpaca":
        prompt = _alpaca_prompt(obj)
    elif fmt == "sharegpt":
        prompt = _sharegpt(obj, tags)
    elif fmt == "messages":
        prompt = _messages(obj["messages"], "messages", tags)
    elif "prompt" in obj:
        prompt = _turns(obj["prompt"], "prompt", "user")
    else:  # TRL's implicit prompt: chosen and rejected are whole conversations sharing all but the last turn
        chosen, rejected = _messages(obj["chosen"], "chosen", tags), _messages(obj["rejected"], "rejected", tags)
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
            raise RecordError("missing field 'prompt' (and chosen/rejected are not conversations sharing a prompt)")
        return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
    return {"prompt": prompt, "chosen": _answer(obj["chosen"], "chosen", tags),
            "rejected": _answer(obj["rejected"], "rejected", tags)}


def _meta(obj: Mapping[str, Any], text_field: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items()
            if k not in _CONSUMED and k != text_field and isinstance(v, (str, int, float, bool)) and v is not None}


def normalize(obj: Mapping[str, Any], kind: Kind, text_field: str = "text", fmt: str = "auto",
              tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One record in its canonical form for a role of ``kind``; raises :class:`RecordError` when it is bad."""
    f = detect(obj, text_field) if fmt == "auto" else fmt
    try:
        if kind == "text":
            if f != "text":
                raise RecordError(f"a {f!r} record where plain text is expected (field {text_field!r})")
            if text_field not in obj or obj[text_field] is None:
                raise RecordError(f"missing field {text_field!r}")
            _text(obj[text_field], f"field {text_field!r}")
            return dict(obj)
        if kind == "conversation":
            if f in ("preference", "prompt", "text"):
                raise RecordError(f"a {f!r} record where instruction data (a prompt and its answer) is expected")
            return {"messages": check_order(_conversation(f, obj, text_field, tags), "conversation", "assistant"),
                    **_meta(obj, text_field)}
        if kind == "preference":
            if f in ("prompt_completion", "qa", "text"):
                raise RecordError(f"a {f!r} record where a preference pair (prompt, chosen, rejected) is expected")
            rec = _preference(f, obj, tags)
            check_order(rec["prompt"], "prompt", "user")
            return {**rec, **_meta(obj, text_field)}
        if kind == "prompt":
            if f == "text":
                raise RecordError("a plain-text record where a prompt is expected")
            if "chosen" in obj and f != "prompt_completion":
                prompt = _preference(f, obj, tags)["prompt"]
            elif f == "prompt":
                prompt = _turns(obj["prompt"], "prompt", "user")
            elif f == "alpaca" and "output" not in obj:
                prompt = _alpaca_prompt(obj)
            else:
                conv = _conversation(f, obj, text_field, tags)
                if conv and conv[-1]["role"] == "assistant":
                    prompt = check_order(conv, "conversation", "assistant")[:-1]
                else:
                    prompt = conv
            return {"prompt": check_order(prompt, "prompt", "user"), **_meta(obj, text_field)}
    except KeyError as e:
        raise RecordError(f"missing field {e.args[0]!r} for the {f!r} format") from None
    raise ValueError(f"unknown kind {kind!r}")


def normalizer(role: str, text_field: str = "text", fmt: str = "auto",
               tags: Mapping[str, str] | None = None) -> Callable[[dict], dict]:
    """The ``normalize`` callable for :func:`pipelines.records.iter_records` for one dataset of ``role``."""
    kind = ROLE_KIND[role]
    return lambda obj: normalize(obj, kind, text_field, fmt, tags)


# ------------------------------------------------------------------------------------------------- record helpers
def prompt_of(rec: Mapping[str, Any]) -> list[dict[str, str]]:
    """The prompt turns of a canonical conversation, preference or prompt record."""
    if "messages" in rec:
        return rec["messages"][:-1]
    return rec["prompt"]


def map_text(rec: dict[str, Any], fn: Callable[[str], str], text_field: str = "text") -> dict[str, Any]:
    """A canonical record with ``fn`` applied to every text it holds (sanitize masks PII in every role this way)."""
    out = dict(rec)
    for key in ("messages", "prompt"):
        if isinstance(out.get(key), list):
            out[key] = [{**m, "content": fn(m["content"])} for m in out[key]]
    for key in ("chosen", "rejected"):
        if isinstance(out.get(key), str):
            out[key] = fn(out[key])
    if isinstance(out.get(text_field), str) and "messages" not in out and "prompt" not in out:
        out[text_field] = fn(out[text_field])
    return out
