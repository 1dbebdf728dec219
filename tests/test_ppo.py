"""PPO: the maths against hand-worked numbers, then the whole loop on a tiny real Llama with a known reward.

The tiny world: questions answered by an SFT model that says " yes", " no", " maybe so" or " not at all" about
equally often; a reward model trained (Bradley-Terry) to prefer " yes". PPO must raise the mean reward, leave the
reference (the base weights under the adapter) untouched, and resume from a checkpoint to the same result.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from pipelines import ppo as P
from pipelines.config import PeftConfig, PPOStageConfig

# ------------------------------------------------------------------------------------------- hand-worked maths
def close(t: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(t, torch.tensor(expected, dtype=t.dtype), atol=atol, rtol=0)



def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(P.masked_mean(x, m)) == pytest.approx(2.5)  # (1+2+3+4)/4, the 99 is padding
    assert P.masked_mean(x, m, dim=1).tolist() == pytest.approx([2.0, 4.0])
    # unbiased variance of 1,2,3,4: (2.25+0.25+0.25+2.25)/3 = 5/3
    assert float(P.masked_var(x, m)) == pytest.approx(5 / 3)
    w = P.whiten(x, m)
    s = math.sqrt(5 / 3)
    close(w, [[-1.5 / s, -0.5 / s, 0.5 / s, 0.0], [1.5 / s, 0.0, 0.0, 0.0]])
    w2 = P.whiten(x, m, shift_mean=False)  # scaled, mean kept: (x - 2.5)/s + 2.5
    assert w2[0, 0].item() == pytest.approx(-1.5 / s + 2.5, abs=1e-6)
    assert w2[0, 3].item() == 0.0


def test_gae_by_hand():
    # gamma = lam = 1, reward 1 at the end, values 0.5: every delta but the last is 0 -> A = 0.5, R = 1.
    a, r = P.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3), 1.0, 1.0)
    close(a, [[0.5, 0.5, 0.5]])
    close(r, [[1.0, 1.0, 1.0]])
    # gamma 0.9, lam 0.5, second row ends after two tokens (its padded entries must not leak in):
    # row 0: V = [1, 2, 3], r = [0, 1, 2]
    #   d2 = 2 - 3 = -1                 A2 = -1
    #   d1 = 1 + 0.9*3 - 2 = 1.7        A1 = 1.7 + 0.45*(-1) = 1.25
    #   d0 = 0 + 0.9*2 - 1 = 0.8        A0 = 0.8 + 0.45*1.25 = 1.3625
    # row 1: V = [1, 1, (7)], r = [0, 2, (5)], mask [1, 1, 0]
    #   d1 = 2 - 1 = 1                  A1 = 1
    #   d0 = 0 + 0.9*1 - 1 = -0.1       A0 = -0.1 + 0.45*1 = 0.35
    rewards = torch.tensor([[0.0, 1.0, 2.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    a, r = P.gae(rewards, values, mask, 0.9, 0.5)
    close(a, [[1.3625, 1.25, -1.0], [0.35, 1.0, 0.0]])
    close(r, [[2.3625, 3.25, 2.0], [1.35, 2.0, 0.0]])


def test_adaptive_kl_controller():
    c = P.AdaptiveKLController(0.1, target=6.0, horizon=100)
    # KL 9 vs target 6: error 0.5 clipped to 0.2; 10 steps -> * (1 + 0.2*10/100) = 1.02
    assert c.update(9.0, 10) == pytest.approx(0.102)
    # KL 5.4: error -0.1; 50 steps -> * (1 - 0.1*50/100) = 0.95
    assert c.update(5.4, 50) == pytest.approx(0.102 * 0.95)
    d = P.AdaptiveKLController(1.0, 6.0, 100)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value
    fixed = P.AdaptiveKLController(0.05, target=None, horizon=100)
    assert fixed.update(100.0, 1000) == 0.05


def test_policy_loss_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 3.0]]))  # ratios 1.5, 0.5, 1.1, (padding)
    adv = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    # token 0: A=1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: A=1, r=0.5: max(-0.5, -0.8) = -0.5 (not clipped: the pessimistic term is the unclipped one)
    # token 2: A=-2, r=1.1: max(2.2, 2.2) = 2.2 (inside the range)
    loss, clipfrac = P.policy_loss(new, old, adv, mask, 0.2)
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert float(clipfrac) == pytest.approx(1 / 3)
    # ratio 1 everywhere: loss = -mean(A)
    loss, clipfrac = P.policy_loss(old, old, adv, mask, 0.2)
    assert float(loss) == pytest.approx(0.0) and float(clipfrac) == 0.0


def test_value_loss_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1, 9.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    # token 0: V=1 -> (1-2)^2 = 1; clipped V = 0.2 -> (0.2-2)^2 = 3.24; max 3.24
    # token 1: V=0.1 -> 0.81; clipped = 0.1 -> 0.81
    assert float(P.value_loss(values, old, returns, mask, 0.2)) == pytest.approx(0.5 * (3.24 + 0.81) / 2)


def test_entropy_from_logits():
    assert float(entropy := P.entropy_from_logits(torch.zeros(4))) == pytest.approx(math.log(4))
    assert float(P.entropy_from_logits(torch.tensor([0.0, -1e9]))) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.7, 0.2, 0.1])
    assert float(P.entropy_from_logits(p.log())) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)
    del entropy


def test_lr_factor_and_prompt_order():
    assert P.lr_factor("constant", 5, 10, 2) == 1.0
    assert P.lr_factor("linear", 0, 10, 0) == 1.0 and P.lr_factor("linear", 5, 10, 0) == pytest.approx(0.5)
    assert P.lr_factor("cosine", 5, 10, 0) == pytest.approx(0.5)
    # every prompt once per epoch, the same order on every call
    seen = [P.prompts_for(i, 10, 5, seed=0) for i in range(2)]
    assert sorted(seen[0] + seen[1]) == list(range(10))
    assert P.prompts_for(1, 10, 5, seed=0) == seen[1]


# ---------------------------------------------------------------------------------------------- a tiny world
QUESTIONS = [f"Is the {c} {n} {a}?" for c in ("red", "blue", "green", "small", "old")
             for n in ("box", "lamp", "kite", "boat") for a in ("heavy", "new")]
ANSWERS = [" yes", " no", " maybe so", " not at all"]


def _prompt(q: str) -> str:
    return f"Question: {q}\nAnswer:"


def build_tiny_world(root: Path, seed: int = 0) -> dict[str, Path]:
    """Tokenizer + SFT Llama (answers uniformly from ANSWERS) + reward model preferring ' yes'; ~5 s on 2 cores."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipelines.modeling import save_model, seed_everything, train_tokenizer

    seed_everything(seed)
    texts = [_prompt(q) + a for q in QUESTIONS for a in ANSWERS]
    tok = train_tokenizer(texts, 300)
    arch = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    rng = random.Random(seed)

    def batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        w = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (w - len(r)) for r in rows])
        return ids, torch.tensor([[1] * len(r) + [0] * (w - len(r)) for r in rows])

    sft = LlamaForCausalLM(LlamaConfig(**arch))
    opt = torch.optim.AdamW(sft.parameters(), lr=5e-3)
    for _ in range(60):
        rows = [tok(_prompt(rng.choice(QUESTIONS)) + rng.choice(ANSWERS))["input_ids"] + [tok.eos_token_id]
                for _ in range(16)]
        ids, attn = batch(rows)
        loss = sft(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(attn == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    rm = LlamaForSequenceClassification(LlamaConfig(**arch, num_labels=1))
    opt = torch.optim.AdamW(rm.parameters(), lr=5e-3)
    for _ in range(30):
        qs = [rng.choice(QUESTIONS) for _ in range(8)]
        enc = lambda a, q: tok(_prompt(q) + a)["input_ids"] + [tok.eos_token_id]  # noqa: E731
        ch = rm(*batch([enc(" yes", q) for q in qs])).logits[:, 0]
        rj = rm(*batch([enc(rng.choice(ANSWERS[1:]), q) for q in qs])).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(ch - rj).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    save_model(sft, tok, root / "sft", {"stage": "sft", "kind": "full", "task": "causal_lm"})
    save_model(rm, tok, root / "reward", {"stage": "reward", "kind": "full", "task": "reward"})
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": _prompt(q)}]}) + "\n"
                               for q in QUESTIONS))
    return {"model": root / "sft", "reward": root / "reward", "prompts": prompts}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(2)
    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))


def _pcfg(**kw) -> PPOStageConfig:
    base = dict(max_steps=8, rollout_batch_size=16, mini_batch_size=8, batch_size=16, ppo_epochs=4,
                max_new_tokens=6, learning_rate=1e-3, init_kl_coef=0.02, target_kl=6.0, kl_horizon=1000,
                lr_scheduler="constant", peft=PeftConfig(method="lora", r=8, alpha=16), max_length=64)
    return PPOStageConfig(**{**base, **kw})


RAW = {"format": "plain", "user": "{content}", "assistant": "{content}"}  # prompts here are already formatted


def _prompts(world) -> list[str]:
    return [json.loads(line)["prompt"][0]["content"] for line in world["prompts"].read_text().splitlines()]


def test_ppo_raises_reward_and_keeps_reference(world, tmp_path):
    from pipelines.evaluate import generate
    from pipelines.modeling import load_model, load_tokenizer
    from pipelines.reward import score

    prompts = _prompts(world)
    sft = load_model(world["model"])
    res = P.train(prompts, world["model"], world["reward"], _pcfg(max_steps=6), 0, tmp_path / "w")
    rewards = [h["reward_mean"] for h in res.history]
    assert [h["iteration"] for h in res.history] == list(range(1, 7))
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 1.5, rewards
    # and on a fresh sample of 64 answers, the policy beats the SFT model by a wide margin
    tok, rm = load_tokenizer(world["model"]), load_model(world["reward"], task="reward")
    many = prompts * 2
    torch.manual_seed(1)
    r_sft = score(rm, tok, many, generate(sft, tok, many, 6, do_sample=True, stop_at_newline=False)[0]).mean()
    torch.manual_seed(1)
    r_ppo = score(rm, tok, many, generate(res.policy, tok, many, 6, do_sample=True, stop_at_newline=False)[0]).mean()
    assert r_ppo > r_sft + 1.5, (float(r_sft), float(r_ppo))
    h = res.history[-1]
    assert h["kl"] > 0 and h["kl_coef"] != 0.02 and 0 <= h["clipfrac"] <= 1 and h["entropy"] > 0

    # the reference = the adapter-disabled network = the SFT weights, bit for bit; the adapter did change.
    ref_sd = sft.state_dict()
    lora = {k: v for k, v in res.policy.named_parameters() if "lora_" in k}
    assert lora and all(v.requires_grad for v in lora.values())
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k)
    base = {k: v for k, v in res.policy.get_base_model().state_dict().items() if "lora_" not in k}
    assert len(base) == len(ref_sd)
    for k, v in base.items():
        assert torch.equal(v, ref_sd[k.replace(".base_layer", "")]), k
    ids = torch.tensor([[5, 6, 7, 8]])
    with res.policy.disable_adapter():
        assert torch.equal(res.policy(input_ids=ids).logits, sft(input_ids=ids).logits)
    assert not torch.equal(res.policy(input_ids=ids).logits, sft(input_ids=ids).logits)


def test_run_writes_model_history_and_chart(world, tmp_path):
    from pipelines.config import PipelineConfig
    from pipelines.modeling import read_manifest

    cfg = PipelineConfig(data={"demo": True}, model={"scratch": {}}, template=RAW,
                         ppo=_pcfg(max_steps=2, rollout_batch_size=8, mini_batch_size=4).model_dump())
    out = P.run(cfg, {**world, "work_dir": tmp_path / "work"}, tmp_path / "out")
    assert out.primary == "model" and "2 PPO iterations" in out.summary
    hist = [json.loads(line) for line in (tmp_path / "out" / "ppo_history.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in hist] == [1, 2]
    for k in ("reward_mean", "reward_std", "kl", "kl_coef", "entropy", "clipfrac", "policy_loss", "value_loss",
              "explained_variance"):
        assert math.isfinite(out.metrics[f"ppo/{k}"]) and out.metrics[f"ppo/{k}"] == pytest.approx(hist[-1][k]), k
    assert out.metrics["global_step"] == 2
    assert (tmp_path / "out" / "ppo_curves.png").read_bytes()[:4] == b"\x89PNG"
    man = read_manifest(tmp_path / "out" / "model")
    assert man["stage"] == "ppo" and man["kind"] == "adapter" and man["metrics"]["global_step"] == 2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model" / "adapter_model.safetensors"), "pt") as st:
        assert st.keys() and all("lora_" in k for k in st.keys())


def test_ppo_resumes_to_the_same_result(world, tmp_path):
    prompts = _prompts(world)
    small = dict(rollout_batch_size=8, mini_batch_size=4)
    straight = P.train(prompts, world["model"], world["reward"], _pcfg(max_steps=4, **small), 0, tmp_path / "straight")
    part = P.train(prompts, world["model"], world["reward"], _pcfg(max_steps=2, save_steps=2, **small), 0,
                   tmp_path / "w")
    assert len(part.history) == 2 and (tmp_path / "w" / "checkpoint-2" / "state.json").is_file()
    # a half-written checkpoint (no state.json) and a temp dir are never chosen
    (tmp_path / "w" / "checkpoint-3").mkdir()
    (tmp_path / "w" / ".checkpoint-4.tmp-1").mkdir()
    assert P.latest_checkpoint(tmp_path / "w").name == "checkpoint-2"
    resumed = P.train(prompts, world["model"], world["reward"], _pcfg(max_steps=4, save_steps=2, **small), 0,
                      tmp_path / "w")
    assert resumed.resumed_from == 2
    assert [h["iteration"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(straight.history, resumed.history):
        for k in ("reward_mean", "kl", "kl_coef", "policy_loss", "value_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["iteration"], k)
    for (k, v), (k2, v2) in zip(straight.policy.named_parameters(), resumed.policy.named_parameters()):
        assert k == k2 and torch.allclose(v, v2, atol=1e-5), k
    # the newest two complete checkpoints are kept; leftovers of interrupted writes are cleaned up
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_ppo_full_finetuning_uses_a_frozen_copy(world, tmp_path):
    from pipelines.modeling import load_model

    res = P.train(_prompts(world), world["model"], world["reward"],
                  _pcfg(max_steps=1, rollout_batch_size=8, mini_batch_size=4, peft=PeftConfig(method="full"),
                        learning_rate=1e-4), 0, tmp_path / "w")
    sft = load_model(world["model"])
    changed = [k for k, v in res.policy.state_dict().items() if not torch.equal(v, sft.state_dict()[k])]
    assert changed and math.isfinite(res.history[0]["kl"])


def _term_effect(world, tmp_path, batch: dict[str, torch.Tensor], term: dict, **data):
    """Loss on ``batch`` under SFT, under PPO alone and under PPO with the extra ``term`` (config keys) fed ``data``
    (4 iterations each), and the two runs."""
    from pipelines.modeling import load_model

    def loss(model) -> float:
        with torch.no_grad():
            return float(model(**batch).loss)

    pcfg = dict(max_steps=4, rollout_batch_size=16, mini_batch_size=8)
    plain = P.train(_prompts(world), world["model"], world["reward"], _pcfg(**pcfg), 0, tmp_path / "plain")
    with_term = P.train(_prompts(world), world["model"], world["reward"], _pcfg(**term, **pcfg), 0,
                        tmp_path / "term", **data)
    return loss(load_model(world["model"])), loss(plain.policy), loss(with_term.policy), plain, with_term


def test_demonstration_term_teaches_an_answer_rollouts_do_not_favour(world, tmp_path):
    """``sft_loss_weight``: " never" is an answer SFT never gives, so rollouts never sample it and PPO alone cannot
    learn it; with the chosen answers of pairs that prefer it as demonstrations the policy does (labels: answer only)."""
    from pipelines.chat import Renderer
    from pipelines.config import TemplateConfig
    from pipelines.modeling import load_tokenizer

    tok = load_tokenizer(world["model"])
    pairs = [{"prompt": [{"role": "user", "content": _prompt(q)}], "chosen": " never", "rejected": " yes"}
             for q in QUESTIONS]
    demos = P.demonstrations(Renderer.for_model(tok, TemplateConfig(**RAW)), pairs, 64)
    b = P.demonstration_batch(demos, [0, 1], tok.pad_token_id, torch.device("cpu"))
    answer = tok(" never", add_special_tokens=False)["input_ids"]
    assert b["labels"][0][b["labels"][0] != -100].tolist()[: len(answer)] == answer
    assert (b["labels"] != -100).sum() < b["attention_mask"].sum()  # prompts are not trained on
    everything = P.demonstration_batch(demos, list(range(len(demos))), tok.pad_token_id, torch.device("cpu"))
    sft, alone, with_term, plain, taught = _term_effect(world, tmp_path, everything, {"sft_loss_weight": 1.0},
                                                        demos=demos)
    # measured: SFT 9.6 nats per token, PPO alone 11.0, with the term 3.4 (on 2 CPU threads)
    assert alone > sft - 0.5, (alone, sft)
    assert with_term < sft - 3.0, (with_term, sft)
    losses = [h["sft_loss"] for h in taught.history]
    assert losses[-1] < losses[0] and "sft_loss" not in plain.history[-1]
    assert P.final_metrics(taught.history)["ppo/sft_loss"] == pytest.approx(losses[-1])
    with pytest.raises(ValueError, match="needs demonstrations"):
        P.train(_prompts(world), world["model"], world["reward"], _pcfg(sft_loss_weight=1.0, max_steps=1), 0,
                tmp_path / "c")


def test_pretraining_mix_keeps_corpus_text_that_no_rollout_asks_about(world, tmp_path):
    """``ptx_coef`` (PPO-ptx): one packed corpus batch per optimiser step lowers the policy's loss on that corpus,
    which PPO alone leaves where it was; a missing corpus is refused."""
    from pipelines.modeling import load_tokenizer, pack_documents

    rows = pack_documents(load_tokenizer(world["model"]), [f"The {q[7:-1]} is never sold." for q in QUESTIONS], 64)
    everything = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}
    sft, alone, with_term, plain, mixed = _term_effect(world, tmp_path, everything, {"ptx_coef": 1.0},
                                                       corpus_rows=rows)
    # measured: SFT 6.1 nats per token, PPO alone 5.8, with the mix 3.0
    assert alone > sft - 1.0, (alone, sft)
    assert with_term < sft - 2.0, (with_term, sft)
    assert mixed.history[-1]["ptx_loss"] < mixed.history[0]["ptx_loss"] and "ptx_loss" not in plain.history[-1]
    with pytest.raises(ValueError, match="needs the corpus"):
        P.train(_prompts(world), world["model"], world["reward"], _pcfg(ptx_coef=1.0, max_steps=1), 0, tmp_path / "c")


def test_instruction_mix_keeps_the_sft_conversations(world, tmp_path):
    """``sft_mix_coef``: one batch of sft conversations per optimiser step (loss on every assistant turn, none on
    the user's) lowers the policy's NLL on them, which PPO alone leaves where it was; missing data is refused."""
    from pipelines.chat import Renderer
    from pipelines.config import TemplateConfig
    from pipelines.modeling import load_tokenizer

    tok = load_tokenizer(world["model"])
    convs = [{"messages": [{"role": "user", "content": _prompt(q)}, {"role": "assistant", "content": " never"},
                           {"role": "user", "content": _prompt(QUESTIONS[(i + 1) % len(QUESTIONS)])},
                           {"role": "assistant", "content": " not ever"}]} for i, q in enumerate(QUESTIONS)]
    rows = P.conversations(Renderer.for_model(tok, TemplateConfig(**RAW)), convs, 128)
    b = P.demonstration_batch(rows, [0], tok.pad_token_id, torch.device("cpu"))
    trained = b["labels"][0][b["labels"][0] != -100].tolist()
    for answer in (" never", " not ever"):  # both assistant turns are trained, no user token is
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        assert any(trained[i: i + len(ids)] == ids for i in range(len(trained))), answer
    assert len(trained) < int(b["attention_mask"].sum()) / 2
    everything = P.demonstration_batch(rows, list(range(len(rows))), tok.pad_token_id, torch.device("cpu"))
    sft, alone, with_term, plain, mixed = _term_effect(world, tmp_path, everything, {"sft_mix_coef": 1.0},
                                                       sft_demos=rows)
    assert alone > sft - 0.5, (alone, sft)
    assert with_term < sft - 2.0, (with_term, sft)
    assert mixed.history[-1]["sft_mix_loss"] < mixed.history[0]["sft_mix_loss"]
    assert "sft_mix_loss" not in plain.history[-1]
    with pytest.raises(ValueError, match="needs the sft conversations"):
        P.train(_prompts(world), world["model"], world["reward"], _pcfg(sft_mix_coef=1.0, max_steps=1), 0,
                tmp_path / "c")


def test_cli_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pipelines.ppo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "PROMPTS" in out.stdout.upper() and "reward_dir" in out.stdout
