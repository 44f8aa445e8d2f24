"""Training a researcher can trust: qrel-aware loss, backbone-only mining, a head that starts as the backbone,
epoch 0 as a candidate, dev splits on connected qrels, one positive per query per epoch, PSR-aware selection."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import head_output

from sbmoe.data.splits import dev_split
from sbmoe.heads import HeadConfig
from sbmoe.heads.stacked import StackedMoEHead
from sbmoe.model import build_model
from sbmoe.training.arguments import FinetuneHeadConfig, TrainingArguments
from sbmoe.training.head_trainer import one_row_per_anchor, selectable_epoch, train_head
from sbmoe.training.losses import QrelAwareInfoNCE
from sbmoe.training.mining import MiningArguments, cached_negatives, mine_negatives

DIM = 16


def unit(rows: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_a_crafted_false_negative_gives_the_loss_of_the_batch_without_that_document() -> None:
    queries, docs = unit(3, 0), unit(3, 1)
    anchor_rows, doc_rows = torch.arange(3), torch.arange(3).unsqueeze(1)  # pairs: anchor i, positive doc i
    relevant = torch.tensor([[0, 0], [1, 1], [2, 2], [0, 1]])  # doc 1, row 1's positive, is also relevant to anchor 0
    masked = QrelAwareInfoNCE("cos", 0.05, relevant, num_docs=3).per_anchor([queries, docs], anchor_rows, doc_rows)
    plain = QrelAwareInfoNCE("cos", 0.05, relevant[:3], num_docs=3)
    keep = torch.tensor([0, 2])  # the batch without row 1 (its document) for anchor 0
    without = plain.per_anchor([queries[keep], docs[keep]], keep, doc_rows[keep])
    assert masked[0] == pytest.approx(without[0].item(), abs=1e-6)
    assert masked[1:] == pytest.approx(plain.per_anchor([queries, docs], anchor_rows, doc_rows)[1:].tolist())
    assert masked[0] < plain.per_anchor([queries, docs], anchor_rows, doc_rows)[0]


def test_a_hard_negative_that_duplicates_the_positive_or_is_judged_relevant_is_masked() -> None:
    queries, docs = unit(2, 2), unit(4, 3)
    doc_rows = torch.tensor([[0, 0], [1, 3]])  # row 0's negative is its own positive again
    relevant = torch.tensor([[0, 0], [1, 1], [1, 3]])  # row 1's negative is judged relevant to it
    loss = QrelAwareInfoNCE("dot", 1.0, relevant, num_docs=4, symmetric=True)
    columns = [queries, docs[doc_rows[:, 0]], docs[doc_rows[:, 1]]]
    assert loss.mask(torch.arange(2), doc_rows).tolist() == [[False, False, True, False], [False, False, False, True]]
    per_anchor = loss.per_anchor(columns, torch.arange(2), doc_rows)
    scores = queries @ docs.T
    forward = torch.logsumexp(torch.stack([scores[0, [0, 1, 3]], scores[1, [0, 1, 0]]]), dim=1) - scores.diag()[:2]
    backward = torch.logsumexp((docs[:2] @ queries.T), dim=1) - scores.diag()[:2]
    assert per_anchor.tolist() == pytest.approx(((forward + backward) / 2).tolist(), abs=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        MiningArguments(hard_negatives=4, negatives_skip=0, negatives_depth=30, negatives_relative_margin=0.0),
        MiningArguments(
            hard_negatives=4,
            negatives_skip=5,
            negatives_depth=30,
            negatives_margin=0.05,
            negatives_relative_margin=0.0,
        ),
        MiningArguments(
            hard_negatives=3,
            negatives_skip=2,
            negatives_depth=20,
            negatives_relative_margin=0.1,
            negatives_sampling="random",
        ),
    ],
)
def test_mined_negatives_never_include_a_qrel_of_their_anchor(settings: MiningArguments) -> None:
    docs = unit(60, 4)
    queries = torch.nn.functional.normalize(docs[:20] + 0.3 * unit(20, 5), dim=-1)
    rng = np.random.default_rng(0)
    positives = [{i, *rng.choice(60, 5, replace=False).tolist()} for i in range(20)]  # some are top-ranked
    mined = mine_negatives(queries, docs, positives, settings)
    assert mined.shape == (20, settings.hard_negatives)
    ranked = (queries @ docs.T).argsort(dim=1, descending=True).tolist()
    for i, pos in enumerate(positives):
        assert not set(mined[i].tolist()) & pos
        order = [d for d in ranked[i] if d not in pos]
        assert set(mined[i].tolist()) <= set(order[settings.negatives_skip : settings.negatives_depth])
        weakest = min(float(queries[i] @ docs[p]) for p in pos)
        limit = min(weakest - settings.negatives_margin, weakest * (1 - settings.negatives_relative_margin))
        eligible = [
            d
            for d in order[settings.negatives_skip : settings.negatives_depth]
            if float(queries[i] @ docs[d]) <= limit
        ]
        if len(eligible) >= settings.hard_negatives:
            assert set(mined[i].tolist()) <= set(eligible)
            if settings.sampling == "top":
                assert mined[i].tolist() == eligible[: settings.hard_negatives]


def test_mining_is_cached_and_shared_by_later_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBMOE_CACHE", str(tmp_path))
    docs, positives = unit(30, 6), [{i} for i in range(10)]
    settings = MiningArguments(hard_negatives=2, negatives_skip=1, negatives_depth=10)
    first = cached_negatives(docs[:10], docs, positives, settings)
    files = list((tmp_path / "negatives").glob("*.npy"))
    assert len(files) == 1
    assert np.array_equal(cached_negatives(docs[:10], docs, positives, settings), first)
    cached_negatives(
        docs[:10], docs, positives, MiningArguments(hard_negatives=2, negatives_skip=2, negatives_depth=10)
    )
    assert len(list((tmp_path / "negatives").glob("*.npy"))) == 2  # other settings: another entry


@pytest.mark.parametrize(
    "options",
    [{"head": "sbmoe"}, {"head": "sbmoe", "query_only": True, "top_k": 1}, {"head": "dense", "dense_size": "total"}],
)
def test_a_freshly_built_learned_or_query_only_head_encodes_as_the_backbone(tiny_bert: str, options: dict) -> None:
    texts = ["cancer cell protein", "brain blood risk of disease", "virus dna"]
    model = build_model(tiny_bert, FinetuneHeadConfig(**options), max_seq_length=32)
    backbone = build_model(tiny_bert, max_seq_length=32)
    for encode in ("encode_query", "encode_document"):
        got, want = getattr(model, encode)(texts), getattr(backbone, encode)(texts)
        assert np.abs(got - want).max() <= 1e-6
    faithful = build_model(tiny_bert, FinetuneHeadConfig(routing="faithful"), max_seq_length=32)
    assert np.abs(faithful.encode_document(texts) - backbone.encode_document(texts)).max() > 1e-3  # the paper's


def test_when_training_only_hurts_the_epoch_0_candidate_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    from sbmoe.heads import SBMoEHead

    torch.manual_seed(0)
    docs = unit(64, 7)
    anchors = docs + 0.01 * unit(64, 8)  # the backbone already finds each anchor's own document
    wrong = torch.roll(torch.arange(64), 1)  # training teaches the neighbouring document instead
    examples = torch.stack([torch.arange(64), wrong], dim=1)

    def recall(head: SBMoEHead) -> float:
        best = (head_output(head, anchors, "query") @ head_output(head, docs, "document").T).argmax(1)
        return best.eq(torch.arange(64)).float().mean().item()

    head = SBMoEHead(
        DIM, HeadConfig(num_experts=2, top_k=1, identity_init=True, query_only=True), normalize_output=True
    )
    before = {k: v.clone() for k, v in head.state_dict().items()}
    config = TrainingArguments(epochs=4, batch_size=16, learning_rate=5e-2, seed=0)
    with caplog.at_level(logging.INFO, logger="sbmoe.training.head_trainer"):
        result = train_head(head, anchors, docs, examples, config, dev_score=recall)
    assert result.initial_dev_score == 1.0 and result.dev_scores[-1] < 1.0  # no epoch beats it (ties keep epoch 0)
    assert result.best_epoch == 0 and result.kept.startswith("kept epoch 0 of 4 (the model before training)")
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in before.items())
    assert "epoch 0 (before training): dev score 1.0000" in caplog.text and "epoch 4/4: loss" in caplog.text


def test_the_dev_split_falls_back_to_random_queries_on_a_connected_graph(caplog: pytest.LogCaptureFixture) -> None:
    qrels = {f"q{i}": {f"d{i}": 1, f"d{i + 1}": 1} for i in range(40)}  # a chain: one connected component
    with caplog.at_level(logging.WARNING, logger="sbmoe.data.splits"):
        split = dev_split(qrels, 10, name="chain")
    assert split.method == "random" and len(split.dev) == 10 and not set(split.dev) & set(split.train)
    assert set(split.dev) | set(split.train) == set(qrels)
    train_docs = {d for docs in split.train.values() for d in docs}
    dev_docs = [d for docs in split.dev.values() for d in docs]
    assert split.seen_positive_share == pytest.approx(sum(d in train_docs for d in dev_docs) / 20)
    assert split.seen_positive_share > 0.5
    assert "chain: the unseen-positives dev split reaches only 0 of 10 queries" in caplog.text
    islands = {f"q{i}": {f"d{i}": 1} for i in range(40)}
    unseen = dev_split(islands, 10)
    assert (unseen.method, len(unseen.dev), unseen.seen_positive_share) == ("unseen-positives", 10, 0.0)


def test_one_positive_per_query_per_epoch_keeps_one_random_row_per_anchor() -> None:
    anchors = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    picks = [one_row_per_anchor(anchors, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(sorted(anchors[p].tolist()) == [0, 1, 2, 3] for p in picks)
    assert len({tuple(p.tolist()) for p in picks}) > 1  # the positive changes from epoch to epoch


def test_no_epoch_before_the_psr_pool_is_fully_open_is_selected() -> None:
    stack = StackedMoEHead(DIM, HeadConfig(head_layers=2, num_experts=2, top_k=1, reuse_group=2, psr="linear"))
    assert selectable_epoch(stack, 10) == 5 and selectable_epoch(stack, 3) == 2
    assert selectable_epoch(StackedMoEHead(DIM, HeadConfig(head_layers=2, num_experts=2, top_k=1)), 10) == 1
