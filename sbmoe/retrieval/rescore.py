"""Exact inner products: top-k over all vectors, and re-scoring around a compressed index (:class:`RescoredIndex`:
PQ / OPQ codes or sign bits in RAM pick candidates, whose float vectors, a memory-mapped ``vectors.npy`` once the
index is saved and loaded, give the exact scores)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from sbmoe.retrieval.ivf import pq_subquantizers

PQ_TYPES = ("pq", "opq")
PQ_BYTES = 48  # default code budget per vector: pq_m is the largest divisor of dim up to this (at 8 bits)
VECTORS_FILE = "vectors.npy"  # a re-scored index's float vectors, beside its codes


class RescoredIndex:
    """A compressed faiss index (``codes``) whose ``rescore * k`` best candidates are re-scored exactly.

    It answers the calls a faiss index does (``d``, ``ntotal``, ``is_trained``, ``train``, ``add``, ``search``),
    so :class:`~sbmoe.retrieval.index.DenseIndex` serves it as it serves any faiss index.

    Args:
        codes: The compressed faiss index: PQ or OPQ, or a binary one searched by the rows' sign bits.
        rescore: Candidates per result re-scored (:meth:`search` takes ``rescore * k``).
        vectors: Float vectors already added (a memory map once loaded); None: none yet.
    """

    def __init__(self, codes: Any, rescore: int, vectors: np.ndarray | None = None):
        self.codes, self.rescore = codes, rescore
        self.binary = isinstance(codes, faiss.IndexBinary)
        self.d = codes.d  # binary: d bits, d / 8 bytes a code
        self._vectors = [] if vectors is None else [vectors]

    @property
    def ntotal(self) -> int:
        """Vectors held."""
        return int(self.codes.ntotal)

    @property
    def is_trained(self) -> bool:
        """Whether the codes are trained."""
        return bool(self.codes.is_trained)

    @property
    def vectors(self) -> np.ndarray:
        """The float vectors (N x d float32) kept for re-scoring (memory-mapped after loading)."""
        if not self._vectors:
            return np.zeros((0, self.d), dtype=np.float32)
        if len(self._vectors) > 1:
            self._vectors = [np.concatenate(self._vectors)]
        return self._vectors[0]

    def _probe(self, x: np.ndarray) -> np.ndarray:
        return binary_codes(x) if self.binary else x

    def train(self, sample: np.ndarray) -> None:
        """Train the codes on ``sample`` (float rows)."""
        self.codes.train(self._probe(sample))

    def add(self, x: np.ndarray) -> None:
        """Append float rows: their codes, and the rows themselves for re-scoring."""
        self.codes.add(self._probe(x))
        self._vectors.append(x)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of the ``rescore * k`` best rows by the codes, by exact inner product."""
        _, rows = self.codes.search(self._probe(queries), min(self.ntotal, k * self.rescore))
        return rescore(queries, self.vectors, rows, k)

    def code_bytes(self, params: dict[str, Any]) -> float:
        """Bytes of one vector's code in RAM (codebooks and rotations, shared by all vectors, are not counted)."""
        return self.d / 8 if self.binary else params["pq_m"] * params["pq_bits"] / 8

    def serialized_bytes(self) -> int:
        """Bytes of the serialized codes index."""
        writer = faiss.serialize_index_binary if self.binary else faiss.serialize_index
        return int(writer(self.codes).nbytes)

    def write(self, file: Path) -> None:
        """Write the codes index to ``file`` and the float vectors to :data:`VECTORS_FILE` beside it."""
        (faiss.write_index_binary if self.binary else faiss.write_index)(self.codes, str(file))
        np.save(file.parent / VECTORS_FILE, self.vectors)


def with_rescoring(index: Any, params: dict[str, Any], vectors: np.ndarray | None = None) -> Any:
    """``index`` wrapped in a :class:`RescoredIndex` when its type re-scores (its settings have ``rescore``)."""
    return RescoredIndex(index, params["rescore"], vectors) if "rescore" in params else index


def binary_codes(x: np.ndarray) -> np.ndarray:
    """Sign bits of each row, packed 8 per byte (the binary index's codes)."""
    return np.packbits(x > 0, axis=1)


def pq_params(dim: int, train_size: int, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``pq_m`` filled in (default: the largest divisor of ``dim`` up to
    ``PQ_BYTES * 8 / pq_bits``) and checked against the dimension and the training sample."""
    pq_m = params["pq_m"]
    if pq_m is None:
        limit = max(1, PQ_BYTES * 8 // params["pq_bits"])
        pq_m = max(m for m in range(1, min(dim, limit) + 1) if dim % m == 0)
    return {**params, "pq_m": pq_subquantizers(dim, train_size, pq_m, params["pq_bits"])}


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` (at most all) rows of ``vectors`` with the largest inner product with each query, best first:
    ``scores`` and ``rows`` (``nq x k``), as a flat index finds them, without building one."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)


def rescore(queries: np.ndarray, vectors: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidate ``rows`` (-1: none); the top ``k`` of them.

    ``vectors`` may be a read-only memory map: only the candidates' rows are read (inside faiss, no copy).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    ptr = faiss.swig_ptr
    faiss.knn_inner_products_by_idx(
        ptr(queries),
        ptr(np.ascontiguousarray(vectors)),
        ptr(rows),
        queries.shape[1],
        len(queries),
        len(vectors),
        rows.shape[1],  # nsubset: candidates per query
        k,
        ptr(scores),
        ptr(ids),
        rows.shape[1],  # ld_ids given explicitly: faiss 1.15 misreads the -1 default
    )
    return scores, ids
