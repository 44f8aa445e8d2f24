"""Streaming encoding in bounded memory: corpus -> encoded in chunks -> embedding shards, which
:func:`sbmoe.retrieval.build.build_index` indexes shard by shard.

Peak memory is one chunk being encoded and one shard being buffered; never the corpus. The shards
(see :mod:`sbmoe.retrieval.shards`) make a killed run resumable: a rerun checks the ids of the shards already
written against the corpus and encodes only the rest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from itertools import islice

import numpy as np
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from sbmoe.data.dataset import DataError, Doc, RetrievalDataset
from sbmoe.model import find_head
from sbmoe.retrieval.cache import model_fingerprint
from sbmoe.retrieval.documents import iter_unique_docs
from sbmoe.retrieval.encoder import Encoder, unit_rows
from sbmoe.retrieval.shards import ShardSet
from sbmoe.retrieval.store import DocStore

CHUNK = 2048  # documents per encode call


class ChunkEncoder:
    """Texts -> the embeddings :meth:`Retriever.build` indexes (unit rows for cosine models) and top-1 experts.

    The same split as :class:`sbmoe.retrieval.encoder.Encoder` (whose uncached path it is): the backbone up to
    pooling, then the tail.
    """

    def __init__(self, model: SentenceTransformer, batch_size: int = 64):
        self.model = model
        self.encoder = Encoder(model, batch_size=batch_size, show_progress=False)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        encoded = self.encoder.encode_texts(texts, "document")
        vectors = unit_rows(encoded.vectors) if self.model.similarity_fn_name == "cosine" else encoded.vectors
        return vectors, encoded.experts


def open_shards(model: SentenceTransformer, folder: str | os.PathLike, shard_size: int) -> ShardSet:
    """The shard folder for ``model``'s embeddings: new, or an earlier run's to resume."""
    dim = model.get_embedding_dimension()
    if dim is None:
        raise ValueError("the model does not report its embedding dimension")
    return ShardSet(folder, dim, shard_size, model_fingerprint(model))


def skip_written(shards: ShardSet, docs: Iterator[Doc]) -> None:
    """Advance ``docs`` past the rows already in ``shards``, checking that their ids are the shards' ids.

    Raises:
        DataError: the corpus differs from the one the shards were written from.
    """
    for shard in shards.shards:
        shards.check_written([doc.id for doc in islice(docs, shard.count)], shard.start)


def encode_to_shards(
    model: SentenceTransformer,
    dataset: RetrievalDataset,
    folder: str | os.PathLike,
    shard_size: int = 100_000,
    batch_size: int = 64,
    chunk: int = CHUNK,
    show_progress: bool = True,
) -> ShardSet:
    """Encode the corpus chunk by chunk into the shard folder ``folder``, resuming after the shards it holds.

    Returns:
        The complete shard set.
    """
    shards = open_shards(model, folder, shard_size)
    docs = iter_unique_docs(dataset)
    skip_written(shards, docs)
    if shards.complete:
        if next(docs, None) is not None:
            raise DataError(
                f"{shards.folder}: complete shards of a shorter corpus; remove them or pass another folder"
            )
        return shards
    encoder = ChunkEncoder(model, batch_size)
    with tqdm(desc="encode to shards", unit="doc", initial=len(shards), disable=not show_progress) as bar:
        while batch := list(islice(docs, chunk)):
            vectors, experts = encoder([doc.full_text for doc in batch])
            shards.append(vectors, batch, experts)
            bar.update(len(batch))
    return shards.finish()


def store_from_shards(model: SentenceTransformer, shards: ShardSet) -> DocStore:
    """A temporary document store of the shards' rows (ids, titles, texts, and experts when ``model`` has a head),
    so the corpus is not read again."""
    store = DocStore.temporary()
    has_head = find_head(model) is not None
    for shard in shards.shards:
        rows = shards.rows(shard)
        docs = (Doc(*fields) for fields in zip(rows["id"], rows["title"], rows["text"], strict=True))
        store.add(docs, rows["expert"] if has_head else None)
    return store
