"""ppo: classic RLHF PPO (Ziegler et al. 2019; Ouyang et al. 2022) against the reward model, KL-penalised to SFT.

Reads: ``inputs["prompts"]`` (JSONL ``{"prompt": "Question: ...\\nAnswer:"}``), ``inputs["model"]`` (the SFT model,
full weights), ``inputs["reward"]`` (the reward model, full weights, a one-label sequence classifier) and
``inputs["work_dir"]`` (checkpoints; stable across retries of the stage).
Writes: ``model/`` (LoRA adapter on the SFT model, or full weights) + tokenizer + manifest, ``ppo_history.jsonl``
(one line per iteration), ``ppo_curves.png`` (reward and KL over iterations), and while training
``work_dir/checkpoint-<iteration>/``.

One iteration (``ppo.max_steps`` of them):
1. rollout: sample ``rollout_batch_size`` prompts, generate answers with the policy (sampling at ``temperature``,
   at most ``max_new_tokens``, everything after the first EOS masked out);
2. score: the frozen reward model scores prompt + answer (as it was trained: text + EOS); each answer token also
   pays ``-kl_coef * (log p_policy - log p_ref)``; the reference is the SFT model: with LoRA the same network with
   the adapter disabled (no second copy), with ``peft.method: full`` a frozen copy;
3. advantages by GAE over answer tokens, using a value model initialised from the reward model (its ``score`` head
   on every position's hidden state), whitened over the batch;
4. ``ppo_epochs`` passes over shuffled mini-batches: clipped policy loss + ``vf_coef`` * clipped value loss, and
   with ``sft_loss_weight`` > 0 that weight x the NLL of one batch of demonstrations (``inputs["preference"]``: the
   chosen answers of the preference training pairs; RPO's term in DPO, PPO-ptx's mix with demonstrations), which
   teaches answers the policy never samples in a rollout (a refusal of a name it does not know), logged as
   ``sft_loss``; with ``ptx_coef`` > 0 that weight x the language-modelling loss of one packed batch of the corpus
   (``inputs["records"]``; InstructGPT's PPO-ptx), which keeps facts no rollout prompt asks about, as ``ptx_loss``;
   with ``sft_mix_coef`` > 0 that weight x the NLL of one batch of the sft conversations (``inputs["sft"]``, loss on
   the assistant turns), which keeps sft's answering skill, as ``sft_mix_loss``.
The KL coefficient adapts towards ``target_kl`` (nats per answer) with Ziegler's proportional controller.

Checkpoints (every ``save_steps`` iterations) hold the trainable policy weights (the adapter), the value model,
the optimiser, the KL controller, the torch RNG, the iteration and the history, written to a temporary directory
and renamed, so a half-written checkpoint is never picked up. A restarted run resumes from the newest one and ends
where an uninterrupted run would. Run alone::

    python -m pipelines.ppo PROMPTS.jsonl SFT_MODEL_DIR REWARD_MODEL_DIR OUT_DIR [--max-steps 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.artifacts import StageOutput, read_jsonl, write_jsonl
from pipelines.config import PipelineConfig, PPOStageConfig
from pipelines.modeling import LoadSpec, load_model, load_spec, load_tokenizer, pack_documents, seed_everything
from pipelines.training import check_peft_supported, lora_config, save_trained

log = logging.getLogger("tunewright.ppo")
STATS = ("reward_mean", "reward_std", "kl", "kl_coef", "entropy", "clipfrac", "policy_loss", "value_loss",
         "explained_variance", "response_length", "learning_rate",
         "sft_loss", "ptx_loss", "sft_mix_loss")  # the last three: only when configured
MIXES = ("sft_loss", "ptx_loss", "sft_mix_loss")
Demo = tuple[list[int], list[int]]  # (token ids, loss mask: 1 on the answer) of one demonstration


# ------------------------------------------------------------------------------------------------ the PPO maths
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1 (over everything, or along ``dim``)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance of the masked entries."""
    n = mask.sum()
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * n / (n - 1) if n > 1 else var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale the masked entries to unit variance (and zero mean unless ``shift_mean`` is False); padding -> 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over ``[batch, tokens]`` with right padding; returns (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero after
    an answer's last token (the episode ends there). returns = A + V are the value targets.
    """
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


class AdaptiveKLController:
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon. Fixed if no target."""

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = float(init_kl_coef), target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), state["target"], int(state["horizon"])


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)); also the clipped share."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> torch.Tensor:
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -eps, eps)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis: logsumexp(z) - sum softmax(z) z."""
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def lr_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """The learning-rate multiplier at iteration ``step`` (0-based) for the config's ``lr_scheduler``."""
    if step < warmup and kind != "constant":
        return (step + 1) / (warmup + 1)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - progress) if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------- model passes
@dataclass
class Batch:
    """Prompts left-padded to a common width ``n_prompt``, answers right-padded after them."""

    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    n_prompt: int
    mask: torch.Tensor  # [B, T] float: 1 on answer tokens up to and including the first EOS

    @property
    def position_ids(self) -> torch.Tensor:
        # Left padding: positions must count real tokens only (generate() does the same).
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def rows(self, idx: torch.Tensor) -> Batch:
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.n_prompt, self.mask[idx])

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.n_prompt:]


def response_logits(model, b: Batch, temperature: float) -> torch.Tensor:
    """Logits that predict each answer token, at the sampling temperature: [B, T, V]."""
    out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False)
    return out.logits[:, b.n_prompt - 1: -1].float() / temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)


def token_values(value_model, b: Batch) -> torch.Tensor:
    """Per-token values: the reward model's ``score`` head on every hidden state (not just the last one): [B, T]."""
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                      use_cache=False).last_hidden_state
    return value_model.score(hidden).squeeze(-1)[:, b.n_prompt - 1: -1].float()


@torch.no_grad()
def rollout(policy, tokenizer, prompts: list[str], pcfg: PPOStageConfig, device: torch.device) -> Batch:
    """Sample one answer per prompt (batched, left padding) and lay everything out as one :class:`Batch`."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    max_prompt = max(8, pcfg.max_length - pcfg.max_new_tokens)
    queries = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt:] for p in prompts]
    answers: list[list[int]] = []
    for s in range(0, len(queries), pcfg.batch_size):
        chunk = queries[s: s + pcfg.batch_size]
        width = max(len(q) for q in chunk)
        ids = torch.tensor([[pad] * (width - len(q)) + q for q in chunk], device=device)
        attn = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in chunk], device=device)
        out = policy.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=pcfg.temperature,
                              top_k=0, top_p=1.0, max_new_tokens=pcfg.max_new_tokens, eos_token_id=eos,
                              pad_token_id=pad)
        for row in out[:, width:].tolist():
            answers.append(row[: row.index(eos) + 1] if eos in row else row)
    answers = [a or [eos] for a in answers]  # an empty answer still ends the episode on one token
    n_prompt, n_resp = max(len(q) for q in queries), max(len(a) for a in answers)
    ids = torch.full((len(queries), n_prompt + n_resp), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (q, a) in enumerate(zip(queries, answers)):
        ids[i, n_prompt - len(q): n_prompt + len(a)] = torch.tensor(q + a)
        attn[i, n_prompt - len(q): n_prompt + len(a)] = 1
    return Batch(ids.to(device), attn.to(device), n_prompt, attn[:, n_prompt:].float().to(device))


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class PPOResult:
    policy: torch.nn.Module
    value_model: torch.nn.Module
    tokenizer: object
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def prompts_for(iteration: int, n_prompts: int, k: int, seed: int, salt: str = "ppo") -> list[int]:
    """Indices of the prompts of an iteration: successive slices of per-epoch shuffles (a function of the iteration,
    so a resumed run draws exactly what an uninterrupted one would). ``salt`` names an independent sequence (the
    demonstrations draw theirs per optimiser step)."""
    orders: dict[int, list[int]] = {}
    out = []
    for pos in range(iteration * k, (iteration + 1) * k):
        epoch, i = divmod(pos, n_prompts)
        if epoch not in orders:
            orders[epoch] = list(range(n_prompts))
            random.Random(f"{salt}-{seed}-{epoch}").shuffle(orders[epoch])
        out.append(orders[epoch][i])
    return out


def demonstrations(renderer, pairs: list[dict], max_length: int) -> list[Demo]:
    """The chosen answer of each preference pair as (ids, loss mask on the answer), rendered as sft and dpo render it."""
    out = []
    for p in pairs:
        prompt, answer = renderer.encode_pair(p["prompt"], p["chosen"], max_length)
        out.append((prompt + answer, [0] * len(prompt) + [1] * len(answer)))
    return out


def conversations(renderer, records: list[dict], max_length: int) -> list[Demo]:
    """Canonical ``{"messages": [...]}`` records as sft encodes them: (ids, loss mask on the assistant turns)."""
    return [renderer.encode(r["messages"], max_length) for r in records]


def demonstration_batch(demos: list[Demo], idx: list[int], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 where the loss mask is 0) of the demonstrations ``idx``."""
    rows = [demos[i] for i in idx]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for r, (tok, mask) in enumerate(rows):
        t = torch.tensor(tok)
        ids[r, : len(tok)] = t
        labels[r, : len(tok)] = torch.where(torch.tensor(mask, dtype=torch.bool), t, -100)
        attn[r, : len(tok)] = 1
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def num_iterations(pcfg: PPOStageConfig, n_prompts: int) -> int:
    if pcfg.max_steps > 0:
        return pcfg.max_steps
    return max(1, math.ceil(pcfg.epochs * n_prompts / pcfg.rollout_batch_size))


def train(prompts: list[str], model_dir: Path, reward_dir: Path, pcfg: PPOStageConfig, seed: int, work_dir: Path,
          spec: LoadSpec | None = None, suffix: str | None = None, demos: list[Demo] | None = None,
          corpus_rows: list[dict] | None = None, sft_demos: list[Demo] | None = None) -> PPOResult:
    """The PPO loop; resumes from the newest complete checkpoint in ``work_dir``. Returns the trained models.

    ``prompts`` are rendered generation prompts; ``suffix`` is the template's end of turn, appended to an answer
    for the reward model exactly as it was trained (EOS by default); ``demos`` feed ``sft_loss_weight``'s term and
    ``corpus_rows`` (:func:`pipelines.modeling.pack_documents` rows) ``ptx_coef``'s, ``sft_demos`` (the sft
    conversations, :func:`conversations`) ``sft_mix_coef``'s."""
    from peft import get_peft_model
    from tqdm.auto import tqdm

    from pipelines.reward import score

    check_peft_supported(pcfg.peft, "ppo")
    if pcfg.peft.method == "qlora":
        raise ValueError("ppo.peft.method 'qlora' is not supported by our PPO loop; use 'lora' or 'full'")
    if pcfg.launcher != "inprocess":
        raise ValueError("ppo runs in-process (our own loop, no DeepSpeed launcher); set ppo.launcher: inprocess")
    if not prompts:
        raise ValueError("ppo: no prompts to roll out")
    if pcfg.sft_loss_weight > 0 and not demos:
        raise ValueError("ppo.sft_loss_weight > 0 needs demonstrations (the preference pairs' chosen answers)")
    if pcfg.ptx_coef > 0 and not corpus_rows:
        raise ValueError("ppo.ptx_coef > 0 needs the corpus (packed rows)")
    if pcfg.sft_mix_coef > 0 and not sft_demos:
        raise ValueError("ppo.sft_mix_coef > 0 needs the sft conversations")
    ptx = ({k: torch.tensor([r[k] for r in corpus_rows]) for k in ("input_ids", "labels", "position_ids")}
           if pcfg.ptx_coef > 0 else None)
    spec = spec or LoadSpec()
    device = spec.torch_device()
    kw = {"dtype": spec.dtype, "trust_remote_code": spec.trust_remote_code}
    seed_everything(seed)
    tokenizer = load_tokenizer(model_dir, spec.trust_remote_code)

    def demo_batch(rows: list[Demo]):
        return lambda idx: demonstration_batch(rows, idx, tokenizer.pad_token_id, device)

    # the extra losses, one batch of each per optimiser step: (history key, weight, rows, sampling salt, batch of rows)
    terms = [t for t in (("sft_loss", pcfg.sft_loss_weight, demos, "ppo-demo", demo_batch(demos)),
                         ("ptx_loss", pcfg.ptx_coef, corpus_rows, "ppo-ptx",
                          lambda idx: {k: v[idx].to(device) for k, v in ptx.items()}),
                         ("sft_mix_loss", pcfg.sft_mix_coef, sft_demos, "ppo-sft", demo_batch(sft_demos)))
             if t[1] > 0]
    policy = load_model(model_dir, **kw)
    peft_cfg = lora_config(pcfg.peft)
    ref_model = None
    if peft_cfg is not None:
        policy = get_peft_model(policy, peft_cfg)  # reference = this network under disable_adapter()
    else:
        ref_model = load_model(model_dir, **kw).to(device).eval().requires_grad_(False)
    value_model = load_model(reward_dir, task="reward", **kw)
    reward_model = load_model(reward_dir, task="reward", **kw)
    reward_model.to(device).eval().requires_grad_(False)
    reward_tok = load_tokenizer(reward_dir, spec.trust_remote_code)
    # Dropout stays off (eval mode) throughout: the log-probs of the rollout and of the first update must agree.
    policy.to(device).eval()
    value_model.to(device).eval()
    pol_params = [p for p in policy.parameters() if p.requires_grad]
    val_params = list(value_model.parameters())
    opt = torch.optim.AdamW([{"params": pol_params}, {"params": val_params}], lr=pcfg.learning_rate,
                            weight_decay=pcfg.weight_decay)
    kl_ctl = AdaptiveKLController(pcfg.init_kl_coef, pcfg.target_kl, pcfg.kl_horizon)
    total = num_iterations(pcfg, len(prompts))
    warmup = int(pcfg.warmup_ratio * total)
    history: list[dict] = []
    start = 0
    ckpt = latest_checkpoint(work_dir)
    if ckpt is not None:
        start, history = load_checkpoint(ckpt, policy, value_model, opt, kl_ctl)
        log.info("ppo: resuming from %s (iteration %d of %d)", ckpt, start, total)

    def reference_logits(b: Batch) -> torch.Tensor:
        if ref_model is not None:
            return response_logits(ref_model, b, pcfg.temperature)
        with policy.disable_adapter():
            return response_logits(policy, b, pcfg.temperature)

    bar = tqdm(range(start, total), initial=start, total=total, desc="ppo", file=sys.stderr,
               disable=os.environ.get("TUNEWRIGHT_NO_PROGRESS") == "1")
    for it in bar:
        lr = pcfg.learning_rate * lr_factor(pcfg.lr_scheduler, it, total, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        # 1. rollout
        batch_prompts = [prompts[i] for i in prompts_for(it, len(prompts), pcfg.rollout_batch_size, seed)]
        b = rollout(policy, tokenizer, batch_prompts, pcfg, device)
        mask, n = b.mask, b.mask.shape[0]
        # 2. old log-probs, reference log-probs, values, scores
        with torch.no_grad():
            old_logp, ref_logp, old_values = (torch.empty_like(mask) for _ in range(3))
            for s in range(0, n, pcfg.batch_size):
                rows = slice(s, s + pcfg.batch_size)
                mb = b.rows(torch.arange(n, device=device)[rows])
                old_logp[rows] = token_logprobs(response_logits(policy, mb, pcfg.temperature), mb.responses)
                ref_logp[rows] = token_logprobs(reference_logits(mb), mb.responses)
                old_values[rows] = token_values(value_model, mb)
            old_logp, ref_logp, old_values = old_logp * mask, ref_logp * mask, old_values * mask
            texts = [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                     for r, m in zip(b.responses, mask)]
            scores = score(reward_model, reward_tok, batch_prompts, texts, batch_size=pcfg.batch_size,
                           max_length=pcfg.max_length, suffix=suffix).to(device)
            # 3. per-token rewards: KL penalty everywhere, the score on the last answer token; GAE; whitening
            kl_tokens = (old_logp - ref_logp) * mask
            rewards = -kl_ctl.value * kl_tokens
            last = mask.sum(1).long() - 1
            rewards[torch.arange(n, device=device), last] += scores
            if pcfg.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, mask, pcfg.gamma, pcfg.lam)
            advantages = whiten(advantages, mask)
            explained_var = 1.0 - masked_var(returns - old_values, mask) / masked_var(returns, mask).clamp(min=1e-8)
        # 4. PPO epochs over shuffled mini-batches (micro-batches of batch_size accumulate into one step)
        acc = {"policy_loss": [], "value_loss": [], "clipfrac": [], "entropy": [], **{t[0]: [] for t in terms}}
        steps_per_iteration = pcfg.ppo_epochs * math.ceil(n / pcfg.mini_batch_size)
        step = it * steps_per_iteration
        for _ in range(pcfg.ppo_epochs):
            perm = torch.randperm(n).to(device)
            for m0 in range(0, n, pcfg.mini_batch_size):
                mini = perm[m0: m0 + pcfg.mini_batch_size]
                opt.zero_grad(set_to_none=True)
                for c0 in range(0, len(mini), pcfg.batch_size):
                    idx = mini[c0: c0 + pcfg.batch_size]
                    mb, m = b.rows(idx), mask[idx]
                    logits = response_logits(policy, mb, pcfg.temperature)
                    logp = token_logprobs(logits, mb.responses)
                    pg, clipfrac = policy_loss(logp, old_logp[idx], advantages[idx], m, pcfg.cliprange)
                    vf = value_loss(token_values(value_model, mb), old_values[idx], returns[idx], m,
                                    pcfg.cliprange_value)
                    ((pg + pcfg.vf_coef * vf) * len(idx) / len(mini)).backward()
                    with torch.no_grad():
                        acc["entropy"].append(float(masked_mean(entropy_from_logits(logits), m)))
                    acc["policy_loss"].append(float(pg.detach()))
                    acc["value_loss"].append(float(vf.detach()))
                    acc["clipfrac"].append(float(clipfrac))
                for key, weight, rows, salt, batch in terms:  # demonstrations, corpus, sft conversations
                    idx = prompts_for(step, len(rows), min(pcfg.batch_size, len(rows)), seed, salt)
                    loss = policy(**batch(idx), use_cache=False).loss
                    (weight * loss).backward()
                    acc[key].append(float(loss.detach()))
                step += 1
                torch.nn.utils.clip_grad_norm_(pol_params + val_params, pcfg.max_grad_norm)
                opt.step()
        seq_kl = float(kl_tokens.sum(1).mean())
        row = {"iteration": it + 1, "reward_mean": float(scores.mean()),
               "reward_std": float(scores.std()) if n > 1 else 0.0, "kl": seq_kl, "kl_coef": kl_ctl.value,
               **{k: sum(v) / len(v) for k, v in acc.items()}, "explained_variance": float(explained_var),
               "response_length": float(mask.sum(1).mean()), "learning_rate": lr}
        kl_ctl.update(seq_kl, n)
        history.append(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{seq_kl:.2f}")
        log.info("ppo iteration %d/%d: %s", it + 1, total,
                 " ".join(f"ppo/{k}={row[k]:.4g}" for k in STATS if k in row))
        if pcfg.save_steps and (it + 1) % pcfg.save_steps == 0:
            save_checkpoint(work_dir, it + 1, policy, value_model, opt, kl_ctl, history)
    bar.close()
    return PPOResult(policy, value_model, tokenizer, history, start)


# ------------------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(work_dir: Path | None) -> Path | None:
    """Newest ``checkpoint-N`` with its ``state.json`` (written last, and the directory is renamed into place)."""
    if work_dir is None or not Path(work_dir).is_dir():
        return None
    done = [p for p in Path(work_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().contiguous().cpu() for k, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(work_dir: Path, iteration: int, policy, value_model, opt, kl_ctl: AdaptiveKLController,
                    history: list[dict], keep: int = 2) -> Path:
    from safetensors.torch import save_file

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    final = work_dir / f"checkpoint-{iteration}"
    tmp = work_dir / f".checkpoint-{iteration}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_trainable(policy), str(tmp / "policy.safetensors"))  # the LoRA adapter (or all weights if full)
    save_file(_trainable(value_model), str(tmp / "value.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, "kl_controller": kl_ctl.state_dict(),
                                                "history": history}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # Keep the newest ``keep`` complete checkpoints; drop older ones and leftovers of interrupted writes.
    done = sorted((p for p in work_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                   and (p / "state.json").is_file()), key=lambda p: int(p.name.split("-")[-1]))
    stale = [p for p in work_dir.glob("checkpoint-*") if p not in done]
    stale += [p for p in work_dir.glob(".checkpoint-*.tmp-*")]
    for p in done[:-keep] + stale:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, policy, value_model, opt, kl_ctl: AdaptiveKLController) -> tuple[int, list[dict]]:
    from safetensors.torch import load_file

    for model, name in ((policy, "policy"), (value_model, "value")):
        saved = load_file(str(ckpt / f"{name}.safetensors"))
        params = dict(model.named_parameters())
        if set(saved) != set(_trainable(model)):
            raise RuntimeError(f"{ckpt}: {name} weights do not match this model (was the config changed?)")
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((ckpt / "state.json").read_text())
    kl_ctl.load_state_dict(state["kl_controller"])
    return int(state["iteration"]), state["history"]


# --------------------------------------------------------------------------------------------------- the stage
def final_metrics(history: list[dict]) -> dict[str, float]:
    """The last iteration's numbers as ``ppo/<name>``, plus the run's means and the first reward."""
    if not history:
        return {}
    out = {f"ppo/{k}": float(history[-1][k]) for k in STATS if k in history[-1]}
    for k in ("reward_mean", "kl", "entropy", "clipfrac"):
        out[f"ppo/{k}_avg"] = sum(h[k] for h in history) / len(history)
    out["ppo/reward_mean_first"] = float(history[0]["reward_mean"])
    out["global_step"] = float(history[-1]["iteration"])
    return out


def chart(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [h["iteration"] for h in history]
    mean = [h["reward_mean"] for h in history]
    std = [h["reward_std"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(it, mean, color="tab:blue", label="reward mean")
    ax1.fill_between(it, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax1.set(xlabel="PPO iteration", ylabel="reward model score", title="reward (mean ± std)")
    extra = [k for k in MIXES if k in history[0]]
    if extra:  # the demonstration / pretraining / instruction terms, when configured
        ax4 = ax1.twinx()
        for k, c in zip(extra, ("tab:green", "tab:purple", "tab:olive")):
            ax4.plot(it, [h[k] for h in history], color=c, linestyle=":", label=k)
        ax4.set_ylabel("NLL (nats per token)")
    ax2.plot(it, [h["kl"] for h in history], color="tab:red", label="KL to SFT")
    ax2.set(xlabel="PPO iteration", ylabel="KL (nats per answer)", title="KL to the reference")
    ax3 = ax2.twinx()
    ax3.plot(it, [h["kl_coef"] for h in history], color="tab:gray", linestyle="--", label="kl_coef")
    ax3.set_ylabel("kl_coef")
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ppo(prompts: list[str], model_dir: Path, reward_dir: Path, pcfg: PPOStageConfig, seed: int, out_dir: Path,
        spec: LoadSpec | None = None, work_dir: Path | None = None, suffix: str | None = None,
        demos: list[Demo] | None = None, corpus_rows: list[dict] | None = None,
        sft_demos: list[Demo] | None = None) -> StageOutput:
    work_dir = Path(work_dir) if work_dir is not None else out_dir / "checkpoints"
    res = train(prompts, model_dir, reward_dir, pcfg, seed, work_dir, spec, suffix, demos, corpus_rows, sft_demos)
    metrics = final_metrics(res.history)
    save_trained(res.policy, res.tokenizer, out_dir / "model",
                 {"stage": "ppo", "task": "causal_lm", "config": pcfg.model_dump(mode="json"), "metrics": metrics},
                 pcfg.update_scale, model_dir)
    write_jsonl(out_dir / "ppo_history.jsonl", res.history)
    if res.history:
        chart(res.history, out_dir / "ppo_curves.png")
    h = res.history
    summary = (f"{len(h)} PPO iterations: reward {h[0]['reward_mean']:.3f} -> {h[-1]['reward_mean']:.3f}, "
               f"KL to SFT {h[-1]['kl']:.2f} nats, kl_coef {h[-1]['kl_coef']:.4f}"
               + (f" (resumed at iteration {res.resumed_from})" if res.resumed_from else "")) if h else "no iterations"
    return StageOutput(primary="model", metrics=metrics, summary=summary)


def run(cfg: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> StageOutput:
    from pipelines.chat import rendered_prompts

    prompts, renderer, examples = rendered_prompts(cfg, inputs["model"], read_jsonl(inputs["prompts"]))
    write_jsonl(out_dir / "examples.jsonl", examples)
    demos = None
    if cfg.ppo.sft_loss_weight > 0:
        if "preference" not in inputs:
            raise ValueError("ppo.sft_loss_weight > 0 needs the preference pairs (inputs['preference'])")
        demos = demonstrations(renderer, read_jsonl(inputs["preference"]), cfg.ppo.max_length)
    rows = None
    if cfg.ppo.ptx_coef > 0:
        if "records" not in inputs:
            raise ValueError("ppo.ptx_coef > 0 needs the corpus (inputs['records'])")
        rows = pack_documents(renderer.tokenizer, [r[cfg.data.text_field] for r in read_jsonl(inputs["records"])],
                              cfg.ppo.max_length)
    sft_demos = None
    if cfg.ppo.sft_mix_coef > 0:
        if "sft" not in inputs:
            raise ValueError("ppo.sft_mix_coef > 0 needs the sft conversations (inputs['sft'])")
        sft_demos = conversations(renderer, read_jsonl(inputs["sft"]), cfg.ppo.max_length)
    return ppo(prompts, inputs["model"], inputs["reward"], cfg.ppo, cfg.seed, out_dir, load_spec(cfg.model),
               inputs.get("work_dir"), renderer.end_of_turn, demos, rows, sft_demos)


def main(argv: list[str] | None = None) -> int:
    d = PPOStageConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", type=Path, help="JSONL with a 'prompt' field per record")
    ap.add_argument("model_dir", type=Path, help="SFT model directory (full weights)")
    ap.add_argument("reward_dir", type=Path, help="reward model directory (full weights)")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--max-steps", type=int, default=d.max_steps, help="PPO iterations")
    ap.add_argument("--rollout-batch-size", type=int, default=d.rollout_batch_size)
    ap.add_argument("--learning-rate", type=float, default=d.learning_rate)
    ap.add_argument("--init-kl-coef", type=float, default=d.init_kl_coef)
    ap.add_argument("--save-steps", type=int, default=d.save_steps)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for p in (args.prompts, args.model_dir, args.reward_dir):
        if not p.exists():
            print(f"error: {p}: not found", file=sys.stderr)
            return 2
    pcfg = PPOStageConfig(max_steps=args.max_steps, rollout_batch_size=args.rollout_batch_size,
                          learning_rate=args.learning_rate, init_kl_coef=args.init_kl_coef, save_steps=args.save_steps)
    prompts = [r["prompt"] for r in read_jsonl(args.prompts)]
    print(ppo(prompts, args.model_dir, args.reward_dir, pcfg, args.seed, args.out_dir).summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
