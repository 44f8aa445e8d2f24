"""Training rows over cached pooled vectors, one slice per training source, and the dev score on them.

Each source keeps its own dev split, its own corpus (hard negatives are mined within it) and its own cache entries,
so adding a source never re-encodes the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sbmoe.data.splits import dev_split
from sbmoe.data.trainset import Example, TrainSet, cropped_span
from sbmoe.evaluation.evaluator import evaluate_embeddings
from sbmoe.model import SBMoEModel
from sbmoe.retrieval.encoder import Encoder, pooled_model
from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.mining import cached_negatives

logger = logging.getLogger(__name__)


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
    dev_split: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What run.json records of the source."""
        sizes = {"anchors": len(self.anchors), "docs": len(self.docs), "dev_queries": len(self.dev_ids)}
        return {"name": self.name, "examples": self.examples, **sizes, "dev_split": self.dev_split}


@dataclass
class PreparedData:
    """Training rows over cached vectors: anchors (queries, then titles), documents, example rows, sources.

    ``rows`` are ``[anchor row, positive doc row, negative doc rows...]`` into ``anchors`` and ``docs``, which
    concatenate the sources in order; ``row_source`` is each row's source index; ``relevant`` holds the
    ``(anchor row, doc row)`` pairs judged relevant, which the loss never uses as negatives.
    """

    anchors: torch.Tensor
    docs: torch.Tensor
    doc_ids: list[str]
    rows: torch.Tensor
    row_source: torch.Tensor
    anchor_texts: list[str]
    doc_texts: list[str]
    sources: list[Source]
    relevant: torch.Tensor

    @property
    def dev_queries(self) -> int:
        """Dev queries over all sources."""
        return sum(len(s.dev_ids) for s in self.sources)


def prepare(model: SBMoEModel, args: FinetuneArguments, sets: list[tuple[str, TrainSet]]) -> PreparedData:
    """Prepare each source (:func:`prepare_source`) and concatenate them; rows keep the width all sources have."""
    parts = [prepare_source(model, args, name, data) for name, data in sets]
    width = min(part.rows.shape[1] for part in parts)
    anchor_offset = doc_offset = 0
    rows, sources, relevant = [], [], []
    for part in parts:
        shift = torch.tensor([anchor_offset] + [doc_offset] * (width - 1))
        rows.append(part.rows[:, :width] + shift)
        relevant.append(part.relevant + torch.tensor([anchor_offset, doc_offset]))
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
        relevant=torch.cat(relevant),
    )


def prepare_source(model: SBMoEModel, args: FinetuneArguments, name: str, data: TrainSet) -> PreparedData:
    """Split off the dev queries, compute (cached) pooled backbone vectors, and mine hard negatives with them."""
    dev_qrels: dict[str, dict[str, int]] = {}
    split_summary: dict[str, Any] = {}
    if args.data.dev_queries:
        split = dev_split(data.qrels, args.data.dev_queries, name=name)
        dev_qrels, split_summary = split.dev, split.summary()
        data = data.restrict(set(split.train))
    doc_ids = list(data.docs)
    doc_row = {d: i for i, d in enumerate(doc_ids)}
    by_query: dict[str, list[Example]] = {}
    for example in data.examples:
        by_query.setdefault(example.query, []).append(example)
    query_ids = sorted(by_query)
    anchor_texts = [data.queries[q] for q in query_ids]
    examples = [(i, e) for i, q in enumerate(query_ids) for e in by_query[q]]
    if args.data.self_supervised == "title":
        titled = [d for d in doc_ids if data.titles.get(d, "").strip()]
        examples += [(len(anchor_texts) + i, Example(f"title:{d}", d)) for i, d in enumerate(titled)]
        anchor_texts += [data.titles[d] for d in titled]
    elif args.data.self_supervised == "crop":
        cropped = [d for d in doc_ids if data.docs[d].strip()]
        examples += [(len(anchor_texts) + i, Example(f"crop:{d}", d)) for i, d in enumerate(cropped)]
        anchor_texts += [cropped_span(d, data.docs[d]) for d in cropped]
    doc_texts = [data.docs[d] for d in doc_ids]
    counts = f"{len(doc_texts):,} documents and {len(anchor_texts):,} queries"
    logger.info("%s: backbone vectors of %s (encoded once, then reused from the cache)", name, counts)
    encoder = Encoder(model, args.data.cache_dir)
    anchors, docs = encoder.pooled(anchor_texts, "queries"), encoder.pooled(doc_texts, "corpus")
    backbone = Encoder(pooled_model(model, normalize=args.training.similarity == "cos"))
    rows, relevant = _rows(args, examples, doc_row, backbone, anchors, docs, data.qrels)
    source = Source(name, range(len(anchor_texts)), range(len(doc_ids)), len(rows), dev_split=split_summary)
    if dev_qrels:
        source.dev_ids = sorted(dev_qrels)
        source.dev_texts = [data.queries[q] for q in source.dev_ids]
        source.dev_vectors = encoder.pooled(source.dev_texts, "queries")
        source.dev_qrels = dev_qrels
    sources = torch.zeros(len(rows), dtype=torch.long)
    return PreparedData(anchors, docs, doc_ids, rows, sources, anchor_texts, doc_texts, [source], relevant)


def _rows(
    args: FinetuneArguments,
    examples: list[tuple[int, Example]],
    doc_row: dict[str, int],
    backbone: Encoder,
    anchors: torch.Tensor,
    docs: torch.Tensor,
    qrels: dict[str, dict[str, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[anchor, positive, negatives...]`` rows (given negatives first, then ones mined with the backbone alone,
    never a document judged relevant to the anchor) and the ``(anchor, doc)`` pairs judged relevant; ``backbone``
    is the backbone alone, which the negatives are mined with."""
    positives: dict[int, set[int]] = {}
    for row, example in examples:
        judged = [doc_row[d] for d in qrels.get(example.query, {}) if d in doc_row]
        positives.setdefault(row, set()).update([doc_row[example.positive], *judged])
    mined = np.zeros((len(anchors), 0), dtype=np.int64)
    if args.mining.hard_negatives:
        wanted = [positives.get(i, set()) for i in range(len(anchors))]
        query_emb = torch.from_numpy(backbone.tail(anchors, "query").vectors)
        doc_emb = torch.from_numpy(backbone.tail(docs, "document").vectors)
        mined = cached_negatives(query_emb, doc_emb, wanted, args.mining)
    rows = []
    for row, example in examples:
        given = [doc_row[n] for n in example.negatives if n in doc_row]
        negatives = (given + [int(m) for m in mined[row] if m not in given])[
            : max(args.mining.hard_negatives, len(given))
        ]
        rows.append([row, doc_row[example.positive], *negatives])
    width = min(len(r) for r in rows)
    relevant = torch.tensor([(a, d) for a, docs_of in sorted(positives.items()) for d in sorted(docs_of)])
    return torch.tensor([r[:width] for r in rows]), relevant.reshape(-1, 2)


SourceEncoder = Callable[["Source"], tuple[np.ndarray, np.ndarray]]


def dev_score(prepared: PreparedData, *, encode: SourceEncoder, weighting: str = "equal") -> dict[str, Any]:
    """nDCG@10 of each source's dev queries against its own corpus; ``encode(source)`` gives the source's dev query
    and document embeddings.

    Returns:
        ``{"metrics": {"nDCG@10": mean over sources (``equal``) or over all dev queries (``queries``)},
        "num_queries", "sources": {name: {"metrics", "per_query", "num_queries", "num_docs"}}}`` (each source's
        part as :func:`~sbmoe.evaluation.evaluator.evaluate_embeddings` gives it).
    """
    scores, sizes, sources = [], [], {}
    for source in prepared.sources:
        if not source.dev_ids:
            continue
        queries, docs = encode(source)
        doc_ids = prepared.doc_ids[source.docs.start : source.docs.stop]
        result = evaluate_embeddings(
            queries, docs, source.dev_ids, doc_ids, source.dev_qrels, top_k=100, metrics=("nDCG@10",)
        )
        sources[source.name] = {key: result[key] for key in ("metrics", "per_query", "num_queries", "num_docs")}
        scores.append(result["metrics"]["nDCG@10"])
        sizes.append(len(source.dev_ids))
    mean = float(np.average(scores, weights=sizes if weighting == "queries" else None))
    return {"metrics": {"nDCG@10": mean}, "num_queries": sum(sizes), "sources": sources}


def dev_ndcg(encoder: Encoder, prepared: PreparedData, *, weighting: str = "equal") -> dict[str, Any]:
    """:func:`dev_score` of ``encoder``'s model on the cached backbone vectors (its tail run on them)."""

    def encode(source: Source) -> tuple[np.ndarray, np.ndarray]:
        docs = prepared.docs[source.docs.start : source.docs.stop]
        return encoder.tail(source.dev_vectors, "query").vectors, encoder.tail(docs, "document").vectors

    return dev_score(prepared, encode=encode, weighting=weighting)


def dev_ndcg_full(model: SBMoEModel, prepared: PreparedData, *, weighting: str = "equal") -> dict[str, Any]:
    """:func:`dev_score` of the whole model as it is now (full fine-tuning: every text is encoded anew)."""

    def encode(source: Source) -> tuple[np.ndarray, np.ndarray]:
        texts = prepared.doc_texts[source.docs.start : source.docs.stop]
        queries = model.encode_query(source.dev_texts, batch_size=64, convert_to_numpy=True)
        return queries, model.encode_document(texts, batch_size=64, convert_to_numpy=True)

    return dev_score(prepared, encode=encode, weighting=weighting)


def reencode(model: SBMoEModel, prepared: PreparedData, cache_dir: str | None) -> None:
    """After full fine-tuning moved the backbone: encode the documents and dev queries again, per source."""
    encoder = Encoder(model, cache_dir)
    parts = [encoder.pooled(prepared.doc_texts[s.docs.start : s.docs.stop], "corpus") for s in prepared.sources]
    prepared.docs = torch.cat(parts)
    for source in prepared.sources:
        if source.dev_ids:
            source.dev_vectors = encoder.pooled(source.dev_texts, "queries")
