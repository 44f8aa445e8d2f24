"""Embedding cache: hits, keys that follow model and corpus changes, recovery from a damaged entry."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

import sbmoe.retrieval.cache as cache_module
from sbmoe.model import build_model
from sbmoe.retrieval.cache import cached_embeddings, default_cache_dir, model_fingerprint

TEXTS = ["the cell protein", "a gene study", "blood risk increase", "dense vector search index", ""]


def test_hit_miss_and_keys(tiny_bert: str, tmp_path: Path) -> None:
    model = build_model(tiny_bert, max_seq_length=64)
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
    model = build_model(tiny_bert, max_seq_length=64)
    good = np.array(cached_embeddings(model, TEXTS, "queries", tmp_path, show_progress=False)[0])
    (entry,) = [p for p in tmp_path.iterdir() if p.name != "texts"]
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


@pytest.fixture()
def encoded_inputs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text the encoder is given, in order (SentenceTransformer.encode_document / encode_query counted)."""
    from sentence_transformers import SentenceTransformer

    seen: list[str] = []
    for name in ("encode_document", "encode_query"):
        real = getattr(SentenceTransformer, name)

        def counting(self, texts, *args, _real=real, **kwargs):
            seen.extend(texts)
            return _real(self, texts, *args, **kwargs)

        monkeypatch.setattr(SentenceTransformer, name, counting)
    return seen


def test_a_corpus_with_one_changed_document_encodes_that_document_only(
    tiny_bert: str, tmp_path: Path, encoded_inputs: list[str]
) -> None:
    model = build_model(tiny_bert, max_seq_length=64)
    first, _ = cached_embeddings(model, TEXTS, "corpus", tmp_path, show_progress=False)
    changed = [*TEXTS[:2], "a changed cancer drug study", *TEXTS[3:]]
    encoded_inputs.clear()
    again, meta = cached_embeddings(model, changed, "corpus", tmp_path, show_progress=False)
    assert encoded_inputs == ["a changed cancer drug study"] and meta["encoded"] == 1
    assert np.array_equal(np.delete(again, 2, axis=0), np.delete(first, 2, axis=0))
    assert np.allclose(again[2], model.encode_document(["a changed cancer drug study"])[0], atol=1e-5)


def test_an_interrupted_encoding_resumes_after_its_finished_chunks(
    tiny_bert: str, tmp_path: Path, encoded_inputs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_model(tiny_bert, max_seq_length=64)
    monkeypatch.setattr(cache_module, "CHUNK", 2)
    real_put = cache_module.TextVectors.put
    calls = []

    def interrupted_put(self, keys, vectors):
        calls.append(len(keys))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_put(self, keys, vectors)

    monkeypatch.setattr(cache_module.TextVectors, "put", interrupted_put)
    with pytest.raises(KeyboardInterrupt):
        cached_embeddings(model, TEXTS, "corpus", tmp_path, show_progress=False)
    monkeypatch.setattr(cache_module.TextVectors, "put", real_put)
    encoded_inputs.clear()
    vectors, meta = cached_embeddings(model, TEXTS, "corpus", tmp_path, show_progress=False)
    assert encoded_inputs == TEXTS[2:] and meta["encoded"] == 3  # the first chunk of 2 was kept
    assert np.allclose(vectors, model.encode_document(TEXTS), atol=1e-5)


def test_a_damaged_vector_row_is_encoded_again(tiny_bert: str, tmp_path: Path, encoded_inputs: list[str]) -> None:
    model = build_model(tiny_bert, max_seq_length=64)
    good, _ = cached_embeddings(model, TEXTS, "corpus", tmp_path, show_progress=False)
    for entry in tmp_path.iterdir():
        if entry.name != "texts":
            shutil.rmtree(entry)
    (store,) = (tmp_path / "texts").glob("corpus-*.sqlite")
    with sqlite3.connect(store) as db:
        db.execute("UPDATE vectors SET vector = zeroblob(length(vector)) WHERE rowid = 1")
    db.close()
    encoded_inputs.clear()
    again, meta = cached_embeddings(model, TEXTS, "corpus", tmp_path, show_progress=False)
    assert meta["encoded"] == 1 and len(encoded_inputs) == 1 and np.allclose(again, good, atol=1e-6)


def test_an_edited_tokenizer_gives_a_new_fingerprint_and_cache_entry(tiny_bert: str, tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert, folder)
    model = build_model(str(folder), max_seq_length=64)
    before = model_fingerprint(model)
    assert model_fingerprint(build_model(str(folder), max_seq_length=64)) == before
    cached_embeddings(model, TEXTS, "corpus", tmp_path / "cache", show_progress=False)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["cell"], vocab["cells"] = vocab["cells"], vocab["cell"]  # the same weights, other token ids
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    edited = build_model(str(folder), max_seq_length=64)
    assert model_fingerprint(edited) != before
    assert not cached_embeddings(edited, TEXTS, "corpus", tmp_path / "cache", show_progress=False)[1]["cached"]
