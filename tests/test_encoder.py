"""The one encoder: pooled vectors from the cache, the model's tail on top, routing statistics as values."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import sbmoe
from sbmoe.retrieval.encoder import Encoder

TEXTS = ["cells and genes", "the protein increase in blood", "a drug study of mice", "dna", "rna virus", "mice"]


@pytest.fixture(scope="module")
def tiny_model(tiny_bert: str) -> sbmoe.SBMoEModel:
    model = sbmoe.build_model(tiny_bert, sbmoe.HeadConfig(num_experts=3, top_k=2)).eval()
    with torch.no_grad():  # a router this small and random may send every input to one expert: spread its choices
        for name, weight in model.head.router.named_parameters():
            weight.zero_() if name.endswith("bias") else weight.normal_(0.0, 3.0 / weight.shape[1] ** 0.5)
    return model


def test_encode_equals_the_model_and_counts_its_expert_index(tiny_model: sbmoe.SBMoEModel, tmp_path: Path) -> None:
    encoded = Encoder(tiny_model, tmp_path, show_progress=False).encode(TEXTS, "corpus")
    per_text = tiny_model.encode_document(TEXTS, output_value=None)
    np.testing.assert_allclose(encoded.vectors, tiny_model.encode_document(TEXTS), atol=1e-6)
    index = [int(row["expert_index"]) for row in per_text]
    assert encoded.experts.tolist() == index
    counts = [index.count(e) for e in range(3)]  # what the head's counter held after encoding TEXTS
    shares = [c / len(TEXTS) for c in counts]
    stats = encoded.routing.as_dict()
    assert stats["counts"] == counts and stats["total"] == len(TEXTS)
    assert stats["shares"] == pytest.approx(shares, abs=1e-12)
    assert stats["entropy"] == pytest.approx(-sum(s * math.log(s) for s in shares if s > 0), abs=1e-12)
    assert not encoded.cached and Encoder(tiny_model, tmp_path).encode(TEXTS, "corpus").cached


def test_two_threads_encoding_at_once_get_the_same_stats(tiny_model: sbmoe.SBMoEModel, tmp_path: Path) -> None:
    encoder = Encoder(tiny_model, tmp_path, show_progress=False)
    batch = np.repeat(encoder.pooled(TEXTS, "queries"), 500, 0)
    alone = encoder.tail(batch, "query")  # the same computation, one thread: the threads must repeat it exactly
    assert alone.routing.total == len(batch)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: encoder.tail(batch, "query"), range(2)))
    for result in results:
        assert result.routing.counts == alone.routing.counts
        np.testing.assert_array_equal(result.experts, alone.experts)


def test_saving_the_model_card_leaves_routing_alone(tiny_model: sbmoe.SBMoEModel, tmp_path: Path) -> None:
    """The model card encodes example sentences; no statistic lives in the model for them to change."""
    encoder = Encoder(tiny_model, tmp_path / "cache", show_progress=False)
    before = encoder.encode(TEXTS, "corpus").routing
    tiny_model.save(str(tmp_path / "m"))
    assert encoder.encode(TEXTS, "corpus").routing == before


def test_headless_model_has_no_experts(tiny_bert: str, tmp_path: Path) -> None:
    plain = sbmoe.build_model(tiny_bert)
    encoded = Encoder(plain, tmp_path, show_progress=False).encode(TEXTS, "queries")
    assert encoded.experts is None and encoded.routing is None
    np.testing.assert_allclose(encoded.vectors, plain.encode_query(TEXTS), atol=1e-6)
