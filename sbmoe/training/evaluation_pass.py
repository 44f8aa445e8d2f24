"""The evaluation passes of fine-tuning: metrics with per-query values on each ``--eval-data`` set, expert use,
and a warning for experts that (nearly) no input reaches."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from sbmoe.data import RetrievalDataset, load_dataset
from sbmoe.evaluation.coverage import coverage, coverage_warnings
from sbmoe.evaluation.evaluate import evaluate_embeddings
from sbmoe.evaluation.metrics import per_query
from sbmoe.heads import SBMoEHead
from sbmoe.heads.moe_block import moe_blocks
from sbmoe.heads.stacked import StackedMoEHead
from sbmoe.heads.upcycle import MoETransformer
from sbmoe.model import SBMoEModel, find_head
from sbmoe.retrieval.encode import pooled_features
from sbmoe.training.arguments import FinetuneArguments
from sbmoe.training.head_trainer import embed

logger = logging.getLogger(__name__)
METRICS = ("nDCG@10", "MAP@100", "Recall@100", "MRR@10")
DEAD_EXPERT_SHARE = 0.01


def moe_utilization(model: SBMoEModel, args: FinetuneArguments, encoder_docs: int = 200) -> list[dict[str, Any]]:
    """Per MoE layer, top-1 expert shares over the documents of the first ``--eval-data`` set in eval mode: all of
    them for a stacked head (on the cached pooled vectors), the first ``encoder_docs`` for MoE layers in the backbone
    (encoded anew). Empty for a model without MoE layers or without eval data."""
    blocks, specs = moe_blocks(model), eval_specs(args)
    if not blocks or not specs:
        return []
    texts = [doc.full_text for doc in load_dataset(specs[0], data_dir=args.data.data_dir).iter_docs()]
    for block in blocks:
        block.reset_routing_stats()
    head = find_head(model)
    if isinstance(head, StackedMoEHead):
        embed(head, pooled_features(model, texts, "corpus", args.data.cache_dir), "document")
        return head.routing_stats()["layers"]
    model.eval()
    model.encode(texts[:encoder_docs], batch_size=32)
    transformer = model[0]
    return transformer.expert_utilization() if isinstance(transformer, MoETransformer) else []


def expert_choice(head: SBMoEHead, vectors: torch.Tensor) -> torch.Tensor:
    """Top-1 expert of each pooled vector (eval mode)."""
    head.eval()
    with torch.no_grad():
        return torch.cat([head({"sentence_embedding": b})["expert_index"] for b in vectors.split(4096)])


def utilization(chosen: torch.Tensor, num_experts: int, initial: torch.Tensor | None = None) -> dict[str, Any]:
    """Share of documents per expert, routing entropy (nats), and share whose expert changed since ``initial``."""
    shares = (torch.bincount(chosen, minlength=num_experts).float() / max(len(chosen), 1)).tolist()
    out: dict[str, Any] = {"shares": shares, "min_share": min(shares)}
    out["entropy"] = -sum(p * float(np.log(p)) for p in shares if p > 0)
    if initial is not None:
        out["changed_from_init"] = (chosen != initial).float().mean().item()
    return out


def evaluate(
    model: SBMoEModel, args: FinetuneArguments, routing_before: dict[str, torch.Tensor], use_head: bool = True
) -> dict[str, Any]:
    """Metrics, per-query values and expert utilization on each ``--eval-data`` set.

    Documents and queries go through the (cached) pooled backbone and then the head in eval mode, which is
    exactly what ``model.encode`` computes; ``use_head=False`` scores the backbone alone (the zero-shot baseline).

    Raises:
        DataError: an eval set with no query that can be scored (see :func:`~sbmoe.evaluation.coverage.coverage`).
    """
    results: dict[str, Any] = {}
    head, cos = find_head(model) if use_head else None, args.training.similarity == "cos"
    for spec in eval_specs(args):
        dataset = load_dataset(spec, data_dir=args.data.data_dir)
        counts = coverage(dataset)
        notes = coverage_warnings(spec, dataset, counts, args.data.keep_identical_ids)
        if not use_head:  # the zero-shot pass runs before training: warn then, once
            for line in notes:
                logger.warning(line)
        query_ids = list(dataset.queries)
        docs = list(dataset.iter_docs())
        doc_ids, doc_texts = [doc.id for doc in docs], [doc.full_text for doc in docs]
        doc_vectors = pooled_features(model, doc_texts, "corpus", args.data.cache_dir)
        queries = pooled_features(model, [dataset.queries[q] for q in query_ids], "queries", args.data.cache_dir)
        query_emb, doc_emb = embed(head, queries, "query", cos), embed(head, doc_vectors, "document", cos)
        result = evaluate_embeddings(
            query_emb.numpy(),
            doc_emb.numpy(),
            query_ids,
            doc_ids,
            dataset.qrels,
            top_k=1000,
            metrics=METRICS,
            relevance_level=dataset.relevance_level,
            ignore_identical_ids=not args.data.keep_identical_ids,
        )
        scores = per_query(dataset.qrels, result["run"], METRICS, dataset.relevance_level)
        results[spec] = {
            "metrics": result["metrics"],
            "num_queries": len(query_ids),
            "judged_queries": counts["judged"],
            "answerable_queries": counts["answerable"],
            "warnings": notes,
            "per_query": {name: {q: values[name] for q, values in scores.items()} for name in METRICS},
        }
        if head is not None and head.num_experts > 1:
            chosen = expert_choice(head, doc_vectors)
            results[spec]["experts"] = utilization(chosen, head.num_experts, routing_before.get(dataset.name))
    return results


def eval_specs(args: FinetuneArguments) -> list[str]:
    """The ``--eval-data`` entries."""
    return [s.strip() for s in args.data.eval_data.split(",") if s.strip()]


def initial_routing(model: SBMoEModel, args: FinetuneArguments) -> dict[str, torch.Tensor]:
    """Top-1 expert per document of each eval corpus before training (to count documents that change expert)."""
    head = find_head(model)
    if head is None or head.num_experts == 1:
        return {}
    out: dict[str, torch.Tensor] = {}
    for spec in eval_specs(args):
        dataset: RetrievalDataset = load_dataset(spec, data_dir=args.data.data_dir)
        if dataset.name not in out:
            texts = [doc.full_text for doc in dataset.iter_docs()]
            out[dataset.name] = expert_choice(head, pooled_features(model, texts, "corpus", args.data.cache_dir))
    return out


def dead_expert_warnings(
    evaluation: dict[str, Any], layers: list[dict[str, Any]], share: float = DEAD_EXPERT_SHARE
) -> list[str]:
    """One line per eval set or MoE layer where an expert takes under ``share`` of the inputs (top-1), naming them;
    ``evaluation`` is :func:`evaluate`'s result and ``layers`` :func:`moe_utilization`'s."""
    where = [(spec, result["experts"]["shares"]) for spec, result in evaluation.items() if "experts" in result]
    where += [(f"MoE layer {layer.get('layer', i)}", layer["shares"]) for i, layer in enumerate(layers)]
    lines = []
    for name, shares in where:
        dead = [f"{e} ({s:.1%})" for e, s in enumerate(shares) if s < share]
        if dead:
            lines.append(
                f"{name}: expert(s) {', '.join(dead)} get under {share:.0%} of the inputs; the router has collapsed "
                "onto the others (raise --aux-loss-weight, or use fewer experts)"
            )
    return lines
