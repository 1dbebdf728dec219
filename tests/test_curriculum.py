"""Curriculum: batched perplexity equals the one-at-a-time value, padding is excluded, and the order reaches
the trainer (dapt feeds blocks sequentially, never shuffled)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.config import CurriculumConfig, DaptConfig
from pipelines.curriculum import order_indices, perplexities
from tests.conftest import tiny_llama

TEXTS = ["the cat sat on the mat", "a dog", "Veltrane Labs sells the Desbrylt speaker for 299 dollars in teal",
         "the cat sat", "zq xv kj wp", "今天天气很好", "the mat"]


@pytest.fixture(scope="module")
def tiny_lm():
    model, tok = tiny_llama(TEXTS, 5)
    return model.eval(), tok


def one_at_a_time(model, tok, text: str) -> float:
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def test_batched_perplexity_matches_unbatched_and_ignores_padding(tiny_lm):
    model, tok = tiny_lm
    batched = perplexities(model, tok, TEXTS, batch_size=4, max_length=64, progress=False)
    single = np.array([one_at_a_time(model, tok, t) for t in TEXTS])
    np.testing.assert_allclose(batched, single, rtol=1e-4)


def test_order_modes():
    ppl = np.array([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0])
    assert order_indices(ppl, "easy_to_hard", 4, 0) == [1, 3, 2, 4, 0, 5, 6, 7]
    assert order_indices(ppl, "off", 4, 0) == list(range(8))
    b = order_indices(ppl, "bucketed", 2, 0)
    assert sorted(b[:4]) == [1, 2, 3, 4] and sorted(b[4:]) == [0, 5, 6, 7]


def test_curriculum_order_reaches_the_trainer(tiny_lm, tmp_path):
    """The batches dapt's trainer draws are the curriculum's blocks in order (a RandomSampler would shuffle)."""
    from transformers import Trainer, TrainingArguments

    from pipelines.dapt import block_dataset
    from pipelines.training import sequential, trainer_kwargs

    model, tok = tiny_lm
    texts = [f"record {i} " + "word " * (i % 5) for i in range(200)]
    ds = block_dataset(tok, texts, 16)
    args = TrainingArguments(**trainer_kwargs(DaptConfig(batch_size=4, max_length=16), tmp_path, 0))
    seen = [row for batch in sequential(Trainer)(model=model, args=args, train_dataset=ds).get_train_dataloader()
            for row in batch["input_ids"].tolist()]
    assert seen == ds["input_ids"]
    shuffled = [row for batch in Trainer(model=model, args=args, train_dataset=ds).get_train_dataloader()
                for row in batch["input_ids"].tolist()]
    assert shuffled != ds["input_ids"], "the default trainer shuffles: the sequential one is what keeps the order"


def test_dapt_rows_pack_whole_documents_that_only_see_themselves(tiny_lm):
    """Each packed document is computed exactly as if it were alone: no attention to the documents before it (a
    model that can see them memorises the fixed stream instead of each fact), and no loss on its first token."""
    from pipelines.dapt import block_dataset

    model, tok = tiny_lm
    texts = [TEXTS[i % len(TEXTS)] * (1 + i % 3) for i in range(12)]
    ds = block_dataset(tok, texts, 48)
    assert all(len(r) == 48 for r in ds["input_ids"])
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    # Every document's tokens appear, in order, each starting at position 0.
    flat = [(i, p) for row, pos in zip(ds["input_ids"], ds["position_ids"]) for i, p in zip(row, pos)]
    starts = [k for k, (_, p) in enumerate(flat) if p == 0]
    got = [[i for i, _ in flat[a:b]] for a, b in zip(starts, starts[1:] + [len(flat)])]
    pieces = [d[j: j + 48] for d in docs for j in range(0, len(d), 48)]
    assert [g for g in got if set(g) != {tok.pad_token_id}] == pieces  # the rest is each row's padding tail
    for row, labels, pos in zip(ds["input_ids"], ds["labels"], ds["position_ids"]):
        assert all(lab == -100 for lab, p in zip(labels, pos) if p == 0)
        assert all(lab in (-100, i) for lab, i in zip(labels, row))
    # The second document of the first row, packed vs alone: same logits.
    row, pos = ds["input_ids"][0], ds["position_ids"][0]
    second = [k for k, p in enumerate(pos) if p == 0][1]
    n = len(docs[1])
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([row]), position_ids=torch.tensor([pos]), use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([docs[1]])).logits[0]
    assert torch.allclose(packed[second: second + n], alone, atol=1e-4)


def test_curriculum_stage_writes_order_histogram(tiny_lm, tmp_path):
    from pipelines.artifacts import read_jsonl
    from pipelines.curriculum import curriculum
    from pipelines.modeling import save_model

    model, tok = tiny_lm
    save_model(model, tok, tmp_path / "ref", {"stage": "base", "kind": "full", "task": "causal_lm"})
    out = curriculum([{"text": t, "id": i} for i, t in enumerate(TEXTS)], "text", tmp_path / "ref",
                     CurriculumConfig(batch_size=3), 0, tmp_path / "out")
    rows = read_jsonl(tmp_path / "out" / "data" / "records.jsonl")
    ppl = [r["perplexity"] for r in rows]
    assert ppl == sorted(ppl) and len(rows) == len(TEXTS)
    assert {r["id"] for r in rows} == set(range(len(TEXTS)))
    assert (tmp_path / "out" / "perplexity_histogram.png").stat().st_size > 1000
    assert out.metrics["ppl_median"] == pytest.approx(float(np.median(ppl)), rel=1e-3)


def test_instruction_replay_is_spread_evenly_and_keeps_the_curriculum_order():
    from pipelines.dapt import interleave, replay_texts

    from pipelines.chat import Renderer
    from pipelines.config import TemplateConfig
    from pipelines.modeling import train_tokenizer

    renderer = Renderer.for_model(train_tokenizer(["Q0 Answer a0"], 300),
                                  TemplateConfig(format="plain", user="{content}\nAnswer:", assistant=" {content}"))
    pairs = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(4)]
    extra = replay_texts(renderer, pairs, 1.5)  # no closing EOS: packing adds one per document
    assert extra == ["Q0\nAnswer: a0", "Q1\nAnswer: a1", "Q2\nAnswer: a2", "Q3\nAnswer: a3",
                     "Q0\nAnswer: a0", "Q1\nAnswer: a1"]
    corpus = [f"doc{i}" for i in range(12)]
    mixed = interleave(corpus, extra)
    assert [t for t in mixed if t.startswith("doc")] == corpus  # the curriculum order survives
    assert [t for t in mixed if t.startswith("Q")] == extra
    gaps = np.diff([i for i, t in enumerate(mixed) if t.startswith("Q")])
    assert gaps.min() >= 2 and gaps.max() <= 4, "replayed pairs are spread out, not bunched at one end"
    assert interleave(corpus, []) == corpus
    # replay_format "text": the turns' contents only, no template (the chat format is left for sft to teach)
    assert replay_texts(renderer, pairs[:2], 1.0, "text") == ["Q0\na0", "Q1\na1"]

