"""quantize calibrates on cached vectors: documents an earlier command encoded are not encoded again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from test_quant import write_beir

import sbmoe
from sbmoe import cli
from sbmoe.heads import HeadConfig
from sbmoe.quant.recipe import calibration_texts, calibration_vectors
from sbmoe.retrieval.encoder import pooled_model


@pytest.fixture()
def saved(tiny_bert: str, tmp_path: Path) -> tuple[str, str]:
    torch.manual_seed(0)
    sbmoe.build_model(tiny_bert, HeadConfig(num_experts=4), max_seq_length=32, device="cpu").save(
        str(tmp_path / "fp32")
    )
    return str(tmp_path / "fp32"), write_beir(tmp_path / "beir")


def test_quantize_after_evaluate_encodes_no_document(saved: tuple[str, str], tmp_path: Path, monkeypatch) -> None:
    model, data = saved
    cache = str(tmp_path / "cache")
    argv = ["evaluate", "--model", model, "--datasets", data, "--cache-dir", cache, "--quiet"]
    assert cli.main([*argv, "--output", str(tmp_path / "r.json")]) == 0
    encoded: list[int] = []
    encode_document = SentenceTransformer.encode_document

    def counting(self, texts, *args, **kwargs):
        encoded.append(len(texts))
        return encode_document(self, texts, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode_document", counting)
    monkeypatch.setenv("SBMOE_CACHE", cache)
    out = str(tmp_path / "q4")
    argv = ["quantize", "--model", model, "--output", out, "--bits", "4", "--calibration", data]
    assert cli.main([*argv, "--corpus-sample", "2"]) == 0
    assert encoded == []  # a sample of the corpus entry evaluate wrote, not a new entry of the sample's texts


def test_calibration_vectors_are_the_sampled_documents_rows(saved: tuple[str, str], tmp_path: Path) -> None:
    model = sbmoe.load_model(saved[0], device="cpu")
    vectors = calibration_vectors(model, saved[1], corpus_sample=3, cache_dir=tmp_path / "c")
    queries, docs = calibration_texts(saved[1], corpus_sample=3)
    pooled = pooled_model(model)
    expected = np.concatenate([pooled.encode_document(docs), pooled.encode_query(queries)])
    assert vectors.shape == (3 + len(queries), 32)
    np.testing.assert_allclose(vectors.numpy(), expected, atol=1e-5)
