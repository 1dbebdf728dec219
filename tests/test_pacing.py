"""The curriculum as a schedule: the pacing sampler's windows (linear and root competence), every record seen,
determinism per seed, the fixed / bucketed / random / off orders, and a tiny Llama whose trainer really receives
the scheduled order (rows recorded at the model's forward), through the same packing and trainer dapt uses."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.config import CurriculumConfig, DaptConfig
from pipelines.training import PacingSampler, competence, paced, planned_draws
from tests.conftest import tiny_llama

N, TOTAL = 100, 1000  # 100 rows, 10 epochs


def sampler(schedule: str, seed: int = 0, n: int = N, total: int = TOTAL, **kw) -> PacingSampler:
    c = CurriculumConfig(schedule=schedule, **kw)
    return PacingSampler(n, schedule, seed, total, c.c0, c.ramp, c.buckets)


def stream(s: PacingSampler) -> list[int]:
    return [i for e in range(math.ceil(s.total / s.n)) for i in s.order(e)][: s.total]


def test_competence_formulas() -> None:
    # Platanios et al. 2019: linear c = min(1, t(1-c0)/T + c0), root c = min(1, sqrt(t(1-c0^2)/T + c0^2))
    assert competence(0.0, "competence_linear", 0.2, 0.5) == pytest.approx(0.2)
    assert competence(0.25, "competence_linear", 0.2, 0.5) == pytest.approx(0.6)
    assert competence(0.25, "competence_root", 0.2, 0.5) == pytest.approx(math.sqrt(0.52))
    assert competence(0.5, "competence_root", 0.2, 0.5) == pytest.approx(1.0)
    assert competence(0.9, "competence_linear", 0.2, 0.5) == 1.0
    assert competence(0.0, "random", 0.2, 0.5) == competence(0.0, "fixed", 0.2, 0.5) == 1.0


def test_window_sizes_per_step() -> None:
    """Batches of 50 draws: the window at each step's first draw, c0 0.2, ramp 0.5 (of 1000 draws)."""
    lin, root = sampler("competence_linear"), sampler("competence_root")
    assert [lin.window(step * 50) for step in range(12)] == [20, 28, 36, 44, 52, 60, 68, 76, 84, 92, 100, 100]
    assert [root.window(step * 50) for step in range(12)] == [20, 37, 49, 58, 66, 73, 79, 85, 90, 96, 100, 100]
    # root pacing opens the window faster early on: more of the data sooner, the same end of the ramp
    assert all(root.window(p) >= lin.window(p) for p in range(TOTAL))
    # and no draw ever comes from outside the window of its moment
    for s in (lin, root):
        assert all(i < s.window(p) for p, i in enumerate(stream(s)))
        first = stream(s)[:20]
        assert len(set(first)) == 20 and max(first) < s.window(19) <= 40, "the easiest rows first, no repeats"


@pytest.mark.parametrize("schedule", ["competence_linear", "competence_root"])
def test_every_record_seen(schedule: str) -> None:
    s = sampler(schedule)
    assert s.unseen() == 0 and set(stream(s)) == set(range(N))
    # each epoch starting after the ramp (here epochs 5-9) is one shuffle of the whole set, like `random`
    for e in range(5, 10):
        assert sorted(s.order(e)) == list(range(N))
    # earlier epochs stay within their windows and repeat easy rows: a pass restarts when the window is drawn through
    assert max(s.order(0)) < s.window(N) and len(set(s.order(0))) < N
    # a one-epoch run sees every row once, easy ones first
    one = sampler(schedule, total=N)
    assert sorted(one.order(0)) == list(range(N)) and one.unseen() == 0
    assert sum(one.order(0)[:50]) < sum(one.order(0)[50:])
    # a run too short for its ramp leaves rows unseen, and says so (dapt logs curriculum_unseen_rows)
    short = sampler(schedule, total=150, ramp=1.0)
    assert short.unseen() == N - len(set(stream(short))) > 0


@pytest.mark.parametrize("schedule", ["competence_linear", "competence_root", "bucketed", "random"])
def test_determinism_per_seed(schedule: str) -> None:
    a, b, other = sampler(schedule, seed=7), sampler(schedule, seed=7), sampler(schedule, seed=8)
    assert [a.order(e) for e in range(10)] == [b.order(e) for e in range(10)]
    assert [a.order(e) for e in range(10)] != [other.order(e) for e in range(10)]
    assert a.order(3) != a.order(4), "reshuffled every epoch"
    # an epoch's order depends on (schedule, seed, epoch) only: a resumed run gets the same order
    fresh = sampler(schedule, seed=7)
    fresh.set_epoch(4)
    assert list(fresh) == a.order(4) and len(fresh) == N


def test_fixed_off_bucketed_and_random_orders() -> None:
    for schedule in ("fixed", "off"):
        s = sampler(schedule, seed=3)
        assert all(s.order(e) == list(range(N)) for e in range(10)) and s.unseen() == 0
    b = sampler("bucketed", buckets=4)
    for e in range(3):
        o = b.order(e)
        assert [sorted(o[k: k + 25]) for k in range(0, N, 25)] == [list(range(k, k + 25)) for k in range(0, N, 25)]
        assert o != list(range(N))
    r = sampler("random")
    orders = [r.order(e) for e in range(10)]
    assert all(sorted(o) == list(range(N)) for o in orders) and len({tuple(o) for o in orders}) == 10
    assert orders[0] != list(range(N))


# --------------------------------------------------------------------------------------------- a tiny trainer
TEXTS = [f"record {i} is " + "word " * (i % 5) + f"end {i}" for i in range(80)]


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_llama(TEXTS, 3)


@pytest.mark.parametrize("schedule", ["competence_root", "fixed", "random"])
def test_the_trainer_receives_the_scheduled_order(tiny_lm, tmp_path, schedule: str) -> None:
    """dapt's packing and trainer, trained for real: the rows reaching the model's forward, step by step, are the
    sampler's order, epoch after epoch (competence: the easiest rows first, within the window of each step)."""
    from transformers import Trainer, TrainingArguments

    from pipelines.dapt import block_dataset
    from pipelines.training import trainer_kwargs

    model, tok = tiny_lm
    ds = block_dataset(tok, TEXTS, 16)
    rows = {tuple(r): k for k, r in enumerate(ds["input_ids"])}
    assert len(rows) == len(ds), "every packed row is distinct, so a row tells which one was drawn"
    dcfg = DaptConfig(batch_size=4, max_length=16, epochs=3, learning_rate=1e-3)
    args = TrainingArguments(**trainer_kwargs(dcfg, tmp_path, 0))
    seen: list[list[int]] = []
    hook = model.register_forward_pre_hook(
        lambda mod, a, kw: seen.append([rows[tuple(r)] for r in kw["input_ids"].tolist()]), with_kwargs=True)
    try:
        ccfg = CurriculumConfig(schedule=schedule, c0=0.25, ramp=0.5)
        trainer = paced(Trainer, ccfg, seed=5)(model=model, args=args, train_dataset=ds)
        trainer.train()
    finally:
        hook.remove()
    n = len(ds)
    expected = PacingSampler(n, schedule, 5, planned_draws(args, n), 0.25, 0.5, ccfg.buckets)
    assert planned_draws(args, n) == 3 * n
    want = [expected.order(e) for e in range(3)]
    got = [i for batch in seen for i in batch]
    assert got == [i for o in want for i in o]
    assert seen[0] == want[0][:4] and len(seen) == trainer.state.global_step == 3 * math.ceil(n / 4)
    assert trainer.pacing.unseen() == 0
    if schedule == "fixed":
        assert want == [list(range(n))] * 3
    if schedule == "competence_root":
        assert all(i < expected.window(p) for p, i in enumerate(got))
        assert max(seen[0]) < math.ceil(0.25 * n) + 1, "the first batch comes from the easiest quarter"


def test_fixed_trains_exactly_like_the_sequential_trainer(tiny_lm, tmp_path) -> None:
    """The default schedule changes nothing: the same weights as the SequentialSampler trainer dapt used before."""
    import copy

    from transformers import Trainer, TrainingArguments

    from pipelines.dapt import block_dataset
    from pipelines.training import sequential, trainer_kwargs

    model, tok = tiny_lm
    ds = block_dataset(tok, TEXTS, 16)
    args = TrainingArguments(**trainer_kwargs(DaptConfig(batch_size=4, max_length=16, epochs=2), tmp_path, 0))
    weights = []
    for cls in (sequential(Trainer), paced(Trainer, CurriculumConfig(schedule="fixed"), seed=0)):
        m = copy.deepcopy(model)
        cls(model=m, args=args, train_dataset=ds).train()
        weights.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_dapt_stage_reads_the_schedule_and_reports_unseen_rows(tiny_lm, tmp_path) -> None:
    from pipelines.dapt import dapt
    from pipelines.modeling import save_model

    model, tok = tiny_lm
    save_model(model, tok, tmp_path / "base", {"stage": "base", "kind": "full", "task": "causal_lm"})
    out = dapt(TEXTS, tmp_path / "base", DaptConfig(batch_size=8, max_length=16, epochs=2), 0, tmp_path / "out",
               curriculum=CurriculumConfig(schedule="competence_linear"))
    assert out.metrics["curriculum_unseen_rows"] == 0.0
    assert out.summary.endswith("(schedule competence_linear)")
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_schedule_is_part_of_dapt_fingerprint_only() -> None:
    from pathlib import Path

    from pipelines.config import load_config
    from tasks.stages import stage_fingerprint_config

    tiny = Path(__file__).parent / "configs" / "tiny.yaml"
    a = load_config(tiny)
    b = load_config(tiny, {"curriculum": {"schedule": "competence_root", "c0": 0.1, "batch_size": 16,
                                          "max_length": 64}})
    assert stage_fingerprint_config(a, "dapt")["curriculum"] == {"schedule": "fixed", "buckets": 4, "c0": 0.2,
                                                                  "ramp": 0.5}
    assert stage_fingerprint_config(a, "dapt") != stage_fingerprint_config(b, "dapt")
    assert stage_fingerprint_config(a, "curriculum") != stage_fingerprint_config(b, "curriculum")  # its own block
    for stage in ("sanitize", "dedup", "sft", "reward", "dpo"):
        assert stage_fingerprint_config(a, stage) == stage_fingerprint_config(b, stage)
    # the scoring settings are not dapt's business
    c = load_config(tiny, {"curriculum": {"schedule": "fixed", "batch_size": 4, "max_length": 64}})
    assert stage_fingerprint_config(a, "dapt") == stage_fingerprint_config(c, "dapt")
