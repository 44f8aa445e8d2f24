"""Head training: bit-identical per seed and thread count, resumed from its per-epoch checkpoint, says what it kept."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from conftest import head_output, write_beir_slice
from safetensors.torch import load_file

from sbmoe.heads import HeadConfig
from sbmoe.heads.sbmoe_head import SBMoEHead
from sbmoe.training.arguments import FinetuneArguments, TrainingArguments
from sbmoe.training.head_trainer import train_head
from sbmoe.training.runner import run

DIM, DOCS, QUERIES = 384, 300, 128  # MiniLM's width: large enough for torch to split work across threads
CONFIG = TrainingArguments(epochs=6, batch_size=32, learning_rate=1e-2, seed=3)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchors near their positive documents, and example rows ``[anchor, positive, 2 negatives]``."""
    generator = torch.Generator().manual_seed(0)
    docs = torch.randn(DOCS, DIM, generator=generator)
    positives = torch.arange(QUERIES) % DOCS
    anchors = docs[positives] + 0.5 * torch.randn(QUERIES, DIM, generator=generator)
    negatives = torch.randint(0, DOCS, (QUERIES, 2), generator=generator)
    return anchors, docs, torch.cat([torch.arange(QUERIES)[:, None], positives[:, None], negatives], dim=1)


@pytest.fixture(autouse=True)
def threads() -> Iterator[Callable[[int], None]]:
    """One torch thread unless the test asks for more (on two busy shared cores, more threads mostly wait for each
    other); the count is restored after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch.set_num_threads
    torch.set_num_threads(before)


def new_head() -> SBMoEHead:
    torch.manual_seed(1)  # noise and expert dropout draw from torch's global generator while training
    return SBMoEHead(DIM, HeadConfig(num_experts=3, top_k=2, expert_hidden=64, expert_dropout=0.2))


def recall_at_1(data: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Callable[[SBMoEHead], float]:
    """A dev score that follows the weights: share of anchors whose positive document scores highest."""
    anchors, docs, rows = data

    def score(head: SBMoEHead) -> float:
        best = (head_output(head, anchors, "query") @ head_output(head, docs, "document").T).argmax(dim=1)
        return (best == rows[:, 1]).float().mean().item()

    return score


DEV_SCORES = {
    "none": (lambda data: None, 0),
    "recall": (recall_at_1, 0),
    "flat": (lambda data: lambda head: 0.5, 2),  # never beats epoch 0 (before training): stops after 2 epochs
}


def train(data, dev: str, checkpoints: Path | None = None, resume: bool = False, **settings) -> tuple[dict, dict]:
    """Train a new head; its weights and the result as a dict."""
    make_dev, patience = DEV_SCORES[dev]
    head = new_head()
    config = replace(CONFIG, patience=patience, **settings)
    result = train_head(head, *data, config, make_dev(data), checkpoints, resume)
    return {k: v.clone() for k, v in head.state_dict().items()}, asdict(result)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.mark.parametrize("num_threads", [1, 2])
def test_same_seed_and_thread_count_give_bit_identical_weights(data, threads, num_threads: int) -> None:
    threads(num_threads)
    first, first_result = train(data, "recall", epochs=2)
    second, second_result = train(data, "recall", epochs=2)
    assert_same_weights(first, second)
    assert first_result == second_result
    unselected, _ = train(data, "none", epochs=2)
    other, _ = train(data, "none", epochs=2, seed=4)
    assert any(not torch.equal(other[k], v) for k, v in unselected.items())  # the seed matters


@pytest.mark.parametrize("dev", DEV_SCORES)
def test_a_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_weights(data, tmp_path: Path, dev: str) -> None:
    whole, whole_result = train(data, dev, tmp_path / "whole")
    train(data, dev, tmp_path / "parts", epochs=2)  # as if killed right after epoch 2's checkpoint
    resumed, resumed_result = train(data, dev, tmp_path / "parts", resume=True)
    assert_same_weights(whole, resumed)
    assert resumed_result["resumed_from"] == 2
    ignore = ("resumed_from", "kept")
    assert {k: v for k, v in resumed_result.items() if k not in ignore} == {
        k: v for k, v in whole_result.items() if k not in ignore
    }
    assert whole_result["stopped_early"] == (dev == "flat")
    again, again_result = train(data, dev, tmp_path / "parts", resume=True)  # a finished run resumes to its end
    assert_same_weights(whole, again)
    assert again_result["resumed_from"] == len(whole_result["losses"])


def test_the_end_of_training_says_which_epoch_was_kept_and_why(data, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sbmoe.training.head_trainer"):
        _, none = train(data, "none", epochs=4)
        _, flat = train(data, "flat")
        _, recall = train(data, "recall")
    assert none["kept"] == "kept the last epoch, 4 of 4 (no dev split)"
    assert (flat["best_epoch"], len(flat["losses"]), flat["stopped_early"]) == (0, 2, True)
    assert flat["kept"] == (
        "kept epoch 0 of 2 (the model before training): best dev score 0.5000; "
        "stopped after 2 epochs without gain (6 planned)"
    )
    best, candidates = recall["best_epoch"], [recall["initial_dev_score"], *recall["dev_scores"]]
    assert candidates[best] == max(candidates)
    assert recall["kept"].startswith(f"kept epoch {best} of 6")
    assert f"best dev score {max(candidates):.4f}" in recall["kept"]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("kept")] == [
        none["kept"],
        flat["kept"],
        recall["kept"],
    ]


def test_a_checkpoint_of_other_settings_is_not_resumed(data, tmp_path: Path, caplog) -> None:
    train(data, "recall", tmp_path, epochs=2)
    with caplog.at_level(logging.WARNING, logger="sbmoe.training.head_trainer"):
        resumed, result = train(data, "recall", tmp_path, resume=True, learning_rate=2e-2)
    assert "is another run's (other settings or data); starting from the first epoch" in caplog.text
    fresh, fresh_result = train(data, "recall", learning_rate=2e-2)
    assert_same_weights(fresh, resumed)
    assert result["resumed_from"] == 0 and result == fresh_result


def test_finetune_head_mode_resumes_from_its_checkpoint(tiny_bert: str, shared_data: Path, tmp_path: Path) -> None:
    beir = write_beir_slice(tmp_path / "slice", shared_data, 12, 60)
    common = {
        "backbone": tiny_bert,
        "train_data": f"{beir}:test",
        "cache_dir": str(tmp_path / "cache"),
        "num_experts": 3,
        "hard_negatives": 2,
        "batch_size": 4,
        "max_seq_length": 32,
        "learning_rate": 1e-2,
        "dev_queries": 3,
    }
    whole = run(FinetuneArguments.from_flat({**common, "epochs": 5, "output_dir": str(tmp_path / "whole")}))
    run(FinetuneArguments.from_flat({**common, "epochs": 2, "output_dir": str(tmp_path / "parts")}))
    assert (tmp_path / "parts" / "checkpoints" / "head" / "state.pt").is_file()
    resumed = run(
        FinetuneArguments.from_flat({**common, "epochs": 5, "output_dir": str(tmp_path / "parts"), "resume": True})
    )
    assert resumed["history"]["resumed_from"] == 2 and resumed["history"]["losses"] == whole["history"]["losses"]
    assert resumed["history"]["kept"] == whole["history"]["kept"] + "; resumed after epoch 2"
    kept = whole["history"]["kept"]
    assert kept.startswith(f"kept epoch {whole['history']['best_epoch']} of 5") and "best dev nDCG@10" in kept
    head = next((tmp_path / "whole").glob("*SBMoEHead*"))
    expected, found = (
        load_file(str(next(head.glob("*.safetensors")))),
        load_file(str(next((tmp_path / "parts" / head.name).glob("*.safetensors")))),
    )
    assert expected.keys() == found.keys() and all(torch.equal(v, found[k]) for k, v in expected.items())
