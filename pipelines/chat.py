"""The one renderer: a conversation becomes text and tokens here, and nowhere else.

Reads: a tokenizer and the config's ``template`` block (:class:`~pipelines.config.TemplateConfig`).
Writes: nothing; :meth:`Renderer.for_model` also stores the template it uses as the tokenizer's ``chat_template``,
so every model a stage saves carries the exact format it was trained with (serving and export read it from there).

sft, reward, dpo, ppo, grpo, dapt's instruction replay and evaluate all encode through a :class:`Renderer`, so a
prompt is formatted the same in training, evaluation and serving. The template is the tokenizer's own chat
template (``format: tokenizer``), one given in the config (``jinja``), or a prompt format for base models
(``plain``, turned into an equivalent Jinja template). A conversation is encoded segment by segment: each
assistant turn is the text between the generation prompt of the turns before it and the rendering that includes
it, so the prompt tokens in training are exactly the tokens a generation prompt gives at inference, and the loss
mask covers assistant turns only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import TemplateConfig

Messages = Sequence[dict[str, str]]
_SENTINEL = "\x00tunewright-answer\x00"


class TemplateError(ValueError):
    """The model cannot render conversations as configured; one line for the user."""


def _lit(s: str) -> str:
    return "{{ " + json.dumps(s, ensure_ascii=False) + " }}" if s else ""


def plain_template(tcfg: TemplateConfig, bos: bool = False) -> str:
    """A ``plain`` prompt format as a Jinja chat template (so it can be saved with the tokenizer and served)."""
    parts = {k: getattr(tcfg, k).split("{content}") for k in ("system", "user", "assistant")}

    def turn(role: str, tail: str = "") -> str:
        pre, post = parts[role]
        return f"{_lit(pre)}{{{{ message['content'] }}}}{_lit(post)}{tail}"

    return ("{{ bos_token }}" if bos else "") + (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}" + turn("system") +
        "{%- elif message['role'] == 'user' -%}" + turn("user") +
        "{%- else -%}" + turn("assistant", "{{ eos_token }}") +
        "{%- endif -%}{%- endfor -%}")


@dataclass
class Renderer:
    tokenizer: Any
    template: str
    stop: tuple[str, ...] = ()
    stop_ids: list[int] = field(default_factory=list)
    end_of_turn: str = ""  # what the template writes after an answer (e.g. "<|im_end|>\n"; EOS for plain)

    @classmethod
    def for_model(cls, tokenizer, tcfg: TemplateConfig, where: str = "the model") -> Renderer:
        if tcfg.format == "tokenizer":
            template = getattr(tokenizer, "chat_template", None)
            if not template:
                raise TemplateError(
                    f"{where} has no chat template; set template.format: plain (a prompt format for base models) or "
                    "template.format: jinja with template.jinja")
        elif tcfg.format == "jinja":
            template = tcfg.jinja
        else:
            template = plain_template(tcfg, bos=_adds_bos(tokenizer))
        tokenizer.chat_template = template  # saved with every model: serving renders exactly what training saw
        r = cls(tokenizer, template, tuple(tcfg.stop))
        r.stop_ids = r._stop_ids()
        return r

    # ------------------------------------------------------------------------------------------------- text
    def text(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(list(messages), chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja raises TemplateError / UndefinedError / raise_exception(...) messages
            raise TemplateError(f"the chat template cannot render this conversation: {e}") from None

    def prompt(self, messages: Messages) -> str:
        """The generation prompt: the turns so far, then whatever starts an assistant turn."""
        return self.text(messages, add_generation_prompt=True)

    def segments(self, messages: Messages) -> list[tuple[str, bool]]:
        """``messages`` (ending with an assistant turn) as (text, trained) pieces whose join is ``text(messages)``.

        A template that renders earlier turns differently once later ones follow (some strip reasoning from
        history) is not prefix-consistent: then only the last assistant turn is trained.
        """
        full = self.text(messages)
        out: list[tuple[str, bool]] = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = self.prompt(messages[:i]), self.text(messages[: i + 1])
            start, end = len(before), len(upto)
            if not (full.startswith(before) and full.startswith(upto) and pos <= start <= end):
                p = self.prompt(messages[:-1])
                if not full.startswith(p):
                    raise TemplateError("the chat template renders a prompt that is not a prefix of the conversation")
                return [(p, False), (full[len(p):], True)]
            out += [(full[pos:start], False), (full[start:end], True)]
            pos = end
        if pos < len(full):
            out.append((full[pos:], False))
        return [(t, trained) for t, trained in out if t]

    def completion(self, prompt: Messages, answer: str) -> str:
        """The text an answer adds to its prompt (the assistant turn as the template writes it)."""
        return self.segments(list(prompt) + [{"role": "assistant", "content": answer}])[-1][0]

    # ----------------------------------------------------------------------------------------------- tokens
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _encode_all(self, messages: Messages) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        for text, trained in self.segments(messages):
            t = self._ids(text)
            ids += t
            mask += [int(trained)] * len(t)
        return ids, mask

    def encode(self, messages: Messages, max_length: int) -> tuple[list[int], list[int]]:
        """Token ids and the loss mask (1 on assistant turns) of a conversation, keeping its last ``max_length``."""
        ids, mask = self._encode_all(messages)
        return ids[-max_length:], mask[-max_length:]

    def encode_prompt(self, messages: Messages, max_length: int) -> list[int]:
        """Generation-prompt ids, left-truncated to ``max_length`` (the most recent context is kept)."""
        ids = self._ids(self.prompt(messages))
        return ids[-max_length:] if max_length > 0 else []

    def encode_pair(self, prompt: Messages, answer: str, max_length: int) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) within ``max_length``: the answer keeps at least half, the prompt its end."""
        segs = self.segments(list(prompt) + [{"role": "assistant", "content": answer}])
        p_ids = self._ids("".join(t for t, _ in segs[:-1]))
        a_ids = self._ids(segs[-1][0])
        a_ids = a_ids[: max(max_length - len(p_ids), max_length // 2)]
        room = max_length - len(a_ids)
        return (p_ids[-room:] if room > 0 else []), a_ids

    def encode_preference(self, pair: dict[str, Any], max_length: int) -> dict[str, list[int]]:
        """TRL's tokenized preference columns (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) of a canonical pair:
        one prompt for both answers, keeping its end within ``max_length``."""
        prompt, chosen = self.encode_pair(pair["prompt"], pair["chosen"], max_length)
        prompt_r, rejected = self.encode_pair(pair["prompt"], pair["rejected"], max_length)
        keep = min(len(prompt), len(prompt_r))
        return {"prompt_ids": prompt[len(prompt) - keep:], "chosen_ids": chosen, "rejected_ids": rejected}

    def _stop_ids(self) -> list[int]:
        """EOS and the template's end-of-turn token (e.g. ``<|im_end|>``), which ends an answer."""
        tok = self.tokenizer
        ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        try:
            full = self.text([{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}])
        except TemplateError:
            return ids
        after = full.split(_SENTINEL, 1)[-1] if _SENTINEL in full else ""
        self.end_of_turn = after
        first = self._ids(after)[:1]
        special = set(tok.all_special_ids) | {i for i, t in getattr(tok, "added_tokens_decoder", {}).items()
                                              if getattr(t, "special", False)}
        if first and first[0] in special and first[0] not in ids:
            ids.append(first[0])
        return ids

    def decode_answer(self, ids: Sequence[int]) -> str:
        """Generated ids as the answer text: up to the first stop token, then cut at the first stop string."""
        ids = list(ids)
        for i, t in enumerate(ids):
            if t in self.stop_ids:
                ids = ids[:i]
                break
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in self.stop:
            text = text.split(s, 1)[0]
        return text

    def example(self, messages: Messages, max_length: int) -> dict[str, Any]:
        """One row of a stage's ``examples.jsonl``: what the model is asked and what it trains on."""
        ids, mask = self._encode_all(messages)
        prompt = self.prompt(messages[:-1]) if messages and messages[-1]["role"] == "assistant" else self.prompt(messages)
        return {"prompt_text": prompt, "trained_text": self.text(messages), "tokens": min(len(ids), max_length),
                "trained_tokens": int(sum(mask[-max_length:])), "truncated": len(ids) > max_length}

    def preference_example(self, pair: dict[str, Any], max_length: int) -> dict[str, Any]:
        """An ``examples.jsonl`` row of a preference pair: the chosen conversation, and the rejected one's text."""
        chosen = list(pair["prompt"]) + [{"role": "assistant", "content": pair["chosen"]}]
        rejected = list(pair["prompt"]) + [{"role": "assistant", "content": pair["rejected"]}]
        return {**self.example(chosen, max_length), "rejected_text": self.text(rejected)}


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of plain text by itself (then a plain format starts with it too)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def rendered_prompts(cfg, model_dir, records: list[dict[str, Any]], n_examples: int = 5):
    """Rollout prompts (ppo, grpo) as generation-prompt text of the policy's template, with the renderer and the
    ``examples.jsonl`` rows that show them."""
    from pipelines.modeling import load_spec, load_tokenizer

    spec = load_spec(cfg.model)
    renderer = Renderer.for_model(load_tokenizer(model_dir, **spec.kwargs(model_dir)), cfg.template, str(model_dir))
    prompts = [renderer.prompt(r["prompt"]) for r in records]
    tok = renderer.tokenizer
    examples = [{"prompt_text": p, "tokens": len(tok(p, add_special_tokens=False)["input_ids"])}
                for p in prompts[:n_examples]]
    return prompts, renderer, examples


def check_template(cfg) -> None:
    """Before any stage: the configured template can render with the base model (one line otherwise)."""
    from pipelines.modeling import load_spec, load_tokenizer

    if cfg.model.scratch is not None:
        if cfg.template.format == "tokenizer":
            raise TemplateError("a scratch model has no chat template; set template.format: plain (and its user / "
                                "assistant patterns) or template.format: jinja")
        return
    spec = load_spec(cfg.model)
    try:
        tok = load_tokenizer(cfg.model.name_or_path, **spec.kwargs(cfg.model.name_or_path))
    except OSError as e:
        raise TemplateError(f"model.name_or_path {cfg.model.name_or_path}: cannot load its tokenizer: "
                            f"{str(e).splitlines()[0]}") from None
    r = Renderer.for_model(tok, cfg.template, f"model {cfg.model.name_or_path}")
    r.segments([{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}])
