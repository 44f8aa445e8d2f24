"""DenseIndex: exactness, recall of approximate types, batching, save/load and its failure messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sbmoe.errors import IndexLoadError
from sbmoe.retrieval.build import build_index
from sbmoe.retrieval.faiss_types import INDEX_TYPES
from sbmoe.retrieval.gpu import gpu_count
from sbmoe.retrieval.index import GPU_MAX_K, DenseIndex

DIM = 32


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    """3,000 unit vectors around 60 centres (neighbour structure, like document embeddings) and 50 queries."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(60, DIM))
    docs = centres[rng.integers(0, 60, 3000)] + 0.35 * rng.normal(size=(3000, DIM))
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[:50] + 0.2 * rng.normal(size=(50, DIM))
    return docs.astype(np.float32), (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def test_flat_is_exact(vectors: tuple[np.ndarray, np.ndarray]) -> None:
    docs, queries = vectors
    index = DenseIndex(DIM, "flat", use_gpu=False)
    index.add(docs[:1000], [f"d{i}" for i in range(1000)])
    index.add(docs[1000:], [f"d{i}" for i in range(1000, 3000)])
    scores, ids = index.search(queries, 10)
    exact = queries @ docs.T
    truth = np.argsort(-exact, axis=1)[:, :10]
    assert (ids == truth).all()
    assert np.allclose(scores, np.take_along_axis(exact, truth, axis=1), atol=1e-5)
    assert len(index) == 3000 and index.doc_ids[2999] == "d2999"


@pytest.mark.parametrize(
    ("index_type", "params", "floor"),
    [
        ("hnsw", {}, 0.98),
        ("ivf", {"nlist": 76, "nprobe": 16}, 0.98),
        ("sq8", {}, 0.9),
        ("ivfpq", {"pq_m": 16, "pq_bits": 4, "nlist": 32, "nprobe": 16}, 0.5),
        ("binary", {}, 0.75),
    ],  # 32 sign bits are a coarse filter: real embeddings have 384+
)
def test_approximate_types_find_the_neighbours(
    vectors: tuple[np.ndarray, np.ndarray], index_type: str, params: dict, floor: float
) -> None:
    docs, queries = vectors
    truth = np.argsort(-(queries @ docs.T), axis=1)[:, :20]
    index = build_index(docs, None, index_type, params, use_gpu=False, show_progress=False)
    scores, ids = index.search(queries, 20)
    assert recall(ids, truth) >= floor
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    if index_type == "binary":  # re-scored exactly: the scores are the true inner products
        assert np.allclose(scores, np.einsum("qkd,qd->qk", docs[ids], queries), atol=1e-5)


def test_k_is_capped_and_bad_inputs_are_named(vectors: tuple[np.ndarray, np.ndarray]) -> None:
    docs, queries = vectors
    index = build_index(docs[:5], ["a", "b", "c", "d", "e"], use_gpu=False, show_progress=False)
    scores, ids = index.search(queries[:2], 100)
    assert scores.shape == ids.shape == (2, 5)
    with pytest.raises(ValueError, match="2 ids for 3 embeddings"):
        build_index(docs[:3], ["x", "y"], use_gpu=False, show_progress=False)
    with pytest.raises(ValueError, match=r"dimension mismatch: expected n x 32 embeddings, got shape \(2, 16\)"):
        index.search(queries[:2, :16], 3)
    with pytest.raises(ValueError, match="unknown index type 'lsh': expected one of flat, hnsw, ivf, ivfpq, sq8"):
        DenseIndex(DIM, "lsh")
    with pytest.raises(ValueError, match=r"unknown index parameters \['nprobes'\]"):
        DenseIndex(DIM, "ivf", nprobes=3)
    with pytest.raises(ValueError, match="search on an empty index"):
        DenseIndex(DIM).search(queries, 3)


@pytest.mark.skipif(gpu_count() > 0, reason="checks the CPU-only error")
def test_gpu_required_without_gpu_fails_clearly() -> None:
    assert DenseIndex(DIM, "flat").use_gpu is False  # auto -> CPU here
    with pytest.raises(RuntimeError, match="use_gpu=True but faiss has no GPU support"):
        DenseIndex(DIM, "flat", use_gpu=True)


def test_k_beyond_the_gpu_limit_searches_the_cpu_copy(vectors: tuple[np.ndarray, np.ndarray]) -> None:
    index = build_index(vectors[0], use_gpu=False, show_progress=False)
    index.use_gpu = True  # pretend: a k over the GPU limit must not touch the GPU copy
    assert index._device_index(GPU_MAX_K + 1) is index._cpu


@pytest.mark.parametrize("index_type", INDEX_TYPES)
def test_save_load_round_trip(tmp_path: Path, vectors: tuple[np.ndarray, np.ndarray], index_type: str) -> None:
    docs, queries = vectors
    docs = docs[:1000]
    pq = {"pq_m": 8, "pq_bits": 4}  # 1-D sub-quantizers at 8 bits (the default for dim 32) train for a minute
    params = {"ivf": {"nlist": 16}, "ivfpq": {"nlist": 16, **pq}, "pq": pq, "opq": pq}.get(index_type, {})
    ids = [f"doc-{i}" for i in range(len(docs))]
    build = {"use_gpu": False, "model_name": "tiny", "model_hash": "abc123", "show_progress": False}
    index = build_index(docs, ids, index_type, params, **build)
    path = index.save(tmp_path / "idx")
    loaded = DenseIndex.load(path, expect_dim=DIM, expect_model_hash="abc123", use_gpu=False)
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["type"], manifest["dim"], manifest["count"], manifest["model"]) == (
        index_type,
        DIM,
        1000,
        {"name": "tiny", "hash": "abc123"},
    )
    assert loaded.doc_ids == ids and loaded.params == index.params
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10), strict=True):
        assert np.array_equal(a, b)


def test_save_replaces_atomically(tmp_path: Path, vectors: tuple[np.ndarray, np.ndarray]) -> None:
    docs, _ = vectors
    build_index(docs[:10], use_gpu=False, show_progress=False).save(tmp_path / "idx")
    build_index(docs[:20], use_gpu=False, show_progress=False).save(tmp_path / "idx")
    assert len(DenseIndex.load(tmp_path / "idx", use_gpu=False)) == 20
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temporary or old folders left


@pytest.fixture
def saved(tmp_path: Path, vectors: tuple[np.ndarray, np.ndarray]) -> Path:
    index = build_index(vectors[0][:100], use_gpu=False, model_name="m", model_hash="feedbeef", show_progress=False)
    return index.save(tmp_path / "idx")


def test_truncated_index_file(saved: Path) -> None:
    data = (saved / "index.faiss").read_bytes()
    (saved / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexLoadError, match=rf"index\.faiss: truncated or altered: {len(data) // 2} bytes, "):
        DenseIndex.load(saved)


def test_corrupt_index_file(saved: Path) -> None:
    data = bytearray((saved / "index.faiss").read_bytes())
    data[-7] ^= 0xFF
    (saved / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match=r"index\.faiss: corrupt: SHA-256 differs from manifest\.json"):
        DenseIndex.load(saved)


def test_unreadable_faiss_file_without_checksums(saved: Path) -> None:
    size = (saved / "index.faiss").stat().st_size
    (saved / "index.faiss").write_bytes(b"\0" * size)
    with pytest.raises(IndexLoadError, match=r"index\.faiss: faiss cannot read it"):
        DenseIndex.load(saved, verify=False)


def test_dimension_and_model_mismatch(saved: Path) -> None:
    with pytest.raises(IndexLoadError, match="dimension mismatch: the index holds 32-d vectors, the model gives 384"):
        DenseIndex.load(saved, expect_dim=384)
    with pytest.raises(IndexLoadError, match=r"model mismatch: built with m \(hash feedbeef\), expected hash 0123"):
        DenseIndex.load(saved, expect_model_hash="0123")


def test_missing_folder_and_bad_manifest(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(IndexLoadError, match=r"nowhere/manifest\.json: folder not found; expected an index folder"):
        DenseIndex.load(tmp_path / "nowhere")
    (saved / "manifest.json").write_text('{"format": 1,\n "dim": ')
    with pytest.raises(IndexLoadError, match=r"manifest\.json:2: invalid JSON"):
        DenseIndex.load(saved)
    (saved / "doc_ids.json").unlink()
    (saved / "manifest.json").write_text(json.dumps({"format": 2}))
    with pytest.raises(IndexLoadError, match=r"missing keys \['count', 'dim'"):
        DenseIndex.load(saved)
