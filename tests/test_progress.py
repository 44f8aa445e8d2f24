"""Feedback while encoding: the progress bar of the embedding cache moves after every encoder batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from tqdm.auto import tqdm

import sbmoe.retrieval.cache as cache_module
from sbmoe.model import build_model

TEXTS = [f"the cell protein {i} of gene study {'risk ' * (i % 4)}" for i in range(11)]


class RecordingBar(tqdm):
    """A tqdm bar that records every update."""

    updates: list[int] = []

    def update(self, n: float | None = 1) -> bool | None:
        RecordingBar.updates.append(n)
        return super().update(n)


def test_encode_progress_moves_per_batch(tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "tqdm", RecordingBar)
    monkeypatch.setattr(cache_module, "CHUNK", 8)  # two encode calls: 8 texts, then 3
    RecordingBar.updates = []
    model = build_model(tiny_bert, max_seq_length=32)
    vectors, meta = cache_module.cached_embeddings(model, TEXTS, "queries", tmp_path, batch_size=3)
    assert RecordingBar.updates == [3, 3, 2, 0, 3, 0]  # per batch; the catch-up after each call moves nothing
    assert meta["count"] == len(vectors) == 11
