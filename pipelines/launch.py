"""launch: run a training stage as an ``accelerate launch`` / ``deepspeed`` job (ZeRO-3) and check what it saved.

Reads: the validated :class:`PipelineConfig`, the stage name, its local inputs (``tasks/`` materialised them).
Writes into ``out_dir``: what the stage writes (``model/``...) plus ``deepspeed_config.json``, the exact DeepSpeed
config the job trained with (``tasks/`` logs everything under ``out_dir``, so it becomes the stage's artifact).

Two halves, one module:

* ``launch_stage`` (the Prefect worker's process) generates the DeepSpeed JSON from ``<stage>.deepspeed``, writes
  a job spec, starts ``accelerate launch ... -m pipelines.launch SPEC`` or ``deepspeed ... --module
  pipelines.launch SPEC``, streams every line of the job's output to the stage log, and names the failing rank and
  its error when the job fails. After a good job it checks the saved model WITHOUT DeepSpeed: no empty tensors
  (TRL #4416: 40-byte LoRA saves under ZeRO-3), a ``score`` head on reward models, and the reloaded weights
  reproduce the greedy generations (or reward scores) the trained model gave just before it was saved.
* ``main`` (every rank) rebuilds the config, runs ``pipelines.<stage>.run`` and, on rank 0, writes the
  :class:`StageOutput` and those probe generations as JSON for ``launch_stage`` to read back. Under ZeRO-3 each
  rank holds a shard of every weight, so the stage's ``save_trained`` is given the gathered (consolidated) weights
  and only rank 0 writes them.

Print the DeepSpeed config a stage would train with, or run a job spec (what the launchers call)::

    python -m pipelines.launch --print-config pipelines/configs/demo-zero3.yaml sft
    python -m pipelines.launch SPEC.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipelines.artifacts import StageOutput, read_jsonl, write_json
from pipelines.config import DeepSpeedConfig, PipelineConfig, TrainConfig

DS_CONFIG = "deepspeed_config.json"
CHECK = "launch_check.json"
LAUNCHABLE = ("dapt", "sft", "reward", "dpo", "grpo")  # ppo is our own loop and stays in-process
ROOT = Path(__file__).resolve().parents[1]
PROBE_TOKENS = 16  # greedy tokens per probe prompt: enough to tell two models apart, cheap under ZeRO-3


# ------------------------------------------------------------------------------------------- DeepSpeed config
def deepspeed_config(tcfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON for a training stage. "auto" values are filled by HF Trainer from its own arguments
    (batch size, accumulation, lr, clipping), so the two can never disagree."""
    ds = tcfg.deepspeed or DeepSpeedConfig()
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    for what in ("optimizer", "param"):
        device = getattr(ds, f"offload_{what}")
        if device != "none":
            zero[f"offload_{what}"] = {"device": device, "pin_memory": True,
                                       **({"nvme_path": ds.nvme_path} if device == "nvme" else {})}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size="auto")
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=ds.gather_16bit_weights_on_model_save)
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": tcfg.bf16 if ds.bf16 is None else ds.bf16},
        # DeepSpeed's own AdamW (fused on GPU, its CPU Adam when offloading); HF keeps the lr scheduler.
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }


def world_size(tcfg: TrainConfig) -> int:
    """``num_processes``, else one process per CUDA GPU, else 1."""
    if tcfg.num_processes:
        return tcfg.num_processes
    import torch

    return torch.cuda.device_count() or 1


def preflight(cfg: PipelineConfig) -> None:
    """Checks that need this machine, before any stage starts: QLoRA without CUDA fails here in one line.

    Stages dispatched to the ``gpu`` work pool are checked there (this machine may have no GPU).
    """
    from pipelines.training import check_peft_supported

    for stage in cfg.active_stages():
        scfg = cfg.stage_config(stage)
        if isinstance(scfg, TrainConfig) and scfg.enabled and scfg.work_pool == "local":
            check_peft_supported(scfg.peft, stage)


# ------------------------------------------------------------------------------------------------ parent side
def launch_command(tcfg: TrainConfig, spec: Path, ds_path: Path | None, port: int) -> list[str]:
    n = world_size(tcfg)
    if tcfg.launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port), "--no_local_rank"]
        if tcfg.hostfile:
            cmd += ["--hostfile", tcfg.hostfile]  # num_processes (if set) is then per host
            if tcfg.num_processes:
                cmd += ["--num_gpus", str(tcfg.num_processes)]
        else:
            cmd += ["--num_gpus", str(n)]
        return cmd + ["--module", "pipelines.launch", str(spec)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
           "--main_process_port", str(port), "--dynamo_backend", "no"]
    if ds_path is not None:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(ds_path)]
    elif n > 1:
        import torch

        cmd += ["--multi_gpu"] if torch.cuda.is_available() else ["--cpu"]
    return cmd + ["-m", "pipelines.launch", str(spec)]


def launch_stage(stage: str, cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path, run_id: str | None = None,
                 log: Callable[[str], Any] = print) -> StageOutput:
    """Run ``pipelines.<stage>.run`` under the configured launcher; return its StageOutput once the save checks pass."""
    from pipelines import tracking
    from pipelines.training import check_peft_supported

    if stage not in LAUNCHABLE:
        raise ValueError(f"{stage} cannot run under a launcher (only {', '.join(LAUNCHABLE)}); "
                         f"set {stage}.launcher: inprocess")
    tcfg = cfg.stage_config(stage)
    check_peft_supported(tcfg.peft, stage)  # one clear line before anything is spawned or loaded
    if tcfg.hostfile and not Path(tcfg.hostfile).is_file():
        raise FileNotFoundError(f"{stage}.hostfile {tcfg.hostfile}: file not found")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds_path = None
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "TUNEWRIGHT_HOME": str(tracking.home()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           # torch warns on every ZeRO collective; one line per step would bury the training log
           "PYTHONWARNINGS": ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                    "ignore::FutureWarning:torch.distributed.c10d_logger"]))}
    if run_id:
        env["MLFLOW_RUN_ID"] = run_id
    if tcfg.deepspeed is not None:
        ds_path = out_dir / DS_CONFIG
        write_json(ds_path, deepspeed_config(tcfg))
        env["TUNEWRIGHT_DEEPSPEED_CONFIG"] = str(ds_path)
    # The spec lives beside the checkpoints (shared storage when multi-node), never in out_dir (= the artifacts).
    job_dir = Path(tempfile.mkdtemp(prefix="launch-", dir=_mkdir(inputs["work_dir"]) if "work_dir" in inputs else None))
    spec = job_dir / "spec.json"
    write_json(spec, {"stage": stage, "config": cfg.model_dump_json(), "out_dir": str(out_dir.resolve()),
                      "inputs": {k: str(Path(v).resolve()) for k, v in inputs.items()},
                      "result": str(job_dir / "result.json"), "errors": str(job_dir / "errors")})
    cmd = launch_command(tcfg, spec, ds_path, _free_port())
    log(f"{stage}: {tcfg.launcher} launch, world size {world_size(tcfg)}"
        f"{', ZeRO-' + str(tcfg.deepspeed.zero_stage) if tcfg.deepspeed else ''}: {' '.join(cmd)}")
    t0 = time.time()
    try:
        code, tail = _run_streaming(cmd, env, log)
        if code != 0:
            raise RuntimeError(_failure_message(stage, code, job_dir / "errors", tail))
        result = json.loads((job_dir / "result.json").read_text())
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    out = StageOutput(result["primary"], result["metrics"], result["parent_metrics"], result["summary"])
    out.metrics["launch_world_size"] = float(result["world_size"])
    out.metrics["launch_seconds"] = round(time.time() - t0, 1)
    model_dir = out_dir / out.primary
    if (model_dir / "tunewright_manifest.json").is_file():
        probes = result["probes"].get(out.primary, {})
        verify_saved(model_dir, inputs, probes, cfg.model.trust_remote_code)
        # What the trained model answered before it was saved, and that the reloaded weights matched it.
        write_json(out_dir / CHECK, {"launcher": tcfg.launcher, "world_size": result["world_size"], **probes})
        log(f"{stage}: saved model verified without DeepSpeed (no empty tensors, reloads, same outputs)")
    return out


def _mkdir(p: Path) -> str:
    Path(p).mkdir(parents=True, exist_ok=True)
    return str(p)


def _free_port() -> int:
    """A free TCP port for the rendezvous: two jobs on one host must not both take 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_streaming(cmd: list[str], env: dict[str, str], log: Callable[[str], Any]) -> tuple[int, list[str]]:
    """Run the job, passing each output line to ``log`` as it comes (progress bars at most every 10 s).

    Stopping the stage (Ctrl-C, SIGTERM from the worker) stops the whole process group, every rank included.
    """
    tail: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1, start_new_session=True)
    last_bar = 0.0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # text mode: "\r" (tqdm) ends a line too
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            if "%|" in line and time.time() - last_bar < 10:
                continue
            last_bar = time.time() if "%|" in line else last_bar
            log(line)
        return proc.wait(), list(tail)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        raise


def _failure_message(stage: str, code: int, errors: Path, tail: list[str]) -> str:
    """The first rank that failed (its own report), else the last traceback lines the job printed."""
    reports = sorted((json.loads(p.read_text()) for p in errors.glob("rank*.json")), key=lambda r: r["time"])
    if reports:
        r = reports[0]
        return (f"{stage}: rank {r['rank']} failed: {r['error']}\n" + "".join(r["traceback"][-3000:]))
    start = max((i for i, line in enumerate(tail) if line.startswith("Traceback")), default=max(0, len(tail) - 20))
    last = next((line for line in reversed(tail) if line.strip()), "no output")
    return f"{stage}: the launched job exited with code {code}: {last}\n" + "\n".join(tail[start:][-40:])


# -------------------------------------------------------------------------------------- checks on the saved model
def verify_saved(model_dir: Path, inputs: dict[str, Path], probes: dict[str, Any],
                 trust_remote_code: bool = False) -> None:
    """Load what was saved, without DeepSpeed, and insist it behaves like the model that was trained."""
    import torch

    from pipelines.modeling import check_saved, load_model, load_tokenizer, read_manifest, require_score_head

    check_saved(model_dir)  # no weights, .bin weights, empty tensors
    manifest = read_manifest(model_dir)
    task = manifest.get("task", "causal_lm")
    if task == "reward":
        require_score_head(model_dir)
    if not probes:
        raise RuntimeError(f"{model_dir}: the job recorded no outputs of the trained model to compare with")
    dtype = probes["dtype"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    if manifest.get("kind") == "adapter":
        from peft import PeftModel

        base = load_model(inputs[manifest.get("base_input", "model")], task=task, trust_remote_code=trust_remote_code,
                          dtype=dtype)
        model = PeftModel.from_pretrained(base, str(model_dir), autocast_adapter_dtype=False)
    else:
        model = load_model(model_dir, task=task, trust_remote_code=trust_remote_code, dtype=dtype)
    model = model.to(device).eval()
    tol = 1e-4 if dtype == "float32" else 2e-2  # a numerical tie may flip greedy's choice; a real change may not
    if task == "reward":
        from pipelines.reward import score

        got = score(model, tokenizer, [p["prompt"] for p in probes["items"]],
                    [p["completion"] for p in probes["items"]])
        want = torch.tensor([p["score"] for p in probes["items"]])
        if not torch.allclose(got, want, atol=1e-3 if dtype == "float32" else 5e-2, rtol=tol):
            raise RuntimeError(f"{model_dir}: the reloaded reward model scores {got.tolist()}, "
                               f"the trained one scored {want.tolist()}")
        return
    for p in probes["items"]:
        _check_greedy(model, tokenizer, p["prompt"], p["tokens"], tol, model_dir)


def _check_greedy(model, tokenizer, prompt: str, want: list[int], tol: float, model_dir: Path) -> None:
    import torch

    with torch.no_grad():
        ids = tokenizer(prompt, return_tensors="pt").to(model.device)
        out = model.generate(**ids, max_new_tokens=len(want), do_sample=False, pad_token_id=tokenizer.pad_token_id)
        got = out[0, ids["input_ids"].shape[1]:].tolist()
        if got == want:
            return
        i = next(j for j in range(min(len(got), len(want)) + 1) if j >= len(got) or j >= len(want) or got[j] != want[j])
        if i < len(want):  # teacher-force the trained model's tokens: is its choice at the split a near-tie here?
            ctx = torch.cat([ids["input_ids"][0], torch.tensor(want[:i], dtype=torch.long, device=model.device)])[None]
            logits = model(input_ids=ctx).logits[0, -1].float()
            margin = float(logits.max() - logits[want[i]])
            if margin <= tol * max(1.0, float(logits.abs().max())):
                return
    raise RuntimeError(
        f"{model_dir}: the saved weights do not reproduce the trained model: for prompt {prompt!r} it generated "
        f"{tokenizer.decode(want)!r}, the reloaded model {tokenizer.decode(got)!r}")


# ---------------------------------------------------------------------------------------------- worker side
def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def probe_prompts(stage: str, cfg: PipelineConfig, inputs: dict[str, Path], n: int = 3) -> list[dict[str, str]]:
    """A few inputs from the stage's own data to record the trained model's outputs on (before it is saved)."""
    def last_user(r: dict) -> str:  # a probe only: records the stage itself will reject still give one
        turns = r.get("messages", [])[:-1] or r.get("prompt") or [{"content": "The"}]
        return turns[-1]["content"] if isinstance(turns, list) else str(turns)

    if stage == "reward":
        pairs = read_jsonl(inputs.get("eval_preference") or inputs["preference"])[:n + 1]
        return [{"prompt": last_user(p), "completion": " " + p[k]} for p in pairs
                for k in ("chosen", "rejected")][: 2 * n]
    for key in ("sft", "preference", "prompts"):
        if key in inputs:
            return [{"prompt": last_user(r)} for r in read_jsonl(inputs[key])[:n]]
    if "records" in inputs:
        return [{"prompt": r[cfg.data.text_field][:80]} for r in read_jsonl(inputs["records"])[:n]]
    return [{"prompt": "The"}]


def gathered_state_dict(model, keep: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The full (consolidated) state dict, on every rank: each ZeRO-3 shard is all-gathered one tensor at a time,
    so no rank ever holds more than one whole parameter on the accelerator. Tied weights stay one tensor."""
    import deepspeed

    params = dict(model.named_parameters(remove_duplicate=False))
    gathered: dict[int, Any] = {}
    out: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if keep is not None and not keep(key):
            continue
        p = params.get(key)
        if p is None:  # a buffer: never partitioned
            out[key] = value.detach().cpu().clone()
            continue
        if id(p) not in gathered:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):  # no-op unless ZeRO-3 partitioned it
                gathered[id(p)] = p.detach().cpu().clone()
        out[key] = gathered[id(p)]
    return out


def _adapter_key(key: str) -> bool:
    return "lora_" in key or "modules_to_save" in key


@contextlib.contextmanager
def _plain_loading() -> Iterator[None]:
    """Load models as plain, whole modules even while a ZeRO-3 trainer exists (HF would otherwise partition a
    freshly loaded model with ``zero.Init``, and a partitioned model outside an engine cannot run forward)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def _record(model, tokenizer, task: str, prompts: list[dict[str, str]], world: int) -> dict[str, Any]:
    """The trained model's greedy tokens (or reward scores) on the probe prompts; every rank must call this."""
    import torch

    was_training = model.training
    model.eval()
    items: list[dict[str, Any]] = []
    try:
        if task == "reward":
            from pipelines.reward import score

            s = score(model, tokenizer, [p["prompt"] for p in prompts], [p["completion"] for p in prompts])
            items = [{**p, "score": float(v)} for p, v in zip(prompts, s)]
        else:
            device = next(model.parameters()).device
            with torch.no_grad():
                for p in prompts:
                    ids = tokenizer(p["prompt"], return_tensors="pt").to(device)
                    out = model.generate(**ids, max_new_tokens=PROBE_TOKENS, do_sample=False, synced_gpus=world > 1,
                                         pad_token_id=tokenizer.pad_token_id)
                    items.append({**p, "tokens": out[0, ids["input_ids"].shape[1]:].tolist()})
    finally:
        model.train(was_training)
    return {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "items": items}


@contextlib.contextmanager
def zero3_session(module, prompts: list[dict[str, str]], probes: dict[str, Any]) -> Iterator[None]:
    """While a stage runs under a launcher: its ``save_trained`` saves gathered weights from rank 0 only (after
    recording the probe outputs), and its ``load_model`` loads plain modules (see ``_plain_loading``)."""
    from pipelines import training

    rank, world = _rank()
    original_save, original_load = training.save_trained, getattr(module, "load_model", None)

    def save_trained(model, tokenizer, out_dir: Path, manifest: dict[str, Any]) -> None:
        from peft import PeftModel

        probes[Path(out_dir).name] = _record(model, tokenizer, manifest.get("task", "causal_lm"), prompts, world)
        state = gathered_state_dict(model, _adapter_key if isinstance(model, PeftModel) else None)
        if rank == 0:
            cls_save = type(model).save_pretrained
            model.save_pretrained = lambda d, **kw: cls_save(model, d, **{**kw, "state_dict": state})
            try:
                original_save(model, tokenizer, out_dir, manifest)
            finally:
                del model.save_pretrained
        _barrier()  # the other ranks may read the saved model next (reward reloads it)

    def load_model(*args, **kwargs):
        with _plain_loading():
            return original_load(*args, **kwargs)

    module.save_trained = save_trained
    if original_load is not None:
        module.load_model = load_model
    try:
        yield
    finally:
        module.save_trained = original_save
        if original_load is not None:
            module.load_model = original_load


def run_spec(spec_path: Path) -> int:
    """One rank of a launched job."""
    spec = json.loads(Path(spec_path).read_text())
    rank, world = _rank()
    try:
        cfg = PipelineConfig.model_validate_json(spec["config"])
        inputs = {k: Path(v) for k, v in spec["inputs"].items()}
        module = importlib.import_module(f"pipelines.{spec['stage']}")
        probes: dict[str, Any] = {}
        with zero3_session(module, probe_prompts(spec["stage"], cfg, inputs), probes):
            out = module.run(cfg, inputs, Path(spec["out_dir"]))
        if rank == 0:
            write_json(Path(spec["result"]), {**asdict(out), "probes": probes, "world_size": world})
        return 0
    except BaseException as e:
        tb = traceback.format_exc()
        Path(spec["errors"]).mkdir(parents=True, exist_ok=True)
        write_json(Path(spec["errors"]) / f"rank{rank}.json",
                   {"rank": rank, "time": time.time(), "error": f"{type(e).__name__}: {e}".splitlines()[0],
                    "traceback": tb.splitlines(keepends=True)})
        print(f"[tunewright] rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", nargs="?", type=Path, help="job spec written by launch_stage (what the launchers run)")
    ap.add_argument("--print-config", nargs=2, metavar=("CONFIG", "STAGE"), help="print a stage's DeepSpeed JSON")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # some launchers pass it
    args = ap.parse_args(argv)
    if args.print_config:
        from pipelines.config import ConfigError, load_config

        try:
            cfg = load_config(args.print_config[0])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        tcfg = cfg.stage_config(args.print_config[1]) if args.print_config[1] in LAUNCHABLE else None
        if tcfg is None:
            print(f"error: {args.print_config[1]}: not a launchable stage ({', '.join(LAUNCHABLE)})", file=sys.stderr)
            return 2
        if tcfg.deepspeed is None:
            print(f"note: {args.print_config[1]} has no deepspeed block, so it does not train under DeepSpeed; "
                  "this is what the defaults would give", file=sys.stderr)
        print(json.dumps(deepspeed_config(tcfg), indent=2))
        return 0
    if args.spec is None or not args.spec.is_file():
        ap.error("a job spec file is required")
    return run_spec(args.spec)


if __name__ == "__main__":
    raise SystemExit(main())
