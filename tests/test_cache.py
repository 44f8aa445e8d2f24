"""Embedding cache: hits, keys that follow model and corpus changes, recovery from a damaged entry."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from sbmoe.model import build_model
from sbmoe.retrieval.cache import cached_embeddings, default_cache_dir, model_fingerprint

TEXTS = ["the cell protein", "a gene study", "blood risk increase", "dense vector search index", ""]


def test_hit_miss_and_keys(tiny_bert: str, tmp_path: Path) -> None:
    model = build_model(tiny_bert, head=False, max_seq_length=64)
    first, meta = cached_embeddings(model, TEXTS, "queries", tmp_path, show_progress=False)
    again, meta2 = cached_embeddings(model, TEXTS, "queries", tmp_path, show_progress=False)
    assert (meta["cached"], meta2["cached"], meta["count"], meta["dim"]) == (False, True, 5, 32)
    assert np.array_equal(first, again)
    assert np.allclose(first, model.encode_query(TEXTS), atol=1e-5)
    assert not cached_embeddings(model, TEXTS[:4], "queries", tmp_path, show_progress=False)[1]["cached"]
    assert not cached_embeddings(model, TEXTS, "corpus", tmp_path, show_progress=False)[1]["cached"]
    before = model_fingerprint(model)
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    assert model_fingerprint(model) != before
    assert not cached_embeddings(model, TEXTS, "queries", tmp_path, show_progress=False)[1]["cached"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # atomic: no leftovers


def test_damaged_entry_is_encoded_again(tiny_bert: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = build_model(tiny_bert, head=False, max_seq_length=64)
    good = np.array(cached_embeddings(model, TEXTS, "queries", tmp_path, show_progress=False)[0])
    (entry,) = tmp_path.iterdir()
    data = (entry / "embeddings.npy").read_bytes()
    (entry / "embeddings.npy").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="sbmoe.retrieval.cache"):
        again, meta = cached_embeddings(model, TEXTS, "queries", tmp_path, show_progress=False)
    assert not meta["cached"] and np.array_equal(good, again)
    assert "unreadable embedding cache entry" in caplog.text


def test_default_dir_is_the_users_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SBMOE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "sbmoe"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "sbmoe"
    monkeypatch.setenv("SBMOE_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    with pytest.raises(ValueError, match="kind must be one of"):
        cached_embeddings(None, TEXTS, "documents")  # type: ignore[arg-type]
