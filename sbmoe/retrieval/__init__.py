"""Retrieval: encode once (cached pooled vectors + the model's head), index with faiss, store texts, search.

:class:`Retriever` puts model, index and document store behind one object.
"""

from sbmoe.retrieval.encoder import Encoded, Encoder
from sbmoe.retrieval.index import INDEX_TYPES, DenseIndex, IndexLoadError
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
]
