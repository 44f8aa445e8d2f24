"""Training data for fine-tuning: (query, positive[, negatives]) examples from BEIR, ir_datasets or jsonl."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from sbmoe.data.beir import load_dataset
from sbmoe.data.dataset import DataError, RetrievalDataset


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
    if spec.startswith("irds:") and _irds_has_docpairs(spec):
        return _load_irds_docpairs(spec)
    name, _, split = spec.rpartition(":")
    if not (name or spec.startswith("irds:")):
        raise DataError(f"training data {spec!r}: expected NAME:SPLIT, irds:<id> or a .jsonl file")
    return _from_qrels(load_dataset(spec, split=split or "train", data_dir=data_dir))


def _from_qrels(dataset: RetrievalDataset) -> TrainSet:
    """One example per positive qrel; the whole corpus is the pool for negatives."""
    titles, docs = {}, {}
    for doc in dataset.iter_docs():
        titles[doc.id] = doc.title
        docs[doc.id] = doc.full_text
    qrels = {q: {d: 1 for d, s in rel.items() if s > 0} for q, rel in dataset.qrels.items()}
    qrels = {q: rel for q, rel in qrels.items() if rel}
    examples = [Example(q, d) for q in sorted(qrels) for d in sorted(qrels[q])]
    return TrainSet(dict(dataset.queries), docs, examples, qrels, titles)


def _irds_has_docpairs(spec: str) -> bool:
    import ir_datasets

    return ir_datasets.load(spec.removeprefix("irds:")).has_docpairs()


def _load_irds_docpairs(spec: str) -> TrainSet:
    """(query, positive, negative) triples of an ir_datasets id with docpairs (texts from its docs store)."""
    import ir_datasets

    dataset = ir_datasets.load(spec.removeprefix("irds:"))
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

    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            query, positive = record.get("query"), record.get("positive")
            negatives = record.get("negatives", [])
            if not isinstance(query, str) or not query.strip():
                raise DataError(f"{where}: 'query' must be a non-empty string")
            if not isinstance(positive, str) or not positive.strip():
                raise DataError(f"{where}: 'positive' must be a non-empty string")
            if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
                raise DataError(f"{where}: 'negatives' must be a list of non-empty strings")
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
