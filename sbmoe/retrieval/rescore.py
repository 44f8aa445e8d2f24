"""Compressed indexes with exact re-scoring: PQ / OPQ codes or sign bits in RAM pick candidates, whose float
vectors (a memory-mapped ``vectors.npy`` once the index is saved and loaded) give the exact inner products."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from sbmoe.retrieval.ivf import pq_subquantizers

RESCORED_TYPES = ("binary", "pq", "opq")  # types that keep float vectors beside their codes
PQ_TYPES = ("pq", "opq")
PQ_BYTES = 48  # default code budget per vector: pq_m is the largest divisor of dim up to this (at 8 bits)


def pq_params(dim: int, train_size: int, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``pq_m`` filled in (default: the largest divisor of ``dim`` up to
    ``PQ_BYTES * 8 / pq_bits``) and checked against the dimension and the training sample."""
    pq_m = params["pq_m"]
    if pq_m is None:
        limit = max(1, PQ_BYTES * 8 // params["pq_bits"])
        pq_m = max(m for m in range(1, min(dim, limit) + 1) if dim % m == 0)
    return {**params, "pq_m": pq_subquantizers(dim, train_size, pq_m, params["pq_bits"])}


def code_bytes(index_type: str, dim: int, params: dict[str, Any]) -> float:
    """Bytes of one vector's code in RAM (codebooks and rotations, shared by all vectors, are not counted)."""
    if index_type == "binary":
        return dim / 8
    return params["pq_m"] * params["pq_bits"] / 8


def candidates(index_type: str, index: Any, queries: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` best rows per query by the compressed codes (Hamming distance for ``binary``)."""
    probe = np.packbits(queries > 0, axis=1) if index_type == "binary" else queries
    _, rows = index.search(probe, count)
    return rows


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
