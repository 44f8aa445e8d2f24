"""What a retriever indexes: a corpus spec, dataset or iterable of documents, as a list with unique, valid ids."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping

from sbmoe.data.corpus import load_corpus
from sbmoe.data.dataset import Doc, Problem, RetrievalDataset
from sbmoe.data.ids import check_id
from sbmoe.errors import DataError

logger = logging.getLogger(__name__)

Corpus = str | os.PathLike | RetrievalDataset | Iterable[Doc | Mapping[str, str]]


def as_dataset(corpus: Corpus, data_dir: str | os.PathLike | None = None) -> RetrievalDataset:
    """A corpus spec, dataset or iterable of documents as a :class:`~sbmoe.data.RetrievalDataset`."""
    if isinstance(corpus, RetrievalDataset):
        return corpus
    if isinstance(corpus, str | os.PathLike):
        return load_corpus(corpus, data_dir)
    docs = [as_doc(item) for item in corpus]
    return RetrievalDataset("docs", "corpus", {}, {}, lambda: iter(docs))


def as_doc(item: Doc | Mapping[str, str]) -> Doc:
    """A :class:`~sbmoe.data.Doc`, or a dict with ``_id`` (or ``id``), ``title`` and ``text``, as a Doc."""
    if isinstance(item, Doc):
        return item
    doc_id = item.get("_id", item.get("id"))
    if doc_id in (None, ""):
        raise DataError(f"document {dict(item)!r} has no '_id' or 'id'")
    return Doc(str(doc_id), item.get("title") or "", item.get("text") or "")


def unique_docs(corpus: Corpus, data_dir: str | os.PathLike | None = None) -> list[Doc]:
    """The corpus's documents in order, the first of each repeated id kept (a warning counts the others).

    Raises:
        DataError: an id that an index cannot hold (see :func:`sbmoe.data.ids.check_id`), with its position.
    """
    return list(iter_unique_docs(as_dataset(corpus, data_dir)))


def iter_unique_docs(dataset: RetrievalDataset) -> Iterator[Doc]:
    """:func:`unique_docs` one document at a time (the ids seen so far are kept, not the documents)."""
    seen: set[str] = set()
    repeated = Problem("repeated document ids, the first of each kept")
    for number, doc in enumerate(dataset.iter_docs(), start=1):
        check_id(doc.id, f"{dataset.name}: document {number}")
        if doc.id in seen:
            repeated.add(doc.id)
            continue
        seen.add(doc.id)
        yield doc
    if repeated.count:
        logger.warning("%s: %s", dataset.name, repeated)
