"""A user's own model and data files, built offline for tests: a tiny random-init model of a real non-Llama
architecture (Qwen2 or Mistral shapes) with a BPE tokenizer and a ChatML chat template, and instruction /
preference files in the formats the popular fine-tuning tools ship (Alpaca JSON array, ShareGPT, OpenAI messages).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PRODUCTS = ["Velora", "Quintex", "Marbolt", "Zephyrin", "Obrix", "Talvane", "Crestil", "Numora", "Pellax", "Strivo",
            "Hexlan", "Dorvik"]
COLOURS = ["red", "blue", "green", "black", "white", "silver"]


def facts(n: int = 12) -> list[tuple[str, str, int]]:
    rng = random.Random(0)
    return [(p, rng.choice(COLOURS), rng.randrange(20, 500)) for p in PRODUCTS[:n]]


def corpus_texts() -> list[str]:
    out = []
    for p, c, price in facts():
        out += [f"The {p} is {c} and costs {price} dollars.", f"Our catalogue lists the {p} in {c}.",
                f"A {p} sells for {price} dollars in every store.", f"Customers like the {c} {p}."]
    return out


def build_model(out: Path, arch: str = "qwen2", positions: int = 256) -> Path:
    """A tiny random-init checkpoint in Hugging Face layout, tokenizer trained on the demo-like texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = corpus_texts() + ["system user assistant You are a helpful assistant.", "What colour is it? How much?"]
    tok.train_from_iterator(texts * 4, trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=["<|im_start|>"])
    hf.chat_template = CHATML
    common = dict(vocab_size=len(hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                  eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id, bos_token_id=None, tie_word_embeddings=True)
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    hf.save_pretrained(str(out))
    return out


def write_data(d: Path) -> dict[str, Path]:
    """Corpus JSONL, sft as an Alpaca JSON array + ShareGPT + messages, preferences as ShareGPT ranking."""
    d.mkdir(parents=True, exist_ok=True)
    f = facts()
    files = {"corpus": d / "corpus.jsonl", "alpaca": d / "alpaca.json", "sharegpt": d / "sharegpt.jsonl",
             "messages": d / "messages.jsonl", "pref": d / "pref_sharegpt.json"}
    files["corpus"].write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()))
    alpaca = [{"instruction": f"What colour is the {p}?", "input": "", "output": f"The {p} is {c}."} for p, c, _ in f]
    files["alpaca"].write_text(json.dumps(alpaca, indent=2))
    files["sharegpt"].write_text("".join(json.dumps({"conversations": [
        {"from": "system", "value": "Answer with the price."},
        {"from": "human", "value": f"How much is the {p}?"}, {"from": "gpt", "value": f"{price} dollars."}]}) + "\n"
        for p, _, price in f))
    files["messages"].write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Tell me about the {p}."}, {"role": "assistant", "content": f"It is {c}."},
        {"role": "user", "content": "And the price?"}, {"role": "assistant", "content": f"{price} dollars."}]}) + "\n"
        for p, c, price in f))
    pref = [{"conversations": [{"from": "human", "value": f"What colour is the {p}?"}],
             "chosen": {"from": "gpt", "value": f"The {p} is {c}."},
             "rejected": {"from": "gpt", "value": f"The {p} is {COLOURS[(COLOURS.index(c) + 1) % len(COLOURS)]}."}}
            for p, c, _ in f] * 3
    files["pref"].write_text(json.dumps(pref, indent=1))
    return files
