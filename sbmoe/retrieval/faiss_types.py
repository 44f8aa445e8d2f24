"""The index types: which parameters each uses, which run on GPU, and the untrained faiss index each one is."""

from __future__ import annotations

from typing import Any

import faiss

from sbmoe.retrieval.rescore import PQ_TYPES, new_pq_index

INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq", "sq8", "binary", "pq", "opq")
GPU_TYPES = ("flat", "ivf", "ivfpq", "sq8")  # the rest stay on CPU (faiss has no GPU HNSW)
SETTINGS = {  # the parameters each type uses
    "flat": (),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
    "ivf": ("nlist", "nprobe"),
    "ivfpq": ("nlist", "nprobe", "pq_m", "pq_bits"),
    "sq8": (),
    "binary": ("rescore",),
    "pq": ("pq_m", "pq_bits", "rescore"),
    "opq": ("pq_m", "pq_bits", "rescore"),
}
FAISS_CLASSES = {  # the faiss class a saved index of each structure reads back as (a check on load)
    "flat": ("IndexFlatIP",),
    "hnsw": ("IndexHNSWFlat",),
    "ivf": ("IndexIVFFlat",),
    "ivfpq": ("IndexIVFPQ",),
    "sq8": ("IndexScalarQuantizer",),
    "binary": ("IndexBinaryFlat",),
    "pq": ("IndexPQ",),
    "opq": ("IndexPreTransform",),
}


def new_faiss(index_type: str, structure: str, dim: int, params: dict[str, Any]) -> Any:
    """An untrained faiss inner-product index of ``structure`` (``index_type``, or ``flat`` after a fallback)."""
    metric = faiss.METRIC_INNER_PRODUCT
    if structure == "flat":
        return faiss.IndexFlatIP(dim)
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], metric)
        index.hnsw.efConstruction = params["ef_construction"]
        return index
    if index_type == "sq8":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, metric)
    if index_type == "binary":
        return faiss.IndexBinaryFlat(dim)
    if index_type in PQ_TYPES:
        return new_pq_index(index_type, dim, params)
    quantizer = faiss.IndexFlatIP(dim)
    if index_type == "ivf":
        return faiss.IndexIVFFlat(quantizer, dim, params["nlist"], metric)
    return faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["pq_m"], params["pq_bits"], metric)
