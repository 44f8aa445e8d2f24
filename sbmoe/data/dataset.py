"""The retrieval data types: a streaming :class:`RetrievalDataset` of queries, qrels and :class:`Doc` documents."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

from sbmoe.errors import DataError as DataError

EXAMPLES = 5


def texts_fingerprint(texts: Iterable[str]) -> str:
    """Hash of texts in order; a corpus and the list of its documents' texts get the same one."""
    digest = hashlib.blake2b(digest_size=16)
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
    return digest.hexdigest()


def beir_text(title: str | None, text: str | None) -> str:
    """BEIR's document text: ``title + " " + text``, stripped (title-only and text-only documents work)."""
    return f"{title or ''} {text or ''}".strip()


@dataclass(frozen=True)
class Doc:
    """One corpus document."""

    id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """BEIR's document text (see :func:`beir_text`)."""
        return beir_text(self.title, self.text)


@dataclass
class Problem:
    """A validation finding: how many items are affected, with a few examples."""

    what: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, item: str) -> None:
        """Count ``item`` and keep it as an example while there are fewer than :data:`EXAMPLES`."""
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(item)

    def __str__(self) -> str:
        return f"{self.count} {self.what} (e.g. {', '.join(self.examples)})"


@dataclass
class CorpusScan:
    """What one streaming pass over the corpus found."""

    size: int
    fingerprint: str
    empty_docs: Problem
    duplicate_ids: Problem
    qrel_docs_found: set[str]


class RetrievalDataset:
    """Queries, qrels and a corpus that streams in batches (it never needs to fit in RAM).

    Attributes:
        name: Dataset name (``scifact``, ``irds:cranfield``...).
        split: The qrels split.
        queries: Query id -> text, only the queries that have qrels in ``split`` (as BEIR's loader does).
        qrels: Query id -> {doc id: graded relevance}.
        relevance_level: Lowest grade that binary metrics (MAP, Recall, P, MRR) count as relevant.
    """

    def __init__(
        self,
        name: str,
        split: str,
        queries: dict[str, str],
        qrels: dict[str, dict[str, int]],
        docs: Callable[[], Iterable[Doc]],
        relevance_level: int = 1,
        unknown_queries: Problem | None = None,
    ):
        self.name = name
        self.split = split
        self.queries = queries
        self.qrels = qrels
        self.relevance_level = relevance_level
        self._docs = docs
        self._unknown_queries = unknown_queries or Problem("qrels query ids not in the queries")

    def __repr__(self) -> str:
        return f"RetrievalDataset({self.name!r}, split={self.split!r}, queries={len(self.queries)})"

    @property
    def unknown_queries(self) -> Problem:
        """The qrels query ids that have no text in the queries file."""
        return self._unknown_queries

    def iter_docs(self) -> Iterator[Doc]:
        """Stream the corpus one document at a time, in file order."""
        yield from self._docs()

    def iter_corpus(self, batch_size: int = 10_000) -> Iterator[list[Doc]]:
        """Stream the corpus in lists of at most ``batch_size`` documents."""
        batch: list[Doc] = []
        for doc in self.iter_docs():
            batch.append(doc)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def corpus(self) -> dict[str, dict[str, str]]:
        """The whole corpus in BEIR's in-memory form: doc id -> ``{"title", "text"}`` (small corpora only)."""
        return {doc.id: {"title": doc.title, "text": doc.text} for doc in self.iter_docs()}

    @cached_property
    def scan(self) -> CorpusScan:
        """One pass over the corpus: size, content fingerprint, empty and duplicate documents, qrel docs seen."""
        digest = hashlib.blake2b(digest_size=16)
        wanted = {doc_id for rels in self.qrels.values() for doc_id in rels}
        empty, duplicates = Problem("documents with empty title and text"), Problem("duplicate document ids")
        seen: set[str] = set()
        found: set[str] = set()
        size = 0
        for doc in self.iter_docs():
            size += 1
            digest.update(doc.full_text.encode("utf-8", "surrogatepass") + b"\x00")
            if not doc.full_text:
                empty.add(doc.id)
            if doc.id in wanted:
                found.add(doc.id)
            if size <= 1_000_000 and doc.id in seen:  # bounded memory: duplicates are checked in the first 1M only
                duplicates.add(doc.id)
            elif size <= 1_000_000:
                seen.add(doc.id)
        return CorpusScan(size, digest.hexdigest(), empty, duplicates, found)

    @property
    def corpus_size(self) -> int:
        """Number of documents (one streaming pass, cached)."""
        return self.scan.size

    @property
    def fingerprint(self) -> str:
        """Hash of the documents' texts in order (:func:`texts_fingerprint` of them); keys the embedding cache."""
        return self.scan.fingerprint

    def validate(self) -> list[str]:
        """Problems worth a warning: qrels pointing at unknown query/doc ids, empty or duplicate documents.

        Returns:
            One human-readable line per problem found, each with a count and examples; empty when all is well.
        """
        scan = self.scan
        unknown_docs = Problem("qrels doc ids not in the corpus")
        for qid, rels in self.qrels.items():
            for doc_id in rels:
                if doc_id not in scan.qrel_docs_found:
                    unknown_docs.add(f"{qid}/{doc_id}")
        problems = (self.unknown_queries, unknown_docs, scan.empty_docs, scan.duplicate_ids)
        return [f"{self.name}: {problem}" for problem in problems if problem.count]


def select_queries(qrels: dict[str, dict[str, int]], queries: dict[str, str]) -> tuple[dict[str, str], Problem]:
    """Queries that have qrels, in qrels order, and the qrels query ids that have no query text."""
    unknown = Problem("qrels query ids not in the queries")
    selected = {}
    for qid in qrels:
        if qid in queries:
            selected[qid] = queries[qid]
        else:
            unknown.add(qid)
    return selected, unknown
