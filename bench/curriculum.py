"""Benchmark: curriculum perplexity, batched + length-bucketed (ours) vs one example at a time, same model and data.

Reads: nothing (texts generated from a fixed seed, the model is a random-init Llama). Writes: a markdown table
and a JSON line on stdout.

    python -m bench.curriculum --n 2000                 # 4 layers x 256 wide Llama, batch 32, max_length 256

Both methods use the same tokenizer, the same truncation (``max_length``), the same model in eval mode under
``torch.inference_mode`` and the same definition (exp of the mean next-token NLL over the text's tokens); the
baseline is what a first implementation does: ``model(input_ids=ids, labels=ids).loss`` per text.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import resource
import time

import numpy as np
import torch

from bench.data_stages import make_dedup_records
from pipelines.curriculum import perplexities


def texts(n: int, seed: int = 0) -> list[str]:
    """n texts of 1 to ~25 sentences (log-uniform), i.e. ~10 to ~250 tokens: the spread of a real corpus."""
    r = random.Random(seed)
    sents = [x["text"] for x in make_dedup_records(4 * n, seed)]
    return [" ".join(r.choice(sents) for _ in range(max(1, int(math.exp(r.uniform(0, math.log(25))))))) for _ in range(n)]


def model_and_tokenizer(corpus: list[str], layers: int, width: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.modeling import train_tokenizer

    torch.manual_seed(seed)
    tok = train_tokenizer(corpus, vocab)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                      num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64),
                      max_position_embeddings=1024, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


@torch.inference_mode()
def one_at_a_time(model, tok, corpus: list[str], max_length: int) -> np.ndarray:
    out = np.empty(len(corpus))
    for i, t in enumerate(corpus):
        ids = torch.tensor([tok(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]])
        out[i] = math.exp(model(input_ids=ids, labels=ids).loss.item())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.curriculum", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    a = ap.parse_args(argv)
    corpus = texts(a.n)
    model, tok = model_and_tokenizer(corpus, a.layers, a.width, a.vocab)
    lens = np.array([len(x) for x in tok(corpus, add_special_tokens=False, truncation=True,
                                          max_length=a.max_length)["input_ids"]])
    perplexities(model, tok, corpus[:64], a.batch_size, a.max_length, progress=False)  # warm-up, both share it
    t0 = time.perf_counter()
    ours = perplexities(model, tok, corpus, a.batch_size, a.max_length, progress=False)
    t1 = time.perf_counter()
    base = one_at_a_time(model, tok, corpus, a.max_length)
    t2 = time.perf_counter()
    rel = float(np.max(np.abs(ours - base) / base))
    row = {"n": a.n, "tokens": int(lens.sum()), "len_min": int(lens.min()), "len_median": int(np.median(lens)),
           "len_max": int(lens.max()), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "batched_s": round(t1 - t0, 2), "one_at_a_time_s": round(t2 - t1, 2),
           "speedup": round((t2 - t1) / (t1 - t0), 2), "max_rel_diff": rel, "torch_threads": torch.get_num_threads(),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"python {platform.python_version()}")
    print(f"model: Llama {a.layers} layers x {a.width} wide, vocab {len(tok)}, {row['params_m']} M params (random init)")
    print(f"data: {a.n} texts, {row['tokens']} tokens, length min/median/max {row['len_min']}/{row['len_median']}/"
          f"{row['len_max']} tokens (max_length {a.max_length})")
    print("| method | seconds | tokens/s | speedup |\n|---|---|---|---|")
    print(f"| one at a time (`model(ids, labels=ids).loss` per text) | {row['one_at_a_time_s']} | "
          f"{row['tokens'] / (t2 - t1):.0f} | 1.0x |")
    print(f"| ours: `perplexities` (length-bucketed batches of {a.batch_size}) | {row['batched_s']} | "
          f"{row['tokens'] / (t1 - t0):.0f} | {row['speedup']}x |")
    print(f"max relative difference of the perplexities: {rel:.2e}")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
