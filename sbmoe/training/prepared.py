"""Training rows over cached pooled vectors, one slice per training source, and the dev score on them.

Each source keeps its own dev split, its own corpus (hard negatives are mined within it) and its own cache entries,
so adding a source never re-encodes the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sbmoe.data.splits import unseen_dev_split
from sbmoe.data.trainset import Example, TrainSet, cropped_span
from sbmoe.evaluation.evaluate import evaluate_embeddings
from sbmoe.heads import SBMoEHead
from sbmoe.model import SBMoEModel, find_head
from sbmoe.retrieval.encode import pooled_features
from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.head_trainer import embed, mine_hard_negatives


@dataclass
class Source:
    """One training source's slice of :class:`PreparedData`: its anchors, documents and dev split."""

    name: str
    anchors: range
    docs: range
    examples: int
    dev_ids: list[str] = field(default_factory=list)
    dev_texts: list[str] = field(default_factory=list)
    dev_vectors: torch.Tensor | None = None
    dev_qrels: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What run.json records of the source."""
        sizes = {"anchors": len(self.anchors), "docs": len(self.docs), "dev_queries": len(self.dev_ids)}
        return {"name": self.name, "examples": self.examples, **sizes}


@dataclass
class PreparedData:
    """Training rows over cached vectors: anchors (queries, then titles), documents, example rows, sources.

    ``rows`` are ``[anchor row, positive doc row, negative doc rows...]`` into ``anchors`` and ``docs``, which
    concatenate the sources in order; ``row_source`` is each row's source index.
    """

    anchors: torch.Tensor
    docs: torch.Tensor
    doc_ids: list[str]
    rows: torch.Tensor
    row_source: torch.Tensor
    anchor_texts: list[str]
    doc_texts: list[str]
    sources: list[Source]

    @property
    def dev_queries(self) -> int:
        """Dev queries over all sources."""
        return sum(len(s.dev_ids) for s in self.sources)


def prepare(model: SBMoEModel, args: FinetuneArguments, sets: list[tuple[str, TrainSet]]) -> PreparedData:
    """Prepare each source (:func:`prepare_source`) and concatenate them; rows keep the width all sources have."""
    parts = [prepare_source(model, args, name, data) for name, data in sets]
    width = min(part.rows.shape[1] for part in parts)
    anchor_offset = doc_offset = 0
    rows, sources = [], []
    for part in parts:
        shift = torch.tensor([anchor_offset] + [doc_offset] * (width - 1))
        rows.append(part.rows[:, :width] + shift)
        source = part.sources[0]
        source.anchors = range(anchor_offset, anchor_offset + len(part.anchor_texts))
        source.docs = range(doc_offset, doc_offset + len(part.doc_ids))
        sources.append(source)
        anchor_offset, doc_offset = source.anchors.stop, source.docs.stop
    return PreparedData(
        anchors=torch.cat([p.anchors for p in parts]),
        docs=torch.cat([p.docs for p in parts]),
        doc_ids=[d for p in parts for d in p.doc_ids],
        rows=torch.cat(rows),
        row_source=torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)]),
        anchor_texts=[t for p in parts for t in p.anchor_texts],
        doc_texts=[t for p in parts for t in p.doc_texts],
        sources=sources,
    )


def prepare_source(model: SBMoEModel, args: FinetuneArguments, name: str, data: TrainSet) -> PreparedData:
    """Split off the dev queries, compute (cached) pooled vectors, and mine hard negatives with the initial model."""
    dev_qrels: dict[str, dict[str, int]] = {}
    if args.dev_queries:
        train_qrels, dev_qrels = unseen_dev_split(data.qrels, args.dev_queries)
        data = data.restrict(set(train_qrels))
    doc_ids = list(data.docs)
    doc_row = {d: i for i, d in enumerate(doc_ids)}
    by_query: dict[str, list[Example]] = {}
    for example in data.examples:
        by_query.setdefault(example.query, []).append(example)
    query_ids = sorted(by_query)
    anchor_texts = [data.queries[q] for q in query_ids]
    examples = [(i, e) for i, q in enumerate(query_ids) for e in by_query[q]]
    if args.self_supervised == "title":
        titled = [d for d in doc_ids if data.titles.get(d, "").strip()]
        examples += [(len(anchor_texts) + i, Example(f"title:{d}", d)) for i, d in enumerate(titled)]
        anchor_texts += [data.titles[d] for d in titled]
    elif args.self_supervised == "crop":
        cropped = [d for d in doc_ids if data.docs[d].strip()]
        examples += [(len(anchor_texts) + i, Example(f"crop:{d}", d)) for i, d in enumerate(cropped)]
        anchor_texts += [cropped_span(d, data.docs[d]) for d in cropped]
    doc_texts = [data.docs[d] for d in doc_ids]
    anchors = pooled_features(model, anchor_texts, "queries", args.cache_dir)
    docs = pooled_features(model, doc_texts, "corpus", args.cache_dir)
    rows = _rows(find_head(model), args, examples, doc_row, anchors, docs, data.qrels)
    source = Source(name, range(len(anchor_texts)), range(len(doc_ids)), len(rows))
    if dev_qrels:
        source.dev_ids = sorted(dev_qrels)
        source.dev_texts = [data.queries[q] for q in source.dev_ids]
        source.dev_vectors = pooled_features(model, source.dev_texts, "queries", args.cache_dir)
        source.dev_qrels = dev_qrels
    return PreparedData(
        anchors, docs, doc_ids, rows, torch.zeros(len(rows), dtype=torch.long), anchor_texts, doc_texts, [source]
    )


def _rows(
    head: SBMoEHead | None,
    args: FinetuneArguments,
    examples: list[tuple[int, Example]],
    doc_row: dict[str, int],
    anchors: torch.Tensor,
    docs: torch.Tensor,
    qrels: dict[str, dict[str, int]],
) -> torch.Tensor:
    """``[anchor, positive, negatives...]`` rows: given negatives first, then ones mined with the initial model
    (never a document judged relevant to the anchor's query)."""
    cos = args.similarity == "cos"
    positives: dict[int, set[int]] = {}
    for row, example in examples:
        judged = [doc_row[d] for d in qrels.get(example.query, {}) if d in doc_row]
        positives.setdefault(row, set()).update([doc_row[example.positive], *judged])
    mined = np.zeros((len(anchors), 0), dtype=np.int64)
    if args.hard_negatives:
        wanted = [positives.get(i, set()) for i in range(len(anchors))]
        mined = mine_hard_negatives(
            embed(head, anchors, "query", cos), embed(head, docs, "document", cos), wanted, args.hard_negatives,
            args.negatives_skip,
        )  # fmt: skip
    rows = []
    for row, example in examples:
        given = [doc_row[n] for n in example.negatives if n in doc_row]
        negatives = (given + [int(m) for m in mined[row] if m not in given])[: max(args.hard_negatives, len(given))]
        rows.append([row, doc_row[example.positive], *negatives])
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


def dev_ndcg(head: SBMoEHead | None, prepared: PreparedData, cos: bool = True) -> float:
    """Mean over sources of the nDCG@10 of their dev queries against their own corpus, on cached vectors."""
    scores = []
    for source in prepared.sources:
        if not source.dev_ids:
            continue
        queries = embed(head, source.dev_vectors, "query", cos).numpy()
        docs = embed(head, prepared.docs[source.docs.start : source.docs.stop], "document", cos).numpy()
        result = evaluate_embeddings(
            queries, docs, source.dev_ids, prepared.doc_ids[source.docs.start : source.docs.stop], source.dev_qrels,
            top_k=100, metrics=("nDCG@10",),
        )  # fmt: skip
        scores.append(result["metrics"]["nDCG@10"])
    return float(np.mean(scores))


def reencode(model: SBMoEModel, prepared: PreparedData, cache_dir: str | None) -> None:
    """After full fine-tuning moved the backbone: encode the documents and dev queries again, per source."""
    prepared.docs = torch.cat(
        [pooled_features(model, prepared.doc_texts[s.docs.start : s.docs.stop], "corpus", cache_dir)
         for s in prepared.sources]
    )  # fmt: skip
    for source in prepared.sources:
        if source.dev_ids:
            source.dev_vectors = pooled_features(model, source.dev_texts, "queries", cache_dir)
