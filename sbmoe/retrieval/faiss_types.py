"""The index types: the faiss factory string each one is, the parameters it uses, which run on GPU, and a check of
the parameters a caller gives."""

from __future__ import annotations

from typing import Any

import faiss

from sbmoe.errors import DataError

PARAM_DEFAULTS: dict[str, Any] = {  # every index parameter; None: a default chosen from the data at training
    "hnsw_m": 32,
    "ef_construction": 200,
    "ef_search": 256,
    "nlist": None,
    "nprobe": None,
    "pq_m": None,
    "pq_bits": 8,
    "rescore": 10,
}
FACTORY = {  # index type -> faiss index_factory string, filled from the parameters (binary: index_binary_factory)
    "flat": "Flat",
    "hnsw": "HNSW{hnsw_m}",
    "ivf": "IVF{nlist},Flat",
    "ivfpq": "IVF{nlist},PQ{pq_m}x{pq_bits}",
    "sq8": "SQ8",
    "binary": "BFlat",
    "pq": "PQ{pq_m}x{pq_bits}",
    "opq": "OPQ{pq_m},PQ{pq_m}x{pq_bits}",
}
INDEX_TYPES = tuple(FACTORY)
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


def check_index_params(index_type: str, params: dict[str, Any]) -> None:
    """Check an index type and its parameters before anything is encoded or built.

    Raises:
        ValueError: an unknown type or parameter name.
        DataError: a value that is no positive integer (None is a default); faiss misbehaves or aborts on those.
    """
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}: expected one of {', '.join(INDEX_TYPES)}")
    unknown = set(params) - set(PARAM_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown index parameters {sorted(unknown)}: expected some of {sorted(PARAM_DEFAULTS)}")
    for key, value in params.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"index parameter {key}={value!r}: expected a positive integer")


def new_faiss(structure: str, dim: int, params: dict[str, Any]) -> Any:
    """An untrained faiss inner-product index of ``structure`` (an index type, or ``flat`` after a fallback)."""
    spec = FACTORY[structure].format(**params)
    if structure == "binary":
        return faiss.index_binary_factory(dim, spec)
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    if structure == "hnsw":
        index.hnsw.efConstruction = params["ef_construction"]
    return index
