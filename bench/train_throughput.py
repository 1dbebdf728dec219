"""Training throughput: TRL 1.16's SFT defaults vs tunewright's GPU recipe, same model, data and steps, side by side.

Reads: nothing (random-init model of Llama-3.2-1B's shape, synthetic token sequences). Writes: a markdown table on
stdout (and ``--json PATH``). Each variant runs in its own process (its own peak memory; ZeRO-3 variants under
``accelerate launch --use_deepspeed`` with the DeepSpeed JSON that ``pipelines.launch`` generates).

    python -m bench.train_throughput                       # GPU: 1B shape, all 8 variants (~10-15 min on one H100)
    python -m bench.train_throughput --smoke               # CPU: tiny shape, a few steps (tests the plumbing)
    python -m bench.train_throughput --variants tunewright-lora,trl-lora-zero3

Variants = recipe x method x parallelism:
* recipe ``trl``: ``SFTConfig()`` as shipped (padded batches of 8, gradient checkpointing, bf16, the model's
  default attention) -- what you get by changing nothing.
* recipe ``tunewright``: packing (best-fit decreasing) into padding-free rows with ``position_ids``: flash-attention
  varlen when ``flash_attn`` is installed, else SDPA, where transformers turns the position_ids into a block-diagonal
  mask, so packed examples never attend to each other (``--smoke`` checks this); Liger kernels when installed; bf16.
* method ``lora`` (r 16, all linear layers) or ``full``; parallelism one device or ZeRO-3 over all GPUs.

Numbers: tokens/s counts real tokens only (no padding); MFU = 6 * N * tokens/s / (devices * peak bf16 FLOP/s),
N = all parameters (attention FLOPs ignored; the same formula for LoRA, whose true FLOPs are ~2/3 of that); peak
memory = ``torch.cuda.max_memory_allocated`` (rank 0), or the process's max RSS on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
VARIANTS = [f"{r}-{m}{p}" for p in ("", "-zero3") for m in ("lora", "full") for r in ("trl", "tunewright")]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "L4": 121e12, "A10": 125e12, "4090": 165e12}  # dense bf16 tensor-core FLOP/s (SXM parts)


def lengths(n: int, median: int, max_len: int, seed: int) -> list[int]:
    """Log-normal example lengths (sigma 0.6: a long right tail, as in instruction data), clipped to max_len."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(np.log(median), 0.6, n), 8, max_len)]


def dataset(n: int, median: int, max_len: int, vocab: int, seed: int):
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed + 1)
    return Dataset.from_dict({"input_ids": [rng.integers(4, vocab, size=k).tolist()
                                            for k in lengths(n, median, max_len, seed)]})


def tokenizer():
    """A stand-in tokenizer: the data is already token ids; the trainer only needs pad/eos."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>")


def attention() -> str:
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def recipe(name: str, max_len: int) -> dict:
    """SFTConfig arguments of a recipe (on top of what every variant shares)."""
    if name == "trl":
        return {}  # TRL's defaults, untouched
    return {"packing": True, "packing_strategy": "bfd", "padding_free": True, "max_length": max_len, "bf16": True,
            "use_liger_kernel": bool(importlib.util.find_spec("liger_kernel"))}


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


# --------------------------------------------------------------------------------------------- one variant
def run_variant(variant: str, a: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rec, method, *par = variant.split("-")
    zero3 = bool(par)
    torch.manual_seed(0)
    shape = TINY if a.smoke else LLAMA_1B
    cuda = torch.cuda.is_available()
    attn = attention() if rec == "tunewright" else None  # TRL: the model's default (sdpa)
    model = LlamaForCausalLM(LlamaConfig(**shape, **({"attn_implementation": attn} if attn else {})))
    n_params = sum(p.numel() for p in model.parameters())
    ds_path = None
    if zero3:
        from pipelines.config import SFTStageConfig
        from pipelines.launch import deepspeed_config

        bf16 = not a.smoke
        ds_path = Path(tempfile.mkdtemp()) / "ds.json"
        ds_path.write_text(json.dumps(deepspeed_config(SFTStageConfig(launcher="accelerate", bf16=bf16,
                                                                      deepspeed={"zero_stage": 3}))))
    kw = dict(output_dir=tempfile.mkdtemp(), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
              report_to=[], save_strategy="no", logging_steps=max(1, a.steps), disable_tqdm=True, seed=0,
              dataloader_num_workers=0, use_cpu=not cuda, **recipe(rec, a.max_length))
    if ds_path:
        kw["deepspeed"] = str(ds_path)
    if a.smoke:
        kw["bf16"] = False  # CPU smoke: fp32 (bf16 on a CPU measures nothing we care about)
    args = SFTConfig(**kw)
    peft = None
    if method == "lora":
        from peft import LoraConfig

        peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    data = dataset(a.examples, a.median, a.max_length, shape["vocab_size"], 0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer(), peft_config=peft)
    count = {"tokens": 0}
    loss_fn = trainer.compute_loss

    def counting_loss(model, inputs, *args, **kwargs):  # the micro-batches actually trained on, counted once each
        m = inputs.get("attention_mask")  # real tokens: the mask where there is padding, all of them padding-free
        count["tokens"] += int(m.sum()) if m is not None else int(inputs["input_ids"].numel())
        return loss_fn(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting_loss
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):  # marks[0]: training starts; marks[i]: step i ends
        def on_train_begin(self, *_, **__):
            marks.append((time.perf_counter(), 0))

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), count["tokens"]))

    trainer.add_callback(Clock())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    w = min(a.warmup, len(marks) - 2)  # timed: the steps after the first `warmup` ones
    (t0, k0), (t1, k1) = marks[w], marks[-1]
    tokens = k1 - k0
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([tokens], dtype=torch.float64, device="cuda" if cuda else "cpu")
        torch.distributed.all_reduce(t)
        tokens, world = int(t.item()), torch.distributed.get_world_size()
    tps = tokens / (t1 - t0)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_flops(device, a.peak_tflops)
    mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "recipe": rec, "method": method, "zero3": zero3, "world_size": world,
            "device": device, "params": n_params, "attention": model.config._attn_implementation,
            "packing": bool(args.packing), "padding_free": bool(args.padding_free), "bf16": bool(args.bf16),
            "liger": bool(args.use_liger_kernel), "gradient_checkpointing": bool(args.gradient_checkpointing),
            "steps_timed": len(marks) - 1 - w, "tokens_per_s": tps,
            "mfu": 6 * n_params * tps / (world * peak) if peak else None, "peak_mem_gib": mem / 2**30}


def cross_contamination(smoke_shape: dict = TINY) -> float:
    """Max |logit difference| between examples packed padding-free (position_ids) and the same examples run alone:
    0 up to float error when packed examples cannot see each other."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**smoke_shape, attn_implementation=attention())).eval()
    seqs = [torch.randint(4, smoke_shape["vocab_size"], (k,)).tolist() for k in (7, 12, 5)]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": s} for s in seqs])
    with torch.no_grad():  # use_cache=False as in TRL's compute_loss: with a KV cache transformers skips the
        # packed-sequence mask and SDPA/eager attention would cross the boundaries
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in seqs])
    return float((together - alone).abs().max())


# ------------------------------------------------------------------------------------------------ driver
def launch(variant: str, a: argparse.Namespace, out: Path) -> dict:
    """One variant in its own process: plain python, or accelerate + DeepSpeed for ZeRO-3 (all GPUs, else 1)."""
    import torch

    worker = [str(ROOT / "bench" / "train_throughput.py"), "--worker", variant, "--out", str(out), *a.passthrough]
    if variant.endswith("-zero3"):
        n = torch.cuda.device_count() or 1
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
               "--main_process_port", "0", "--dynamo_backend", "no", "--use_deepspeed", *worker]
    else:
        cmd = [sys.executable, *worker]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        return {"variant": variant, "error": (p.stderr or p.stdout).strip().splitlines()[-1][:200]}
    return json.loads(out.read_text())


def table(rows: list[dict]) -> str:
    head = ["variant", "tokens/s", "MFU", "peak mem GiB", "vs TRL", "attention", "packing", "liger", "devices"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {r["variant"]: r for r in rows}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        base = by.get(r["variant"].replace("tunewright", "trl"), {})
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base.get("tokens_per_s") else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.2f} | {speedup} | "
                     f"{r['attention']} | {'yes' if r['packing'] else 'no'} | {'yes' if r['liger'] else 'no'} | "
                     f"{r['world_size']} x {r['device']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few steps, fp32: runs on CPU in about a minute")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default 40; smoke 4)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default 5; smoke 1)")
    ap.add_argument("--batch-size", type=int, default=8, help="per-device rows (TRL's default is 8)")
    ap.add_argument("--max-length", type=int, default=None, help="TRL's default 1024 (smoke 256)")
    ap.add_argument("--median", type=int, default=None, help="median example length in tokens (default 270)")
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s (default: by GPU name)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.steps = a.steps or (4 if a.smoke else 40)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 5)
    a.max_length = a.max_length or (256 if a.smoke else 1024)
    a.median = a.median or (60 if a.smoke else 270)
    a.examples = a.examples or (a.steps * a.batch_size * 8)
    if a.worker:
        res = run_variant(a.worker, a)
        if int(os.environ.get("RANK", "0")) == 0:
            a.out.write_text(json.dumps(res))
        return 0
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]}; choose from {', '.join(VARIANTS)}")
    a.passthrough = [f"--steps={a.steps}", f"--warmup={a.warmup}", f"--batch-size={a.batch_size}",
                     f"--max-length={a.max_length}", f"--median={a.median}", f"--examples={a.examples}",
                     *(["--smoke"] if a.smoke else []), *([f"--peak-tflops={a.peak_tflops}"] if a.peak_tflops else [])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in a.variants.split(","):
            t = time.time()
            rows.append(launch(v, a, Path(tmp) / f"{v}.json"))
            print(f"{v}: {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    contamination = cross_contamination()
    ls = lengths(a.examples, a.median, a.max_length, 0)
    print(f"data: {a.examples} examples, median {sorted(ls)[len(ls) // 2]} tokens, max {max(ls)}; "
          f"{a.steps} steps ({a.warmup} untimed), {a.batch_size} rows/device, max_length {a.max_length}\n"
          f"packed (padding-free, {attention()}) vs separate logits: max |diff| = {contamination:.1e} -> "
          f"{'no cross-contamination' if contamination < 1e-4 else 'PACKED EXAMPLES SEE EACH OTHER'}\n")
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "cross_contamination": contamination}, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
