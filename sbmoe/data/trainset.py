"""Training data for fine-tuning: (query, positive[, negatives]) examples from BEIR, ir_datasets or jsonl."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sbmoe.data.beir import load_dataset
from sbmoe.data.dataset import DataError, Problem, RetrievalDataset
from sbmoe.data.irds import irds_dataset
from sbmoe.data.textfile import json_lines
from sbmoe.paths import data_dir as default_data_dir

logger = logging.getLogger(__name__)


@dataclass
class Example:
    """One training example: a query id, a positive doc id and optional given negative doc ids."""

    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)


@dataclass
class TrainSet:
    """Texts by id plus the examples that point into them.

    Attributes:
        queries: ``{query_id: text}``.
        docs: ``{doc_id: text}``; the pool hard negatives are mined from (the whole corpus for BEIR data).
        examples: One per (query, positive) pair.
        qrels: ``{query_id: {doc_id: 1}}`` of the positives (mining excludes them; the dev split uses them).
        titles: ``{doc_id: title}`` where known (for title -> document self-supervision).
    """

    queries: dict[str, str]
    docs: dict[str, str]
    examples: list[Example]
    qrels: dict[str, dict[str, int]]
    titles: dict[str, str] = field(default_factory=dict)

    def restrict(self, query_ids: set[str]) -> TrainSet:
        """The same set with only the examples of ``query_ids``."""
        return TrainSet(
            queries=self.queries,
            docs=self.docs,
            examples=[e for e in self.examples if e.query in query_ids],
            qrels={q: d for q, d in self.qrels.items() if q in query_ids},
            titles=self.titles,
        )


def load_train_set(spec: str, data_dir: str | Path | None = None) -> TrainSet:
    """Load training data.

    Args:
        spec: ``NAME:SPLIT`` or ``FOLDER:SPLIT`` (a BEIR folder, e.g. ``scifact:train``), ``irds:<id>`` with
            docpairs (e.g. ``irds:msmarco-passage/train/triples-small``) or qrels, or a ``.jsonl`` file of
            ``{"query", "positive"[, "negatives"]}`` objects.
        data_dir: Folder holding BEIR datasets by name (default: :func:`sbmoe.data.data_dir`).

    Raises:
        DataError: naming the file and line of a malformed record.
    """
    if spec.endswith(".jsonl"):
        return _load_jsonl(Path(spec))
    if spec.startswith("irds:"):
        dataset = irds_dataset(spec.removeprefix("irds:"), default_data_dir(data_dir))
        if dataset.has_docpairs():
            return _irds_docpairs(dataset)
    name, _, split = spec.rpartition(":")
    if not (name or spec.startswith("irds:")):
        raise DataError(f"training data {spec!r}: expected NAME:SPLIT, irds:<id> or a .jsonl file")
    return _from_qrels(load_dataset(spec, split=split or "train", data_dir=data_dir))


def load_train_sets(
    specs: str, data_dir: str | Path | None = None, max_positives_per_query: int = 0
) -> list[tuple[str, TrainSet]]:
    """Load each comma-separated training source (see :func:`load_train_set`), named by its spec.

    Args:
        specs: One or more training data specs, comma-separated.
        data_dir: Folder holding BEIR datasets by name.
        max_positives_per_query: Keep at most this many positives per query (a seeded sample; 0 keeps all).

    Raises:
        DataError: an empty spec list, a source named twice, or a source's own error.
    """
    names = [s.strip() for s in specs.split(",") if s.strip()]
    if not names:
        raise DataError("--train-data is empty: expected NAME:SPLIT, irds:<id> or a .jsonl file")
    if len(set(names)) != len(names):
        raise DataError(f"--train-data names a source twice: {specs}")
    sets = [(name, load_train_set(name, data_dir)) for name in names]
    if max_positives_per_query:
        sets = [(name, cap_positives(data, max_positives_per_query)) for name, data in sets]
    return sets


def cap_positives(data: TrainSet, limit: int) -> TrainSet:
    """Keep at most ``limit`` positive examples per query (a sample seeded by the query id); every judged document
    stays in the qrels, so none is mined as a negative."""
    kept: dict[str, set[str]] = {}
    for qid, rels in data.qrels.items():
        positives = sorted(rels)
        kept[qid] = set(random.Random(f"cap:{qid}").sample(positives, min(limit, len(positives))))
    examples = [e for e in data.examples if e.positive in kept.get(e.query, ())]
    return TrainSet(data.queries, data.docs, examples, data.qrels, data.titles)  # all qrels: never mined


def _from_qrels(dataset: RetrievalDataset) -> TrainSet:
    """One example per positive qrel whose query and document exist; the whole corpus is the pool for negatives.

    Problems (qrels naming unknown queries or documents, blank queries, empty or duplicate documents) are logged
    as warnings with counts and examples, as evaluation does; a set left with no example is an error.

    Raises:
        DataError: no usable training example, saying why.
    """
    for warning in dataset.validate():
        logger.warning("training data %s", warning)
    titles, docs = {}, {}
    for doc in dataset.iter_docs():
        titles.setdefault(doc.id, doc.title)  # a duplicated id keeps its first document, as the index would
        docs.setdefault(doc.id, doc.full_text)
    blank = Problem("queries with blank text")
    qrels: dict[str, dict[str, int]] = {}
    for qid, rels in dataset.qrels.items():
        if qid not in dataset.queries:
            continue
        if not dataset.queries[qid].strip():
            blank.add(qid)
            continue
        positives = {d: 1 for d, s in rels.items() if s >= dataset.relevance_level and d in docs}
        if positives:
            qrels[qid] = positives
    if blank.count:
        logger.warning("training data %s: %s, skipped", dataset.name, blank)
    if not qrels:
        raise DataError(f"{dataset.name} ({dataset.split}): no usable training example: {_why_empty(dataset, docs)}")
    examples = [Example(q, d) for q in sorted(qrels) for d in sorted(qrels[q])]
    return TrainSet({q: dataset.queries[q] for q in qrels}, docs, examples, qrels, titles)


def _why_empty(dataset: RetrievalDataset, docs: dict[str, str]) -> str:
    """Why no qrel of ``dataset`` gives a training example."""
    if not dataset.qrels:
        return f"qrels split {dataset.split!r} has no judgments"
    if not dataset.queries:
        return f"none of the {len(dataset.qrels)} qrels query ids is in the queries file (queries empty or ids differ)"
    judged = {d for q in dataset.queries for d, s in dataset.qrels[q].items() if s >= dataset.relevance_level}
    if not judged:
        return f"no qrel has a score >= {dataset.relevance_level} (expected positive judgments)"
    if not judged & docs.keys():
        example = ", ".join(sorted(judged)[:3])
        return f"none of the {len(judged)} judged document ids is in the corpus (e.g. {example})"
    return "every query with a judged document has blank text"


def _irds_docpairs(dataset: Any) -> TrainSet:
    """(query, positive, negative) triples of an ir-datasets dataset with docpairs (texts from its docs store)."""
    queries = {q.query_id: q.text for q in dataset.queries_iter()}
    store = dataset.docs_store()
    examples = [Example(p.query_id, p.doc_id_a, [p.doc_id_b]) for p in dataset.docpairs_iter()]
    ids = {e.positive for e in examples} | {n for e in examples for n in e.negatives}
    docs = {doc.doc_id: _irds_text(doc) for doc in store.get_many_iter(ids)}
    qrels: dict[str, dict[str, int]] = {}
    for e in examples:
        qrels.setdefault(e.query, {})[e.positive] = 1
    return TrainSet(queries, docs, examples, qrels)


def _irds_text(doc) -> str:
    title = getattr(doc, "title", "") or ""
    return f"{title} {getattr(doc, 'text', '') or ''}".strip()


def _load_jsonl(path: Path) -> TrainSet:
    if not path.is_file():
        raise DataError(f"{path}: training file not found")
    queries: dict[str, str] = {}
    doc_ids: dict[str, str] = {}
    examples: list[Example] = []

    def doc_id(text: str) -> str:
        return doc_ids.setdefault(text, f"d{len(doc_ids)}")

    expected = 'expected {"query": text, "positive": text, "negatives": [text, ...]} (negatives optional)'
    for number, record in json_lines(path, expected):
        where = f"{path}:{number}"
        query, positive = record.get("query"), record.get("positive")
        negatives = record.get("negatives", [])
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"{where}: 'query' must be a non-empty string; {expected}")
        if not isinstance(positive, str) or not positive.strip():
            raise DataError(f"{where}: 'positive' must be a non-empty string; {expected}")
        if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
            raise DataError(f"{where}: 'negatives' must be a list of non-empty strings; {expected}")
        qid = f"q{number}"
        queries[qid] = query
        examples.append(Example(qid, doc_id(positive), [doc_id(n) for n in negatives]))
    if not examples:
        raise DataError(f"{path}: no training examples")
    docs = {i: text for text, i in doc_ids.items()}
    return TrainSet(queries, docs, examples, {e.query: {e.positive: 1} for e in examples})


def cropped_span(doc_id: str, text: str, low: float = 0.1, high: float = 0.5, min_words: int = 5) -> str:
    """A random span of ``text`` (Contriever-style cropping) covering ``low``..``high`` of its words.

    The span depends only on ``doc_id``, so its embedding is cached once for every run and seed.
    """
    words = text.split()
    rng = random.Random(f"crop:{doc_id}")
    length = min(len(words), max(min_words, round(rng.uniform(low, high) * len(words))))
    start = rng.randint(0, len(words) - length)
    return " ".join(words[start : start + length])
