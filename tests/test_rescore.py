"""Compressed indexes with exact re-scoring: PQ / OPQ / binary codes in RAM, float vectors memory-mapped."""

from __future__ import annotations

import numpy as np
import pytest

from sbmoe.retrieval.build import build_index
from sbmoe.retrieval.index import DenseIndex
from sbmoe.retrieval.rescore import exact_top_k, pq_params

pytestmark = pytest.mark.usefixtures("one_faiss_thread")
DIM = 32
PQ = {"pq_m": 8, "pq_bits": 4}  # 8 four-dim sub-vectors of 16 centroids: 4 bytes a code, trained in a blink


def unit(rows: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def docs() -> np.ndarray:
    return unit(1500, 0)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return unit(20, 1)


@pytest.mark.parametrize("index_type", ["pq", "opq", "binary"])
def test_memory_mapped_rescoring_returns_the_in_ram_top_k(index_type, docs, queries, tmp_path) -> None:
    params = {} if index_type == "binary" else PQ
    index = build_index(docs, None, index_type, {"rescore": 5, **params}, use_gpu=False, show_progress=False)
    assert not isinstance(index.faiss_index.vectors, np.memmap)
    in_ram = index.search(queries, 10)
    loaded = DenseIndex.load(index.save(tmp_path / index_type), use_gpu=False)
    assert isinstance(loaded.faiss_index.vectors, np.memmap)  # read from disk on demand, not loaded into RAM
    on_disk = loaded.search(queries, 10)
    np.testing.assert_array_equal(on_disk[1], in_ram[1])
    np.testing.assert_allclose(on_disk[0], in_ram[0], rtol=1e-6)
    exact = np.einsum("qd,qkd->qk", queries, docs[on_disk[1]])  # the scores are exact inner products
    np.testing.assert_allclose(on_disk[0], exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("index_type", ["pq", "opq"])
def test_rescoring_every_candidate_is_exact_search_and_fewer_is_close(index_type, docs, queries) -> None:
    flat = build_index(docs, use_gpu=False, show_progress=False).search(queries, 10)
    index = build_index(docs, None, index_type, PQ, use_gpu=False, show_progress=False)
    results = {}
    for rescore in (1, 10, 150):  # 150 x 10 candidates: every document
        index.params["rescore"] = rescore
        results[rescore] = index.search(queries, 10)
    np.testing.assert_array_equal(results[150][1], flat[1])
    few, some = results[1], results[10]

    def recall(ids: np.ndarray) -> float:
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, flat[1], strict=True)])

    assert recall(some[1]) > recall(few[1])
    assert recall(some[1]) >= 0.85  # 4-byte codes of random 32-d vectors: the hard case


def test_code_bytes_per_document(docs) -> None:
    assert pq_params(384, 5000, {"pq_m": None, "pq_bits": 8})["pq_m"] == 48  # default: at most 48 bytes a code
    assert pq_params(384, 5000, {"pq_m": None, "pq_bits": 4})["pq_m"] == 96
    pq = build_index(docs, None, "opq", PQ, use_gpu=False, show_progress=False)
    assert pq.bytes_per_vector()["code"] == 4 and pq.bytes_per_vector()["rescore"] == 4 * DIM
    binary = build_index(docs, None, "binary", use_gpu=False, show_progress=False)
    assert binary.bytes_per_vector()["code"] == DIM / 8
    flat = build_index(docs, use_gpu=False, show_progress=False)
    sizes = flat.bytes_per_vector()
    assert sizes["code"] == 0 and sizes["index"] == pytest.approx(4 * DIM, rel=0.01)


def test_exact_top_k_is_the_flat_index_search_without_an_index(docs, queries) -> None:
    flat_scores, flat_rows = build_index(docs, use_gpu=False, show_progress=False).search(queries, 20)
    scores, rows = exact_top_k(queries, docs, 20)
    np.testing.assert_allclose(scores, flat_scores, atol=1e-6)
    for i, j in zip(*np.nonzero(rows != flat_rows), strict=True):  # two kernels: rows may swap only within a tie
        assert np.isclose(flat_scores[i], flat_scores[i, j], atol=1e-6).sum() > 1
    assert exact_top_k(queries, docs[:5], 20)[1].shape == (len(queries), 5)  # k capped at the vectors
