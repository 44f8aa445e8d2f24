"""Retrieval: encode once (cached pooled vectors + the model's head), index with faiss, store texts, search.

:class:`Retriever` puts model, index and document store behind one object.
"""

from sbmoe.errors import IndexLoadError
from sbmoe.retrieval.build import build_index
from sbmoe.retrieval.encoder import Encoded, Encoder
from sbmoe.retrieval.faiss_types import INDEX_TYPES
from sbmoe.retrieval.index import DenseIndex
from sbmoe.retrieval.retriever import Hit, Retriever
from sbmoe.retrieval.store import DocStore

__all__ = [
    "INDEX_TYPES",
    "DenseIndex",
    "DocStore",
    "Encoded",
    "Encoder",
    "Hit",
    "IndexLoadError",
    "Retriever",
    "build_index",
]
